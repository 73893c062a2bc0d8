"""The lab base model at build time: its architecture, the run plan, data buckets, helpers, and how to
rebuild a trained model from a `train_base.py` output folder. Used by `train_base.py`, `base_stages.py`,
`base_eval.py` and `pack.py` (this folder); the shipped model's run-time side is `loralab.lab.model`."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loralab.lab import world as W
from loralab.lab.model import SCHEDULER_CONFIG

log = logging.getLogger("lab.train_base")


# --------------------------------------------------------------------------------------------- model
# Every channel count is a multiple of 32 (GroupNorm 32: LDM single files do not record group counts).
# Head counts are not recorded in an LDM file either; the choices follow the SD1 conventions a loader
# assumes: UNet num_heads = 8 (diffusers `attention_head_dim=8`), CLIP head size 64 (heads = hidden / 64).
TE_HIDDEN = 64
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=TE_HIDDEN,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    use_linear_projection=False,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
)
TE_CONFIG = dict(
    vocab_size=49408,
    hidden_size=TE_HIDDEN,
    intermediate_size=4 * TE_HIDDEN,
    num_hidden_layers=4,
    num_attention_heads=TE_HIDDEN // 64,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=TE_HIDDEN,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
VAE_LATENT_FACTOR = 4  # pixels per latent cell (two downsamplings)
UNET_MULTIPLE = 2  # latent sides must be divisible by this (one downsampling)
MIN_SNR_GAMMA = 5.0
CAPTION_DROPOUT = 0.10
FILES = ("unet.safetensors", "vae.safetensors", "text_encoder.safetensors", "configs.json",
         "evaluator.safetensors", "report.json", "samples.png")


# --------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Data sizes, batch sizes and time shares for one kind of run (`make_plan`)."""

    n_train: int  # base-model images (VAE and UNet)
    n_cnn_train: int  # evaluator training images (all 7 shapes)
    n_cnn_val: int  # clean images to measure the evaluator
    share_evaluator: float  # of the budget
    share_vae: float
    reserve_eval_s: float  # kept for evaluation + writing after the UNet stage
    batch_cnn: int
    batch_vae: int
    batch_unet: int
    lr_vae: float
    lr_unet: float
    ema_decay: float
    eval_prompts: int  # held-out prompts scored (of 52); 0 = all
    eval_aspects_each: bool  # every prompt at every image size (else cycle through sizes)
    eval_seeds: int
    ddim_steps: int
    cfg_scales: tuple[float, ...]
    workers: int
    log_every_s: float
    scaling_images: int = 20000
    ring_prompts: int = 4  # prompts with the never-trained shape word "ring" (expect no ring)


def make_plan(device: torch.device, quick: bool, budget_s: float) -> Plan:
    """GPU: big batches (the tiny model is launch-bound), ~200k images. CPU: the feasibility study's
    batch sizes. Quick: a smoke test that runs every stage on tiny data in about a minute."""
    cpus = os.cpu_count() or 1
    if quick:
        return Plan(n_train=1200, n_cnn_train=1200, n_cnn_val=140, share_evaluator=0.10, share_vae=0.15,
                    reserve_eval_s=min(25.0, 0.3 * budget_s), batch_cnn=64, batch_vae=16, batch_unet=32,
                    lr_vae=1e-3, lr_unet=1e-3, ema_decay=0.99, eval_prompts=6, eval_aspects_each=False,
                    eval_seeds=1, ddim_steps=8, cfg_scales=(5.0,), workers=1, log_every_s=5.0,
                    scaling_images=300, ring_prompts=1)
    if device.type == "cuda":
        return Plan(n_train=200_000, n_cnn_train=40_000, n_cnn_val=2100, share_evaluator=0.05, share_vae=0.20,
                    reserve_eval_s=max(25.0, 0.07 * budget_s), batch_cnn=512, batch_vae=256, batch_unet=512,
                    lr_vae=1e-3, lr_unet=1e-3, ema_decay=0.999, eval_prompts=0, eval_aspects_each=True,
                    eval_seeds=4, ddim_steps=25, cfg_scales=(3.0, 5.0, 7.5), workers=min(16, cpus),
                    log_every_s=10.0)
    return Plan(n_train=30_000, n_cnn_train=12_000, n_cnn_val=1400, share_evaluator=0.05, share_vae=0.22,
                reserve_eval_s=max(30.0, 0.05 * budget_s), batch_cnn=128, batch_vae=16, batch_unet=32,
                lr_vae=1e-3, lr_unet=5e-4, ema_decay=0.999, eval_prompts=0, eval_aspects_each=False,
                eval_seeds=1, ddim_steps=25, cfg_scales=(5.0,), workers=min(2, cpus), log_every_s=30.0)


# --------------------------------------------------------------------------------------------- helpers
class StageProgress:
    """Progress of a time-budgeted stage: a tqdm bar on a terminal, else a log line every `every_s`."""

    def __init__(self, name: str, budget_s: float, every_s: float):
        self.name, self.budget_s, self.every_s = name, budget_s, every_s
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=round(budget_s), desc=name, unit="s", leave=False)

    def __call__(self, step: int, elapsed: float, loss: float, **extra: float) -> None:
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.n = min(round(elapsed), self.bar.total)
            self.bar.set_postfix(step=step, loss=f"{loss:.4f}", refresh=True)
            return
        if now - self.last >= self.every_s:
            more = "".join(f" {k}={v:.4g}" for k, v in extra.items())
            log.info("[%s] step %d  %.0f/%.0fs  loss %.4f%s", self.name, step, elapsed, self.budget_s, loss, more)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cosine_lr(base: float, step: int, warmup: int, frac: float, floor: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `base` to `floor`·base over the time fraction."""
    cos = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return base * min(1.0, (step + 1) / warmup) * cos


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with a warm-up, so a short run still averages sensibly: min(decay, (1+n)/(10+n))."""
    return min(decay, (1 + step) / (10 + step))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    from loralab.io import atomic_write_bytes as write

    write(path, data)


def atomic_save_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    from loralab.io import atomic_write

    state = {k: v.detach().to("cpu", torch.float16).contiguous() if v.is_floating_point() else
             v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# --------------------------------------------------------------------------------------------- data
@dataclass
class Bucket:
    """All images of one image size: uint8 pixels (n, 3, H, W) on the device, and per-image labels."""

    size: W.Size
    images: torch.Tensor
    items: list[W.WorldItem]
    captions: torch.Tensor | None = None  # (n,) rows of the token table
    latents: torch.Tensor | None = None


def render_buckets(items: Sequence[W.WorldItem], device: torch.device, workers: int) -> list[Bucket]:
    out = []
    for size, idx in W.group_by_image_size(items).items():
        its = [items[i] for i in idx]
        arr = W.render_many(its, workers=workers)
        out.append(Bucket(size, torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(device), its))
    return out


def tokenize(tok, captions: Sequence[str], device: torch.device) -> torch.Tensor:
    """(n, 77) input ids with the real CLIP tokenizer `tok` (`loralab.models.tokenizer.clip_tokenizer()`),
    padded to 77 with <|endoftext|> as SD 1.x does."""
    ids = tok(list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


def bucket_choice(buckets: Sequence[Bucket], gen: torch.Generator) -> int:
    """Index of the bucket for the next batch, in proportion to the buckets' image counts."""
    counts = torch.tensor([float(len(b.items)) for b in buckets])
    return int(torch.multinomial(counts / counts.sum(), 1, generator=gen))


# --------------------------------------------------------------------------------------------- models
def build_models(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    te = CLIPTextModel(CLIPTextConfig(**TE_CONFIG))
    return unet, vae, te


def configs_dict(unet, vae, te, scaling_factor: float, extra: dict) -> dict:
    vae_cfg = dict(vae.config)
    vae_cfg["scaling_factor"] = scaling_factor
    te_cfg = te.config.to_dict()
    te_cfg.pop("transformers_version", None)
    return jsonable({
        "format": "loralab lab model v1: diffusers/transformers state dicts in fp16",
        "family": "sd1",
        "unet": {"class": "diffusers.UNet2DConditionModel", "config": dict(unet.config)},
        "vae": {"class": "diffusers.AutoencoderKL", "config": vae_cfg},
        "text_encoder": {"class": "transformers.CLIPTextModel", "config": te_cfg},
        "vae_scaling_factor": scaling_factor,
        "scheduler": {"class": "diffusers.DDPMScheduler", "config": SCHEDULER_CONFIG},
        "tokenizer": "loralab.models.tokenizer.clip_tokenizer() (real CLIP BPE, pad <|endoftext|>, 77 tokens)",
        "text_conditioning": "CLIPTextModel last_hidden_state (after final_layer_norm), all 77 positions",
        "world": {
            "shapes_trained": list(W.TRAIN_SHAPES), "shape_never_trained": W.HELD_OUT_SHAPE,
            "colours": list(W.COLOURS), "backgrounds": list(W.BACKGROUNDS), "palette": W.PALETTE,
            "sizes": W.SIZES, "image_sizes": list(W.DEFAULT_IMAGE_SIZES),
            "held_out_triples": list(W.HELD_OUT_TRIPLES),
            "caption_example": W.caption("circle", "red", "blue", "large"),
        },
        **extra,
    })


def load_trained(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Rebuild (unet, vae, text_encoder, configs) from a `train_base` output folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    cfg = json.loads((folder / "configs.json").read_text())
    unet = UNet2DConditionModel.from_config(cfg["unet"]["config"])
    vae = AutoencoderKL.from_config(cfg["vae"]["config"])
    te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]["config"]))
    for m, name in ((unet, "unet"), (vae, "vae"), (te, "text_encoder")):
        missing, unexpected = m.load_state_dict(load_file(str(folder / f"{name}.safetensors")), strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise RuntimeError(f"{name}: missing {missing[:5]} unexpected {unexpected[:5]}")
        m.to(device)
        if dtype != torch.float32:
            m.to(dtype)
        m.eval()
    return unet, vae, te, cfg


# --------------------------------------------------------------------------------------------- VAE
def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 127.5 - 1.0


def to_uint8_range(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


@torch.no_grad()
def encode_means(vae, images_uint8: torch.Tensor, device: torch.device, chunk: int = 4096) -> torch.Tensor:
    outs = []
    for i in range(0, images_uint8.shape[0], chunk):
        outs.append(vae.encode(to_unit(images_uint8[i : i + chunk].to(device))).latent_dist.mean.float())
    return torch.cat(outs)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scaling_factor: float, chunk: int = 2048) -> torch.Tensor:
    """Latents (already × scaling factor) -> RGB 0..255 float (n, 3, H, W)."""
    outs = []
    for i in range(0, latents.shape[0], chunk):
        with autocast(latents.device):
            outs.append(to_uint8_range(vae.decode(latents[i : i + chunk] / scaling_factor).sample))
    return torch.cat(outs)


@dataclass
class Report:
    """report.json of a run, rewritten (atomically) after every stage."""

    path: Path
    data: dict = field(default_factory=dict)

    def write(self) -> None:
        atomic_write_bytes(self.path, json.dumps(jsonable(self.data), indent=1).encode())
