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

`method = "uce"` in the prompt file (`recipes/prompts.py`) writes a LECO erase in closed form instead, with
no training step (`closed_form`): Unified Concept Editing (Gandikota et al. 2023) on the cross-attention
key/value projections, `uce_erase_weights`. Each erase entry's text (from its concept's words on, through
EOS: CLIP is causal, so the words after the concept carry it too) is mapped to its neutral prompt's, pushed
η = guidance_scale further away from the concept (LECO's erase target, on the text instead of the noise);
the anchors (η = 0 entries), the neutral prompts and "" keep theirs, weighted by `preserve_weight`; each
ΔW, truncated to network_dim by SVD, is the LoRA module's up·down. The trained LECO erase is
all-or-nothing on the lab model, and where it tips depends on the seed (README); the closed form is not.
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
from loralab.recipes.prompts import PromptOptions, SliderPrompt, read_prompt_options, read_prompts
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
        self.options = PromptOptions()

    # ---------------------------------------------------------------- prepare
    def prepare(self, cfg: TrainConfig) -> Run:
        """The prompts first (a bad file fails before anything loads), then the standard run without a
        dataset (`train/run.py` prepare with `data`), then each prompt encoded once."""
        from diffusers import DDIMScheduler

        from loralab.train.run import prepare

        self.entries = read_prompts(cfg.prompts_file)
        self.options = read_prompt_options(cfg.prompts_file)
        if self.options.method == "uce":
            check_uce_entries(self.entries, cfg.prompts_file)
        run = prepare(slider_config(cfg), self, self._data)
        self.sampler = DDIMScheduler.from_config(run.noise_scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                                 steps_offset=1)
        self._encode(run)
        if self.options.method == "uce":
            self.closed_form(run)
        return run

    def closed_form(self, run: Run) -> None:
        """`method = "uce"`: the LoRA's cross-attention key/value modules set to the closed-form erase, and no
        training steps (the run ends at once; saving writes the final file as for any run)."""
        erase = [(e.target, e.neutral) for e in self.entries if e.action == "erase"]
        etas = {e.guidance_scale for e in self.entries if e.action == "erase"}
        keep = [""] + [e.target for e in self.entries if e.action != "erase"] + [n for _, n in erase]
        tok = run.model.tokenizers[0]
        modules = {m.lora_name: m for m in run.network.unet_loras}
        bad = [n for n, m in modules.items() if n.endswith(("_attn2_to_k", "_attn2_to_v"))
               and not (hasattr(m, "lora_down") and isinstance(m.lora_down, torch.nn.Linear))]
        if bad or len(etas) != 1:
            raise LoralabError("method = uce writes plain LoRA modules (network_module = networks.lora) with one "
                               "guidance_scale for all erase entries" + (f"; {bad[0]} is not one" if bad else ""))
        sd = uce_erase_weights(run.model.unet, lambda texts: torch.cat([self.cond[t][0] for t in texts]).float(),
                               lambda t: [tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids, erase, keep,
                               rank=run.cfg.network_dim, keep_weight=self.options.preserve_weight, guidance=etas.pop())
        paths = {id(mod): "lora_unet_" + path.replace(".", "_") for path, mod in run.model.unet.named_modules()}
        written = 0
        with torch.no_grad():  # by the wrapped layer (kohya's SDXL names are not the diffusers paths of `sd`)
            for m in modules.values():
                key = paths.get(id(m.org_module), "")
                if f"{key}.lora_up.weight" in sd:
                    m.lora_down.weight.copy_(sd[f"{key}.lora_down.weight"])
                    m.lora_up.weight.copy_(sd[f"{key}.lora_up.weight"] / m.scale)
                    written += 1
        if written != len(sd) // 3:
            raise LoralabError(f"method = uce: the network has LoRA modules on {written} of the {len(sd) // 3} "
                               "cross-attention key/value projections; train the UNet with the default targets")
        run.max_steps = 0
        log.info("method = uce: %d erase prompts edited in closed form, %d texts kept (preserve_weight %g); no "
                 "training steps", len(erase), len(keep), self.options.preserve_weight)

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
        uce = {"loralab_slider_method": json.dumps(dataclasses.asdict(self.options))} \
            if self.options.method != "train" else {}
        return {"loralab_recipe": kind, **uce, "loralab_slider_prompts": json.dumps([e.as_dict() for e in self.entries]),
                "loralab_slider_settings": json.dumps({"max_denoising_steps": run.cfg.max_denoising_steps,
                                                       "leco_denoise_guidance_scale":
                                                           run.cfg.leco_denoise_guidance_scale})}


def check_uce_entries(entries: Sequence[SliderPrompt], where: str) -> None:
    """`method = "uce"` erases: erase entries (their neutral is the target without the concept's words) and
    anchors (guidance_scale 0); an entry of another kind is a one-line error before anything loads."""
    for i, e in enumerate(entries, 1):
        if e.action == "enhance" and e.guidance_scale != 0 or e.bidirectional:
            raise LoralabError(f"prompts_file: {where}: prompt {i}: method = uce takes erase entries and anchors "
                               "(guidance_scale = 0) only; train sliders and enhance entries with method = train")
    if not any(e.action == "erase" for e in entries):
        raise LoralabError(f"prompts_file: {where}: method = uce needs at least one erase entry")
    from loralab.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()  # every SD text encoder reads CLIP's vocabulary: the pairs are checked now
    for i, e in enumerate(entries, 1):
        if e.action == "erase":
            try:
                concept_positions(tok(e.target).input_ids, tok(e.neutral).input_ids, 77)
            except LoralabError:
                raise LoralabError(f"prompts_file: {where}: prompt {i}: method = uce maps the target to its neutral "
                                   f"prompt word for word, so neutral must be the target without the erased words "
                                   f"(target {e.target!r}, neutral {e.neutral!r})") from None


def concept_positions(concept_ids: Sequence[int], neutral_ids: Sequence[int], length: int) -> list[int]:
    """For each of the `length` positions of the concept prompt's tokens (BOS first), the position of the
    neutral prompt it is edited towards: the same before the concept's words, BOS (0) for the concept's own
    words, the same word `len(concept) − len(neutral)` positions back after them (the neutral prompt is the
    concept prompt without the concept's words)."""
    a, b = list(concept_ids), list(neutral_ids)
    n = len(a) - len(b)
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
    if n <= 0 or a[:k] != b[:k] or a[k + n:] != b[k:]:
        raise LoralabError("uce: the neutral prompt must be the concept prompt without the concept's words")
    return [p if p < k else 0 if p < k + n else p - n for p in range(length)]


def uce_delta(w: torch.Tensor, source: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
              keep_weight: float, ridge: float) -> torch.Tensor:
    """Unified Concept Editing (Gandikota et al. 2023), one projection W (out × d) of the text: the ΔW that
    minimises Σ‖(W+ΔW)cᵢ − W c*ᵢ‖² + λ Σ‖ΔW cⱼ‖² + γ‖ΔW‖² over edited rows cᵢ → c*ᵢ (`source`, `target`: n × d)
    and kept rows cⱼ (`keep`): ΔW = W (C* − C)ᵀ C (CᵀC + λ KᵀK + γI)⁻¹."""
    d = source.shape[1]
    m = source.T @ source + keep_weight * keep.T @ keep + ridge * torch.eye(d, dtype=source.dtype)
    return torch.linalg.solve(m, (w.double() @ (target - source).T @ source).T).T


def uce_erase_weights(unet: torch.nn.Module, encode, ids, erase: Sequence[tuple[str, str]], keep: Sequence[str], *,
                      rank: int, keep_weight: float = 1.0, ridge: float = 1e-3, span: str = "words",
                      guidance: float = 0.0,
                      projections: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")) -> dict[str, torch.Tensor]:
    """A LECO erase written in closed form: the cross-attention key/value projections map each (concept
    prompt, neutral prompt) pair of `erase` to the neutral's text (`concept_positions`) while the texts of
    `keep` (anchors, the empty prompt) keep theirs; each ΔW, truncated to `rank` by SVD, is a kohya LoRA
    module (alpha = rank). `guidance` η > 0 pushes each edited row past the neutral's, away from the concept's
    (LECO's erase target). `encode(texts)` -> (n, tokens, d) the UNet's text conditioning; `ids(text)` ->
    its token ids with BOS. `span`: which positions of a concept prompt are edited: "concept" (its words),
    "words" (from its words through EOS: the CLIP text encoder is causal, so the words after the concept carry
    it too), "all" (and the padding after EOS)."""
    concept = encode([c for c, _ in erase]).double()
    neutral = encode([n for _, n in erase]).double()
    length = concept.shape[1]
    src, tgt = [], []
    for i, (c, n) in enumerate(erase):
        a, b = ids(c), ids(n)
        pos = concept_positions(a, b, length)
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        end = {"concept": k + len(a) - len(b), "words": min(len(a) + 1, length), "all": length}[span]
        src.append(concept[i][k:end])
        to = neutral[i][pos[k:end]]
        tgt.append(to + guidance * (to - concept[i][k:end]))  # LECO's erase: neutral − η·(concept − neutral)
    source, target = torch.cat(src), torch.cat(tgt)
    kept = encode(list(keep)).double().reshape(-1, concept.shape[2])
    out = {}
    for name, module in unet.named_modules():
        if not name.endswith(projections):
            continue
        w = module.weight.detach().cpu().double()
        delta = uce_delta(w, source.cpu(), target.cpu(), kept.cpu(), keep_weight, ridge)
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, sv.shape[0])
        key = "lora_unet_" + name.replace(".", "_")
        up, down = torch.zeros(w.shape[0], rank, dtype=w.dtype), torch.zeros(rank, w.shape[1], dtype=w.dtype)
        up[:, :r], down[:r] = u[:, :r] * sv[:r], vh[:r]  # rank above d: the rest stays zero
        out[f"{key}.lora_up.weight"] = up.float().contiguous()
        out[f"{key}.lora_down.weight"] = down.float().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Prepare a slider / LECO run from the config and fit it."""
    recipe = SliderRecipe()
    return fit(recipe.prepare(cfg), recipe, callbacks)
