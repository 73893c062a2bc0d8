"""Nothing lost: a second run does not silently replace the first run's files; bad output paths are
refused before any model loads."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.recipes.lora import LoRARecipe, train
from test_train import base_cfg, make_dataset


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_in_the_same_folder_is_refused_and_overwrite_starts_over(tmp_path, tiny_sd1_checkpoint, monkeypatch):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 2),), reg=False)
    keys = base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_epochs=2, save_every_n_epochs=1,
                    save_state="true")
    train(build_config(None, keys))
    before = _digest(tmp_path / "out")
    assert {"lora.safetensors", "lora-000001.safetensors", "train_log.jsonl"} <= set(before)

    import loralab.models.loader as loader

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(loader, "load_base_model", no_load)
    with pytest.raises(LoralabError) as e:
        LoRARecipe().prepare(build_config(None, keys))
    msg = str(e.value)
    assert "lora-000001.safetensors" in msg and "lora.safetensors" in msg and "overwrite = true" in msg
    assert _digest(tmp_path / "out") == before  # nothing changed
    monkeypatch.undo()

    # another output_name in the same folder is a different run: allowed
    other = build_config(None, {**keys, "output_name": "other", "max_train_epochs": "1"})
    train(other)
    assert (tmp_path / "out" / "other.safetensors").is_file()

    result = train(build_config(None, {**keys, "overwrite": "true", "max_train_epochs": "1"}))
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "lora-000001.safetensors" not in names and "lora-000001-state" not in names  # the old epochs are gone
    assert result.final_file.name == "lora.safetensors" and "other.safetensors" in names
    kept = [n for n in names if n.startswith("train_log-before-")]
    assert len(kept) == 1  # the earlier log is kept, the new one starts clean
    steps = [line for line in result.log_file.read_text().splitlines() if '"kind": "step"' in line]
    assert len(steps) == result.global_step


def test_output_dir_that_is_a_file_is_refused_before_loading(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 1),), reg=False)
    (tmp_path / "out").write_text("not a folder")
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--pretrained_model_name_or_path",
                        str(tiny_sd1_checkpoint), "--train_data_dir", str(img), "--output_dir", str(tmp_path / "out"),
                        "--max_train_steps", "1", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "output_dir" in r.stderr and "is a file, not a folder" in r.stderr
    assert "loralab.models.loader" not in r.stderr  # refused before the model loaded
    assert (tmp_path / "out").read_text() == "not a folder"


@pytest.mark.parametrize("keys,match", [
    ({"optimizer_type": "AdamW", "optimizer_args": "betaz=0.9,0.99"}, "betaz"),
    ({"optimizer_type": "NoSuchOptimizer"}, "NoSuchOptimizer"),
])
def test_optimizer_errors_come_before_the_model_loads(tmp_path, tiny_sd1_checkpoint, monkeypatch, keys, match):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 1),), reg=False)
    import loralab.models.loader as loader

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(loader, "load_base_model", no_load)
    with pytest.raises(LoralabError, match=match):
        LoRARecipe().prepare(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", **keys)))


def test_earlier_run_files_rule(tmp_path):
    from loralab.train.run import earlier_run_files

    names = ["lora.safetensors", "lora-000003.safetensors", "lora-step00000040.safetensors", "lora-000003-state",
             "lora-state", "lora-interrupted-state", "lora.ckpt", "lora-000001.pt", "lora-v2.safetensors",
             "lora-v2-000001.safetensors", "lorax.safetensors", "lora.txt", "train_log.jsonl", "sample"]
    for n in names:
        (tmp_path / n).mkdir() if n.endswith("state") or n == "sample" else (tmp_path / n).write_text("x")
    assert [p.name for p in earlier_run_files(tmp_path, "lora")] == sorted(names[:8])
    assert [p.name for p in earlier_run_files(tmp_path, "lora-v2")] == ["lora-v2-000001.safetensors",
                                                                        "lora-v2.safetensors"]


def test_overwrite_deletes_nothing_when_the_new_run_cannot_start(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 1),), reg=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_text("the earlier run")
    (out / "train_log.jsonl").write_text("{}\n")
    keys = base_cfg(tiny_sd1_checkpoint, img, out, overwrite="true", optimizer_args="betaz=0.9")
    with pytest.raises(LoralabError, match="betaz"):
        LoRARecipe().prepare(build_config(None, keys))
    assert (out / "lora.safetensors").read_text() == "the earlier run" and (out / "train_log.jsonl").exists()


@pytest.mark.parametrize("keys,match", [
    ({"lr_scheduler": "cosine", "lr_scheduler_args": "bogus=1"}, "lr_scheduler_args.*bogus"),
    ({"lr_scheduler": "cosine", "lr_scheduler_args": "num_cycles"}, "lr_scheduler_args: entry 'num_cycles'"),
    ({"lr_scheduler": "piecewise_constant"}, "step_rules"),
    ({"lr_scheduler": "piecewise_constant", "lr_scheduler_args": "step_rules='1:x,0.1'"}, "lr_scheduler_args"),
    ({"lr_scheduler_type": "NoSuchLR"}, "lr_scheduler_type=NoSuchLR"),
    ({"lr_scheduler_type": "StepLR", "lr_scheduler_args": "step_size=2 gama=0.5"}, "gama"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": "0.6", "lr_decay_steps": "0.6"}, "lr_decay_steps"),
    ({"lr_scheduler": "adafactor"}, "Adafactor"),
])
def test_scheduler_errors_come_before_the_model_loads(tmp_path, tiny_sd1_checkpoint, monkeypatch, keys, match):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 1),), reg=False)
    import loralab.models.loader as loader

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(loader, "load_base_model", no_load)
    with pytest.raises(LoralabError, match=match):
        LoRARecipe().prepare(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", **keys)))


@pytest.mark.parametrize("keys,match", [
    ({"full_fp16": "true", "mixed_precision": "bf16"}, 'full_fp16: .*mixed_precision = "fp16"'),
    ({"full_bf16": "true"}, 'full_bf16: .*mixed_precision = "bf16"'),
    ({"full_fp16": "true", "full_bf16": "true", "mixed_precision": "fp16"}, "choose at most one"),
    ({"lr_scheduler_type": "StepLR", "lr_warmup_steps": "10"}, "lr_scheduler_type: a scheduler class gets no warmup"),
    ({"save_last_n_steps": "-1"}, "save_last_n_steps: must be 0 or more"),
    ({"lr_scheduler_min_lr_ratio": "1.5"}, "lr_scheduler_min_lr_ratio"),
    ({"save_model_as": "bin"}, "save_model_as.*safetensors, ckpt, pt"),
    ({"text_encoder_lr": "1e-4,2e-4,3e-4"}, "text_encoder_lr.*two"),
    ({"text_encoder_lr": "1e-4 -2e-4"}, "text_encoder_lr.*0 or more"),
])
def test_config_refuses_bad_precision_scheduler_and_save_keys(tmp_path, tiny_sd1_checkpoint, keys, match):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 1),), reg=False)
    with pytest.raises(LoralabError, match=match):
        build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", **keys))
