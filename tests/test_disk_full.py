"""A full disk while a state folder is written: the message names the disk-full file, the temp folder is
removed, every file saved before is intact, and the run resumes from the last complete state to the same
final file as a run that never failed. The disk is a small tmpfs mounted in a private mount namespace
(`unshare`), so nothing outside the test sees it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from test_train import make_dataset

SCRIPT = textwrap.dedent('''
    import hashlib, io, json, shutil, sys
    from contextlib import redirect_stderr
    from pathlib import Path
    from loralab.cli import run_command
    from loralab.config import build_config
    from loralab.recipes.lora import train
    from loralab.train.callbacks import Callback

    ckpt, img, disk, straight, report = sys.argv[1:6]
    disk = Path(disk)
    keys = {"pretrained_model_name_or_path": ckpt, "train_data_dir": img, "output_name": "lora", "resolution": "64",
            "network_dim": "8", "network_alpha": "4", "learning_rate": "1e-3", "train_batch_size": "1", "seed": "5",
            "save_precision": "float", "device": "cpu", "max_train_epochs": "3", "save_every_n_epochs": "1",
            "save_state": "true"}
    out = disk / "run"
    facts = {}

    def hashes(folder):
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "train_log.jsonl"}

    class FillDisk(Callback):  # after epoch 1's files: room for one more LoRA file, not for its state
        def on_epoch_end(self, run):
            if run.epoch + 1 != 1:
                return
            lora = (out / "lora-000001.safetensors").stat().st_size
            state = sum(p.stat().st_size for p in (out / "lora-000001-state").iterdir())
            room = lora + 32 * 1024
            facts.update(lora_size=lora, state_size=state, room=room, before=hashes(out))
            with open(disk / "filler", "wb") as f:
                f.write(b"x" * (shutil.disk_usage(disk).free - room))

    def train_cli(cfg, callbacks=()):  # what `loralab train` does with the result: exit code and message
        return run_command(lambda: train(cfg, callbacks) and 0)

    err = io.StringIO()
    with redirect_stderr(err):
        facts["rc"] = train_cli(build_config(None, {**keys, "output_dir": str(out)}), [FillDisk()])
    facts["stderr"] = err.getvalue()
    facts["after"] = hashes(out)
    facts["left"] = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    from loralab.io import DiskFullError, atomic_write_bytes
    try:  # replacing a file on the full disk: refused, the old file stays, no temp file
        atomic_write_bytes(out / "lora-000001.safetensors", b"y" * 10**6)
    except DiskFullError as e:
        facts["replace_error"] = str(e)
    facts["after_replace"] = hashes(out)
    facts["left_after_replace"] = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    (disk / "filler").unlink()
    facts["resumed_rc"] = train_cli(build_config(None, {**keys, "output_dir": str(out),
                                                      "resume": str(out / "lora-000001-state")}))
    shutil.copy(out / "lora.safetensors", Path(report).with_name("resumed.safetensors"))
    train(build_config(None, {**keys, "output_dir": straight}))
    Path(report).write_text(json.dumps(facts))
''')


def _namespace_cmd() -> list[str] | None:
    """`unshare` with a private mount namespace: as root directly, else through a user namespace."""
    if not shutil.which("unshare"):
        return None
    return ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]


def test_a_full_disk_while_saving_state_loses_nothing(tmp_path, tiny_sd1_checkpoint):
    ns = _namespace_cmd()
    probe = subprocess.run((ns or []) + ["sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True, text=True) if ns else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root or unprivileged user namespaces): "
                    + (probe.stderr.strip() if probe else "no unshare command"))
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 2),), reg=False)
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "disk_full.py").write_text(SCRIPT)
    report = tmp_path / "report.json"
    cmd = (f"mount -t tmpfs -o size=4m tmpfs {disk} && exec {sys.executable} {tmp_path / 'disk_full.py'} "
           f"{tiny_sd1_checkpoint} {img} {disk} {tmp_path / 'straight'} {report}")
    r = subprocess.run(ns + ["sh", "-c", cmd], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr[-3000:]
    facts = json.loads(report.read_text())
    assert facts["state_size"] > facts["room"] > facts["lora_size"]  # the case this test is about

    assert facts["rc"] == 2
    err = facts["stderr"]
    out = disk / "run"
    assert f"error: disk full: could not write {out}/lora-000002-state/network.safetensors (" in err, err
    assert f'resume = "{out.as_posix()}/lora-000001-state"' in err and "Traceback" not in err
    # epoch 1's file and state untouched, epoch 2's file complete, no temp file or folder left
    assert all(facts["after"][name] == digest for name, digest in facts["before"].items())
    assert "lora-000002.safetensors" in facts["after"]
    assert not [p for p in facts["left"] if ".tmp" in p or p.startswith("lora-000002-state")]

    assert facts["replace_error"].startswith(f"disk full: could not write {out}/lora-000001.safetensors (")
    assert facts["after_replace"] == facts["after"] and facts["left_after_replace"] == facts["left"]

    assert facts["resumed_rc"] == 0
    a = load_file(str(tmp_path / "straight" / "lora.safetensors"))
    b = load_file(str(tmp_path / "resumed.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
