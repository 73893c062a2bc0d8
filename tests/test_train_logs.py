"""TrainLog: JSON lines, TensorBoard events with kohya's tags, kohya's moving average, the loss plot."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from loralab.train.logs import LossRecorder, TrainLog, plot_loss, read_train_log


def kohya_loss_recorder(events: list[tuple[int, int, float]]) -> list[float]:
    """kohya's LossRecorder as written (append in epoch 0, overwrite slots later), for comparison."""
    losses: list[float] = []
    total = 0.0
    out = []
    for epoch, step, loss in events:
        if epoch == 0:
            losses.append(loss)
        else:
            while len(losses) <= step:
                losses.append(0.0)
            total -= losses[step]
            losses[step] = loss
        total += loss
        out.append(total / len(losses))
    return out


def test_loss_recorder_matches_kohya():
    losses = [0.9, 0.7, 0.8, 0.5, 0.4, 0.6, 0.3, 0.2, 0.35]
    events = [(i // 3, i % 3, loss) for i, loss in enumerate(losses)]  # 3 epochs of 3 steps
    rec = LossRecorder()
    ours = []
    for epoch, step, loss in events:
        rec.add(step, loss)
        ours.append(rec.moving_average)
    assert ours == pytest.approx(kohya_loss_recorder(events))
    assert ours[1] == pytest.approx((0.9 + 0.7) / 2)  # first epoch: mean so far
    assert ours[3] == pytest.approx((0.5 + 0.7 + 0.8) / 3)  # then a window of one epoch
    assert ours[-1] == pytest.approx((0.3 + 0.2 + 0.35) / 3)  # end of epoch: the epoch mean

    assert rec.state_dict()["losses"] == [0.3, 0.2, 0.35]
    resumed = LossRecorder()
    resumed.load_state_dict(rec.state_dict())
    assert resumed.moving_average == pytest.approx(rec.moving_average)


def test_train_log_jsonl_and_tensorboard(tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    with TrainLog(out, logging_dir=logs, log_prefix="mylora_", run_time="20260101120000") as log:
        assert log.tensorboard_dir == logs / "mylora_20260101120000" / "network_train"
        losses = [0.5, 0.3, 0.4, 0.2]
        for i, loss in enumerate(losses):
            epoch = i // 2 + 1
            lrs = {"lr/unet": 1e-4 * (i + 1), "lr/textencoder": 5e-5}
            log.step(i + 1, epoch, loss, lrs, max_norm=(2, 0.75, 1.5))  # kohya's (keys_scaled, mean, max)
            if i % 2 == 1:
                log.epoch(epoch, step=i + 1)
        log.validation(4, 2, {"loss/validation/epoch_average": 0.33})
        log.event("saved", step=4, epoch=2, path=out / "mylora.safetensors")

    records = read_train_log(out / "train_log.jsonl")
    assert [r["kind"] for r in records] == ["step", "step", "epoch", "step", "step", "epoch", "validation", "event"]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["loss/current"] for r in steps] == losses
    assert [r["loss/average"] for r in steps] == pytest.approx([0.5, 0.4, 0.35, 0.3])
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 2), (2, 4)]
    assert [r["loss/epoch_average"] for r in epochs] == pytest.approx([0.4, 0.3])
    assert records[-1]["path"].endswith("mylora.safetensors")
    assert [r["epoch_step"] for r in steps] == [0, 1, 0, 1]  # slots restart with each epoch
    assert (steps[0]["max_norm/keys_scaled"], steps[0]["norm/avg_key_norm"], steps[0]["max_norm/max_key_norm"]) == (
        2, 0.75, 1.5)
    assert read_train_log(out) == records  # the folder works too

    acc = EventAccumulator(str(log.tensorboard_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/current", "loss/average", "loss/epoch_average", "lr/unet", "lr/textencoder",
            "max_norm/keys_scaled", "max_norm/max_key_norm", "norm/avg_key_norm",
            "loss/validation/epoch_average"} <= tags

    def scalars(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert [s for s, _ in scalars("loss/current")] == [1, 2, 3, 4]
    assert [v for _, v in scalars("loss/current")] == pytest.approx([0.5, 0.3, 0.4, 0.2])
    assert [v for _, v in scalars("loss/average")] == pytest.approx([0.5, 0.4, 0.35, 0.3])
    assert scalars("loss/epoch_average") == [(1, pytest.approx(0.4)), (2, pytest.approx(0.3))]  # step = epoch
    assert scalars("lr/unet")[-1] == (4, pytest.approx(4e-4))


def test_jsonl_survives_a_crash_and_resume_appends(tmp_path):
    log = TrainLog(tmp_path)  # no logging_dir: no TensorBoard
    assert log.tensorboard_dir is None
    log.step(1, 1, float("nan"))
    # not closed: the line is already on disk
    assert read_train_log(tmp_path)[0]["loss/current"] != read_train_log(tmp_path)[0]["loss/current"]  # NaN
    with open(tmp_path / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "step", "ste')  # torn last line
    log.close()
    with TrainLog(tmp_path) as again:
        again.step(2, 1, 0.1, epoch_step=1)
    assert [r["step"] for r in read_train_log(tmp_path)] == [1, 2]  # torn line skipped, the rest kept

def test_plot_loss(tmp_path):
    records = [{"kind": "step", "step": i, "epoch": 1 + i // 10, "loss/current": 1 / (i + 1),
                "loss/average": 1 / (i + 2)} for i in range(30)]
    records += [{"kind": "epoch", "step": 10 * e, "epoch": e, "loss/epoch_average": 0.1 / e} for e in (1, 2, 3)]
    records += [{"kind": "validation", "step": 30, "epoch": 3, "loss/validation/epoch_average": 0.05}]
    png = plot_loss(records, tmp_path / "plots" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob(".*.tmp"))
    assert plot_loss([], tmp_path / "empty.png").exists()


def test_resume_continues_the_moving_average(tmp_path):
    with TrainLog(tmp_path / "a") as full:
        for i, loss in enumerate([0.9, 0.7, 0.8, 0.5, 0.4, 0.6]):
            last = full.step(i + 1, i // 3 + 1, loss)
    with TrainLog(tmp_path / "b") as first:
        for i, loss in enumerate([0.9, 0.7, 0.8, 0.5]):
            first.step(i + 1, i // 3 + 1, loss)
        state = first.state_dict()
    with TrainLog(tmp_path / "b") as second:
        second.load_state_dict(state)
        for i, loss in enumerate([0.4, 0.6], start=4):
            resumed = second.step(i + 1, 2, loss)
    assert resumed["loss/average"] == pytest.approx(last["loss/average"])
    assert resumed["epoch_step"] == last["epoch_step"] == 2


def test_disabled_log_writes_nothing(tmp_path):
    with TrainLog(tmp_path / "out", logging_dir=tmp_path / "tb", enabled=False) as log:
        record = log.step(1, 1, 0.5)
        log.epoch(1, step=1)
    assert record["loss/average"] == 0.5
    assert not (tmp_path / "out").exists() and not (tmp_path / "tb").exists()
