"""Host-side overhead of loralab's training loop: `fit` against a bare step on the same model, in one process.

    python bench/step_overhead.py                    # tiny SD 1.x model, batch 2, 32 px, 60 timed steps, 3 rounds
    python bench/step_overhead.py --model lab --batch 4 --steps 40 --out bench/results/step_overhead_2cpu.json

Both sides use the same prepared run (`train/run.py` prepare: model, LoRA network hooked into the UNet, optimizer,
latent cache): the bare step is what any trainer must do (UNet forward on fixed noisy latents and text
conditioning, MSE, backward, optimizer step, zero_grad) with nothing else: no dataset, captions, logging,
progress bar or callbacks. `fit` is loralab's loop as `loralab train` runs it (captions, cached latents, noise,
the loss options, the NaN guard, the optimizer and LR schedule, the JSON-lines log, the progress bar, the
save / sample callbacks). The bare step is timed just before and just after the loop
(their mean), so a drift in machine load hits both sides; the figure is loop s/step ÷ bare s/step, the median over rounds (1.0 = no overhead).
On a GPU the same ratio also counts host synchronisations, so run it there too. Not a test: numbers depend on
the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import sync, write_dataset, write_model, write_result  # noqa: E402


def lab_model_dir() -> Path:
    from loralab.lab.model import lab_model_path

    return Path(lab_model_path())



def make_config(model: Path, data: Path, out: Path, res: int, bs: int, steps: int, dev: str, extra: dict):
    from loralab.config import build_config

    values = {"pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "output_dir": str(out),
              "output_name": "overhead", "overwrite": "true", "resolution": str(res), "network_dim": "16",
              "network_alpha": "16", "train_batch_size": str(bs), "max_train_steps": str(steps),
              "cache_latents": "true", "network_train_unet_only": "true", "learning_rate": "1e-4", "device": dev,
              "mixed_precision": "bf16" if dev == "cuda" else "no", "save_every_n_epochs": "0"}
    values.update(extra)
    return build_config(None, values)


def bare_steps(run, steps: int) -> float:
    """Seconds per bare step on the run's model, network and optimizer (fixed inputs)."""
    from loralab.train.step import text_conditioning

    batch = run.dataset.batches_for_epoch(0, seed=0)[0]
    latents = torch.stack([run.latent_cache.get(s, flipped=False) for s in batch]).to(run.device)
    with torch.no_grad(), run.autocast():
        cond, added = text_conditioning(run, [s.entry.caption for s in batch])
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (len(batch),), device=run.device)
    unet, opt, dtype = run.model.unet, run.optimizer, run.weight_dtype

    def step():
        with run.autocast():
            pred = unet((latents + noise).to(dtype), t, cond.to(dtype), added_cond_kwargs=added or None).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    sync(run.device.type)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(run.device.type)
    return (time.perf_counter() - t0) / steps


def loop_and_bare(cfg, steps: int, warm: int) -> tuple[float, float]:
    """Seconds per optimizer step of `fit` (after `warm` steps) and of the bare step on the same run, the bare
    step timed just before and just after the loop (their mean), so a drift in machine load hits both sides."""
    from loralab.recipes.lora import LoRARecipe
    from loralab.train.callbacks import Callback
    from loralab.train.loop import fit

    times: list[float] = []

    class StepTimes(Callback):
        def on_step_end(self, run) -> None:
            sync(run.device.type)
            times.append(time.perf_counter())

    recipe = LoRARecipe()
    run = recipe.prepare(cfg)
    before = bare_steps(run, steps)
    fit(run, recipe, [StepTimes()])
    run.network.apply_to()  # fit takes the network off at its end
    after = bare_steps(run, steps)
    return (times[-1] - times[warm - 1]) / (len(times) - warm), (before + after) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("tiny", "lab"), default="tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=32, help="image size (the tiny VAE halves it, the lab's quarters it)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config values for the loop")
    ap.add_argument("--out", default="", help="write the figures as JSON: this .json file, or step_overhead.json in this folder")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="loralab_overhead_"))
    res = args.resolution
    if args.model == "lab":
        model = lab_model_dir()
    else:
        write_model("tiny", work / "model")  # (its UNet config, size and VAE factor are not needed here)
        model = work / "model"
    write_dataset(work / "data", max(8, args.batch * 4), res)
    extra = dict(kv.split("=", 1) for kv in args.set)
    warm = 3
    rows = []
    for r in range(args.rounds):
        cfg = make_config(model, work / "data", work / f"out{r}", res, args.batch, warm + args.steps, dev, extra)
        loop_s, bare_s = loop_and_bare(cfg, args.steps, warm)
        rows.append({"round": r, "loop_s_per_step": loop_s, "bare_s_per_step": bare_s, "ratio": loop_s / bare_s})
        print(f"round {r}: loop {loop_s * 1e3:.2f} ms/step, bare {bare_s * 1e3:.2f} ms/step, ratio {loop_s / bare_s:.3f}",
              flush=True)
    ratio = statistics.median(r["ratio"] for r in rows)
    device = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({platform.processor() or platform.machine()}, "\
        f"{torch.get_num_threads()} threads)"
    result = {"device": device, "torch": torch.__version__, "model": args.model, "batch": args.batch,
              "resolution": res, "steps": args.steps, "extra": extra, "rounds": rows, "median_ratio": ratio}
    print(f"model={args.model} batch={args.batch} device={device}: loop / bare = {ratio:.3f} (median of {len(rows)})")
    if args.out:
        write_result(args.out, "step_overhead.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
