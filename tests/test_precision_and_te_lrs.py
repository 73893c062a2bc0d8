"""text_encoder_lr as one value per text encoder (SDXL's TE1 / TE2 groups), and full_fp16 / full_bf16 (the
LoRA weights and their gradients in half precision)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from loralab.config import build_config
from loralab.models.loader import save_single_file
from loralab.models.tiny import tiny_sd_components
from loralab.network.lora import LoRANetwork, NetworkConfig
from loralab.recipes.lora import train
from loralab.train.callbacks import Callback
from test_train import base_cfg, make_dataset


@pytest.fixture(scope="module")
def sdxl_parts():
    c = tiny_sd_components("sdxl", seed=0)
    return c["unet"], [c["text_encoder"], c["text_encoder_2"]]


def _names(groups):
    return [(g["name"], g["lr"]) for g in groups]


def test_sdxl_text_encoders_get_their_own_lr(sdxl_parts):
    unet, tes = sdxl_parts
    net = LoRANetwork.create(unet, tes, "sdxl", NetworkConfig(dim=2))
    te1 = [m for m in net.text_encoder_loras if m.lora_name.startswith("lora_te1_")]
    te2 = [m for m in net.text_encoder_loras if m.lora_name.startswith("lora_te2_")]
    assert te1 and te2 and len(te1) + len(te2) == len(net.text_encoder_loras)

    groups = net.param_groups(unet_lr=1e-4, text_encoder_lr=[1e-5, 2e-5], learning_rate=1e-3)
    assert _names(groups) == [("textencoder1", 1e-5), ("textencoder2", 2e-5), ("unet", 1e-4)]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for m in te1 for p in m.parameters()]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for m in te2 for p in m.parameters()]

    # one value, or two equal values: the single "textencoder" group, exactly as before
    one = net.param_groups(unet_lr=1e-4, text_encoder_lr=3e-5, learning_rate=1e-3)
    for same in ([3e-5], [3e-5, 3e-5]):
        groups = net.param_groups(unet_lr=1e-4, text_encoder_lr=same, learning_rate=1e-3)
        assert _names(groups) == _names(one) == [("textencoder", 3e-5), ("unet", 1e-4)]
        assert [id(p) for p in groups[0]["params"]] == [id(p) for p in one[0]["params"]]

    # 0 for one encoder: its group is dropped and its LoRA frozen (kohya's "NO LR skipping!")
    groups = net.param_groups(unet_lr=1e-4, text_encoder_lr=[0.0, 2e-5], learning_rate=1e-3)
    assert _names(groups) == [("textencoder2", 2e-5), ("unet", 1e-4)]
    assert not any(p.requires_grad for m in te1 for p in m.parameters())
    assert all(p.requires_grad for m in te2 for p in m.parameters())


def test_a_single_text_encoder_takes_the_first_value(caplog):
    c = tiny_sd_components("sd1", seed=0)
    net = LoRANetwork.create(c["unet"], [c["text_encoder"]], "sd1", NetworkConfig(dim=2))
    with caplog.at_level(logging.WARNING, logger="loralab.network.lora"):
        groups = net.param_groups(unet_lr=None, text_encoder_lr=[1e-5, 2e-5], learning_rate=1e-4)
    assert _names(groups) == [("textencoder", 1e-5), ("unet", 1e-4)]
    assert "one text encoder" in caplog.text


@pytest.fixture
def paths(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    (tmp_path / "data").mkdir()
    return {"pretrained_model_name_or_path": str(model), "train_data_dir": str(tmp_path / "data")}


@pytest.mark.parametrize("value, expected, trains", [
    ("2e-5", 2e-5, True),
    (["1e-5", "2e-5"], [1e-5, 2e-5], True),  # command line: --text_encoder_lr 1e-5 2e-5
    ([1e-5, 2e-5], [1e-5, 2e-5], True),  # TOML list
    ([3e-5], 3e-5, True),
    ("1e-5,2e-5", [1e-5, 2e-5], True),
    ([], -1.0, True),  # kohya: none given = learning_rate
    ([0, 0], [0.0, 0.0], False),  # 0 for both = UNet only
    ([0, 1e-5], [0.0, 1e-5], True),
    ("0", 0.0, False),
])
def test_text_encoder_lr_values_and_trains_text_encoder(paths, value, expected, trains):
    cfg = build_config(None, {**paths, "text_encoder_lr": value})
    assert cfg.text_encoder_lr == pytest.approx(expected) and type(cfg.text_encoder_lr) is type(expected)
    assert cfg.trains_text_encoder() is trains


def test_text_encoder_lr_list_from_toml(paths, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("text_encoder_lr = [1e-5, 2e-5]\n")
    assert build_config(toml, paths).text_encoder_lr == [1e-5, 2e-5]


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_sdxl_file(tmp_path_factory) -> Path:
    c = tiny_sd_components("sdxl", seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors"
    save_single_file(path, c["unet"], c["vae"], [c["text_encoder"], c["text_encoder_2"]], family="sdxl",
                     dtype=torch.float32)
    return path


class Capture(Callback):
    def __init__(self):
        self.seen = {}

    def on_train_start(self, run):
        self.seen["groups"] = [(g["name"], g["lr"]) for g in run.optimizer.param_groups]
        self.seen["dtypes"] = {p.dtype for p in run.params}
        self.seen["scaler"] = type(run.scaler).__name__
        grads = self.seen["grad_dtypes"] = set()
        for p in run.params:
            p.register_hook(lambda g: grads.add(g.dtype))


def test_sdxl_run_trains_each_text_encoder_at_its_lr(tmp_path, tiny_sdxl_file):
    rng = np.random.default_rng(0)
    d = tmp_path / "img" / "2_chara"
    d.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"i{i}.png")
        (d / f"i{i}.txt").write_text(f"chara, tag{i}")
    cap = Capture()
    cfg = build_config(None, {**base_cfg(tiny_sdxl_file, tmp_path / "img", tmp_path / "out", max_train_steps=2),
                              "text_encoder_lr": ["2e-3", "4e-3"], "unet_lr": "1e-3"})
    result = train(cfg, [cap])
    assert cap.seen["groups"] == [("textencoder1", 2e-3), ("textencoder2", 4e-3), ("unet", 1e-3)]
    records = [line for line in result.log_file.read_text().splitlines() if '"kind": "step"' in line]
    assert '"lr/textencoder1": 0.002' in records[-1] and '"lr/textencoder2": 0.004' in records[-1]
    with safe_open(str(result.final_file), "pt") as f:
        md = f.metadata()
        ups = {k: f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")}
    assert md["ss_text_encoder_lr"] == "[0.002, 0.004]"
    for prefix in ("lora_te1_", "lora_te2_"):  # both encoders trained
        assert any(v.abs().sum() > 0 for k, v in ups.items() if k.startswith(prefix))


@pytest.mark.parametrize("mixed, key, dtype, scaler, optimizer", [
    ("fp16", "full_fp16", torch.float16, "Fp16GradScaler", "Lion"),  # Adam's eps=1e-8 is 0 in fp16: see below
    ("bf16", "full_bf16", torch.bfloat16, "NoneType", "AdamW"),
])
def test_full_half_precision_trains_the_lora_in_half(tmp_path, tiny_sd1_checkpoint, mixed, key, dtype, scaler,
                                                     optimizer):
    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 2),), reg=False)
    cap = Capture()
    result = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_steps=3,
                                               mixed_precision=mixed, optimizer_type=optimizer, learning_rate=1e-4,
                                               **{key: "true"})), [cap])
    assert cap.seen["dtypes"] == {dtype} and cap.seen["grad_dtypes"] == {dtype} and cap.seen["scaler"] == scaler
    with safe_open(str(result.final_file), "pt") as f:
        md = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert md["ss_full_fp16"] == str(key == "full_fp16")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in sd.values())  # save_precision float
    assert any(t.abs().sum() > 0 for k, t in sd.items() if k.endswith("lora_up.weight"))  # it trained
    assert np.isfinite(result.last_loss)


def test_full_fp16_warns_about_adam_eps(caplog):
    from loralab.config import TrainConfig
    from loralab.train.optim import build_optimizer

    def built(**kw):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="loralab.train.optim"):
            build_optimizer(TrainConfig(mixed_precision="fp16", **kw), [torch.nn.Parameter(torch.zeros(2))], 10)
        return caplog.text

    assert "eps=1e-08" in built(full_fp16=True) and "AdamW8bit" in built(full_fp16=True)
    assert built(full_fp16=True, optimizer_args=["eps=1e-4"]) == ""
    assert built(full_fp16=True, optimizer_type="Lion") == "" and built() == ""
