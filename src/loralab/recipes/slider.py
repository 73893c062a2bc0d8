"""Sliders and LECO: a LoRA trained from prompts alone, no images (p1atdev/LECO, rohitgandikota/sliders,
ostris' slider).

The config names a prompt file (`prompts_file`, `recipes/prompts.py`: target, positive, negative,
neutral, action, guidance_scale, multiplier, bidirectional); kohya_ss's LECO tab keys `prompts_file`,
`max_denoising_steps` and `leco_denoise_guidance_scale` mean what they mean there. One step of one
entry, for each of its directions (LoRA multiplier m, sign s: +1 enhance, −1 erase; a bidirectional
entry also trains −m with −s):

    1. x_T ~ N(0, I); with the LoRA on at m and no gradient, k DDIM steps (k drawn from 1 ..
       max_denoising_steps − 1) of the target prompt, classifier-free guidance leco_denoise_guidance_scale
       against the empty prompt (as generation does): x_t at t = the sampler's k-th timestep.
    2. LoRA off: ε(x_t, positive), ε(x_t, neutral), ε(x_t, negative).
    3. LoRA on at m: ε_m(x_t, target), with gradient; loss = MSE(ε_m(target), `slider_target`):

           ε(neutral) + s · η · (ε(positive) − ε(negative))        (η = guidance_scale)

So an enhance entry teaches the LoRA at +m to move the target prompt towards positive and away from
negative, an erase entry away from positive; a bidirectional slider learns the mirror image at −m, so
the saved file works at negative weights in A1111 and ComfyUI. Only the UNet LoRA trains (the text
encoders are frozen: the prompts are encoded once). The loop, saving, sampling and resume are the
standard ones; the saved file is a standard kohya LoRA with `loralab_recipe` = slider or leco.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from loralab.config import TrainConfig
from loralab.errors import LoralabError
from loralab.recipes.prompts import SliderPrompt, read_prompts
from loralab.train.callbacks import Callback
from loralab.train.loop import TrainResult, fit
from loralab.train.recipe import Recipe
from loralab.train.run import Run

log = logging.getLogger(__name__)


def slider_target(neutral: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, guidance: float,
                  sign: float) -> torch.Tensor:
    """What the LoRA's prediction of the target prompt is pulled towards: neutral + sign·η·(positive − negative)."""
    return neutral + sign * guidance * (positive - negative)


def trains_module(lora_name: str, method: str) -> bool:
    """LECO's `training_method` on a UNet LoRA module name: full; xattn (ESD-x: cross-attention, attn2);
    xattn_kv (attn2's to_k / to_v: they see the text only); selfattn (ESD-u: attn1); noxattn (no attn2, no
    time embedding); innoxattn (no attn2)."""
    if method == "xattn_kv":
        return "_attn2_to_k" in lora_name or "_attn2_to_v" in lora_name
    return {"full": True, "xattn": "_attn2_" in lora_name, "selfattn": "_attn1_" in lora_name,
            "noxattn": "_attn2_" not in lora_name and "time_emb" not in lora_name,
            "innoxattn": "_attn2_" not in lora_name}[method]


def slider_config(cfg: TrainConfig) -> TrainConfig:
    """The config as a slider trains it: the UNet LoRA only (LECO and the sliders freeze the text encoders)."""
    if not cfg.network_train_unet_only:
        log.info("slider / LECO: only the UNet LoRA is trained (network_train_unet_only)")
    return dataclasses.replace(cfg, network_train_unet_only=True)


class SliderRecipe(Recipe):
    name = "slider"

    def __init__(self) -> None:
        self.entries: list[SliderPrompt] = []
        self.cond: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self.sampler = None

    # ---------------------------------------------------------------- prepare
    def prepare(self, cfg: TrainConfig) -> Run:
        """The prompts first (a bad file fails before anything loads), then the standard run without a
        dataset (`train/run.py` prepare with `data`), then each prompt encoded once."""
        from diffusers import DDIMScheduler

        from loralab.train.run import prepare

        self.entries = read_prompts(cfg.prompts_file)
        run = prepare(slider_config(cfg), self, self._data)
        self.sampler = DDIMScheduler.from_config(run.noise_scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                                 steps_offset=1)
        self._encode(run)
        return run

    def _data(self, run: Run) -> int:
        """The run's data: the sample prompts of the config; the batches of an epoch are the prompt entries."""
        from loralab.train.sampling import parse_prompt_file

        run.prompts = parse_prompt_file(run.cfg.sample_prompts) if run.cfg.sample_prompts else []
        log.info("slider / LECO: %d prompt entries from %s", len(self.entries), run.cfg.prompts_file)
        return len(self.entries)

    def _encode(self, run: Run) -> None:
        from loralab.train.step import text_conditioning

        texts = sorted({t for e in self.entries for t in e.texts()} | {""})
        with torch.no_grad(), run.autocast():
            for i in range(0, len(texts), 32):
                chunk = texts[i:i + 32]
                hidden, added = text_conditioning(run, chunk, cached=False)
                for j, text in enumerate(chunk):
                    self.cond[text] = (hidden[j:j + 1].detach(), {k: v[j:j + 1].detach() for k, v in added.items()})

    def param_groups(self, run: Run) -> list[dict]:
        """The LoRA groups, only the modules of leco_training_method trained (the others stay at zero and are
        saved as such)."""
        from loralab.train.run import lora_param_groups

        groups = lora_param_groups(run)
        method = run.cfg.leco_training_method
        if method == "full":
            return groups
        modules = [m for m in run.network.unet_loras if trains_module(m.lora_name, method)]
        if not modules:
            raise LoralabError(f"leco_training_method = {method}: the model has no such LoRA modules; use full")
        keep = {id(p) for m in modules for p in m.parameters()}
        for m in run.network.unet_loras:
            m.requires_grad_(id(next(m.parameters())) in keep)
        log.info("leco_training_method = %s: %d of %d UNet LoRA modules train", method, len(modules),
                 len(run.network.unet_loras))
        groups = [dict(g, params=[p for p in g["params"] if id(p) in keep]) for g in groups]
        return [g for g in groups if g["params"]]

    # ---------------------------------------------------------------- batches and loss
    def batches(self, run: Run, epoch: int) -> list:
        """Every entry once an epoch, in a seeded order (one entry a batch)."""
        order = list(range(len(self.entries)))
        random.Random(run.cfg.seed * 1_000_003 + epoch).shuffle(order)
        return [[self.entries[i]] for i in order]

    def loss(self, run: Run, batch: list, rng: random.Random, generator: torch.Generator) -> torch.Tensor:
        entry = batch[0]
        try:
            losses = [self.direction_loss(run, entry, m, sign, rng, generator) for m, sign in entry.directions()]
        finally:
            run.network.set_multiplier(1.0)  # saving and sample images see the LoRA at full strength
        return torch.stack(losses).mean()

    def direction_loss(self, run: Run, entry: SliderPrompt, multiplier: float, sign: float, rng: random.Random,
                       generator: torch.Generator) -> torch.Tensor:
        """Steps 1-3 of the module docstring for one direction of one entry."""
        from loralab.train.sampling import vae_scale_factor

        w, h = entry.resolution or run.cfg.resolution_wh()
        f = vae_scale_factor(run.model.vae)
        shape = (entry.batch_size, run.model.unet.config.in_channels, h // f, w // f)
        steps = run.cfg.max_denoising_steps
        k = rng.randint(1, steps - 1) if steps > 1 else 0
        run.network.set_multiplier(multiplier)
        with torch.no_grad():
            latents, t = self.partial_denoise(run, entry.target, shape, steps, k, generator)
            run.network.set_multiplier(0.0)
            positive, neutral, negative = self.predict(run, latents, t, [entry.positive, entry.neutral,
                                                                         entry.negative]).chunk(3)
        target = slider_target(neutral, positive, negative, entry.guidance_scale, sign)
        run.network.set_multiplier(multiplier)
        pred = self.predict(run, latents, t, [entry.target])
        return F.mse_loss(pred.float(), target.float())

    def partial_denoise(self, run: Run, prompt: str, shape: tuple[int, ...], steps: int, k: int,
                        generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """x_t after the first `k` of `steps` DDIM steps from seeded noise, with CFG
        (leco_denoise_guidance_scale) against the empty prompt; t = the sampler's k-th timestep."""
        sampler, scale = self.sampler, run.cfg.leco_denoise_guidance_scale
        sampler.set_timesteps(steps, device=run.device)
        x = torch.randn(shape, generator=generator, device=run.device) * sampler.init_noise_sigma
        for t in sampler.timesteps[:k]:
            if scale > 1.0:
                uncond, cond = self.predict(run, x, int(t), ["", prompt]).chunk(2)
                eps = uncond + scale * (cond - uncond)
            else:
                eps = self.predict(run, x, int(t), [prompt])
            x = sampler.step(eps, t, x).prev_sample
        return x, int(sampler.timesteps[k])

    def predict(self, run: Run, latents: torch.Tensor, t: int, texts: Sequence[str]) -> torch.Tensor:
        """The UNet's prediction (float32) of `latents` at timestep `t` for each text: (len(texts)·B, C, h, w)."""
        from loralab.models.sdxl import sample_time_ids

        b, dtype = latents.shape[0], run.weight_dtype
        x = latents.repeat(len(texts), 1, 1, 1)
        cond = torch.cat([self.cond[s][0].expand(b, -1, -1) for s in texts]).to(run.device)
        added = {k: torch.cat([self.cond[s][1][k].expand(b, -1) for s in texts]).to(run.device)
                 for k in self.cond[texts[0]][1]}
        if run.sdxl:
            added["time_ids"] = sample_time_ids(x.shape[3] * 8, x.shape[2] * 8, x.shape[0]).to(run.device)
        ts = torch.full((x.shape[0],), t, dtype=torch.long, device=run.device)
        with run.autocast():
            out = run.model.unet(x.to(dtype), ts, cond.to(dtype), added_cond_kwargs=added or None).sample
        return out.float()

    # ---------------------------------------------------------------- outputs
    def extra_metadata(self, run: Run) -> dict[str, str]:
        """The kind (slider: an entry has a negative prompt or trains both directions; else leco), the
        prompt entries and the denoising settings."""
        kind = "slider" if any(e.bidirectional or e.negative for e in self.entries) else "leco"
        return {"loralab_recipe": kind, "loralab_slider_prompts": json.dumps([e.as_dict() for e in self.entries]),
                "loralab_slider_settings": json.dumps({"max_denoising_steps": run.cfg.max_denoising_steps,
                                                       "leco_denoise_guidance_scale":
                                                           run.cfg.leco_denoise_guidance_scale})}


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Prepare a slider / LECO run from the config and fit it."""
    recipe = SliderRecipe()
    return fit(recipe.prepare(cfg), recipe, callbacks)
