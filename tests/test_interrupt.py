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


def _interrupt_at(step: int):
    from loralab.train.callbacks import Callback

    class Interrupt(Callback):  # what StopOnSignal's handler does when the signal lands during this step
        def on_step_end(self, run):
            if run.global_step == step:
                run.interrupted = "SIGINT"
                run.stop("interrupted (SIGINT)")

    return Interrupt()


def test_an_interrupt_on_an_epochs_last_step_keeps_that_epochs_file(tmp_path, tiny_sd1_checkpoint):
    import json

    from loralab.config import build_config
    from loralab.recipes.lora import train
    from test_train import base_cfg

    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 1),), reg=False)  # 2 steps an epoch (batch 1)
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_epochs=3,
                                      save_every_n_epochs=1, train_batch_size=1))
    result = train(cfg, [_interrupt_at(2)])
    out = tmp_path / "out"
    assert result.interrupted == "SIGINT" and result.final_file is None
    assert (out / "lora-000001.safetensors").is_file() and not (out / "lora.safetensors").exists()
    state = json.loads((out / "lora-interrupted-state" / "train_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (1, 0, 2)  # continue with epoch 2


def test_an_interrupt_during_the_last_step_finishes_the_run(tmp_path, tiny_sd1_checkpoint):
    from loralab.config import build_config
    from loralab.recipes.lora import train
    from test_train import base_cfg

    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 1),), reg=False)
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_steps=3,
                                      train_batch_size=1))
    result = train(cfg, [_interrupt_at(3)])  # max_train_steps ends inside epoch 2
    assert result.interrupted == "" and result.global_step == 3 and result.final_file.is_file()
    assert not (tmp_path / "out" / "lora-interrupted-state").exists()


KILL_AT = '''
import os, signal, sys
from pathlib import Path
marker = sys.argv.pop(1)  # kill this process at once when it opens a path containing `marker`

def hook(event, args):
    if event == "open" and marker in str(args[0]):
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
from loralab.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _steps_logged(log, since: int) -> int:
    import json

    if not log.exists():
        return 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return sum(1 for r in records if r.get("kind") == "step" and r["step"] > since)


def test_sigkill_at_three_points_then_resume_ends_bit_identical(tmp_path, tiny_sd1_checkpoint):
    """kill -9 while a state folder is written, while a LoRA file is written and in the middle of an epoch;
    each time the run resumes from its last complete state and the files end identical to a straight run."""
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 2),), reg=False)  # 2 steps an epoch (batch 1)
    script = tmp_path / "kill_at.py"
    script.write_text(KILL_AT)
    keys = {"max_train_steps": 8, "save_every_n_epochs": 1, "save_state": "true"}
    straight = subprocess.run(_args(tiny_sd1_checkpoint, img, tmp_path / "a", **keys), capture_output=True, text=True,
                              timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "b"

    def run(marker: str, resume: str | None = None, **popen):
        args = _args(tiny_sd1_checkpoint, img, out, **keys, **({"resume": out / resume} if resume else {}))
        return subprocess.Popen([sys.executable, str(script), marker] + args[3:], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **popen)

    # 1: while epoch 2's state folder is written (network, optimizer and scheduler are in, the counters not)
    p = run("lora-000002-state.tmp/train_state.json")
    p.communicate(timeout=400)
    assert p.returncode == -signal.SIGKILL
    assert (out / "lora-000002-state.tmp").is_dir() and not (out / "lora-000002-state").exists()
    # 2: resumed from epoch 1's state; killed while epoch 3's LoRA file is being written
    p = run(".lora-000003.safetensors.", "lora-000001-state")
    p.communicate(timeout=400)
    assert p.returncode == -signal.SIGKILL
    assert (out / "lora-000002-state").is_dir() and not (out / "lora-000002-state.tmp").exists()
    assert not (out / "lora-000003.safetensors").exists()
    # 3: resumed from epoch 2's state; killed from outside in the middle of epoch 4 (after step 7)
    p = run("never-opened", "lora-000002-state")
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and _steps_logged(out / "train_log.jsonl", since=6) < 1:
        time.sleep(0.02)
    p.kill()
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL and not (out / "lora.safetensors").exists()
    # the last resume finishes the run
    r = subprocess.run(_args(tiny_sd1_checkpoint, img, out, **keys, resume=out / "lora-000003-state"),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]

    names = ["lora-000001.safetensors", "lora-000002.safetensors", "lora-000003.safetensors", "lora.safetensors"]
    for name in names:
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert sorted(p.name for p in out.iterdir() if ".tmp" in p.name) == []  # the killed writes' temp files too


def test_resume_from_a_state_saved_on_an_epochs_last_step_logs_that_epoch(tmp_path, tiny_sd1_checkpoint):
    import json

    from loralab.config import build_config
    from loralab.recipes.lora import train
    from test_train import base_cfg

    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 1),), reg=False)  # 2 steps an epoch (batch 1)
    keys = base_cfg(tiny_sd1_checkpoint, img, tmp_path / "a", max_train_epochs=2, train_batch_size=1,
                    save_every_n_steps=2, save_state="true")
    train(build_config(None, keys))
    straight = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    # the same run again (it saves a step state on epoch 1's last step), then resumed from that state
    train(build_config(None, {**keys, "output_dir": str(tmp_path / "b")}))
    train(build_config(None, {**keys, "output_dir": str(tmp_path / "b"),
                              "resume": str(tmp_path / "b" / "lora-step00000002-state")}))
    resumed = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]

    def epochs(records):
        return [(r["epoch"], r["step"], r["loss/epoch_average"]) for r in records if r["kind"] == "epoch"]

    after_resume = resumed[[r.get("event") for r in resumed].index("resumed"):]
    assert epochs(after_resume) == epochs(straight)  # epoch 1 (its last step came before the resume), then 2
