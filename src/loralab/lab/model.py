"""The shipped lab model at run time: where its files are, its noise schedule, and sampling from it.

    model = LabModel.load("cpu")
    images = model.generate(items, [it.caption() for it in items], steps=25, cfg=7.5, seed=0)

The files in `assets/` are built by the tools outside the package (`tools/lab/train_base.py` trains the
model on a GPU, `tools/lab/pack.py` packs it): `lab_model.safetensors` (an LDM-layout single-file SD 1.x
checkpoint, loaded by the same `load_base_model` as any real checkpoint), `evaluator.safetensors` (the
lab evaluator's shape CNN) and `lab_model.json` (how the model was trained and measured).

Sampling goes through the one sampler, `loralab.train.sampling` (its DDIM + CFG denoising loop), with
the DDIM scheduler built from the schedule the model was trained with (`SCHEDULER_CONFIG`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loralab.lab import world as W

ASSETS = Path(__file__).parent / "assets"
MODEL_FILE = "lab_model.safetensors"
EVALUATOR_FILE = "evaluator.safetensors"
REPORT_FILE = "lab_model.json"

# The lab model's noise schedule (SD 1.x: DDPM 1000 steps, scaled_linear 0.00085-0.012, ε-prediction);
# the DDIM sampler uses it as is: no x0 clipping, the last step to alpha_cumprod[0], timesteps offset by 1.
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


def lab_model_path() -> Path:
    """The shipped lab base model (LDM single file)."""
    return ASSETS / MODEL_FILE


def evaluator_path() -> Path:
    """The shipped lab evaluator (`loralab.lab.evaluator.Evaluator.load`)."""
    return ASSETS / EVALUATOR_FILE


def report_path() -> Path:
    """How the shipped model was trained and measured (the training report, JSON)."""
    return ASSETS / REPORT_FILE


def ddim_scheduler():
    """A fresh DDIM scheduler with the lab model's own schedule (`SCHEDULER_CONFIG`)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


@dataclass
class LabModel:
    """The shipped lab model, loaded through loralab's checkpoint loader."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    te: torch.nn.Module
    tok: object
    scaling: float
    device: torch.device

    @classmethod
    def load(cls, device: str | torch.device) -> "LabModel":
        from loralab.models.loader import load_base_model

        device = torch.device(device)
        m = load_base_model(str(lab_model_path()))
        for mod in (m.unet, m.vae, m.text_encoders[0]):
            mod.requires_grad_(False).eval().to(device)
        return cls(m.unet, m.vae, m.text_encoders[0], m.tokenizers[0], m.vae_scaling_factor, device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden state (after the final layer norm) of `texts`, 77 tokens each: (n, 77, dim). Tokenized
        as training and sampling do (`models.text.tokenize`): a new word added to `tok` (pivotal tuning,
        `models.embeddings.add_new_token`) is its own id(s); other prompts give the ids they always gave."""
        from loralab.models.text import tokenize

        ids = tokenize(self.tok, list(texts))
        return self.te(ids.to(self.device)).last_hidden_state.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (× the scaling factor) -> RGB 0..255, rounded, float (n, 3, H, W)."""
        pixels = self.vae.decode(latents / self.scaling).sample.float()
        return ((pixels.clamp(-1, 1) + 1) * 127.5).round()

    @torch.no_grad()
    def generate(self, items: Sequence[W.WorldItem], prompts: Sequence[str], *, steps: int, cfg: float,
                 seed: int) -> list[torch.Tensor]:
        """Images (3, H, W) RGB 0..255 on the CPU for `items` (at their image sizes) with `prompts`, DDIM
        `steps` with classifier-free guidance `cfg` against the empty prompt, through the one sampler
        (`loralab.train.sampling.denoise`), one batch per image size. Image i's initial noise: a CPU
        generator seeded `seed + items[i].seed + i`, so an image does not depend on the others nor on the device."""
        from loralab.train.sampling import SamplePrompt, denoise

        if len(items) != len(prompts):
            raise ValueError("generate: one prompt per item")
        cond = self.encode([""] + list(prompts))
        uncond, cond = cond[:1], cond[1:]
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        channels = self.unet.config.in_channels
        out: list[torch.Tensor | None] = [None] * len(items)
        for (w, h), idx in W.group_by_image_size(items).items():
            shape = (1, channels, h // factor, w // factor)
            seeds = [seed + items[i].seed + i for i in idx]
            noise = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
            positives = cond[list(idx)]
            text = torch.cat([uncond.expand(len(idx), -1, -1), positives]) if cfg > 1.0 else positives
            prompt = SamplePrompt(prompts[idx[0]], width=w, height=h, seed=seeds[0], steps=steps, scale=cfg)
            latents = denoise(unet=self.unet, sampler=ddim_scheduler(), prompt=prompt, cond=text, added={},
                              latent_shape=noise.shape, generator=torch.Generator("cpu").manual_seed(seeds[0]),
                              device=self.device, dtype=torch.float32, noise=noise)
            images = self.decode(latents).cpu()
            for j, i in enumerate(idx):
                out[i] = images[j]
        return out  # type: ignore[return-value]
