"""`loralab generate`: images from a base model with LoRAs at chosen weights, through the one sampler.

The guide's test loop ("the tag alone", "add that tag back", "does it still work at weight 0.8") as a
command: each prompt in kohya's line syntax (`prompt --n neg --w 512 --h 512 --d seed --s steps --l cfg
--ss sampler`), fixed seeds (`--d`, else seed + prompt index), the sampler code of training samples
(`train/sampling.py`), so an image here and a sample image of the same settings are the same picture.
Several LoRAs stack (each adds weight · its delta); weight 0 gives the base model's image.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from loralab.errors import LoralabError

log = logging.getLogger(__name__)


@dataclass
class LoraSpec:
    path: Path
    weight: float = 1.0


def parse_lora_arg(text: str) -> LoraSpec:
    """`FILE` or `FILE:WEIGHT` (weight 1.0 by default; a Windows drive letter is not a weight)."""
    m = re.fullmatch(r"(.+):([-+]?(?:\d+\.?\d*|\.\d+))", text)
    path, weight = (m.group(1), float(m.group(2))) if m else (text, 1.0)
    if not Path(path).is_file():
        raise LoralabError(f"--lora {text}: {path} is not a file")
    return LoraSpec(Path(path), weight)


def generate(model_path: str | Path, prompts: Sequence, out_dir: str | Path, *, loras: Sequence[LoraSpec] = (),
             device: str = "", precision: str = "fp32", sampler: str = "", seed: int = 0,
             clip_skip: int = 0, max_token_length: int = 75, vae: str | None = None,
             v_parameterization: bool = False,
             file_stem: str = "gen") -> list[Path]:
    """Draw each prompt (`SamplePrompt`s) with the LoRAs applied; returns the PNG paths in `out_dir`.
    `clip_skip` and `max_token_length` as in training (a LoRA trained with clip_skip 2 wants it here too);
    `v_parameterization` for v-prediction models (SD 2.x 768-v) whose file does not say so."""
    from loralab.models.loader import load_base_model
    from loralab.models.text import encode_captions, unet_text_conditioning
    from loralab.network.lora import LoRANetwork
    from loralab.train.run import move_frozen
    from loralab.train.sampling import generate_samples

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = load_base_model(model_path, vae=vae, v_parameterization=v_parameterization or None)
    for m in (model.unet, model.vae, *model.text_encoders):
        m.requires_grad_(False).eval()
        move_frozen(m, dev, dtype if m is model.unet else torch.float32)
    networks = []
    try:
        for spec in loras:
            try:
                net = LoRANetwork.from_weights(spec.path, model.unet, model.text_encoders, model.family,
                                               multiplier=spec.weight)
            except LoralabError as e:
                raise LoralabError(f"--lora {spec.path}: it does not fit the base model {model_path} "
                                   f"({model.family}); pick a LoRA trained for this model. Details: {e}") from None
            net.apply_to()
            net.to(dev, dtype=torch.float32)
            networks.append(net)
            log.info("LoRA %s at weight %s", spec.path.name, spec.weight)

        def conditioning(texts: list[str]):
            outputs = encode_captions(model.family, model.text_encoders, model.tokenizers, texts,
                                      max_token_length=max_token_length, clip_skip=clip_skip or None)
            hidden, added = unet_text_conditioning(model.family, outputs)
            return hidden.to(dtype), added

        return generate_samples(unet=model.unet, vae=model.vae, vae_scaling_factor=model.vae_scaling_factor,
                                encode_prompt=conditioning, scheduler_config=dict(model.noise_scheduler().config),
                                prompts=prompts, out_dir=out_dir, file_stem=file_stem, device=dev, dtype=dtype,
                                default_seed=seed, v_parameterization=model.v_parameterization,
                                sampler=sampler or ("euler_a" if model.family == "sdxl" else "ddim"),
                                eval_modules=networks)
    finally:
        for net in reversed(networks):
            net.restore()
