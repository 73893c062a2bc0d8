"""What DAAM maps cost: the one sampler's denoising loop with and without `AttentionRecorder`.

    python bench/attention_speed.py --model sd15 --steps 25        # on a GPU: SD 1.5-size random UNet, 512 px, bf16
    python bench/attention_speed.py --model tiny --steps 5         # anywhere: tiny UNet (checks the script)

Both runs go through `train.sampling.denoise` (DDIM, CFG 7.5, batch of one image: negatives + positives),
same noise and conditioning; the recorder maps 4 words of 1-3 tokens. Only the UNet loop is timed (a plain
generation also encodes the prompt and decodes the VAE, so the ratio here is an upper bound of the overhead).
The issue's bar: maps cost at most 1.3× a plain generation for SD 1.5 at 512 px on a GPU.
Prints a table and writes --out (JSON). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, layers_per_block=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(unet, device, dtype, steps: int, latent: int, record: bool) -> float:
    from loralab.analyze.attention import AttentionRecorder, WordTokens
    from loralab.train.sampling import SamplePrompt, denoise, make_sampler

    g = torch.Generator("cpu").manual_seed(0)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    noise = torch.randn(1, 4, latent, latent, generator=g)
    prompt = SamplePrompt("bench", width=latent * 8, height=latent * 8, steps=steps, scale=7.5)
    words = [WordTokens("a", (), (1,)), WordTokens("b", (), (2, 3)), WordTokens("c", (), (5,)),
             WordTokens("d", (), (6, 7, 8))]

    def go():
        return denoise(unet=unet, sampler=make_sampler("ddim"), prompt=prompt, cond=cond, added={},
                       latent_shape=noise.shape, generator=torch.Generator("cpu").manual_seed(0), device=device,
                       dtype=dtype, noise=noise)

    with torch.no_grad():
        if record:
            with AttentionRecorder(unet, [words], (latent, latent), cfg=True) as rec:
                sync(device)
                t = time.perf_counter()
                go()
                rec.maps((latent * 8, latent * 8))
                sync(device)
        else:
            sync(device)
            t = time.perf_counter()
            go()
            sync(device)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_attention.json")
    args = ap.parse_args(argv)
    from diffusers import UNet2DConditionModel

    from loralab.models import tiny

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg, latent = (SD15_UNET, 64) if args.model == "sd15" else (tiny.TINY_SD1_UNET, 8)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(device).eval()
    run(unet, device, dtype, 2, latent, False)  # warm-up (kernels, allocator)
    run(unet, device, dtype, 2, latent, True)
    plain = min(run(unet, device, dtype, args.steps, latent, False) for _ in range(args.repeats))
    maps = min(run(unet, device, dtype, args.steps, latent, True) for _ in range(args.repeats))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU"
    result = {"model": args.model, "device": name, "torch": torch.__version__, "dtype": str(dtype), "steps": args.steps,
              "image_px": latent * 8, "plain_s": round(plain, 4), "maps_s": round(maps, 4), "ratio": round(maps / plain, 3)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| model | device | steps | plain s | with maps s | ratio |\n|---|---|---|---|---|---|")
    print(f"| {args.model} {latent * 8} px | {name} | {args.steps} | {plain:.3f} | {maps:.3f} | {maps / plain:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
