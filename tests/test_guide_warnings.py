"""The guide's warnings, each with a case that triggers it and one that does not, and the metadata keys that
UIs read to route a LoRA (v-prediction, network args, UNet-only text-encoder lr)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from loralab.analyze.check_report import BucketSettings
from loralab.analyze.dataset_check import MAX_REPEATS, check_dataset
from loralab.config import build_config
from loralab.train.metadata import RunInfo, build_metadata
from loralab.train.optim import safeguard_warmup_warning


def _dataset(root: Path, repeats: int) -> Path:
    train = root / "train"
    for i in range(4):
        d = train / f"{repeats}_alice"
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(d / f"a{i}.png")
        (d / f"a{i}.txt").write_text(f"alice, smile, pose{i}")
    return train


def test_repeats_above_five_are_a_warning(tmp_path):
    report = check_dataset(_dataset(tmp_path / "six", MAX_REPEATS + 1), settings=BucketSettings(batch_size=4),
                           progress=False)
    (p,) = [p for p in report.problems if p.code == "too_many_repeats"]
    assert p.level == "warning" and p.concept == "6_alice"
    assert p.message.startswith("6 repeats: more than 5 only show the same images more often and overfit them")


def test_five_repeats_are_not(tmp_path):
    report = check_dataset(_dataset(tmp_path / "five", MAX_REPEATS), settings=BucketSettings(batch_size=4),
                           progress=False)
    assert not [p for p in report.problems if p.code == "too_many_repeats"]


def test_prodigy_safeguard_warmup_without_warmup_is_a_warning():
    for args in (["safeguard_warmup=True"], "d_coef=2 safeguard_warmup=True", ["decouple=True", "safeguard_warmup=True"]):
        for warmup in (0, 0.0, "0%", None):
            w = safeguard_warmup_warning("Prodigy", args, warmup)
            assert w and w.startswith("optimizer_args safeguard_warmup=True with no warmup"), (args, warmup)
    assert safeguard_warmup_warning("prodigy", ["safeguard_warmup=True"], 0)  # kohya's names are case-blind


def test_safeguard_warmup_with_warmup_or_other_optimizers_is_not():
    assert safeguard_warmup_warning("Prodigy", ["safeguard_warmup=True"], 100) is None
    assert safeguard_warmup_warning("Prodigy", ["safeguard_warmup=True"], "5%") is None
    assert safeguard_warmup_warning("Prodigy", ["safeguard_warmup=True"], 0.05) is None
    assert safeguard_warmup_warning("Prodigy", ["safeguard_warmup=False"], 0) is None
    assert safeguard_warmup_warning("Prodigy", [], 0) is None
    assert safeguard_warmup_warning("AdamW", ["weight_decay=0.1"], 0) is None



def test_locon_and_loha_dims_above_32_are_a_warning(tmp_path, tiny_sd1_checkpoint):
    from loralab.train.guide import guide_warnings, network_dim_warning

    locon = _cfg(tmp_path, tiny_sd1_checkpoint, network_dim=16, conv_dim=64)
    assert "LoCon with conv_dim = 64" in network_dim_warning(locon)
    loha = _cfg(tmp_path, tiny_sd1_checkpoint, network_module="lycoris.kohya", network_dim=48)
    loha.network_args = ["algo=loha"]
    assert "LoHa with network_dim = 48" in guide_warnings(loha)[0] and "rank dim²" in guide_warnings(loha)[0]
    # not: plain LoRA at dim 64 (no conv layers), LoCon at 32/32, LoHa at 32
    assert network_dim_warning(_cfg(tmp_path, tiny_sd1_checkpoint, network_dim=64)) is None
    assert network_dim_warning(_cfg(tmp_path, tiny_sd1_checkpoint, network_dim=32, conv_dim=32)) is None
    loha.network_dim = 32
    assert guide_warnings(loha) == []


def test_adaptive_optimizer_with_a_small_learning_rate_is_a_warning(tmp_path, tiny_sd1_checkpoint):
    from loralab.train.guide import adaptive_lr_warning

    assert "around 1.0" in adaptive_lr_warning(_cfg(tmp_path, tiny_sd1_checkpoint, optimizer_type="Prodigy"))
    assert adaptive_lr_warning(_cfg(tmp_path, tiny_sd1_checkpoint, optimizer_type="Prodigy", learning_rate=1.0)) is None
    assert adaptive_lr_warning(_cfg(tmp_path, tiny_sd1_checkpoint, optimizer_type="AdamW")) is None

# ------------------------------------------------------------------------------------------- metadata
def _run(family: str = "sd1", v: bool = False, network_args: dict | None = None) -> RunInfo:
    return RunInfo(session_id=1, started_at=0.0, family=family, v_parameterization=v, model_name="m",
                   model_hash="h", vae_name="", num_train_images=4, num_reg_images=0, num_batches_per_epoch=2,
                   num_epochs=1, max_train_steps=2, optimizer_desc="AdamW", tag_frequency={}, dataset_dirs={},
                   reg_dataset_dirs={}, bucket_info=None, network_args=network_args or {})


def _cfg(tmp_path: Path, ckpt: Path, **kw) -> object:
    values = {"pretrained_model_name_or_path": str(ckpt), "train_data_dir": str(tmp_path),
              "output_dir": str(tmp_path / "out"), "network_dim": "4", "network_alpha": "2", "learning_rate": "1e-3"}
    return build_config(None, {**values, **{k: str(v) for k, v in kw.items()}})


def test_v_prediction_is_recorded_for_every_family(tmp_path, tiny_sd1_checkpoint):
    cfg = _cfg(tmp_path, tiny_sd1_checkpoint, v_parameterization="true", zero_terminal_snr="true")
    for family in ("sd1", "sd2", "sdxl"):
        md = build_metadata(cfg, _run(family, v=True), epoch=1, step=2, final=True)
        assert md["ss_v_parameterization"] == "True" and md["modelspec.prediction_type"] == "v", family
        assert md["ss_zero_terminal_snr"] == "True"
    md = build_metadata(_cfg(tmp_path, tiny_sd1_checkpoint), _run("sdxl"), epoch=1, step=2, final=True)
    assert "ss_v_parameterization" not in md and md["ss_zero_terminal_snr"] == "False"


def test_network_args_only_when_given(tmp_path, tiny_sd1_checkpoint):
    md = build_metadata(_cfg(tmp_path, tiny_sd1_checkpoint), _run(), epoch=1, step=2, final=True)
    assert "ss_network_args" not in md  # kohya writes it only when network_args were given
    md = build_metadata(_cfg(tmp_path, tiny_sd1_checkpoint), _run(network_args={"conv_dim": 4, "conv_alpha": 1}), epoch=1, step=2,
                        final=True)
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1"}


def test_text_encoder_lr_is_zero_for_unet_only_runs(tmp_path, tiny_sd1_checkpoint):
    md = build_metadata(_cfg(tmp_path, tiny_sd1_checkpoint, network_train_unet_only="true", text_encoder_lr="5e-5"), _run(), epoch=1,
                        step=2, final=True)
    assert md["ss_text_encoder_lr"] == "0" and md["ss_unet_lr"] == "0.001"
    md = build_metadata(_cfg(tmp_path, tiny_sd1_checkpoint, text_encoder_lr="5e-5"), _run(), epoch=1, step=2, final=True)
    assert md["ss_text_encoder_lr"] == "5e-05"


def test_train_and_dry_run_say_the_safeguard_warning_before_the_model_loads(tmp_path, tiny_sd1_checkpoint, caplog):
    import json

    from loralab.cli import main as cli_main
    from test_train import base_cfg, make_dataset

    img, _ = make_dataset(tmp_path, concepts=(("1_solo", 1),), reg=False)
    keys = base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", optimizer_type="Prodigy", learning_rate=1.0)
    toml = tmp_path / "c.toml"
    toml.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items()) + '\noptimizer_args = ["safeguard_warmup=True"]\n')
    with caplog.at_level("WARNING"):
        assert cli_main(["train", "--config", str(toml), "--dry-run"]) == 0
    assert "safeguard_warmup=True with no warmup" in caplog.text
    caplog.clear()
    toml.write_text(toml.read_text() + 'lr_warmup_steps = 10\nlr_scheduler = "constant_with_warmup"\n')
    with caplog.at_level("WARNING"):
        assert cli_main(["train", "--config", str(toml), "--dry-run"]) == 0
    assert "safeguard_warmup" not in caplog.text
