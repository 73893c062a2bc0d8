"""Train the lab's tiny SD 1.x-family base model from scratch on the procedural world, within a time budget.

    python -m loralab.lab.train_base --out OUT --device cuda --budget-s 330 --seed 0   # a GPU, minutes
    python -m loralab.lab.train_base --out OUT --device cpu --budget-s 3600 --seed 0   # 2 CPU cores, ~1 h
    python -m loralab.lab.train_base --out OUT --device cpu --budget-s 90 --quick      # smoke test

The recipe, top to bottom (`main`):

1. data: render the world (`loralab.lab.world`) into uint8 tensors, one per image size (32×32, 48×32,
   32×48): the base training set (six shapes, held-out triples excluded), and the evaluator's training
   and validation sets (all seven shapes, all triples). Captions are tokenized once with the real CLIP
   tokenizer (`loralab.models.tokenizer.clip_tokenizer`) into a table; row 0 is "" (caption dropout).
2. evaluator: the shape CNN of `loralab.lab.evaluator`, and its own accuracy on clean images.
3. VAE: `AutoencoderKL` (SD layout, f4: 32×32 px -> 8×8×4), loss MSE + 0.5·L1 + 1e-6·KL; then its
   scaling factor = 1 / std of the posterior means, and how well the evaluator reads its reconstructions
   (the ceiling for the whole model).
4. latents: posterior means × scaling factor, cached once on the device.
5. UNet + text encoder, jointly from scratch: SD1 noise schedule (DDPM 1000, scaled_linear
   0.00085-0.012), ε-prediction, min-SNR-γ=5 weighting, 10 % caption dropout to "", AdamW, gradient
   clipping 1.0, EMA of the weights; the learning rate follows a cosine over the *time* budget.
6. evaluation: DDIM 25 steps with CFG on every held-out prompt (triples never trained on) at each
   aspect ratio, scored by the evaluator per attribute; the same on training combinations.
7. files (each written atomically as soon as it exists, so a late failure loses nothing before it):
   unet.safetensors, vae.safetensors, text_encoder.safetensors (fp16 diffusers/transformers state dicts,
   EMA weights), configs.json (everything needed to rebuild them: `load_trained`), evaluator.safetensors,
   report.json (command, seed, device, per-stage steps/times/losses, accuracies) and samples.png.

Every stage stops by time (its share of `--budget-s`), not only by step count; the UNet stage gets what
the others leave. The budget counts from the start of `main` (imports, ~10 s, come before it).

Measured run (seed 0, `--device cuda --budget-s 330`, one NVIDIA H100 80GB HBM3 with 16 CPU cores,
torch 2.11.0+cu130, diffusers 0.42.1, transformers 5.17.0; 323 s in `main`, 344 s wall):
data 13 s (200k images, 16 render processes); evaluator 1192 steps in 16.5 s, 100 % on 2100 clean
images; VAE 1008 steps × 256 in 66 s, 26.5 dB, the evaluator reads its reconstructions at shape 95.4 %
(the ceiling; small crosses and stars blur into circles); UNet+TE 1982 steps × 512 (1.01M samples) in
183 s. Held-out prompts (26 triples × 2 sizes × 3 aspect ratios × 4 seeds = 624 images, DDIM 25):
CFG 7.5: shape 90.9 %, colour 100 %, background 100 %, size 99.5 %; CFG 5: 90.7 / 100 / 100 / 99.7 %;
training combinations at CFG 7.5: shape 96.3 %. (That run had cuDNN autotuning on from the start.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loralab.lab import world as W
from loralab.lab.evaluator import Evaluator, accuracy, confusion, train_evaluator
from loralab.models.tokenizer import clip_tokenizer

log = logging.getLogger("loralab.lab.train_base")

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
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
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


def train_vae(vae, buckets: Sequence[Bucket], plan: Plan, device: torch.device, budget_s: float, seed: int) -> dict:
    """MSE + 0.5·L1 + 1e-6·KL on posterior samples, AdamW, cosine over the time budget."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    cpu_gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=plan.lr_vae, weight_decay=1e-4,
                            fused=device.type == "cuda")
    vae.train()
    prog = StageProgress("vae", budget_s, plan.log_every_s)
    t0 = time.perf_counter()
    step, losses, loss_log = 0, [], []
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s and step > 0:
            break
        for g in opt.param_groups:
            g["lr"] = cosine_lr(plan.lr_vae, step, 100, elapsed / budget_s, floor=0.05)
        b = buckets[bucket_choice(buckets, cpu_gen)]
        idx = torch.randint(0, b.images.shape[0], (plan.batch_vae,), generator=gen, device=device)
        x = to_unit(b.images[idx])
        with autocast(device):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=device)
            rec = vae.decode(z).sample.float()
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.detach())
        if len(losses) >= 50:
            v = float(torch.stack(losses).mean())
            losses.clear()
            loss_log.append((step, round(time.perf_counter() - t0, 1), v))
            prog(step, time.perf_counter() - t0, v)
    sync(device)
    prog.close()
    vae.eval()
    secs = time.perf_counter() - t0
    final = loss_log[-1][2] if loss_log else float(torch.stack(losses).mean())
    log.info("[vae] %d steps in %.1fs (%.1f steps/s, batch %d), loss %.4f", step, secs, step / secs,
             plan.batch_vae, final)
    return {"steps": step, "seconds": round(secs, 1), "batch": plan.batch_vae, "lr": plan.lr_vae,
            "final_loss": final, "loss_curve": loss_log[:: max(1, len(loss_log) // 40)]}


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


# --------------------------------------------------------------------------------------------- UNet + TE
def train_unet_te(unet, te, buckets: Sequence[Bucket], token_table: torch.Tensor, plan: Plan,
                  device: torch.device, budget_s: float, seed: int) -> tuple[dict, list[torch.Tensor]]:
    """Joint UNet + text encoder training from scratch; returns the stats and the EMA parameters."""
    from diffusers import DDPMScheduler

    from loralab.train.noise import min_snr_weight

    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    ac = sched.alphas_cumprod.to(device, torch.float32)
    sqrt_ac, sqrt_1m = ac.sqrt(), (1 - ac).sqrt()
    snr = ac / (1 - ac)
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    cpu_gen = torch.Generator().manual_seed(seed + 2)
    params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad]
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=plan.lr_unet, betas=(0.9, 0.99), fused=device.type == "cuda")
    ema = [p.detach().clone().float() for p in params]
    unet.train()
    te.train()
    prog = StageProgress("unet+te", budget_s, plan.log_every_s)
    warmup = 200 if device.type == "cuda" else 100
    t0 = time.perf_counter()
    step, losses, loss_log, samples = 0, [], [], 0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s and step > 0:
            break
        for g in opt.param_groups:
            g["lr"] = cosine_lr(plan.lr_unet, step, warmup, elapsed / budget_s, floor=0.1)
        b = buckets[bucket_choice(buckets, cpu_gen)]
        n = b.latents.shape[0]
        bs = plan.batch_unet
        idx = torch.randint(0, n, (bs,), generator=gen, device=device)
        lat = b.latents[idx]
        cap = b.captions[idx]
        drop = torch.rand(bs, generator=gen, device=device) < CAPTION_DROPOUT
        cap = torch.where(drop, torch.zeros_like(cap), cap)
        ids = token_table[cap]
        noise = torch.randn(lat.shape, generator=gen, device=device)
        t = torch.randint(0, 1000, (bs,), generator=gen, device=device)
        noisy = sqrt_ac[t, None, None, None] * lat + sqrt_1m[t, None, None, None] * noise  # = scheduler.add_noise
        with autocast(device):
            ctx = te(ids).last_hidden_state
            pred = unet(noisy, t, ctx).sample
        per = (pred.float() - noise).pow(2).mean((1, 2, 3))
        loss = (per * min_snr_weight(snr[t], MIN_SNR_GAMMA)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = ema_decay_at(step, plan.ema_decay)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - d)
        step += 1
        samples += bs
        losses.append(per.detach().mean())
        if len(losses) >= 50:
            v = float(torch.stack(losses).mean())
            losses.clear()
            loss_log.append((step, round(time.perf_counter() - t0, 1), v))
            prog(step, time.perf_counter() - t0, v, lr=opt.param_groups[0]["lr"])
    sync(device)
    prog.close()
    secs = time.perf_counter() - t0
    final = loss_log[-1][2] if loss_log else float(torch.stack(losses).mean())
    log.info("[unet+te] %d steps in %.1fs (%.2f steps/s, batch %d, %d samples), unweighted mse %.4f",
             step, secs, step / secs, plan.batch_unet, samples, final)
    stats = {"steps": step, "seconds": round(secs, 1), "batch": plan.batch_unet, "samples": samples,
             "lr": plan.lr_unet, "ema_decay": plan.ema_decay, "min_snr_gamma": MIN_SNR_GAMMA,
             "caption_dropout": CAPTION_DROPOUT, "final_mse_unweighted": final,
             "loss_curve": loss_log[:: max(1, len(loss_log) // 40)]}
    return stats, ema


def copy_ema_into(unet, te, ema: list[torch.Tensor]) -> None:
    params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)


# --------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate(unet, vae, te, tok, scaling_factor: float, items: Sequence[W.WorldItem], cfg: float, steps: int,
             device: torch.device, seed: int, batch: int = 1024, prompts: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Images (3, H, W) RGB 0..255 for `items` (their captions, or `prompts`, at their image sizes), DDIM
    with classifier-free guidance. Image i's initial noise comes from seed + item.seed + i."""
    from diffusers import DDIMScheduler

    unet.eval()
    te.eval()
    texts = list(prompts) if prompts is not None else [it.caption() for it in items]
    out: list[torch.Tensor | None] = [None] * len(items)
    uncond = te(tokenize(tok, [""], device)).last_hidden_state
    for (w, h), idx in W.group_by_image_size(items).items():
        for s in range(0, len(idx), batch):
            part = idx[s : s + batch]
            ids = tokenize(tok, [texts[i] for i in part], device)
            with autocast(device):
                cond = te(ids).last_hidden_state
            ctx = torch.cat([cond, uncond.to(cond.dtype).expand(len(part), -1, -1)])
            shape = (4, h // VAE_LATENT_FACTOR, w // VAE_LATENT_FACTOR)
            lat = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + items[i].seed + i))
                               for i in part]).to(device)
            sched = DDIMScheduler(**SCHEDULER_CONFIG)
            sched.set_timesteps(steps, device=device)
            for t in sched.timesteps:
                with autocast(device):
                    eps = unet(torch.cat([lat, lat]), t.expand(2 * len(part)), ctx).sample.float()
                e_c, e_u = eps.chunk(2)
                lat = sched.step(e_u + cfg * (e_c - e_u), t, lat).prev_sample
            imgs = decode(vae, lat, scaling_factor)
            for j, i in enumerate(part):
                out[i] = imgs[j].cpu()
    return out  # type: ignore[return-value]


def eval_items(plan: Plan, rng: np.random.Generator, held_out: bool) -> list[W.WorldItem]:
    """The prompts to score: held-out triples × sizes (or as many training combinations), at every image
    size (or cycling through them), `eval_seeds` samples each."""
    base = W.held_out_prompts()
    if not held_out:
        train = W.training_triples()
        pick = rng.choice(len(train), size=len(base), replace=False)
        base = [W.WorldItem(*train[int(k)], list(W.SIZES)[j % 2], 32, 32, 0) for j, k in enumerate(pick)]
    if plan.eval_prompts:
        step = max(1, len(base) // plan.eval_prompts)
        base = base[::step][: plan.eval_prompts]
    out = []
    for j, it in enumerate(base):
        sizes = W.DEFAULT_IMAGE_SIZES if plan.eval_aspects_each else [W.DEFAULT_IMAGE_SIZES[j % 3]]
        for (w, h) in sizes:
            for s in range(plan.eval_seeds):
                out.append(replace(it, width=w, height=h, seed=1000 * s))
    return out


def save_grid(path: Path, images: Sequence[torch.Tensor], items: Sequence[W.WorldItem], preds: Sequence[dict],
              cols: int = 8, scale: int = 3, limit: int = 48) -> None:
    """A grid of samples (each in a 48×48 cell, ×`scale`), caption under each; wrong shape in red."""
    from PIL import Image, ImageDraw

    n = min(limit, len(images))
    cell, text_h = 48 * scale, 24
    rows = max(1, math.ceil(n / cols))
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k in range(n):
        arr = images[k].clamp(0, 255).byte().permute(1, 2, 0).numpy()
        im = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.Resampling.NEAREST)
        x0, y0 = (k % cols) * cell, (k // cols) * (cell + text_h)
        grid.paste(im, (x0 + (cell - im.width) // 2, y0 + (cell - im.height) // 2))
        it, p = items[k], preds[k]
        ok = p.get("shape") == it.shape
        draw.text((x0 + 2, y0 + cell), f"{it.colour} {it.shape}", fill=(0, 0, 0) if ok else (200, 0, 0))
        draw.text((x0 + 2, y0 + cell + 11), f"{it.background} bg, {it.size}", fill=(60, 60, 60))
    tmp = path.with_name(path.name + ".tmp.png")
    grid.save(tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------- main
@dataclass
class Report:
    path: Path
    data: dict = field(default_factory=dict)

    def write(self) -> None:
        atomic_write_bytes(self.path, json.dumps(jsonable(self.data), indent=1).encode())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loralab.lab.train_base", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created; the files are overwritten)")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto (cuda when there is one)")
    p.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget of the whole run, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny data, every stage, same files")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores on a GPU run, else 2)")
    p.add_argument("--workers", type=int, default=0, help="render processes (0: the plan's)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    # CUDA is touched only after the data are rendered (forked render workers).
    device = torch.device(args.device if args.device != "auto" else "cuda" if _has_cuda_no_init() else "cpu")
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    budget = float(args.budget_s)
    plan = make_plan(device, args.quick, budget)
    if args.workers:
        plan.workers = args.workers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = t_start + budget

    def left() -> float:
        return deadline - time.perf_counter()

    import diffusers
    import transformers

    report = Report(out / "report.json", {
        "command": "python -m loralab.lab.train_base " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed, "budget_s": budget, "quick": args.quick, "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__},
        "plan": asdict(plan), "stages": {}, "status": "running",
    })
    stages = report.data["stages"]
    log.info("train_base: device %s (%s), budget %.0fs, seed %d%s", device, report.data["device_name"], budget,
             args.seed, ", quick" if args.quick else "")
    torch.manual_seed(args.seed)
    ss = np.random.SeedSequence(args.seed)
    rng_train, rng_cnn, rng_val, rng_eval = (np.random.default_rng(s) for s in ss.spawn(4))

    # 1. data ---------------------------------------------------------------------------------
    t = time.perf_counter()
    train_items = W.sample_world(plan.n_train, rng_train)
    all7 = W.all_triples(W.SHAPES)
    cnn_items = W.sample_world(plan.n_cnn_train, rng_cnn, triples=all7)
    val_items = W.sample_world(plan.n_cnn_val, rng_val, triples=all7)
    # Render before CUDA is initialised (forked workers).
    train_b = render_buckets(train_items, torch.device("cpu"), plan.workers)
    cnn_b = render_buckets(cnn_items, torch.device("cpu"), plan.workers)
    val_b = render_buckets(val_items, torch.device("cpu"), plan.workers)
    t_render = time.perf_counter() - t
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu)")
        report.data["device_name"] = torch.cuda.get_device_name(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN autotuning costs ~20 s at the first steps of each stage (3 image sizes × every conv);
        # measured on an H100 it pays off only over the long UNet stage (12 vs 10.3 steps/s), not for the
        # VAE (23 vs 20 steps/s), so it is switched on just before the UNet stage.
        torch.backends.cudnn.benchmark = False
    for b in train_b + cnn_b + val_b:
        b.images = b.images.to(device)
    held = set(W.HELD_OUT_TRIPLES)
    assert not any(it.triple in held or it.shape == W.HELD_OUT_SHAPE for it in train_items)
    captions = [""] + sorted({it.caption() for it in train_items})
    cap_index = {c: i for i, c in enumerate(captions)}
    tok = clip_tokenizer()
    token_table = tokenize(tok, captions, device)
    for b in train_b:
        b.captions = torch.tensor([cap_index[it.caption()] for it in b.items], device=device)
    stages["data"] = {"seconds": round(time.perf_counter() - t, 1), "render_seconds": round(t_render, 1),
                      "workers": plan.workers, "train_images": plan.n_train, "evaluator_images": plan.n_cnn_train,
                      "evaluator_val_images": plan.n_cnn_val, "captions": len(captions),
                      "train_triples": len(W.training_triples()), "held_out_triples": len(W.HELD_OUT_TRIPLES),
                      "image_sizes": {f"{b.size[0]}x{b.size[1]}": len(b.items) for b in train_b}}
    log.info("[data] %d train / %d evaluator / %d val images, %d captions in %.1fs (render %.1fs, %d workers)",
             plan.n_train, plan.n_cnn_train, plan.n_cnn_val, len(captions), time.perf_counter() - t, t_render,
             plan.workers)
    report.write()

    # 2. evaluator ----------------------------------------------------------------------------
    t = time.perf_counter()
    shape_ids = {s: i for i, s in enumerate(W.SHAPES)}
    ev_budget = plan.share_evaluator * budget
    prog = StageProgress("evaluator", ev_budget, plan.log_every_s)
    res = train_evaluator(
        [(b.images, torch.tensor([shape_ids[it.shape] for it in b.items], device=device)) for b in cnn_b],
        device=device, time_budget_s=ev_budget, batch_size=plan.batch_cnn, seed=args.seed, progress=prog)
    prog.close()
    evaluator = res.evaluator
    val_imgs = [b.images for b in val_b]
    val_exp = [[it.attributes for it in b.items] for b in val_b]
    val_preds = [evaluator.predict_tensor(x) for x in val_imgs]
    clean = accuracy(sum(val_preds, []), sum(val_exp, []))
    evaluator.info.update({"clean_accuracy": clean, "seed": args.seed})
    evaluator.save(out / "evaluator.safetensors")
    stages["evaluator"] = {"steps": res.steps, "seconds": round(time.perf_counter() - t, 1),
                           "train_seconds": round(res.seconds, 1), "batch": plan.batch_cnn, "final_loss": res.final_loss,
                           "clean_accuracy": clean, "clean_confusion": confusion(sum(val_preds, []), sum(val_exp, []))}
    log.info("[evaluator] %d steps in %.1fs, clean accuracy %s", res.steps, res.seconds, fmt_acc(clean))
    report.write()
    del cnn_b

    # 3. VAE ----------------------------------------------------------------------------------
    unet, vae, te = build_models(args.seed)
    unet.to(device)
    vae.to(device)
    te.to(device)
    t = time.perf_counter()
    stages["vae"] = train_vae(vae, train_b, plan, device, plan.share_vae * budget, args.seed)
    # scaling factor = 1 / std of the posterior means (SD's 0.18215 was found the same way)
    with torch.no_grad():
        ns = [max(1, plan.scaling_images * len(b.items) // plan.n_train) for b in train_b]
        means = torch.cat([encode_means(vae, b.images[:k], device).flatten() for b, k in zip(train_b, ns)])
        scaling_factor = float(1.0 / means.std())
    stages["vae"]["scaling_factor"] = scaling_factor
    stages["vae"]["latent_mean"] = float(means.mean() * scaling_factor)
    # how well the evaluator reads reconstructions: the ceiling of the whole model
    rec_preds, exp_all, psnr = [], [], []
    with torch.no_grad():
        for x, exp in zip(val_imgs, val_exp):  # the whole validation set: all seven shapes
            rec = decode(vae, encode_means(vae, x, device) * scaling_factor, scaling_factor)
            mse = (rec - x.float()).pow(2).mean((1, 2, 3)).clamp(min=1e-3)
            psnr.append(10 * torch.log10(255.0**2 / mse))
            rec_preds += evaluator.predict_tensor(rec)
            exp_all += exp
    psnr_t = torch.cat(psnr).cpu()
    is_ring = torch.tensor([e["shape"] == W.HELD_OUT_SHAPE for e in exp_all])
    stages["vae"].update({
        "psnr_train_shapes": float(psnr_t[~is_ring].mean()), "psnr_ring": float(psnr_t[is_ring].mean()) if is_ring.any() else None,
        "recon_accuracy_train_shapes": accuracy([p for p, r in zip(rec_preds, is_ring) if not r],
                                                [e for e, r in zip(exp_all, is_ring) if not r]),
        "recon_accuracy_ring": accuracy([p for p, r in zip(rec_preds, is_ring) if r], [e for e, r in zip(exp_all, is_ring) if r]),
        "recon_confusion": confusion(rec_preds, exp_all),
        "stage_seconds": round(time.perf_counter() - t, 1)})
    atomic_save_safetensors(out / "vae.safetensors", vae.state_dict())
    log.info("[vae] scaling factor %.4f, PSNR %.1f dB (ring %.1f), evaluator on reconstructions: %s",
             scaling_factor, stages["vae"]["psnr_train_shapes"], stages["vae"]["psnr_ring"] or float("nan"),
             fmt_acc(stages["vae"]["recon_accuracy_train_shapes"]))
    report.write()

    # 4. latents ------------------------------------------------------------------------------
    t = time.perf_counter()
    vae.requires_grad_(False)
    for b in train_b:
        b.latents = encode_means(vae, b.images, device) * scaling_factor
        assert b.latents.shape[-1] % UNET_MULTIPLE == 0 and b.latents.shape[-2] % UNET_MULTIPLE == 0
        b.images = torch.empty((0, *b.images.shape[1:]), dtype=torch.uint8, device=device)  # free the pixels
    sync(device)
    stages["latents"] = {"seconds": round(time.perf_counter() - t, 1),
                         "shapes": {f"{b.size[0]}x{b.size[1]}": list(b.latents.shape) for b in train_b}}
    log.info("[latents] cached %d latents in %.1fs", plan.n_train, stages["latents"]["seconds"])
    report.write()

    # 5. UNet + text encoder ------------------------------------------------------------------
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    unet_budget = max(1.0, left() - plan.reserve_eval_s)
    stats, ema = train_unet_te(unet, te, train_b, token_table, plan, device, unet_budget, args.seed)
    stages["unet_te"] = stats
    copy_ema_into(unet, te, ema)
    del ema
    atomic_save_safetensors(out / "unet.safetensors", unet.state_dict())
    atomic_save_safetensors(out / "text_encoder.safetensors", te.state_dict())
    configs = configs_dict(unet, vae, te, scaling_factor, {
        "sampling": {"scheduler": "DDIMScheduler", "steps": plan.ddim_steps, "cfg": max(plan.cfg_scales)},
        "trained_by": report.data["command"], "seed": args.seed})
    atomic_write_bytes(out / "configs.json", json.dumps(configs, indent=1).encode())
    report.write()

    # 6. evaluation ---------------------------------------------------------------------------
    t = time.perf_counter()
    try:
        evaluate(unet, vae, te, tok, scaling_factor, evaluator, plan, device, rng_eval, args.seed, out, report)
        configs["sampling"]["cfg"] = report.data["recommended_cfg"]
        atomic_write_bytes(out / "configs.json", json.dumps(configs, indent=1).encode())
        report.data["status"] = "done"
    except Exception as e:  # the weights are written already; record the failure instead of losing them
        log.exception("evaluation failed")
        report.data["status"] = f"evaluation failed: {type(e).__name__}: {e}"
    stages["eval"] = {"seconds": round(time.perf_counter() - t, 1)}

    # 7. files --------------------------------------------------------------------------------
    report.data["total_seconds"] = round(time.perf_counter() - t_start, 1)
    report.data["files"] = {f: (out / f).stat().st_size for f in FILES if (out / f).exists() and f != "report.json"}
    report.write()
    log.info("done in %.1fs (budget %.0fs); files in %s: %s", report.data["total_seconds"], budget, out,
             ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in report.data["files"].items()))
    return report.data


def _has_cuda_no_init() -> bool:
    """Whether a CUDA device exists, asked through NVML so that no CUDA context is created yet."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.is_available()


def fmt_acc(acc: dict) -> str:
    return " ".join(f"{k} {100 * acc[k]:.1f}%" for k in ("shape", "colour", "background", "size", "all") if k in acc) + \
        f" (n={acc.get('n', 0)})"


def evaluate(unet, vae, te, tok, scaling_factor: float, evaluator: Evaluator, plan: Plan, device: torch.device,
             rng: np.random.Generator, seed: int, out: Path, report: Report) -> None:
    """Score held-out prompts at each CFG scale, training combinations at the best one; samples.png."""
    held = eval_items(plan, rng, held_out=True)
    exp = [it.attributes for it in held]
    results, best, best_imgs, best_preds = {}, None, None, None
    for cfg in plan.cfg_scales:
        t = time.perf_counter()
        imgs = generate(unet, vae, te, tok, scaling_factor, held, cfg, plan.ddim_steps, device, seed)
        preds = evaluator.predict(imgs)
        acc = accuracy(preds, exp)
        acc["shape_confusion"] = confusion(preds, exp)
        acc["mean_shape_confidence"] = float(np.mean([p["shape_confidence"] for p in preds]))
        acc["seconds"] = round(time.perf_counter() - t, 1)
        results[str(cfg)] = acc
        log.info("[eval] held-out prompts, CFG %.1f: %s in %.1fs", cfg, fmt_acc(acc), acc["seconds"])
        if best is None or (acc["shape"] + acc["colour"] + acc["background"] + acc["size"]) > \
                sum(results[str(best)][k] for k in ("shape", "colour", "background", "size")):
            best, best_imgs, best_preds = cfg, imgs, preds
    report.data["held_out"] = {"prompts": len(W.held_out_prompts()) if not plan.eval_prompts else plan.eval_prompts,
                               "images": len(held), "ddim_steps": plan.ddim_steps, "by_cfg": results}
    report.data["recommended_cfg"] = best
    train_items = eval_items(plan, rng, held_out=False)
    imgs = generate(unet, vae, te, tok, scaling_factor, train_items, best, plan.ddim_steps, device, seed)
    preds = evaluator.predict(imgs)
    acc = accuracy(preds, [it.attributes for it in train_items])
    acc["shape_confusion"] = confusion(preds, [it.attributes for it in train_items])
    report.data["training_combinations"] = {"cfg": best, "images": len(train_items), "accuracy": acc}
    log.info("[eval] training combinations, CFG %.1f: %s", best, fmt_acc(acc))
    ring = [W.WorldItem(W.HELD_OUT_SHAPE, c, b, s, 32, 32, 0) for c, b in (("red", "white"), ("blue", "yellow"))
            for s in W.SIZES][: plan.ring_prompts]
    ring_preds = evaluator.predict(generate(unet, vae, te, tok, scaling_factor, ring, best, plan.ddim_steps, device, seed))
    report.data["ring_prompts_shapes"] = [p["shape"] for p in ring_preds]  # never trained: expect no ring
    order = sorted(range(len(held)), key=lambda i: (held[i].shape, held[i].colour, held[i].background, held[i].size))
    pick = order[:: max(1, len(order) // 48)][:48]
    save_grid(out / "samples.png", [best_imgs[i] for i in pick], [held[i] for i in pick], [best_preds[i] for i in pick])
    h = results[str(best)]
    log.info("[eval] HELD-OUT (CFG %.1f): shape %.1f%%  colour %.1f%%  background %.1f%%  size %.1f%%",
             best, 100 * h["shape"], 100 * h["colour"], 100 * h["background"], 100 * h["size"])


if __name__ == "__main__":
    main()
