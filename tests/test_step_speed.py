"""What makes the training step fast without changing what it computes (issue: speed).

- Host reads of device values (`.item()`, `float(t)`, `.tolist()`, `bool(t)`, `.cpu()`, `.numpy()`) are where a GPU
  run waits for the GPU. They are counted here on CPU, where the same Python calls run: the loop reads the
  losses once per `log_every_n_steps`, nothing else in the step reads the device. (Implicit waits inside
  torch, such as a copy from pageable memory, are not Python calls: `data/transfer.py` avoids those.)
- The text encoders' outputs are cached by themselves when they cannot change.
- torch.compile (`torch_compile`) trains the same steps as eager.
"""

from __future__ import annotations

import json

import pytest
import torch

from loralab.config import build_config
from loralab.recipes.lora import LoRARecipe, train
from loralab.train.callbacks import Callback
from loralab.train.loop import fit
from test_train import base_cfg, make_dataset

READS = ("item", "__float__", "tolist", "__bool__", "cpu", "numpy")


def small_run(tmp_path, ckpt, name: str, **kw):
    img = tmp_path / "img"
    if not img.exists():
        make_dataset(tmp_path, concepts=(("4_alpha", 1), ("4_beta", 1)), reg=False, size=(32, 32))
    return build_config(None, base_cfg(ckpt, img, tmp_path / name, resolution=32, network_train_unet_only="true",
                                       **kw))


def step_losses(log_file) -> list[float]:
    rows = [json.loads(line) for line in open(log_file)]
    return [r["loss/current"] for r in rows if r["kind"] == "step"]


class CountReads(Callback):
    """Counts host reads of tensors from the first step's start to the last step's end. Not counted: torch's
    AdamW on CPU reads its per-parameter step counters (`state["step"]`, kept on the CPU); on a GPU loralab
    uses the fused AdamW, whose counters stay on the GPU and are never read."""

    def __init__(self, monkeypatch) -> None:
        self.counts: dict[str, int] = dict.fromkeys(READS, 0)
        self.on = False
        self.optimizer = None
        for name in READS:
            original = getattr(torch.Tensor, name)

            def spy(t, *a, _name=name, _original=original, **k):
                if self.on and not self.is_step_counter(t):
                    self.counts[_name] += 1
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, spy)

    def is_step_counter(self, t) -> bool:
        return t.dim() == 0 and any(t is state.get("step") for state in self.optimizer.state.values())

    def on_train_start(self, run) -> None:
        self.optimizer = run.optimizer
        self.on = True

    def on_step_end(self, run) -> None:
        if run.global_step >= run.max_steps:
            self.on = False


def test_the_loop_reads_the_device_once_per_log_interval(tmp_path, tiny_sd1_checkpoint, monkeypatch):
    cfg = small_run(tmp_path, tiny_sd1_checkpoint, "a", max_train_steps=20, min_snr_gamma=5, noise_offset=0.05,
                    log_every_n_steps=10, save_every_n_epochs=0)
    counter = CountReads(monkeypatch)
    result = train(cfg, [counter])
    assert result.global_step == 20
    # one read at steps 10 and 20 and at each epoch's end (4 steps an epoch: 4, 8, 12, 16; 20 is both)
    assert counter.counts == {**dict.fromkeys(READS, 0), "tolist": 6}
    losses = step_losses(result.log_file)  # every step is still logged, in order, with its own time
    assert len(losses) == 20 and all(0 < x < 10 for x in losses)
    rows = [json.loads(line) for line in open(result.log_file)]
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    assert steps == list(range(1, 21))
    times = [r["time"] for r in rows if r["kind"] == "step"]
    assert times == sorted(times) and len(set(times)) == 20
    epochs = [i for i, r in enumerate(rows) if r["kind"] == "epoch"]  # epoch records follow their steps
    assert all(rows[i - 1]["kind"] == "step" and rows[i - 1]["step"] == rows[i]["step"] for i in epochs)


def test_log_interval_does_not_change_the_losses_and_text_outputs_are_cached(tmp_path, tiny_sd1_checkpoint):
    every = train(small_run(tmp_path, tiny_sd1_checkpoint, "a", max_train_steps=6, log_every_n_steps=1))
    recipe = LoRARecipe()
    run = recipe.prepare(small_run(tmp_path, tiny_sd1_checkpoint, "b", max_train_steps=6, log_every_n_steps=4))
    assert run.te_cache is not None and len(run.te_cache) == 2  # frozen encoders, fixed captions: cached by itself
    late = fit(run, recipe)
    assert step_losses(late.log_file) == step_losses(every.log_file)
    shuffled = LoRARecipe().prepare(small_run(tmp_path, tiny_sd1_checkpoint, "c", max_train_steps=1,
                                              shuffle_caption="true"))
    assert shuffled.te_cache is None  # captions change per step: encoded each step


def test_a_nan_between_reads_stops_at_its_step_before_any_later_save(tmp_path, tiny_sd1_checkpoint):
    from loralab.errors import LoralabError

    class NaNAtStep3(LoRARecipe):
        def loss(self, run, batch, rng, generator):
            loss = super().loss(run, batch, rng, generator)
            return loss * float("nan") if run.global_step == 2 else loss

    cfg = small_run(tmp_path, tiny_sd1_checkpoint, "a", max_train_steps=12, log_every_n_steps=10,
                    save_every_n_steps=2)
    recipe = NaNAtStep3()
    with pytest.raises(LoralabError, match=r"the loss became NaN at step 3 \(epoch 1\); training stopped\. The last "
                                           r"good file is .*lora-step00000002\.safetensors"):
        fit(recipe.prepare(cfg), recipe)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.safetensors")) == ["lora-step00000002.safetensors"]
    rows = [json.loads(line) for line in open(tmp_path / "a" / "train_log.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2]
    assert rows[-1]["event"] == "nan" and rows[-1]["step"] == 3


def test_compiled_and_eager_steps_give_the_same_losses(tmp_path, tiny_sd1_checkpoint, caplog):
    """aot_eager traces the forward and backward graphs as inductor does, without generating C++ (inductor
    takes minutes to compile on 2 CPU cores; its figure is in the README)."""
    eager = train(small_run(tmp_path, tiny_sd1_checkpoint, "eager", max_train_steps=20))
    with caplog.at_level("INFO"):
        compiled = train(small_run(tmp_path, tiny_sd1_checkpoint, "compiled", max_train_steps=20, torch_compile="true",
                                   dynamo_backend="aot_eager"))
    assert "torch.compile: 1 batch shape compiled" in caplog.text
    a, b = step_losses(eager.log_file), step_losses(compiled.log_file)
    assert len(a) == len(b) == 20
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
