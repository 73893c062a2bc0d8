"""Scoring the trained lab base model: DDIM + CFG samples of held-out and training prompts, read by the
lab evaluator, and a grid of samples (`samples.png`).

`generate` is the batched twin of the package's sampler (`loralab.lab.model.LabModel.generate`, which
runs `loralab.train.sampling`'s loop one image at a time): the same DDIM schedule, CFG and per-image seeds
(image i's noise from seed + item.seed + i), but whole image-size groups per UNet call, because here
thousands of images are scored inside the GPU run's time budget (in bf16 autocast on a GPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from base_model import SCHEDULER_CONFIG, VAE_LATENT_FACTOR, Plan, Report, autocast, decode, log, tokenize
from loralab.lab import world as W
from loralab.lab.evaluator import Evaluator, accuracy, confusion


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

