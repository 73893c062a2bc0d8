"""End-to-end training on a tiny SD1-architecture single-file checkpoint (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.recipes.lora import train
from loralab.train.callbacks import Callback


def make_dataset(root: Path, *, concepts=(("3_alpha", 3), ("2_beta", 2)), reg=True, size=(64, 64)) -> tuple[Path, Path | None]:
    rng = np.random.default_rng(0)
    img_dir = root / "img"
    for name, n in concepts:
        d = img_dir / name
        d.mkdir(parents=True)
        tag = name.split("_", 1)[1]
        for i in range(n):
            w, h = size if i % 2 == 0 else (size[0], size[1] + 32)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{tag}{i}.png")
            (d / f"{tag}{i}.txt").write_text(f"{tag}, red, blue background, tag{i}")
    reg_dir = None
    if reg:
        reg_dir = root / "reg"
        d = reg_dir / "1_thing"
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"r{i}.png")
    return img_dir, reg_dir


def base_cfg(ckpt: Path, img: Path, out: Path, **kw) -> dict:
    d = {"pretrained_model_name_or_path": str(ckpt), "train_data_dir": str(img), "output_dir": str(out),
         "output_name": "lora", "resolution": "64", "network_dim": "4", "network_alpha": "2", "learning_rate": "1e-3",
         "train_batch_size": "2", "seed": "1", "save_precision": "float", "device": "cpu"}
    d.update({k: str(v) for k, v in kw.items()})
    return d


def test_two_epochs_with_concepts_reg_buckets_samples_and_logs(tmp_path, tiny_sd1_checkpoint):
    img, reg = make_dataset(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alpha, red --w 64 --h 64 --d 5 --s 3 --l 4\n# comment\nbeta --n blurry --w 64 --h 96 --s 2\n")
    cfg = build_config(None, base_cfg(
        tiny_sd1_checkpoint, img, tmp_path / "out", reg_data_dir=reg, max_train_epochs=2, save_every_n_epochs=1,
        enable_bucket="true", min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32, sample_prompts=prompts,
        sample_every_n_epochs=1, logging_dir=tmp_path / "logs", shuffle_caption="true", keep_tokens=1))
    result = train(cfg)
    out = tmp_path / "out"
    assert (out / "lora-000001.safetensors").is_file()
    assert not (out / "lora-000002.safetensors").exists()  # the last epoch is the final file, as in kohya
    assert result.final_file == out / "lora.safetensors" and result.final_file.is_file()
    assert len(list((out / "sample").glob("lora_e000001_*.png"))) == 2
    assert len(list((out / "sample").glob("lora_e000002_*.png"))) == 2
    # kohya keys + metadata
    with safe_open(str(result.final_file), "pt") as f:
        keys = list(f.keys())
        md = f.metadata()
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert json.loads(md["ss_tag_frequency"])["3_alpha"]["alpha"] == 3
    assert json.loads(md["ss_dataset_dirs"]) == {"3_alpha": {"n_repeats": 3, "img_count": 3},
                                                "2_beta": {"n_repeats": 2, "img_count": 2}}
    assert md["ss_num_reg_images"] != "0" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["ss_epoch"] == "2"
    # logs: jsonl for tools, TensorBoard events
    records = [json.loads(line) for line in result.log_file.read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == result.global_step > 0
    assert {r["epoch"] for r in records if r["kind"] == "epoch"} == {1, 2}
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_overfitting_one_image_drives_the_loss_down(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_solo", 1),), reg=False)
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_steps=60,
                                      train_batch_size=1, learning_rate="3e-3", network_dim=8, network_alpha=8,
                                      network_train_unet_only="true", min_timestep=400, max_timestep=401,
                                      cache_latents="true"))
    result = train(cfg)
    losses = [json.loads(l)["loss/current"] for l in result.log_file.read_text().splitlines() if '"kind": "step"' in l]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_straight_run_equals_resumed_run(tmp_path, tiny_sd1_checkpoint):
    img, reg = make_dataset(tmp_path)
    common = dict(reg_data_dir=reg, save_every_n_epochs=2, save_state="true", network_dropout=0.1,
                  shuffle_caption="true", caption_tag_dropout_rate=0.2, flip_aug="true", noise_offset=0.05,
                  lr_scheduler="cosine", optimizer_type="AdamW")
    straight = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "a", max_train_epochs=4, **common)))

    class Interrupt(Exception):
        pass

    class CrashAfterEpoch2(Callback):  # an interruption: the run dies, nothing after epoch 2 is written
        def on_epoch_end(self, run):
            if run.epoch == 1:
                raise Interrupt

    with pytest.raises(Interrupt):
        train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "b", max_train_epochs=4, **common)),
              [CrashAfterEpoch2()])
    state = tmp_path / "b" / "lora-000002-state"
    assert state.is_dir() and (tmp_path / "b" / "lora-000002.safetensors").is_file()
    resumed = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "b", max_train_epochs=4,
                                                resume=state, **common)))
    assert resumed.global_step == straight.global_step
    a, b = load_file(str(straight.final_file)), load_file(str(resumed.final_file))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_with_advice_and_keeps_last_save(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, reg=False)
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_epochs=3,
                                      save_every_n_epochs=1, learning_rate="1e30", max_grad_norm=0,
                                      optimizer_type="SGDNesterov"))
    with pytest.raises(LoralabError, match="NaN.*learning_rate") as e:
        train(cfg)
    assert "stopped" in str(e.value)
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    for f in (tmp_path / "out").glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(f)).values())


def test_cli_train_subprocess(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 2),), reg=False)
    toml = tmp_path / "run.toml"
    toml.write_text(f"""
[model]
pretrained_model_name_or_path = "{tiny_sd1_checkpoint}"
[dataset]
train_data_dir = "{img}"
resolution = "64"
[training]
max_train_steps = 2
network_dim = 2
output_dir = "{tmp_path / 'out'}"
output_name = "cli"
""")
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--config", str(toml), "--device", "cpu",
                        "--optimizer_type", "AdamW"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "cli.safetensors").is_file()


# Two CPU processes with a gloo process group, as `accelerate launch --multi_gpu` starts them on GPUs
# (`accelerate launch --cpu --num_processes 2` starts a single process; torchrun starts two).
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def test_two_processes_on_cpu(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 2), ("2_beta", 2)), reg=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(TWO_PROCESSES + ["-m", "loralab.cli", "train", "--pretrained_model_name_or_path", str(tiny_sd1_checkpoint),
                        "--train_data_dir", str(img), "--output_dir", str(tmp_path / "out"), "--output_name", "ddp",
                        "--resolution", "64", "--max_train_steps", "2", "--network_dim", "2", "--device", "cpu"],
                       capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "2 processes" in r.stderr  # two really ran (`accelerate launch --cpu` would start one)
    assert [p.name for p in (tmp_path / "out").glob("*.safetensors")] == ["ddp.safetensors"]


NAN_ON_ONE_RANK = """
import sys
from loralab.cli import run_command
from loralab.config import build_config
from loralab.recipes.lora import LoRARecipe
from loralab.train.loop import fit

class NaNOnRank1(LoRARecipe):  # only process 1 sees a NaN loss, at step 2
    def loss(self, run, batch, rng, generator):
        loss = super().loss(run, batch, rng, generator)
        return loss * float("nan") if run.rank == 1 and run.global_step == 1 else loss

ckpt, img, out = sys.argv[1:4]
cfg = build_config(None, {"pretrained_model_name_or_path": ckpt, "train_data_dir": img, "output_dir": out,
                          "output_name": "ddp", "resolution": "64", "max_train_steps": "4", "network_dim": "2",
                          "device": "cpu", "save_every_n_steps": "1"})
recipe = NaNOnRank1()
sys.exit(run_command(lambda: fit(recipe.prepare(cfg), recipe, ()) and 0))
"""


def test_a_nan_in_one_of_two_processes_stops_both(tmp_path, tiny_sd1_checkpoint):
    """Without a shared flag, the process with the NaN stops and the other waits in the gradient
    all-reduce forever; with it both stop at the same step with the message."""
    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 2), ("2_beta", 2)), reg=False)
    (tmp_path / "nan_on_rank1.py").write_text(NAN_ON_ONE_RANK)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(TWO_PROCESSES + [str(tmp_path / "nan_on_rank1.py"), str(tiny_sd1_checkpoint), str(img), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0, r.stderr[-3000:]
    assert "error: the loss became NaN at step 2 (epoch 1); training stopped." in r.stderr, r.stderr[-3000:]
    assert "error: the loss became NaN in another process at step 2 (epoch 1)" in r.stderr
    assert "Traceback" not in r.stderr.split("failed (exitcode")[0]  # torchrun then prints its own about the exit
    saved = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert saved == ["ddp-step00000001.safetensors"]  # the file before the NaN stays; no final file


@pytest.mark.parametrize("opts", [
    {"mixed_precision": "bf16", "gradient_checkpointing": "true", "save_precision": "bf16"},
    {"mixed_precision": "fp16", "save_precision": "fp16"},
    {"optimizer_type": "Prodigy", "learning_rate": "1.0",
     "optimizer_args": "decouple=True weight_decay=0.01 d_coef=0.8 use_bias_correction=True safeguard_warmup=True betas=0.9,0.99",
     "network_args": "conv_dim=4 conv_alpha=2", "scale_weight_norms": "0.5", "min_snr_gamma": "5",
     "multires_noise_iterations": "4", "lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": "0.5",
     "max_token_length": "150", "clip_skip": "2", "gradient_accumulation_steps": "2"},
])
def test_training_options_run_and_save(tmp_path, tiny_sd1_checkpoint, opts):
    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 2),), reg=False)
    result = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_steps=3, **opts)))
    sd = load_file(str(result.final_file))
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.get("save_precision"), torch.float32)
    assert all(t.dtype == want for k, t in sd.items() if not k.endswith(".alpha"))
    assert all(torch.isfinite(t.float()).all() for t in sd.values())
    ups = [t for k, t in sd.items() if k.endswith("lora_up.weight")]
    assert any(t.abs().sum() > 0 for t in ups)  # it trained
    if "network_args" in opts:
        assert any("_resnets_" in k for k in sd)  # LoCon modules
        records = [json.loads(l) for l in result.log_file.read_text().splitlines()]
        assert any("max_norm/keys_scaled" in r for r in records if r["kind"] == "step")


def test_sd2_v_parameterization_run_metadata(tmp_path, tiny_sd2_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 2),), reg=False)
    result = train(build_config(None, base_cfg(tiny_sd2_checkpoint, img, tmp_path / "out", max_train_steps=2,
                                               v_parameterization="true")))
    with safe_open(str(result.final_file), "pt") as f:
        md = f.metadata()
        keys = list(f.keys())
    assert md["ss_v2"] == "True" and md["ss_base_model_version"] == "sd_v2_v"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and md["modelspec.prediction_type"] == "v"
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)


def test_resume_warns_when_seed_or_batch_layout_changed(tmp_path, tiny_sd1_checkpoint, caplog):
    img, _ = make_dataset(tmp_path, reg=False)
    first = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "a", max_train_epochs=1,
                                              save_state="true")))
    state = tmp_path / "a" / "lora-state"
    assert state.is_dir() and first.global_step > 0
    saved = json.loads((state / "train_state.json").read_text())
    assert (saved["world"], saved["train_batch_size"], saved["gradient_accumulation_steps"]) == (1, 2, 1)
    assert saved["batches_per_epoch"] == first.global_step
    caplog.set_level("WARNING", logger="loralab.train.run")
    train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "b", max_train_epochs=2, resume=state,
                                      seed=7, train_batch_size=1)))
    text = caplog.text
    assert "saved with seed = 1, this run has 7" in text
    assert "saved with train_batch_size = 2, this run has 1" in text and "batches per epoch" in text
    assert "gradient_accumulation_steps" not in text and "processes" not in text
