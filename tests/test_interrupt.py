"""Ctrl-C: the current step finishes, a state folder is written, the resume line is printed, and the
resumed run ends bit-identical to a run never interrupted."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from test_train import make_dataset


def _args(ckpt, img, out, **extra):
    keys = {"pretrained_model_name_or_path": ckpt, "train_data_dir": img, "output_dir": out, "output_name": "lora",
            "resolution": 64, "network_dim": 4, "network_alpha": 2, "learning_rate": "1e-3", "train_batch_size": 1,
            "seed": 3, "save_precision": "float", "device": "cpu", "max_train_steps": 20, "network_dropout": 0.1,
            "shuffle_caption": "true", "flip_aug": "true", "lr_scheduler": "cosine", **extra}
    return [sys.executable, "-m", "loralab.cli", "train"] + [a for k, v in keys.items() for a in (f"--{k}", str(v))]


def test_sigint_saves_a_state_that_resumes_exactly(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("4_alpha", 2),), reg=False)
    out = tmp_path / "b"
    proc = subprocess.Popen(_args(tiny_sd1_checkpoint, img, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count('"kind": "step"') >= 3:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    state = out / "lora-interrupted-state"
    assert f'resume = "{state.as_posix()}"' in err and "Traceback" not in err
    assert state.is_dir() and not (out / "lora.safetensors").exists()
    steps_done = log.read_text().count('"kind": "step"')
    assert 3 <= steps_done < 20

    r = subprocess.run(_args(tiny_sd1_checkpoint, img, out, resume=state), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    straight = subprocess.run(_args(tiny_sd1_checkpoint, img, tmp_path / "a"), capture_output=True, text=True,
                              timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = load_file(str(tmp_path / "a" / "lora.safetensors")), load_file(str(out / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
