"""The training stages of the lab base model: the VAE, then the UNet and the text encoder jointly (with an
EMA of their weights). Each stage stops by time, its share of the run's budget (`train_base.py`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from base_model import (CAPTION_DROPOUT, MIN_SNR_GAMMA, SCHEDULER_CONFIG, Bucket, Plan, StageProgress, autocast,
                        bucket_choice, cosine_lr, ema_decay_at, log, sync, to_unit)


# --------------------------------------------------------------------------------------------- VAE
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
