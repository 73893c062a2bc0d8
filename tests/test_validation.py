"""Validation loss (kohya semantics): held-out images never train, the value is deterministic, it is logged."""

from __future__ import annotations

import json

import pytest

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.recipes.lora import LoRARecipe, train
from loralab.train.validation import validation_batches, validation_loss
from test_train import base_cfg, make_dataset


def test_held_out_images_never_train_and_the_split_is_seeded(tmp_path, tiny_sd1_checkpoint):
    img, reg = make_dataset(tmp_path, concepts=(("2_alpha", 5), ("1_beta", 4)))
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", reg_data_dir=reg,
                                      validation_split=0.4, max_train_epochs=3))
    run = LoRARecipe().prepare(cfg)
    held = {s.entry.path for s in run.val_dataset.samples}
    # per folder: ceil(n * 0.6) train, the rest validate; reg folders are never split
    assert sorted(p.stem for p in held) == sorted(["alpha" + str(i) for i in _held(5)] +
                                                  ["beta" + str(i) for i in _held(4)])
    assert len(held) == 2 + 1 and all(p.parent.name in ("2_alpha", "1_beta") for p in held)
    trained = {s.entry.path for e in range(3) for b in run.dataset.batches_for_epoch(e, cfg.seed) for s in b}
    assert trained and not trained & held
    assert {p.parent.name for p in trained} == {"2_alpha", "1_beta", "1_thing"}
    again = LoRARecipe().prepare(cfg)
    assert {s.entry.path for s in again.val_dataset.samples} == held  # same seed, same split
    run.log.close()
    again.log.close()


def _held(n: int) -> list[int]:
    """The images split_validation holds out of n (seed 1): the same rule, computed independently."""
    import math
    import random

    order = list(range(n))
    random.Random(1).shuffle(order)
    return sorted(order[math.ceil(n * 0.6):])


def test_validating_the_same_weights_twice_gives_the_same_value(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 4),), reg=False)
    val = tmp_path / "val" / "1_alpha"
    val.mkdir(parents=True)
    for p in sorted((img / "1_alpha").iterdir())[:4]:  # two images and their captions as a separate folder
        (val / p.name).write_bytes(p.read_bytes())
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", validation_data_dir=tmp_path / "val",
                                      network_dropout=0.3, max_train_steps=2))
    run = LoRARecipe().prepare(cfg)
    assert len(validation_batches(run)) == 1 and len(validation_batches(run)[0]) == 2
    first = validation_loss(run)
    second = validation_loss(run)
    assert first == second and first > 0
    for m in run.network.modules():  # put back in training mode, dropouts active
        assert m.training
    run.log.close()


def test_validation_loss_is_logged_every_epoch_and_step(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 4),), reg=False)
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", validation_split=0.25,
                                      max_train_epochs=2, validate_every_n_steps=2, train_batch_size=2))
    result = train(cfg)
    records = [json.loads(line) for line in result.log_file.read_text().splitlines()]
    val = [r for r in records if r["kind"] == "validation"]
    by_epoch = [r for r in val if "loss/validation/epoch_average" in r]
    by_step = [r for r in val if "loss/validation/step_current" in r]
    assert [r["epoch"] for r in by_epoch] == [1, 2]  # 3 training images x 2 repeats, batch 2: 3 steps an epoch
    assert [r["step"] for r in by_step] == [2, 4, 6]
    epochs = {r["epoch"]: r["loss/epoch_average"] for r in records if r["kind"] == "epoch"}
    for r in by_epoch:
        assert r["loss/validation/epoch_divergence"] == pytest.approx(r["loss/validation/epoch_average"] - epochs[r["epoch"]])
    from safetensors import safe_open

    with safe_open(str(result.final_file), "pt") as f:
        md = f.metadata()
    assert md["ss_validation_split"] == "0.25" and md["ss_num_train_images"] == "6"


def test_bad_validation_settings_are_refused(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_alpha", 1),), reg=False)
    with pytest.raises(LoralabError, match="validation_split"):
        build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "o", validation_split=1.0))
    with pytest.raises(LoralabError, match="validation_data_dir"):
        build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "o", validation_data_dir=tmp_path / "nope"))
    with pytest.raises(LoralabError, match="validate_every_n_steps"):
        build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "o", validate_every_n_steps=-1))
