"""Training-step benchmark: loralab's real training loop against a plain diffusers + LoRA step.

    python bench/train_speed.py --model sd15 --batch 1 8 --steps 10     # on a GPU: SD1.5-size random UNet, 512 px
    python bench/train_speed.py --model sdxl --batch 1 8 --steps 5      # SDXL-size random UNet, 1024 px
    python bench/train_speed.py --model sd15 --batch 32 --compile       # both sides through torch.compile (inductor)
    python bench/train_speed.py --model tiny --batch 2 --steps 3         # anywhere: tiny model (checks the script)
    python bench/train_speed.py --model tiny-sdxl --batch 2 --steps 3    # anywhere: tiny SDXL model

--profile-memory prints, for one step of each side, the operators that allocated the most GPU memory
(torch.profiler), to find what makes a peak; --no-cudnn-benchmark turns cuDNN's autotuning off.

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


SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025)
CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)


def write_result(out: str, name: str, result: dict) -> None:
    """The figures as JSON: into `out` when it is a .json file, else into `out/<name>` (folders made)."""
    path = Path(out)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / name
    path.write_text(json.dumps(result, indent=1) + "\n")


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def write_model(kind: str, folder: Path) -> tuple[dict, int, int]:
    """A random model of the chosen size as a diffusers folder (fp16 on disk); returns the UNet config, the
    image size and the VAE's downscale factor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loralab.models import tiny

    configs = {"sd15": (SD15_UNET, SD15_VAE, CLIP_L, None, 512), "sdxl": (SDXL_UNET, SDXL_VAE, CLIP_L, CLIP_BIGG, 1024),
               "tiny": (tiny.TINY_SD1_UNET, tiny.TINY_VAE, tiny.TINY_CLIP_L, None, 64),
               "tiny-sdxl": (tiny.TINY_SDXL_UNET, dict(tiny.TINY_VAE, scaling_factor=0.13025), tiny.TINY_CLIP_L,
                             tiny.TINY_OPENCLIP_BIGG, 64)}
    unet_cfg, vae_cfg, te_cfg, te2_cfg, res = configs[kind]
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # random init of billions of weights: on the GPU
    dtype = torch.float16 if kind in ("sd15", "sdxl") else torch.float32
    with torch.device(dev):
        parts = {"unet": UNet2DConditionModel(**unet_cfg), "vae": AutoencoderKL(**vae_cfg),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**te_cfg))}
        if te2_cfg:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))
    for name, module in parts.items():
        module.to(dtype).save_pretrained(folder / name)
    del parts
    index = {"_class_name": "StableDiffusionXLPipeline" if te2_cfg else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler" if te2_cfg else "DDPMScheduler"]}
    if te2_cfg:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
    (folder / "model_index.json").write_text(json.dumps(index))
    return unet_cfg, res, 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def write_dataset(folder: Path, n: int, res: int) -> None:
    import numpy as np
    from PIL import Image

    sub = folder / "1_thing"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(sub / f"{i:04d}.png")
        (sub / f"{i:04d}.txt").write_text("thing, red, blue background")


def profile_table(prof) -> str:
    """The operators that allocated the most GPU memory in a profiled step."""
    return prof.key_averages().table(sort_by="self_cuda_memory_usage", row_limit=12, max_name_column_width=60)


def profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], profile_memory=True)


def bench_loralab(model_dir: Path, data_dir: Path, out: Path, res: int, bs: int, steps: int, warm: int, dev: str,
                  compiled: bool = False, profile_memory: bool = False) -> dict:
    from loralab.config import build_config
    from loralab.recipes.lora import train
    from loralab.train.callbacks import Callback

    times: list[float] = []
    prof = profiler() if profile_memory and dev == "cuda" else None

    class StepTimes(Callback):
        def on_step_end(self, run) -> None:
            sync(dev)
            times.append(time.perf_counter())
            if dev == "cuda" and len(times) == warm:
                torch.cuda.reset_peak_memory_stats()  # like the plain step: peak of the timed steps, after cuDNN autotuning
            if prof is not None and len(times) == warm:
                prof.__enter__()
            if prof is not None and len(times) == warm + 1:
                prof.__exit__(None, None, None)
                print(f"loralab step, batch {bs}: operators by GPU memory\n{profile_table(prof)}", flush=True)

    cfg = build_config(None, {
        "pretrained_model_name_or_path": str(model_dir), "train_data_dir": str(data_dir), "output_dir": str(out),
        "output_name": f"bench_bs{bs}", "overwrite": "true", "resolution": str(res), "network_dim": "16", "network_alpha": "16",
        "train_batch_size": str(bs), "max_train_steps": str(warm + steps), "cache_latents": "true",
        "mixed_precision": "bf16" if dev == "cuda" else "no", "network_train_unet_only": "true",
        "learning_rate": "1e-4", "device": dev, "save_precision": "fp16", "torch_compile": str(compiled).lower()})
    train(cfg, [StepTimes()])
    dt = (times[-1] - times[warm - 1]) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    what = "loralab train loop" + (" (compiled)" if compiled else "")
    return {"what": what, "bs": bs, "s_per_step": dt, "steps_s": 1 / dt, "img_s": bs / dt, "peak_GiB": peak}


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


def bench_plain(unet_cfg: dict, res: int, bs: int, steps: int, warm: int, dev: str, compiled: bool = False,
                profile_memory: bool = False, vae_factor: int = 8) -> dict:
    """The ../shared/bench baseline step: diffusers UNet in bf16, rank-16 LoRA on attention, autocast, fused AdamW
    (SDXL: with its pooled text embedding and size/crop ids)."""
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
    forward = torch.compile(unet, dynamic=False) if compiled else unet
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev == "cuda")
    lat = res // vae_factor
    x = torch.randn(bs, 4, lat, lat, device=dev)
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (bs,), device=dev)
    ctx = torch.randn(bs, 77, unet_cfg["cross_attention_dim"], device=dev)
    added = None
    if unet_cfg.get("addition_embed_type") == "text_time":
        pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(bs, pooled, device=dev),
                 "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * bs, device=dev)}
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")

    def step():
        with amp:
            pred = forward(x + noise, t, ctx, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warm):
        step()
    sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if profile_memory and dev == "cuda":
        with profiler() as prof:
            step()
            sync(dev)
        print(f"plain step, batch {bs}: operators by GPU memory\n{profile_table(prof)}", flush=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    unet = opt = forward = None  # free the GPU memory before the next row
    if dev == "cuda":
        torch.cuda.empty_cache()
    what = "plain diffusers + LoRA" + (" (compiled)" if compiled else "")
    return {"what": what, "bs": bs, "s_per_step": dt, "steps_s": 1 / dt, "img_s": bs / dt, "peak_GiB": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("sd15", "sdxl", "tiny", "tiny-sdxl"), default="tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides (loralab: torch_compile = true)")
    ap.add_argument("--profile-memory", action="store_true", help="print the operators that allocate the most GPU memory")
    ap.add_argument("--no-cudnn-benchmark", action="store_true")
    ap.add_argument("--skip-plain", action="store_true", help="time loralab's loop only")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    work = Path(tempfile.mkdtemp(prefix="loralab_bench_"))
    out = Path(args.out) if args.out else work / "out"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    unet_cfg, res, factor = write_model(args.model, work / "model")
    write_dataset(work / "data", max(args.batch) * 4, res)
    print(f"random {args.model} model and dataset written in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for bs in args.batch:
        rows.append(bench_loralab(work / "model", work / "data", work / f"run_bs{bs}", res, bs, args.steps, args.warm,
                                  dev, args.compile, args.profile_memory))
        if not args.skip_plain:
            rows.append(bench_plain(unet_cfg, res, bs, args.steps, args.warm, dev, args.compile, args.profile_memory,
                                    factor))
        if dev == "cuda":
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"\nmodel={args.model} res={res} device={device} torch={torch.__version__} compile={args.compile}")
    print(f"{'what':34} {'bs':>3} {'s/step':>8} {'steps/s':>8} {'img/s':>8} {'peak GiB':>9} {'vs plain':>9}")
    plain = {r["bs"]: r for r in rows if r["what"].startswith("plain")}
    for r in rows:
        ratio = r["img_s"] / plain[r["bs"]]["img_s"] if r["bs"] in plain else float("nan")
        print(f"{r['what']:34} {r['bs']:>3} {r['s_per_step']:>8.4f} {r['steps_s']:>8.2f} {r['img_s']:>8.2f} "
              f"{r['peak_GiB']:>9.2f} {ratio:>9.2f}")
    result = {"device": device, "torch": torch.__version__, "model": args.model, "resolution": res,
              "compile": args.compile, "cudnn_benchmark": not args.no_cudnn_benchmark, "rows": rows}
    (out / "bench_results.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
