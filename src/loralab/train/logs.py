"""Training logs: kohya's TensorBoard tags, a JSON-lines log for later commands, and a loss plot.

    log = TrainLog(output_dir, logging_dir=cfg.logging_dir, log_prefix=cfg.log_prefix, enabled=is_main)
    for epoch in range(first_epoch, epochs + 1):                  # 1-based, as kohya prints and saves
        for batch in loader:
            ...                                                   # after each optimizer step:
            log.step(global_step, epoch, loss.item(), current_lrs(optimizer, scheduler), max_norm=norms)
        log.epoch(epoch, step=global_step)
    log.event("done", step=global_step, epoch=epoch)
    log.close()

Where things go:
- `<output_dir>/train_log.jsonl`, always: one JSON object per line, flushed as it is written, so a
  crash keeps everything logged so far. Every record has "kind" ("step", "epoch", "validation" or
  "event"), "step" (global optimizer step), "epoch" and "time" (unix seconds); the values use the
  TensorBoard tag names as keys ("loss/current", "loss/average", "lr/unet", ...). A resumed run appends.
  NaN / inf losses are written as NaN / Infinity (Python's json reads them back).
- `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/network_train/` (kohya's layout), when logging_dir is set:
  TensorBoard events with kohya's tags: loss/current, loss/average, lr/*, max_norm/keys_scaled,
  max_norm/max_key_norm, norm/avg_key_norm at step = global step; loss/epoch_average at step = epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from loralab.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["LOG_FILE_NAME", "LossRecorder", "TrainLog", "latest", "plot_loss", "read_train_log"]

LOG_FILE_NAME = "train_log.jsonl"


class LossRecorder:
    """kohya's moving average of the loss (`train_util.LossRecorder`): one slot per step of an epoch.

    `add(epoch_step, loss)` stores the loss in slot `epoch_step` (growing the list with zeros as needed)
    and the average is sum(slots) / len(slots). During the first epoch that is the mean of the epoch so
    far; afterwards a window of the last epoch's worth of steps, each new loss replacing the one at the
    same position in the previous epoch. At the end of an epoch it is that epoch's mean loss, which kohya
    logs as loss/epoch_average. (kohya appends during epoch 0 and fills slots later; for consecutive steps
    from 0 that is the same rule.)
    """

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.total: float = 0.0

    def add(self, epoch_step: int, loss: float) -> None:
        while len(self.losses) <= epoch_step:
            self.losses.append(0.0)
        self.total += loss - self.losses[epoch_step]
        self.losses[epoch_step] = loss

    @property
    def moving_average(self) -> float:
        return self.total / len(self.losses) if self.losses else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.losses = [float(x) for x in state["losses"]]
        self.total = math.fsum(self.losses)


def _json_value(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # tensors, numpy scalars
        return value.item()
    return value


def _ends_without_newline(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class TrainLog:
    """Writes step / epoch / validation / event records to the JSON-lines file and TensorBoard.

    `output_dir`: where `train_log.jsonl` goes (appended to when it exists, e.g. on resume).
    `logging_dir`, `log_prefix`, `tracker_name`: kohya's `--logging_dir`, `--log_prefix`,
    `--log_tracker_name` (default "network_train"); no TensorBoard without `logging_dir`.
    `run_time`: the YYYYmmddHHMMSS part of the TensorBoard folder (default: now).
    `enabled=False` (processes other than the main one) writes nothing; the methods still return records.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        logging_dir: str | Path | None = None,
        log_prefix: str | None = None,
        tracker_name: str | None = None,
        log_file_name: str = LOG_FILE_NAME,
        run_time: str | None = None,
        enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.jsonl_path = self.output_dir / log_file_name
        self.enabled = enabled
        self.recorder = LossRecorder()
        self._epoch: int | None = None  # epoch of the last step record
        self._slot = 0  # moving-average slot of the next step in that epoch
        self.tensorboard_dir: Path | None = None
        self.before_write: Callable[[], None] | None = None  # called before an epoch, validation or event record
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torn = _ends_without_newline(self.jsonl_path)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if torn:  # a crash cut the last line short: start ours on a fresh line
            self._file.write("\n")
        if logging_dir:
            stamp = run_time or time.strftime("%Y%m%d%H%M%S", time.localtime())
            self.tensorboard_dir = Path(logging_dir) / f"{log_prefix or ''}{stamp}" / (tracker_name or "network_train")
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), flush_secs=30)

    # ------------------------------------------------------------------------------------ writing
    def _write(self, record: dict[str, Any], tb_step: int | None) -> dict[str, Any]:
        record = {k: _json_value(v) for k, v in record.items()}
        if self._file is None:
            return record
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._writer is not None and tb_step is not None:
            for tag, value in record.items():
                if tag in ("kind", "step", "epoch", "epoch_step", "time") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(tag, value, global_step=tb_step)
        return record

    def step(
        self,
        step: int,
        epoch: int,
        loss: float,
        lrs: Mapping[str, float] | None = None,
        *,
        max_norm: tuple[int, float, float] | Mapping[str, float] | None = None,
        values: Mapping[str, float] | None = None,
        epoch_step: int | None = None,
        at: float | None = None,
    ) -> dict[str, Any]:
        """One training step at global step `step` (the TensorBoard x axis) of epoch `epoch` (1-based).

        Logs loss/current, loss/average (kohya's moving average, `LossRecorder`), `lrs` (from
        `optim.current_lrs`: lr/unet, lr/textencoder, lr/d*lr/...), `max_norm` — kohya's
        `apply_max_norm_regularization` result (keys_scaled, mean_norm, maximum_norm) → max_norm/keys_scaled,
        norm/avg_key_norm, max_norm/max_key_norm, or a mapping of tags — and any other `values`.
        `epoch_step` is the moving-average slot; by default the count of steps logged in this epoch. `at`: when
        the step ended (unix seconds; default now), for a step logged later than it ran.
        """
        loss = float(_json_value(loss))
        if epoch != self._epoch:
            self._epoch, self._slot = epoch, 0
        slot = self._slot if epoch_step is None else epoch_step
        self._slot = slot + 1
        self.recorder.add(slot, loss)
        record: dict[str, Any] = {"kind": "step", "step": step, "epoch": epoch, "epoch_step": slot,
                                  "time": time.time() if at is None else at, "loss/current": loss,
                                  "loss/average": self.recorder.moving_average}
        record.update(lrs or {})
        if isinstance(max_norm, Mapping):
            record.update(max_norm)
        elif max_norm is not None:
            keys_scaled, mean_norm, maximum_norm = max_norm
            record.update({"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": maximum_norm,
                           "norm/avg_key_norm": mean_norm})
        record.update(values or {})
        return self._write(record, tb_step=step)

    def epoch(self, epoch: int, *, step: int, values: Mapping[str, float] | None = None) -> dict[str, Any]:
        """End of epoch `epoch` (1-based) at global step `step`: loss/epoch_average = kohya's moving
        average now (the mean of the last epoch's worth of steps), at TensorBoard step = epoch (kohya),
        plus `values` (e.g. loss/validation/epoch_average)."""
        self._catch_up()
        record = {"kind": "epoch", "step": step, "epoch": epoch, "time": time.time(),
                  "loss/epoch_average": self.recorder.moving_average}
        record.update(values or {})
        written = self._write(record, tb_step=epoch)
        self.flush()
        return written

    def validation(
        self, step: int, epoch: int, values: Mapping[str, float], *, tb_step: int | None = None
    ) -> dict[str, Any]:
        """Validation values (kohya tags loss/validation/{step,epoch}_average, ..._divergence), at
        TensorBoard step `tb_step` (default: `step`)."""
        self._catch_up()
        record = {"kind": "validation", "step": step, "epoch": epoch, "time": time.time(), **values}
        return self._write(record, tb_step=step if tb_step is None else tb_step)

    def event(self, event: str, *, step: int, epoch: int, **fields: Any) -> dict[str, Any]:
        """A non-scalar happening, e.g. event("saved", step=..., epoch=..., path=Path("x.safetensors"));
        only in the JSON-lines file."""
        self._catch_up()
        record = {"kind": "event", "step": step, "epoch": epoch, "time": time.time(), "event": event}
        record.update({k: str(v) if isinstance(v, Path) else v for k, v in fields.items()})
        return self._write(record, tb_step=None)

    def _catch_up(self) -> None:
        """Steps logged later than they ran (the trainer keeps their losses on the GPU for a while) are written
        before any other record: `before_write` writes them."""
        if self.before_write is not None:
            self.before_write()

    # ----------------------------------------------------------------------------------- lifecycle
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue loss/average exactly (save it with the training state)."""
        self._catch_up()
        return {"loss_recorder": self.recorder.state_dict(), "epoch": self._epoch, "slot": self._slot}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.recorder.load_state_dict(state["loss_recorder"])
        self._epoch, self._slot = state.get("epoch"), int(state.get("slot", 0))

    def flush(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TrainLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_train_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `train_log.jsonl` (a file or the folder holding it), in file order.

    A line that is not valid JSON (a crash in the middle of a write) is skipped with a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LOG_FILE_NAME
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d is not a complete JSON record; skipped", path, lineno)
    return records


def latest(records: Iterable[Mapping[str, Any]], kind: str, key: str = "step") -> list[Mapping[str, Any]]:
    """The records of `kind`, the last one per `key` value (a resumed run logs the steps after its state
    again: the later record is the one the finished run stands on), in `key` order."""
    out: dict[Any, Mapping[str, Any]] = {}
    for r in records:
        if r.get("kind") == kind and key in r:
            out.pop(r[key], None)
            out[r[key]] = r
    return sorted(out.values(), key=lambda r: r[key])


def plot_loss(records: Iterable[Mapping[str, Any]], out_png: str | Path, *, title: str | None = None) -> Path:
    """Loss curve PNG: per-step loss (faint), kohya's moving average (loss/average), epoch averages as
    points at the step where each epoch ended, and validation averages when present. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(records)
    steps = [r for r in latest(records, "step") if "loss/current" in r]
    epochs = [r for r in latest(records, "epoch", "epoch") if "loss/epoch_average" in r]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if steps:
        x = [r["step"] for r in steps]
        ax.plot(x, [r["loss/current"] for r in steps], color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
        ax.plot(x, [r["loss/average"] for r in steps], color="tab:blue", linewidth=1.8, label="moving average")
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["loss/epoch_average"] for r in epochs], "o", color="tab:orange",
                label="epoch average")
    for tag, style in (("loss/validation/epoch_average", "s"), ("loss/validation/step_average", "^")):
        val = [r for r in records if tag in r]
        if val:
            ax.plot([r["step"] for r in val], [r[tag] for r in val], style, color="tab:green",
                    label=tag.removeprefix("loss/").replace("/", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.grid(True, alpha=0.3)
    if steps or epochs:
        ax.legend(loc="upper right")
    fig.tight_layout()

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))
    return out_png
