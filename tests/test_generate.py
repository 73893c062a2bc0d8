"""`loralab generate`: LoRAs at chosen weights through the one sampler; weight 0 is the base model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from loralab.cli import main
from loralab.network.lora import LoRANetwork, NetworkConfig
from loralab.review.generate import parse_lora_arg


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, _tiny_sd1_model_shared):
    """A LoRA for the tiny SD 1.x model with random (non-zero) up weights, UNet and text encoder."""
    import copy

    model = copy.deepcopy(_tiny_sd1_model_shared)
    net = LoRANetwork.create(model.unet, model.text_encoders, model.family, NetworkConfig(dim=4, alpha=4))
    torch.manual_seed(0)
    for m in net.loras:
        torch.nn.init.normal_(m.lora_up.weight, std=0.5)
    path = tmp_path_factory.mktemp("lora") / "rand.safetensors"
    net.save(path, torch.float32, {"ss_network_dim": "4"})
    return path


def _image(folder) -> np.ndarray:
    (png,) = sorted(folder.glob("*.png"))
    return np.asarray(Image.open(png)).astype(np.int16)


PROMPT = "a red thing --w 64 --h 64 --s 4 --d 7 --l 5"


def test_weight_zero_is_the_base_model_and_weights_stack(tmp_path, tiny_sd1_checkpoint, lora_file, capsys):
    ck = str(tiny_sd1_checkpoint)
    assert main(["generate", "--model", ck, "--out", str(tmp_path / "base"), "--device", "cpu", PROMPT]) == 0
    assert main(["generate", "--model", ck, "--lora", f"{lora_file}:0", "--out", str(tmp_path / "w0"),
                 "--device", "cpu", PROMPT]) == 0
    assert main(["generate", "--model", ck, "--lora", f"{lora_file}:1.0", "--out", str(tmp_path / "w1"),
                 "--device", "cpu", PROMPT]) == 0
    assert main(["generate", "--model", ck, "--lora", f"{lora_file}:0.5", "--lora", f"{lora_file}:0.5",
                 "--out", str(tmp_path / "half2"), "--device", "cpu", PROMPT]) == 0
    base, w0, w1, half2 = (_image(tmp_path / d) for d in ("base", "w0", "w1", "half2"))
    assert base.shape == (64, 64, 3)
    assert np.array_equal(base, w0)
    assert np.abs(w1 - base).mean() > 1.0  # the LoRA changes the picture
    assert np.abs(half2 - w1).max() <= 2  # two LoRAs at 0.5 add up to one at 1.0
    (png,) = (tmp_path / "w1").glob("*.png")
    assert png.name.startswith("gen_00_") and png.name.endswith("_7.png")  # the --d seed in the name
    assert "Seed: 7" in Image.open(png).text["parameters"]


def test_bad_input_gets_a_message_and_no_traceback(tmp_path, tiny_sd1_checkpoint, tiny_sd2_checkpoint, lora_file):
    args = [sys.executable, "-m", "loralab.cli", "generate", "--model", str(tiny_sd2_checkpoint), "--device", "cpu",
            "--lora", str(lora_file), "--out", str(tmp_path / "x"), PROMPT]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error:" in r.stderr and str(lora_file) in r.stderr
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())
    assert main(["generate", "--model", str(tiny_sd1_checkpoint), "--device", "cpu", "a thing --zz 3"]) == 2
    assert main(["generate", "--model", str(tiny_sd1_checkpoint), "--device", "cpu"]) == 2


def test_lora_argument():
    with pytest.raises(Exception, match="is not a file"):
        parse_lora_arg("missing.safetensors:0.8")


def test_lora_argument_weight(lora_file):
    assert parse_lora_arg(f"{lora_file}:0.8").weight == 0.8
    assert parse_lora_arg(f"{lora_file}:-1").weight == -1.0
    assert parse_lora_arg(str(lora_file)).weight == 1.0 and parse_lora_arg(str(lora_file)).path == lora_file
