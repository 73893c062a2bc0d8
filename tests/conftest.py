"""Shared fixtures: tiny random SD checkpoints written in the LDM single-file layout, and a loaded model.

The whole test session runs offline: HF_HUB_OFFLINE=1 is set before anything imports huggingface_hub.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers/transformers read it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from loralab.models.loader import BaseModel, load_base_model, save_single_file  # noqa: E402
from loralab.models.tiny import tiny_sd_components  # noqa: E402


def write_tiny_checkpoint(path: Path, family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A tiny random `family` model saved by save_single_file. Its `loralab.*` metadata (written by
    save_single_file from the model configs) carries the tiny head counts that shapes cannot tell."""
    c = tiny_sd_components(family, seed=seed)
    tes = [c["text_encoder"]] + ([c["text_encoder_2"]] if "text_encoder_2" in c else [])
    save_single_file(path, c["unet"], c["vae"], tes, family=family, dtype=dtype)
    return path


@pytest.fixture(scope="session")
def tiny_sd1_checkpoint(tmp_path_factory) -> Path:
    """Path of a tiny SD 1.x checkpoint (LDM layout .safetensors, fp32, components of tiny_sd_components("sd1"))."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sd1.safetensors", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_checkpoint(tmp_path_factory) -> Path:
    """Path of a tiny SD 2.x checkpoint (OpenCLIP text encoder, linear proj_in, per-level heads), fp32."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sd2.safetensors", "sd2")


@pytest.fixture(scope="session")
def _tiny_sd1_model_shared(tiny_sd1_checkpoint) -> BaseModel:
    return load_base_model(tiny_sd1_checkpoint)


@pytest.fixture
def tiny_sd1_model(_tiny_sd1_model_shared) -> BaseModel:
    """The tiny SD 1.x checkpoint loaded (fp32). Each test gets its own deep copy, so it may modify it
    (inject LoRA, move devices) freely."""
    return copy.deepcopy(_tiny_sd1_model_shared)

@pytest.fixture
def one_thread():
    """One torch thread for the test (lab runs are reproducible and lighter on 2 cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
