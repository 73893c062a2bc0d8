"""SDXL: conditioning (two encoders, pooled, size/crop micro-conditioning), training a tiny SDXL-architecture
single-file checkpoint end to end, diffusers loading our LoRA, text-encoder output caching and fp8_base (CPU)."""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from loralab.config import build_config
from loralab.data.text_encoder_cache import cache_text_encoder_outputs, te_outputs_npz_path
from loralab.errors import LoralabError
from loralab.models.fp8 import store_fp8
from loralab.models.loader import load_base_model, peek_family, save_single_file
from loralab.models.sdxl import batch_time_ids, sdxl_time_ids
from loralab.models.text import encode_captions, encode_text_sdxl, tokenize, unet_text_conditioning
from loralab.models.tiny import tiny_sd_components
from loralab.recipes.lora import train
from loralab.train.callbacks import Callback

# (image size w x h) -> its bucket (w, h) at resolution 64, buckets 32..128 step 32, and the micro-conditioning
# (orig_h, orig_w, crop_top, crop_left, target_h, target_w), unflipped and flipped, worked out by hand from
# kohya's get_crop_ltrb (image fitted inside the bucket, floats, int() at the end):
#   96x40 in 96x32: ar 2.4 < 3 -> fitted 76.8 x 32, left (96-76.8)//2 = 9, right 85.8, flipped left int(10.2) = 10
#   40x96 in 32x96: ar 0.4167 > 0.3333 -> fitted 32 x 76.8, top (96-76.8)//2 = 9
#   120x36 in 96x32: ar 3.333 > 3 -> fitted 96 x 28.8, top (32-28.8)//2 = 1
#   283x480 in 32x96: ar 0.5896 -> fitted 32 x 54.27, top 41.73//2 = 20
#   90x64 in 64x64: ar 1.406 -> fitted 64 x 45.51, top 18.49//2 = 9
#   93x40 in 96x32: ar 2.325 -> fitted 74.4 x 32, left 21.6//2 = 10, right 84.4, flipped left int(11.6) = 11
#   45x64 in 64x64: ar 0.7031 -> fitted 45 x 64, left 19//2 = 9, right 54, flipped left 10
TIME_IDS_TABLE = [
    ((64, 64), (64, 64), (64, 64, 0, 0, 64, 64), (64, 64, 0, 0, 64, 64)),
    ((96, 40), (96, 32), (40, 96, 0, 9, 32, 96), (40, 96, 0, 10, 32, 96)),
    ((40, 96), (32, 96), (96, 40, 9, 0, 96, 32), (96, 40, 9, 0, 96, 32)),
    ((120, 36), (96, 32), (36, 120, 1, 0, 32, 96), (36, 120, 1, 0, 32, 96)),
    ((283, 480), (32, 96), (480, 283, 20, 0, 96, 32), (480, 283, 20, 0, 96, 32)),
    ((90, 64), (64, 64), (64, 90, 9, 0, 64, 64), (64, 90, 9, 0, 64, 64)),
    ((93, 40), (96, 32), (40, 93, 0, 10, 32, 96), (40, 93, 0, 11, 32, 96)),
    ((45, 64), (64, 64), (64, 45, 0, 9, 64, 64), (64, 45, 0, 10, 64, 64)),
]


@pytest.fixture(scope="module")
def tiny_sdxl_checkpoint(tmp_path_factory) -> Path:
    """A tiny random SDXL-architecture model (CLIP-L + bigG-style TE2 with projection, text_time UNet) saved in
    the SGM single-file layout (model.diffusion_model.*, conditioner.embedders.0/1.*, first_stage_model.*)."""
    c = tiny_sd_components("sdxl", seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors"
    save_single_file(path, c["unet"], c["vae"], [c["text_encoder"], c["text_encoder_2"]], family="sdxl",
                     dtype=torch.float32)
    return path


def make_images(root: Path, sizes, captions=None) -> Path:
    img_dir = root / "img"
    d = img_dir / "2_chara"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"i{i}.png")
        (d / f"i{i}.txt").write_text(captions[i] if captions else f"chara, tag{i}, blue background")
    return img_dir


def cfg_dict(ckpt: Path, img: Path, out: Path, **kw) -> dict:
    d = {"pretrained_model_name_or_path": str(ckpt), "train_data_dir": str(img), "output_dir": str(out),
         "output_name": "xl", "resolution": "64", "network_dim": "4", "network_alpha": "2", "learning_rate": "1e-3",
         "train_batch_size": "2", "seed": "3", "save_precision": "float", "device": "cpu",
         "enable_bucket": "true", "min_bucket_reso": "32", "max_bucket_reso": "128", "bucket_reso_steps": "32"}
    d.update({k: str(v) for k, v in kw.items()})
    return d


@contextmanager
def collect_loader_warnings():
    """Warnings and WARNING+ log records from diffusers, peft and transformers."""
    records: list[str] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    h = H(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(h)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records
    for lg in loggers:
        lg.removeHandler(h)
    records += [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("size,bucket,plain,flipped", TIME_IDS_TABLE)
def test_time_ids_table(size, bucket, plain, flipped):
    assert sdxl_time_ids(size, bucket) == plain
    assert sdxl_time_ids(size, bucket, flipped=True) == flipped
    ids = batch_time_ids([size, size], [bucket, bucket], [False, True])
    assert ids.dtype == torch.long and ids.tolist() == [list(plain), list(flipped)]


def test_encode_text_sdxl_matches_the_rule(tiny_sdxl_checkpoint):
    m = load_base_model(tiny_sdxl_checkpoint)
    te1, te2 = m.text_encoders
    tok1, tok2 = m.tokenizers
    assert (tok1.pad_token_id, tok2.pad_token_id) == (49407, 0)  # bigG pads with 0 (formats.md §4)
    caps = ["chara, red hair", ""]
    with torch.no_grad():
        h1, h2, pool = encode_captions("sdxl", m.text_encoders, m.tokenizers, caps)
        ids1, ids2 = tokenize(tok1, caps), tokenize(tok2, caps)
        assert ids2[0, -1] == 0 and ids1[0, -1] == 49407
        o1 = te1(ids1, output_hidden_states=True)
        o2 = te2(ids2, output_hidden_states=True)
        assert torch.equal(h1, o1.hidden_states[-2]) and torch.equal(h2, o2.hidden_states[-2])  # no final norm
        assert not torch.allclose(h1, o1.last_hidden_state)
        assert torch.allclose(pool, o2.text_embeds, atol=1e-6)  # EOS is the largest id: same as HF's pooling
        hidden, added = unet_text_conditioning("sdxl", (h1, h2, pool))
        assert hidden.shape == (2, 77, 32 + 48) and added["text_embeds"].shape == (2, 32)
        # max_token_length 150: each 77-chunk encoded alone, joined kohya's way; pool of the first chunk
        long = ", ".join(f"tag{i}" for i in range(50))
        l1, l2, lp = encode_captions("sdxl", m.text_encoders, m.tokenizers, [long, "x"], max_token_length=150)
        assert l1.shape == (2, 152, 32) and l2.shape == (2, 152, 48) and lp.shape == (2, 32)
        ids2 = tokenize(tok2, [long, "x"], 150)
        first = te2(ids2[:, :77], output_hidden_states=True)
        assert torch.allclose(lp, first.text_embeds, atol=1e-6)
        assert torch.equal(l2[:, :76], first.hidden_states[-2][:, :76])
        again = encode_text_sdxl(m.text_encoders, [tokenize(tok1, [long, "x"], 150), ids2], tok2.eos_token_id)
        assert torch.equal(again[0], l1)


def test_peek_family_reads_only_the_keys(tiny_sdxl_checkpoint, tiny_sd1_checkpoint, tmp_path):
    assert peek_family(tiny_sdxl_checkpoint) == "sdxl" and peek_family(tiny_sd1_checkpoint) == "sd1"
    assert peek_family(tmp_path / "missing.safetensors") is None


# ---------------------------------------------------------------------------------------------- one training run


@pytest.fixture(scope="module")
def trained(tiny_sdxl_checkpoint, tmp_path_factory):
    """2 epochs on images of three bucket shapes (bucket_reso_steps 32), flip_aug, both text encoders trained,
    sample images with the default sampler; records every time_ids the UNet gets while training."""
    root = tmp_path_factory.mktemp("xl_run")
    img = make_images(root, [s for s, *_ in TIME_IDS_TABLE])
    prompts = root / "prompts.txt"
    prompts.write_text("chara, red hair --w 64 --h 96 --d 1 --s 3 --l 4\n")
    seen: list[tuple[list[int], bool]] = []
    state = {}

    def capture(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        seen.append((added["time_ids"].tolist(), torch.is_grad_enabled()))

    class Start(Callback):
        def on_train_start(self, run):
            state["ctx"] = run
            run.model.unet.register_forward_pre_hook(capture, with_kwargs=True)

    cfg = build_config(None, cfg_dict(tiny_sdxl_checkpoint, img, root / "out", max_train_epochs=2, flip_aug="true",
                                      sample_prompts=prompts, sample_every_n_epochs=2, text_encoder_lr="2e-3",
                                      save_every_n_epochs=1))
    result = train(cfg, [Start()])
    return {"result": result, "ctx": state["ctx"], "seen": seen, "ckpt": tiny_sdxl_checkpoint, "root": root}


def test_training_runs_two_epochs_with_buckets(trained):
    result = trained["result"]
    assert result.epochs == 2 and result.global_step > 0
    assert (trained["root"] / "out" / "xl-000001.safetensors").is_file() and result.final_file.is_file()
    with safe_open(str(result.final_file), "pt") as f:
        md, keys = f.metadata(), list(f.keys())
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    buckets = {tuple(b["resolution"]) for b in json.loads(md["ss_bucket_info"])["buckets"].values()}
    assert buckets == {(32, 96), (64, 64), (96, 32)}  # three aspect ratios, steps of 32
    assert any(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_output_blocks_") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    # the default sampler for SDXL samples is euler_a
    pngs = sorted((trained["root"] / "out" / "sample").glob("xl_e000002_*.png"))
    assert len(pngs) == 1 and "Sampler: euler_a" in Image.open(pngs[0]).text["parameters"]


def test_micro_conditioning_reaching_the_unet_is_kohyas(trained):
    """Every training row of time_ids equals the hand table for its image (unflipped or flipped); the image is
    recognised by its original size. Sample calls get (h, w, 0, 0, h, w)."""
    expected = {(plain[0], plain[1]): (plain, flipped) for _, _, plain, flipped in TIME_IDS_TABLE}
    rows = [tuple(r) for ids, grad in trained["seen"] if grad for r in ids]
    assert len(rows) >= 2 * 2 * len(TIME_IDS_TABLE)  # 2 epochs x 2 repeats x images
    seen_images, seen_flips = set(), set()
    for r in rows:
        plain, flipped = expected[r[:2]]
        assert r in (plain, flipped), (r, plain, flipped)
        seen_images.add(r[:2])
        if plain != flipped:
            seen_flips.add(r == flipped)
    assert seen_images == set(expected)
    assert seen_flips == {True, False}  # images whose crop differs when mirrored were trained both ways
    sample_rows = {tuple(r) for ids, grad in trained["seen"] if not grad for r in ids}
    assert sample_rows == {(96, 64, 0, 0, 96, 64)}


def test_diffusers_sdxl_pipeline_loads_our_lora_identically(trained):
    """The saved file through diffusers' StableDiffusionXLPipeline.load_lora_weights: no unexpected or missing
    keys, and the UNet and both text encoders compute what our in-memory trained network computes."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    ctx = trained["ctx"]
    ours, net = ctx.model, ctx.network
    ref = load_base_model(trained["ckpt"])
    pipe = StableDiffusionXLPipeline(vae=ref.vae, text_encoder=ref.text_encoders[0], text_encoder_2=ref.text_encoders[1],
                                     tokenizer=ref.tokenizers[0], tokenizer_2=ref.tokenizers[1], unet=ref.unet,
                                     scheduler=EulerDiscreteScheduler())
    with collect_loader_warnings() as msgs:
        pipe.load_lora_weights(str(trained["result"].final_file))
    assert not [m for m in msgs if re.search(r"unexpected|missing|not found|not been|unsuccessful|unconverted", m, re.I)], msgs
    assert sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) == len(net.unet_loras)
    te_counts = [sum(isinstance(m, LoraLayer) for m in te.modules()) for te in (pipe.text_encoder, pipe.text_encoder_2)]
    assert sum(te_counts) == len(net.text_encoder_loras) and all(te_counts)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    kw = dict(sample=torch.randn(2, 4, 32, 16, generator=g), timestep=torch.tensor([10, 700]),
              encoder_hidden_states=torch.randn(2, 77, 80, generator=g),
              added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g),
                                 "time_ids": batch_time_ids([(96, 40), (283, 480)], [(96, 32), (32, 96)], [False, True])})
    net.apply_to()
    net.eval()
    try:
        with torch.no_grad():
            mine = [ours.unet(**kw).sample] + [te(ids, output_hidden_states=True) for te in ours.text_encoders]
            theirs = [pipe.unet(**kw).sample] + [te(ids, output_hidden_states=True)
                                                 for te in (pipe.text_encoder, pipe.text_encoder_2)]
            net.restore()
            base = ours.unet(**kw).sample
            base_te2 = ours.text_encoders[1](ids, output_hidden_states=True)
    finally:
        net.restore()
    assert (mine[0] - base).abs().max() > 1e-4  # the trained LoRA changes the UNet
    assert (mine[2].hidden_states[-2] - base_te2.hidden_states[-2]).abs().max() > 1e-5  # and bigG
    assert (mine[0] - theirs[0]).abs().max() < 1e-4
    for a, b in zip(mine[1:], theirs[1:]):
        assert (a.hidden_states[-2] - b.hidden_states[-2]).abs().max() < 1e-4
        assert (a.last_hidden_state - b.last_hidden_state).abs().max() < 1e-4
    assert (mine[2].text_embeds - theirs[2].text_embeds).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------- TE output cache


def test_cached_text_encoder_outputs_give_the_same_loss(tiny_sdxl_checkpoint, tmp_path):
    """Text encoders frozen: a step with cached outputs (memory, then disk) has the same loss as encoding each
    step (same seed), with caption dropout handled by the cached empty caption."""
    img = make_images(tmp_path, [(64, 64), (96, 40), (40, 96), (64, 64)])
    common = dict(max_train_steps=2, network_train_unet_only="true", caption_dropout_rate="0.5", flip_aug="true")
    plain = train(build_config(None, cfg_dict(tiny_sdxl_checkpoint, img, tmp_path / "a", **common)))
    cached = train(build_config(None, cfg_dict(tiny_sdxl_checkpoint, img, tmp_path / "b",
                                               cache_text_encoder_outputs="true", **common)))
    disk = train(build_config(None, cfg_dict(tiny_sdxl_checkpoint, img, tmp_path / "c",
                                             cache_text_encoder_outputs_to_disk="true", **common)))
    losses = [[json.loads(line)["loss/current"] for line in r.log_file.read_text().splitlines() if '"kind": "step"' in line]
              for r in (plain, cached, disk)]
    assert len(losses[0]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    files = sorted((img / "2_chara").glob("*_te_outputs.npz"))
    assert [f.name for f in files] == [f"i{i}_te_outputs.npz" for i in range(4)]  # kohya's name
    with np.load(files[0]) as npz:
        assert npz["hidden_state1"].shape == (77, 32) and npz["hidden_state2"].shape == (77, 48)
        assert npz["pool2"].shape == (32,)


def test_text_encoder_disk_cache_is_rebuilt_when_caption_or_encoders_change(tmp_path):
    img = make_images(tmp_path, [(64, 64), (64, 64)], captions=["a", "b"])
    paths = sorted((img / "2_chara").glob("*.png"))
    calls: list[list[str]] = []

    def encode(captions):
        calls.append(list(captions))
        x = torch.tensor([[float(len(c)), 1.0] for c in captions])
        return x[:, None, :].repeat(1, 3, 1), x

    names = ("hidden_state", "pool")
    run = lambda items, enc="v1": cache_text_encoder_outputs(items, encode, names=names, to_disk=True,  # noqa: E731
                                                             encoders=enc, extra_captions=[""], progress=False)
    c1 = run([(paths[0], "a"), (paths[1], "b")])
    assert calls == [["a"], ["b"], [""]] and te_outputs_npz_path(paths[0]).is_file()
    assert c1.get(["b", ""])[1].tolist() == [[1.0, 1.0], [0.0, 1.0]]
    calls.clear()
    c2 = run([(paths[0], "a"), (paths[1], "b")])
    assert calls == [[""]] and c2.num_loaded == 2  # both read back; "" is memory-only
    calls.clear()
    run([(paths[0], "a"), (paths[1], "b, new tag")])  # caption edited: that file is rebuilt
    assert calls == [["b, new tag"], [""]]
    calls.clear()
    run([(paths[0], "a"), (paths[1], "b, new tag")], enc="v2")  # other encoders: everything is rebuilt
    assert calls == [["a"], ["b, new tag"], [""]]


@pytest.mark.parametrize("opts,match", [
    ({"shuffle_caption": "true"}, "shuffle_caption"),
    ({"caption_tag_dropout_rate": "0.1"}, "caption_tag_dropout_rate"),
    ({"enable_wildcard": "true"}, "enable_wildcard"),
    ({"network_train_unet_only": "false"}, "network_train_unet_only"),
])
def test_text_encoder_cache_refuses_what_it_cannot_cache(tiny_sdxl_checkpoint, tmp_path, opts, match):
    img = make_images(tmp_path, [(64, 64)])
    d = cfg_dict(tiny_sdxl_checkpoint, img, tmp_path / "o", cache_text_encoder_outputs="true",
                 network_train_unet_only="true")
    d.update(opts)
    with pytest.raises(LoralabError, match=f"cache_text_encoder_outputs.*{match}"):
        build_config(None, d)
    if "network_train_unet_only" in opts:
        build_config(None, dict(d, text_encoder_lr="0"))  # text_encoder_lr = 0 freezes them too


# ---------------------------------------------------------------------------------------------- fp8_base


def fp8_supported() -> bool:
    try:
        torch.ones(1).to(torch.float8_e4m3fn).to(torch.bfloat16)
        return True
    except (AttributeError, RuntimeError, TypeError):
        return False


def test_fp8_base_refused_without_mixed_precision(tiny_sdxl_checkpoint, tmp_path):
    img = make_images(tmp_path, [(64, 64)])
    with pytest.raises(LoralabError, match="fp8_base.*mixed_precision"):
        build_config(None, cfg_dict(tiny_sdxl_checkpoint, img, tmp_path / "o", fp8_base="true"))


@pytest.mark.parametrize("layer", [torch.nn.Linear(8, 4), torch.nn.Conv2d(3, 5, 3, padding=1, stride=2)])
def test_store_fp8_equals_a_bf16_layer_with_rounded_weights(layer):
    """Forward and input gradient of a float8-stored layer == a bf16 layer holding the float8-rounded weights."""
    if not fp8_supported():
        pytest.skip("this torch cannot store float8")
    torch.manual_seed(0)
    layer.requires_grad_(False)
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        ref.weight.copy_(ref.weight.to(torch.float8_e4m3fn).float())
    ref.bfloat16()
    assert store_fp8(layer, torch.bfloat16) == 1 and layer.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(2, 8) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 3, 7, 7)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = layer(x1), ref(x2.bfloat16())
    assert y1.dtype == torch.bfloat16 and torch.equal(y1, y2)
    y1.float().square().sum().backward()
    y2.float().square().sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_fp8_base_training_on_cpu(tiny_sdxl_checkpoint, tmp_path):
    img = make_images(tmp_path, [(64, 64), (96, 40)])
    d = cfg_dict(tiny_sdxl_checkpoint, img, tmp_path / "out", max_train_steps=2, fp8_base="true",
                 mixed_precision="bf16", network_train_unet_only="true", cache_text_encoder_outputs="true",
                 gradient_checkpointing="true")
    if not fp8_supported():
        with pytest.raises(LoralabError, match="fp8_base"):
            train(build_config(None, d))
        return
    dtypes = {}

    class Start(Callback):
        def on_train_start(self, run):
            dtypes.update({type(m).__name__: m.weight.dtype for m in run.model.unet.modules()
                           if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))})

    result = train(build_config(None, d), [Start()])
    assert dtypes == {"Linear": torch.float8_e4m3fn, "Conv2d": torch.float8_e4m3fn}
    with safe_open(str(result.final_file), "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(t).all() for t in ups) and any(t.abs().sum() > 0 for t in ups)
    assert np.isfinite(result.last_loss)


def test_sdxl_diffusers_folder_loads_with_bigg_pad_zero(tmp_path):
    """A diffusers SDXL folder whose tokenizer_2 pads with <|endoftext|> still encodes with pad id 0 (kohya)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from loralab.models.tokenizer import clip_tokenizer

    c = tiny_sd_components("sdxl", seed=1)
    pipe = StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=c["unet"],
                                     scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(tmp_path / "xl")
    assert peek_family(tmp_path / "xl") == "sdxl"
    m = load_base_model(tmp_path / "xl")
    assert m.family == "sdxl" and [t.pad_token_id for t in m.tokenizers] == [49407, 0]
    assert m.vae_scaling_factor == 0.13025
