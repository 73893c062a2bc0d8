"""Train the lab's tiny SD 1.x-family base model from scratch on the procedural world, within a time budget.

    python tools/lab/train_base.py --out OUT --device cuda --budget-s 330 --seed 0   # a GPU, minutes
    python tools/lab/train_base.py --out OUT --device cpu --budget-s 3600 --seed 0   # 2 CPU cores, ~1 h
    python tools/lab/train_base.py --out OUT --device cpu --budget-s 90 --quick      # smoke test
    python tools/lab/pack.py OUT                                                      # -> src/loralab/lab/assets/

A build tool, not part of the installed package (it imports loralab). The code is in this folder:
`base_model.py` (architecture, run plan, data, helpers, `load_trained`), `base_stages.py` (the VAE and
UNet + text encoder stages), `base_eval.py` (sampling and scoring), this file (the run, `main`).

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
training combinations at CFG 7.5: shape 96.3 %. (That run had cuDNN autotuning on from the start; the
script was then the module `loralab.lab.train_base`, which its report records as the command.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from base_eval import evaluate, fmt_acc
from base_model import (FILES, UNET_MULTIPLE, Report, StageProgress, atomic_save_safetensors, atomic_write_bytes,
                        build_models, configs_dict, decode, encode_means, log, make_plan, render_buckets, sync,
                        tokenize)
from base_stages import copy_ema_into, train_unet_te, train_vae
from loralab.lab import world as W
from loralab.lab.evaluator import accuracy, confusion, train_evaluator
from loralab.models.tokenizer import clip_tokenizer


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/lab/train_base.py", description=__doc__.split("\n\n")[0])
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
        "command": "python tools/lab/train_base.py " + " ".join(sys.argv[1:] if argv is None else argv),
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


if __name__ == "__main__":
    main()
