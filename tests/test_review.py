"""`loralab review`: a real lab-model run reviewed end to end (files, figures, recommendation, the run
folder untouched), the rule on known series, the image measures, and bad input without a traceback."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loralab.errors import LoralabError
from loralab.lab import demo as D
from loralab.lab import world as W
from loralab.review import measure as M
from loralab.review.recommend import overfit_alarm, recommend
from loralab.review.runlog import local_minima, read_run
from loralab.review.signals import EpochSignals

EPOCHS = 4


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    """A 4-epoch LoRA on the lab model with a validation split and max-norm, a file every epoch."""
    from loralab.recipes.lora import train

    root = tmp_path_factory.mktemp("review")
    W.write_kohya_dataset(root / "data", tag=D.TAG, n=10, repeats=2, seed=3)
    recipe = D.DemoRecipe(max_train_epochs=EPOCHS, unet_lr=3e-3, train_batch_size=4, seed=3,
                          extra={"validation_split": 0.2, "scale_weight_norms": 0.5})
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(D.train_config(recipe, root / "data", None, root / "out", "cpu"))
    finally:
        torch.set_num_threads(old)
    return root / "out"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "review" not in p.relative_to(folder).parts}


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "loralab.cli", "review", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_review_writes_its_files_and_leaves_the_run_alone(lab_run):
    before = _digest(lab_run)
    r = _cli(lab_run, "--device", "cpu", "--no-lab-scores", "--max-prompts", "3", "--weights", "0,1,2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _digest(lab_run) == before  # nothing but review/ changed
    out = lab_run / "review"
    data = json.loads((out / "review.json").read_text())
    assert 1 <= data["recommended_epoch"] <= EPOCHS
    assert sorted(int(e) for e in data["epochs"]) == list(range(EPOCHS + 1))
    run = read_run(lab_run)
    assert run.config["output_name"] == "olis" and run.config["validation_split"] == 0.2  # logged at the start
    assert run.config["pretrained_model_name_or_path"].endswith("lab_model.safetensors") and run.finished
    val = run.validation_losses()
    assert sorted(val) == list(range(1, EPOCHS + 1))
    assert data["recommended_epoch"] == min(val, key=lambda e: (val[e], e))  # the validation minimum
    assert f"recommended epoch: {data['recommended_epoch']}" in r.stdout
    text = (out / "review.md").read_text()
    for part in ("## Recommended epoch", "## Loss", "## Per epoch", "## Samples per epoch", "## LoRA weight sweep",
                 "## Memorisation", "## Max-norm (scale_weight_norms)",
                 f"## Where the activation tags act (epoch {data['recommended_epoch']})"):
        assert part in text, part
    assert "`olis` " in text.split("## Where the activation tags act")[1].split("##")[0]  # the tag's region share
    with Image.open(out / "attention.png") as im:  # the image and the map of olis, one row
        assert im.width > 2 * im.height - 60
    mn = run.max_norm_stats()
    assert mn["steps"] == run.steps()[-1]["step"] and f"{mn['steps_with_keys_scaled']} of {mn['steps']} steps" in text
    with Image.open(out / "grid.png") as grid:  # rows: base model + every epoch, cells scaled to 128 px
        assert grid.height >= (EPOCHS + 1) * 128
    with Image.open(out / "sweep.png") as sweep:
        assert sweep.height >= 128 * 3  # 3 weights of at least one epoch
    for name in ("loss.png", "signals.png"):
        with Image.open(out / name) as im:
            assert im.width >= 600
    e0 = data["epochs"]["0"]
    assert e0["change"] == 0.0 and len(e0["nearest"]) == 3  # 3 prompts, each with its nearest training image
    assert all(0.0 <= data["epochs"][str(e)]["change"] <= 1.0 for e in range(1, EPOCHS + 1))
    assert any(data["epochs"][str(e)]["change"] > 0.0 for e in range(1, EPOCHS + 1))  # the LoRA changes images


def test_review_with_lab_scores_and_own_prompts(lab_run, tmp_path):
    from loralab.lab.judge import lab_judge
    from loralab.review.review import ReviewOptions, review_run

    prompts = tmp_path / "p.txt"
    prompts.write_text("olis, red, white background, small --w 32 --h 32 --d 5 --s 8\n# a comment\n"
                       "blue circle, gray background, large --w 48 --h 32 --d 6 --s 8\n")
    res = review_run(lab_run, ReviewOptions(prompts=str(prompts), out=str(tmp_path / "rv"), device="cpu",
                                            weights=(0.0, 1.0)),
                     judge=lab_judge(lab_run, device="cpu", ev=D.QUICK_EVAL))
    assert sorted(res.judged) == list(range(EPOCHS + 1))
    assert res.judged[0]["concept"] <= 0.25 and all(0 <= v["score"] <= 1 for v in res.judged.values())
    text = res.report.read_text()
    assert "## Ground truth: the lab evaluator" in text and "lab: concept × retention" in text
    assert "`olis`" in text  # the trigger word found in the run's captions
    # the prompt without the trigger is a control; the one with it is a prompt with its own control
    assert "control: red, white background, small" not in text  # controls are in the grid, not the text
    data = json.loads((tmp_path / "rv" / "review.json").read_text())
    assert len(data["epochs"]["1"]["nearest"]) == 1


def test_bad_input_has_a_message_and_no_traceback(lab_run, tmp_path, tiny_sd1_checkpoint):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli(empty)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "has no train_log.jsonl" in r.stderr

    broken = tmp_path / "broken"
    shutil.copytree(lab_run, broken, ignore=shutil.ignore_patterns("review"))
    (broken / "olis-000002.safetensors").write_bytes((broken / "olis-000002.safetensors").read_bytes()[:5000])
    (broken / "olis-000003.safetensors").unlink()
    log = (broken / "train_log.jsonl").read_text().splitlines()
    (broken / "train_log.jsonl").write_text("\n".join(l for l in log if '"event": "done"' not in l) + "\n")
    run = read_run(broken)
    assert not run.finished  # an interrupted run (no `done` event) is reviewed as far as it got
    assert [e.epoch for e in run.epochs] == [1, 4]
    assert any("olis-000002.safetensors cannot be read" in p for p in run.problems)
    assert any("epochs 2, 3 finished in the log" in p for p in run.problems)
    before = _digest(broken)
    r = _cli(broken, "--model", tiny_sd1_checkpoint, "--no-lab-scores")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "does not fit the base model" in r.stderr and "olis" in r.stderr
    assert not (broken / "review").exists()  # a refused review leaves nothing behind
    bad = tmp_path / "bad.txt"
    bad.write_text("olis, red --zz 3\n")
    r = _cli(broken, "--prompts", bad, "--no-lab-scores")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "zz" in r.stderr
    for f in broken.glob("olis*.safetensors"):
        f.unlink()
    r = _cli(broken, "--no-lab-scores")
    assert r.returncode == 2 and "no readable LoRA file" in r.stderr
    assert {k: v for k, v in _digest(broken).items() if not k.startswith("olis")} == \
        {k: v for k, v in before.items() if not k.startswith("olis")}


# ------------------------------------------------------------------------------------------- the rule
def _sig(epoch, train=None, val=None, copies=0, burned=False, n=4):
    s = EpochSignals(epoch, train_loss=train, val_loss=val, copies=copies, burned=burned, saturation=1.8 if burned else 1.0)
    s.nearest = [0] * n
    return s


def test_rule_takes_the_validation_minimum_and_raises_the_alarm():
    sig = {0: _sig(0)} | {e: _sig(e, t, v) for e, t, v in
                          [(1, .08, .050), (2, .05, .041), (3, .04, .046), (4, .03, .052), (5, .02, .060)]}
    pick, reasons = recommend(sig)
    assert pick == 2 and "validation loss" in reasons[0]
    alarm, evidence = overfit_alarm(sig, pick)
    assert alarm and "rose from 0.0410 (epoch 2) to 0.0600 (epoch 5" in evidence[0]
    flat = {0: _sig(0)} | {e: _sig(e, .05 - e * .001, .040 - e * .0005) for e in range(1, 6)}
    assert recommend(flat)[0] == 5 and "still falling" in recommend(flat)[1][1]
    assert overfit_alarm(flat, 5) == (False, [])


def test_rule_without_validation_takes_the_last_local_minimum_and_vetoes_damage():
    losses = {1: .06, 2: .04, 3: .045, 4: .035, 5: .036}
    sig = {0: _sig(0)} | {e: _sig(e, t) for e, t in losses.items()}
    assert local_minima(losses) == [2, 4]
    assert recommend(sig)[0] == 4
    sig[4] = _sig(4, .035, copies=3)  # 3 of 4 images copy a training image
    pick, reasons = recommend(sig)
    assert pick == 3 and any("near-copies" in r for r in reasons)
    sig[4] = _sig(4, .035, burned=True)
    sig[4].sweep = {2.0: {"saturation": 2.1, "clipped": 0.0, "burned": True}}
    assert recommend(sig)[0] == 3
    sig[4].sweep = {2.0: {"saturation": 1.1, "clipped": 0.0, "burned": False}}  # burn not confirmed higher up
    assert recommend(sig)[0] == 4
    sig[5] = _sig(5, .036, copies=4)
    assert overfit_alarm(sig, 4)[0]


def test_local_minima_edges():
    assert local_minima({1: 1.0}) == []
    assert local_minima({1: 1.0, 2: 2.0}) == [1]
    assert local_minima({1: 2.0, 2: 1.0}) == [2]
    assert local_minima({1: 3.0, 2: 1.0, 3: 1.0, 4: 0.5}) == [2, 4]


# ------------------------------------------------------------------------------------------- measures
def test_image_measures():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    b = Image.fromarray(np.full((32, 48, 3), 128, np.uint8))
    assert M.change(a, a) == 0.0 and 0.2 < M.change(a, b) < 0.3
    thumbs = M.thumbnails([b, a])
    idx, sims = M.nearest(M.thumbnails([a]), thumbs)
    assert idx[0] == 1 and sims[0] == pytest.approx(1.0, abs=1e-5)
    grey = Image.fromarray(np.stack([np.full((8, 8), v, np.uint8) for v in (120, 100, 100)], -1))
    vivid = Image.fromarray(np.stack([np.full((8, 8), v, np.uint8) for v in (250, 20, 20)], -1))
    ratio, extra, burned = M.burned([vivid], [grey])
    assert ratio > 5 and burned
    assert M.burned([grey], [grey]) == (1.0, 0.0, False)


def test_draw_images_matches_generate_samples(tiny_sd1_model, tmp_path):
    from loralab.models.text import encode_captions, unet_text_conditioning
    from loralab.train.sampling import SamplePrompt, draw_images, generate_samples

    m = tiny_sd1_model

    def enc(texts):
        return unet_text_conditioning(m.family, encode_captions(m.family, m.text_encoders, m.tokenizers, texts))[0]

    prompts = [SamplePrompt("a red thing", width=64, height=64, steps=4, seed=3, scale=5.0),
               SamplePrompt("a blue thing", negative_prompt="dark", width=64, height=64, steps=4, scale=5.0),
               SamplePrompt("tall", width=64, height=96, steps=4, seed=9, scale=1.0)]
    common = dict(unet=m.unet, vae=m.vae, vae_scaling_factor=m.vae_scaling_factor, encode_prompt=enc,
                  scheduler_config=dict(m.noise_scheduler().config), device="cpu", default_seed=11, sampler="ddim")
    batched = draw_images(prompts, batch_size=4, **common)
    paths = generate_samples(prompts=prompts, out_dir=tmp_path, file_stem="s", **common)
    for im, p in zip(batched, paths):
        ref = np.asarray(Image.open(p)).astype(int)
        assert im.size == Image.open(p).size
        assert np.abs(np.asarray(im).astype(int) - ref).max() <= 2


def test_log_keeps_the_last_record_per_step(tmp_path):
    recs = [{"kind": "event", "event": "start", "step": 0, "epoch": 1, "config": {"output_name": "x"}}]
    recs += [{"kind": "step", "step": s, "epoch": 1, "loss/current": 1.0} for s in (1, 2, 3)]
    recs += [{"kind": "event", "event": "resumed", "step": 2, "epoch": 1, "config": {"output_name": "x"}}]
    recs += [{"kind": "step", "step": 3, "epoch": 1, "loss/current": 0.5}, {"kind": "epoch", "step": 3, "epoch": 1,
                                                                           "loss/epoch_average": 0.7}]
    (tmp_path / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    from loralab.network.lora import LoRANetwork  # noqa: F401  (a file is needed: write a minimal one)
    from safetensors.torch import save_file

    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(tmp_path / "x.safetensors"), {"ss_epoch": "1", "ss_steps": "3"})
    run = read_run(tmp_path)
    assert [r["loss/current"] for r in run.steps()] == [1.0, 1.0, 0.5]
    assert run.epoch_losses() == {1: 0.7} and run.output_name == "x" and run.epochs[0].steps == 3
    with pytest.raises(LoralabError, match="holds no run named 'y'"):
        read_run(tmp_path, "y")


def test_runs_of_two_output_names_share_a_log(tmp_path):
    from safetensors.torch import save_file

    recs = []
    for name, loss in (("a", 0.5), ("b", 0.25)):
        recs += [{"kind": "event", "event": "start", "step": 0, "epoch": 1, "config": {"output_name": name}},
                 {"kind": "step", "step": 1, "epoch": 1, "loss/current": loss},
                 {"kind": "epoch", "step": 1, "epoch": 1, "loss/epoch_average": loss},
                 {"kind": "event", "event": "done", "step": 1, "epoch": 1}]
        save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(tmp_path / f"{name}.safetensors"), {"ss_epoch": "1"})
    (tmp_path / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert read_run(tmp_path).output_name == "b"  # the last run logged
    assert read_run(tmp_path).epoch_losses() == {1: 0.25}
    assert read_run(tmp_path, "a").epoch_losses() == {1: 0.5} and read_run(tmp_path, "a").finished
    with pytest.raises(LoralabError, match="holds no run named 'c'"):
        read_run(tmp_path, "c")

