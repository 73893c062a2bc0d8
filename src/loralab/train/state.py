"""Training state for `save_state` / `resume`: continue exactly where a run stopped.

A state folder holds the LoRA weights in fp32, the optimizer, LR-scheduler and loss-scaler states, and
`train_state.json` with the epoch, the global step and the step inside the epoch. Randomness in the loop
is derived from (seed, global step) rather than carried in a generator, so these counters are the whole
RNG state: a resumed run draws the same noise, timesteps, dropouts and caption shuffles as a straight
one. Unlike kohya, the global step keeps counting across resumes (kohya restarts it at 0).

The folder is written under a temporary name and renamed, so a crash never leaves a half state.
A recipe may keep tensors of its own beside these (pivotal tuning: `EMBEDDINGS_FILE`, the new tokens'
vectors, written by the recipe right after the state, restored by it on resume).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loralab.errors import LoralabError
from loralab.io import disk_full_error, is_disk_full

STATE_FILE = "train_state.json"
STATE_PARTS = ("network.safetensors", "optimizer.pt", "scheduler.pt")  # and STATE_FILE; scaler.pt with fp16
EMBEDDINGS_FILE = "embeddings.safetensors"  # pivotal tuning's new tokens: "<token>.<text encoder index>", fp32


@dataclass
class TrainCounters:
    epoch: int            # epochs finished
    global_step: int      # optimizer steps done
    batch_in_epoch: int   # batches of the current epoch already consumed (0 at an epoch boundary)
    seed: int
    max_train_steps: int
    log_state: dict | None = None  # the train log's moving-average state, so loss/average continues exactly
    # how the batches were laid out when the state was saved (0: a state from before these were kept)
    world: int = 0  # processes
    batches_per_epoch: int = 0  # batches per process per epoch
    train_batch_size: int = 0
    gradient_accumulation_steps: int = 0


def save_state(folder: Path, *, network_sd: dict[str, torch.Tensor], optimizer: Any, scheduler: Any,
               scaler: Any | None, counters: TrainCounters) -> Path:
    """Write the state folder atomically (temp folder, then rename over the old one).

    A failed write (a full disk, Ctrl-C twice) removes the temp folder and leaves the old state as it
    was; a full disk is a `DiskFullError` naming the file that did not fit."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    current = tmp / "network.safetensors"
    try:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in network_sd.items()}, str(current))
        parts = {"optimizer.pt": optimizer, "scheduler.pt": scheduler, "scaler.pt": scaler}
        for name, part in parts.items():
            if part is not None:
                current = tmp / name
                torch.save(part.state_dict(), current)
        current = tmp / STATE_FILE
        current.write_text(json.dumps(asdict(counters), indent=1), encoding="utf-8")
    except BaseException as e:
        full = not isinstance(e, (KeyboardInterrupt, LoralabError)) and is_disk_full(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full_error(folder / current.name, folder.parent) from e
        raise
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def load_counters(folder: str | Path) -> TrainCounters:
    folder = Path(folder)
    f = folder / STATE_FILE
    if not f.is_file():
        hint = ""
        inner = sorted(p.parent for p in folder.glob(f"*/{STATE_FILE}")) if folder.is_dir() else []
        if inner:
            hint = f" It contains state folders, e.g. {inner[-1]}; point resume at one of them."
        raise LoralabError(f"resume: {folder} is not a loralab state folder (no {STATE_FILE}).{hint}")
    try:
        return TrainCounters(**json.loads(f.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:
        raise LoralabError(f"resume: {f} is unreadable ({e}); pick another state folder") from None


def load_state(folder: str | Path, *, optimizer: Any, scheduler: Any, scaler: Any | None) -> dict[str, torch.Tensor]:
    """Restore optimizer/scheduler/scaler in place; return the network weights."""
    folder = Path(folder)
    sd = load_file(str(folder / "network.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", map_location="cpu", weights_only=True))
    return sd
