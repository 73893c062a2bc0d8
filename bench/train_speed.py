"""Training-step benchmark: loralab's real training loop against a plain diffusers + LoRA step.

    python bench/train_speed.py --model sd15 --batch 1 8 --steps 10     # on a GPU: SD1.5-size random UNet, 512 px
    python bench/train_speed.py --model tiny --batch 2 --steps 3         # anywhere: tiny model (checks the script)

For each batch size it runs `loralab.recipes.lora.train` on a generated dataset (cached latents, rank-16 LoRA,
bf16 autocast on CUDA) and times the optimizer steps after a warm-up through the loop's step hook; then it
times, in the same process and on the same UNet config, the plain step of ../shared/bench (diffusers UNet,
rank-16 LoRA on attention q/k/v/out, autocast bf16, fused AdamW, random cached-latent inputs). It prints a
table (steps/s, images/s, peak memory, ratio) and writes bench_results.json next to --out.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, layers_per_block=2)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, sample_size=512)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
              pad_token_id=1)


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def write_model(kind: str, folder: Path) -> tuple[dict, int]:
    """A random model of the chosen size as a diffusers folder; returns the UNet config and the image size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loralab.models import tiny

    if kind == "sd15":
        unet_cfg, vae_cfg, te_cfg, res = SD15_UNET, SD15_VAE, CLIP_L, 512
    else:
        unet_cfg, vae_cfg, te_cfg, res = tiny.TINY_SD1_UNET, tiny.TINY_VAE, tiny.TINY_CLIP_L, 64
    torch.manual_seed(0)
    UNet2DConditionModel(**unet_cfg).save_pretrained(folder / "unet")
    AutoencoderKL(**vae_cfg).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**te_cfg)).save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return unet_cfg, res


def write_dataset(folder: Path, n: int, res: int) -> None:
    import numpy as np
    from PIL import Image

    sub = folder / "1_thing"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(sub / f"{i:04d}.png")
        (sub / f"{i:04d}.txt").write_text("thing, red, blue background")


def bench_loralab(model_dir: Path, data_dir: Path, out: Path, res: int, bs: int, steps: int, warm: int, dev: str) -> dict:
    from loralab.config import build_config
    from loralab.recipes.lora import train
    from loralab.train.callbacks import Callback

    times: list[float] = []

    class StepTimes(Callback):
        def on_step_end(self, run) -> None:
            sync(dev)
            times.append(time.perf_counter())
            if dev == "cuda" and len(times) == warm:
                torch.cuda.reset_peak_memory_stats()  # like the plain step: peak of the timed steps, after cuDNN autotuning

    cfg = build_config(None, {
        "pretrained_model_name_or_path": str(model_dir), "train_data_dir": str(data_dir), "output_dir": str(out),
        "output_name": f"bench_bs{bs}", "overwrite": "true", "resolution": str(res), "network_dim": "16", "network_alpha": "16",
        "train_batch_size": str(bs), "max_train_steps": str(warm + steps), "cache_latents": "true",
        "mixed_precision": "bf16" if dev == "cuda" else "no", "network_train_unet_only": "true",
        "learning_rate": "1e-4", "device": dev, "save_precision": "fp16"})
    train(cfg, [StepTimes()])
    dt = (times[-1] - times[warm - 1]) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    return {"what": "loralab train loop", "bs": bs, "s_per_step": dt, "steps_s": 1 / dt, "img_s": bs / dt, "peak_GiB": peak}


class _LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 16):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.up = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def bench_plain(unet_cfg: dict, res: int, bs: int, steps: int, warm: int, dev: str) -> dict:
    """The ../shared/bench baseline step: diffusers UNet in bf16, rank-16 LoRA on attention, autocast, fused AdamW."""
    from diffusers import UNet2DConditionModel

    with torch.device(dev):
        unet = UNet2DConditionModel(**unet_cfg)
    unet.to(torch.bfloat16 if dev == "cuda" else torch.float32)
    for mod in list(unet.modules()):
        if mod.__class__.__name__ == "Attention":
            for attr in ("to_q", "to_k", "to_v"):
                setattr(mod, attr, _LoRALinear(getattr(mod, attr)))
            mod.to_out[0] = _LoRALinear(mod.to_out[0])
    params = [p for m in unet.modules() if isinstance(m, _LoRALinear) for p in (m.down.weight, m.up.weight)]
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev == "cuda")
    lat = res // 8
    x = torch.randn(bs, 4, lat, lat, device=dev)
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (bs,), device=dev)
    ctx = torch.randn(bs, 77, unet_cfg["cross_attention_dim"], device=dev)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")

    def step():
        with amp:
            pred = unet(x + noise, t, ctx).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warm):
        step()
    sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    del unet, opt
    if dev == "cuda":
        torch.cuda.empty_cache()
    return {"what": "plain diffusers + LoRA", "bs": bs, "s_per_step": dt, "steps_s": 1 / dt, "img_s": bs / dt, "peak_GiB": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("sd15", "tiny"), default="tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    work = Path(tempfile.mkdtemp(prefix="loralab_bench_"))
    out = Path(args.out) if args.out else work / "out"
    out.mkdir(parents=True, exist_ok=True)
    unet_cfg, res = write_model(args.model, work / "model")
    write_dataset(work / "data", max(args.batch) * 4, res)
    rows = []
    for bs in args.batch:
        rows.append(bench_loralab(work / "model", work / "data", work / f"run_bs{bs}", res, bs, args.steps, args.warm, dev))
        rows.append(bench_plain(unet_cfg, res, bs, args.steps, args.warm, dev))
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"\nmodel={args.model} res={res} device={device} torch={torch.__version__}")
    print(f"{'what':28} {'bs':>3} {'s/step':>8} {'steps/s':>8} {'img/s':>8} {'peak GiB':>9} {'vs plain':>9}")
    for ours, plain in zip(rows[::2], rows[1::2]):
        for r in (ours, plain):
            ratio = r["img_s"] / plain["img_s"]
            print(f"{r['what']:28} {r['bs']:>3} {r['s_per_step']:>8.4f} {r['steps_s']:>8.2f} {r['img_s']:>8.2f} "
                  f"{r['peak_GiB']:>9.2f} {ratio:>9.2f}")
    (out / "bench_results.json").write_text(json.dumps({"device": device, "model": args.model, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
