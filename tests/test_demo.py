"""`loralab demo` (loralab.lab.demo): a short LoRA on the shipped lab model really learns the new shape
(scored by the lab evaluator), the prompt sets keep test and training data apart, the epoch rule, and a
quick end-to-end run writes its files. Torch runs on one thread here: on busy shared cores the tiny
model's kernels get many times slower with more threads (see `choose_threads`)."""

from __future__ import annotations

import json
import re

import torch
from PIL import Image

from loralab.lab import demo as D
from loralab.lab import world as W



def _score(epoch: int, concept: float, retention: float) -> D.EpochScore:
    return D.EpochScore(epoch, concept, 0.5, {"shape": 0.9, "colour": 1.0, "background": 1.0},
                        {"shape": retention, "colour": 1.0, "background": 1.0, "min": retention}, 0.0)


def test_recommend_epoch_rule():
    base = _score(0, 0.0, 1.0)
    # the earliest epoch meeting both bars, even when a later one has more concept
    pick, why = D.recommend_epoch([base, _score(1, 0.5, 1.0), _score(2, 0.85, 0.95), _score(3, 0.95, 0.92)])
    assert pick.epoch == 2 and "earliest" in why
    # a later epoch that damages the base prompts is not picked
    pick, _ = D.recommend_epoch([base, _score(1, 0.9, 0.8), _score(2, 0.8, 0.9)])
    assert pick.epoch == 2
    # none meets both: the best trade-off min(concept/0.8, retention/0.9), never the base model
    pick, why = D.recommend_epoch([base, _score(1, 0.4, 1.0), _score(2, 0.7, 0.85), _score(3, 0.9, 0.6)])
    assert pick.epoch == 2 and "no epoch" in why


def test_prompt_sets_keep_test_and_training_apart(tmp_path):
    folder = W.write_kohya_dataset(tmp_path, tag=D.TAG, n=15, repeats=10, seed=0)
    pairs = D.dataset_pairs(folder)
    assert len(pairs) == 15
    tags = D.tag_prompts(24, pairs)
    assert len(tags) == 24 and len({(t.colour, t.background) for t in tags}) == 24
    assert not {(t.colour, t.background) for t in tags} & pairs  # new colour pairs: not copies of the dataset
    assert {(t.width, t.height) for t in tags} == set(W.DEFAULT_IMAGE_SIZES)
    assert all(t.caption(tag=D.TAG).startswith(D.TAG + ", ") for t in tags)
    base = D.base_prompts(52)
    assert {b.triple for b in base} == set(W.HELD_OUT_TRIPLES)
    reg = D.class_prompts(150)
    assert not {r.triple for r in reg} & set(W.HELD_OUT_TRIPLES)  # retention is measured on unseen prompts
    assert {r.shape for r in reg} == set(W.TRAIN_SHAPES) and {r.size for r in reg} == set(W.SIZES)
    assert D.class_prompts(150) == reg  # fixed seeds


def test_lab_model_samples_through_the_one_sampler(monkeypatch, one_thread):
    """`LabModel.generate` draws with `loralab.train.sampling.denoise` (one batch per image size, CFG batch
    [negatives, positives]) and the lab's DDIM schedule; image i's noise is seeded seed + item.seed + i, so an
    image does not depend on the others."""
    import loralab.train.sampling as S
    from loralab.lab.model import SCHEDULER_CONFIG, LabModel

    calls = []
    denoise = S.denoise

    def spy(**kw):
        calls.append((kw["cond"].shape[0], tuple(kw["noise"].shape), kw["sampler"].config.steps_offset))
        return denoise(**kw)

    monkeypatch.setattr(S, "denoise", spy)
    model = LabModel.load("cpu")
    items = [W.WorldItem("circle", "red", "blue", "large", 32, 32, seed=3),
             W.WorldItem("square", "white", "gray", "small", 48, 32, seed=5),
             W.WorldItem("triangle", "green", "black", "small", 32, 32, seed=8)]
    prompts = [it.caption() for it in items]
    imgs = model.generate(items, prompts, steps=3, cfg=7.5, seed=1)
    assert [tuple(im.shape) for im in imgs] == [(3, 32, 32), (3, 32, 48), (3, 32, 32)]
    assert all(im.min() >= 0 and im.max() <= 255 and torch.equal(im, im.round()) for im in imgs)
    offset = SCHEDULER_CONFIG["steps_offset"]
    assert sorted(calls) == [(2, (1, 4, 8, 12), offset), (4, (2, 4, 8, 8), offset)]  # latents (h/4, w/4)
    alone = model.generate(items[1:2], prompts[1:2], steps=3, cfg=7.5, seed=2)  # same noise: 1 + 5 + 1 = 2 + 5 + 0
    assert (alone[0] - imgs[1]).abs().max() <= 1
    alone = model.generate(items[2:], prompts[2:], steps=3, cfg=7.5, seed=3)  # 1 + 8 + 2 = 3 + 8 + 0, batch of 1
    assert (alone[0] - imgs[2]).abs().max() <= 1


def test_short_lora_learns_the_new_shape(tmp_path, one_thread):
    """~120 steps of UNet-only LoRA on 15 ring images: prompts with the tag turn into rings."""
    from loralab.lab.evaluator import Evaluator
    from loralab.lab.model import evaluator_path
    from loralab.recipes.lora import train

    folder = W.write_kohya_dataset(tmp_path / "data", tag=D.TAG, n=15, repeats=10, seed=0)
    recipe = D.DemoRecipe(max_train_epochs=3, unet_lr=2e-3, seed=0)
    cfg = D.train_config(recipe, tmp_path / "data", None, tmp_path / "out", "cpu")
    result = train(cfg)
    assert result.global_step == 3 * 39 and result.final_file.is_file()

    ev = D.DemoEval(n_tag_prompts=16, n_base_prompts=0, ddim_steps=15)
    model = D.LabModel.load("cpu")
    evaluator = Evaluator.load(evaluator_path())
    items = D.tag_prompts(ev.n_tag_prompts, D.dataset_pairs(folder))

    def ring_rate(lora):
        imgs, _ = D.evaluate_lora(model, lora, items, [], ev)
        return sum(p["shape"] == W.HELD_OUT_SHAPE for p in evaluator.predict(imgs)) / len(items)

    before, after = ring_rate(None), ring_rate(result.final_file)
    assert before <= 0.1
    assert after >= 0.6 and after >= before + 0.5, (before, after)

    # the demo's scoring (LoRA merged into the weights, tag and base prompts in one batch per image size)
    # draws what the hooked network draws list by list, up to float rounding, and the evaluator reads the same
    from loralab.network.lora import LoRANetwork

    base = D.base_prompts(52)[::9]
    weights = {k: v.clone() for k, v in model.unet.state_dict().items()}
    tag_imgs, base_imgs = D.evaluate_lora(model, result.final_file, items, base, ev)
    assert all(torch.equal(v, weights[k]) for k, v in model.unet.state_dict().items())  # weights restored exactly
    net = LoRANetwork.from_weights(str(result.final_file), model.unet, [model.te], "sd1")
    net.eval()
    net.apply_to()
    try:
        ref_tag = model.generate(items, [it.caption(tag=D.TAG) for it in items], steps=15, cfg=7.5, seed=0)
        ref_base = model.generate(base, [it.caption() for it in base], steps=15, cfg=7.5, seed=0)
    finally:
        net.restore()
    for new, ref in ((tag_imgs, ref_tag), (base_imgs, ref_base)):
        diff = torch.stack([(a - b).abs().max() for a, b in zip(new, ref)])
        assert float(diff.max()) <= 8 and float(diff.float().mean()) <= 2, diff
        read = lambda imgs: [{k: p[k] for k in ("shape", "colour", "background", "size")}  # noqa: E731
                             for p in evaluator.predict(imgs)]
        assert read(new) == read(ref)


def test_quick_demo_writes_grids_loss_and_report(tmp_path):
    out = tmp_path / "demo"
    report = D.run_demo(out, "cpu", quick=True, threads=1)
    assert report == out / "report.md" and report.is_file()
    epochs = D.QUICK_RECIPE.max_train_epochs
    for name in ("grid_reg.png", "grid_noreg.png", "loss_reg.png", "loss_noreg.png"):
        with Image.open(out / name) as im:
            assert im.width > 100 and im.height > 100
    with Image.open(out / "grid_reg.png") as grid:  # rows: base model + each epoch; 96 px tall cells and more
        assert grid.height > (epochs + 1) * 96
    assert len(list((out / "dataset" / f"{D.QUICK_RECIPE.repeats}_{D.TAG}").glob("*.png"))) == D.QUICK_RECIPE.n_images
    reg_imgs = sorted((out / "reg" / f"1_{D.CLASS_NAME}").glob("*.png"))
    assert len(reg_imgs) == D.QUICK_RECIPE.n_reg
    assert W.parse_caption(reg_imgs[0].with_suffix(".txt").read_text().strip())["shape"] in W.TRAIN_SHAPES
    for run in ("train_reg", "train_noreg"):
        assert (out / run / f"{D.TAG}.safetensors").is_file()
        assert (out / run / f"{D.TAG}-000001.safetensors").is_file()
    text = report.read_text()
    assert "## Recommended epoch" in text and "Rule:" in text
    rows = [line for line in text.splitlines() if re.match(r"\| (base model \||\**\d)", line)]
    assert len(rows) == 2 * (epochs + 1)  # one table per run: base model + every epoch
    data = json.loads((out / "results.json").read_text())
    assert set(data["runs"]) == {"reg", "noreg"}
    assert 1 <= data["recommended"]["epoch"] <= epochs
    assert (out / data["recommended"]["file"]).is_file()
    # every run is reviewed by `loralab review` (same code), with the evaluator only as its ground truth
    assert "## What `loralab review` recommends, without the evaluator" in text
    for name in ("reg", "noreg"):
        rv = data["runs"][name]["review"]
        assert 1 <= rv["epoch"] <= epochs and 0.0 <= rv["share_of_best"] <= 1.0
        review = json.loads((out / f"train_{name}" / "review" / "review.json").read_text())
        assert review["recommended_epoch"] == rv["epoch"]
        assert sorted(review["judged"]) == [str(e) for e in range(epochs + 1)]
        assert (out / f"train_{name}" / "review" / "grid.png").is_file()
