"""save_last_n_epochs / _steps (and their _state keys): which older saves a run deletes (kohya's rule), and
save_model_as ckpt / pt files."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from loralab.config import build_config
from loralab.network.files import read_weights
from loralab.recipes.lora import train
from loralab.train.callbacks import epoch_to_remove, step_to_remove
from test_train import base_cfg, make_dataset


@pytest.mark.parametrize("epoch, every, keep, expected", [
    (6, 2, 2, 2), (4, 2, 2, None), (3, 1, 2, 1), (2, 1, 2, None), (5, 1, 0, None), (5, 0, 2, None),
])
def test_epoch_to_remove_is_kohyas_get_remove_epoch_no(epoch, every, keep, expected):
    assert epoch_to_remove(epoch, every, keep) == expected


@pytest.mark.parametrize("step, every, keep, expected", [
    (50, 10, 30, 10),  # kohya's own example: at step 50, 20..50 stay and step 10 goes
    (40, 10, 30, None), (45, 15, 20, 15), (4, 1, 2, 1), (3, 1, 2, None), (60, 10, 25, 30), (50, 10, 0, None),
])
def test_step_to_remove_is_kohyas_get_remove_step_no(step, every, keep, expected):
    assert step_to_remove(step, every, keep) == expected


def test_save_last_n_keeps_exactly_kohyas_files_and_states(tmp_path, tiny_sd1_checkpoint, caplog):
    """5 epochs of one step each, saving every step and every epoch with states:
    - save_last_n_epochs 2: at epoch e the save of epoch e-2 goes -> 3, 4 stay (5 is the final file);
      the epoch states follow it (save_last_n_epochs_state 0) -> 3, 4;
    - save_last_n_steps 2 (steps, not files): at step s the save of step s-3 goes -> 2, 3, 4 stay (no step
      file at the last step); save_last_n_steps_state 1: at step s the state of s-2 goes -> 3, 4."""
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 2),), reg=False)
    out = tmp_path / "out"
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, out, max_train_epochs=5, save_every_n_epochs=1,
                                      save_every_n_steps=1, save_state="true", save_last_n_epochs=2,
                                      save_last_n_steps=2, save_last_n_steps_state=1))
    caplog.set_level(logging.INFO, logger="loralab.train.callbacks")
    result = train(cfg)
    assert result.global_step == 5
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "lora.safetensors", "lora-state", "train_log.jsonl",
        "lora-000003.safetensors", "lora-000004.safetensors", "lora-000003-state", "lora-000004-state",
        "lora-step00000002.safetensors", "lora-step00000003.safetensors", "lora-step00000004.safetensors",
        "lora-step00000003-state", "lora-step00000004-state"])
    assert sorted(p.name for p in result.saved_files) == sorted(
        ["lora.safetensors", "lora-000003.safetensors", "lora-000004.safetensors", "lora-step00000002.safetensors",
         "lora-step00000003.safetensors", "lora-step00000004.safetensors"])
    removed = [json.loads(line) for line in result.log_file.read_text().splitlines() if '"removed"' in line]
    assert [(r["step"], r["path"].rsplit("/", 1)[-1], r["rule"]) for r in removed] == [
        (3, "lora-step00000001-state", "save_last_n_steps_state"),
        (3, "lora-000001.safetensors", "save_last_n_epochs"),
        (3, "lora-000001-state", "save_last_n_epochs"),
        (4, "lora-step00000002-state", "save_last_n_steps_state"),
        (4, "lora-step00000001.safetensors", "save_last_n_steps"),
        (4, "lora-000002.safetensors", "save_last_n_epochs"),
        (4, "lora-000002-state", "save_last_n_epochs"),
    ]
    assert "removed " in caplog.text and "lora-000001.safetensors (save_last_n_epochs)" in caplog.text
    from loralab.review.runlog import read_run  # `loralab review` says why epochs 1 and 2 have no file

    run = read_run(out)
    assert [e.epoch for e in run.epochs] == [3, 4, 5]
    assert run.problems == ["epochs 1, 2 were removed during training by save_last_n_epochs (the log records it): "
                            "not reviewed"]


def test_without_save_state_only_files_are_pruned_and_the_final_file_stays(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 2),), reg=False)
    out = tmp_path / "out"
    train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, out, max_train_epochs=4, save_every_n_epochs=1,
                                      save_last_n_epochs=1, save_last_n_epochs_state=1)))
    assert sorted(p.name for p in out.iterdir()) == ["lora-000003.safetensors", "lora.safetensors", "train_log.jsonl"]


def test_save_model_as_ckpt(tmp_path, tiny_sd1_checkpoint):
    """kohya's .ckpt / .pt LoRA: torch.save of the network's state dict (kohya keys, save_precision dtype), no
    metadata; the suffix follows save_model_as for the epoch, step and final files, and save_last_n_* too."""
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 2),), reg=False)
    out = tmp_path / "ckpt"
    keys = dict(max_train_epochs=3, save_every_n_epochs=1, save_last_n_epochs=1, save_every_n_steps=2,
                save_precision="fp16")
    result = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, out, save_model_as="ckpt", **keys)))
    assert result.final_file == out / "lora.ckpt"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["lora.ckpt", "lora-000002.ckpt", "lora-step00000002.ckpt", "train_log.jsonl"])
    sd = torch.load(result.final_file, map_location="cpu", weights_only=True)
    assert type(sd) is dict and all(isinstance(v, torch.Tensor) for v in sd.values())
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in sd)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))  # it trained
    # the same tensors as a .safetensors run of the same config
    ref = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "st", **keys)))
    st = load_file(str(ref.final_file))
    assert sd.keys() == st.keys() and all(torch.equal(sd[k], st[k]) for k in st)
    assert read_weights(result.final_file).keys() == st.keys()


def test_save_model_as_pt_continues_as_network_weights(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 2),), reg=False)
    first = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "a", max_train_steps=1,
                                              save_model_as="pt")))
    assert first.final_file == tmp_path / "a" / "lora.pt"
    sd = torch.load(first.final_file, map_location="cpu", weights_only=True)
    assert {v.dtype for v in sd.values()} == {torch.float32}  # save_precision float (base_cfg)
    cont = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "b", max_train_steps=1,
                                             network_weights=first.final_file)))
    assert cont.final_file.is_file()
