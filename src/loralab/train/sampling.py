"""Sample images during training: kohya prompt files, samplers, the denoising loop and PNG files.

    prompts = parse_prompt_file(cfg.sample_prompts)
    paths = generate_samples(unet=unet, vae=vae, vae_scaling_factor=0.18215, encode_prompt=encode,
                             scheduler_config=noise_scheduler.config, prompts=prompts,
                             out_dir=output_dir / "sample", file_stem=f"{output_name}_e{epoch:06d}",
                             device=device, dtype=weight_dtype, default_seed=cfg.seed,
                             sampler=cfg.sample_sampler, eval_modules=[network])

The denoising loop is written here with a diffusers scheduler (set_timesteps, scale_model_input, step)
instead of a pipeline class, so it runs any UNet and any `encode_prompt` callable: the tiny test models,
a UNet with LoRA hooks, and later SDXL (where `encode_prompt` also returns `added_cond_kwargs`).

kohya behaviour kept (`train_util.line_to_prompt_dict`, `get_my_scheduler`, `sample_image_inference`):
prompt-line options, sizes floored to multiples of 8 (at least 64), steps clamped to 1..1000, the
sampler table, `clip_sample=True` forced on schedulers that have the option, one image per prompt,
classifier-free guidance with the negative prompt ("" when none), file names
`<stem>_<i:02d>_<YYYYmmddHHMMSS>[_<seed>].png`, and the global torch (and CUDA) RNG state restored.
Ours: a seed per prompt comes from `--d`, else `default_seed + i`, else a random one (not in the name);
the initial latents and ancestral noise come from a CPU generator with that seed, so a seed gives the same
image on any device; unknown options and sampler names are errors instead of being ignored.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from loralab.errors import LoralabError
from loralab.io import atomic_write
from loralab.models.sdxl import sample_time_ids

logger = logging.getLogger(__name__)

__all__ = [
    "SAMPLERS",
    "SamplePrompt",
    "draw_images",
    "generate_samples",
    "image_grid",
    "make_sampler",
    "parse_prompt_file",
    "parse_prompt_line",
]

# kohya's sampler names → (diffusers scheduler class, extra constructor arguments)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),  # kohya accepts it but hides it from the options
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    # diffusers >= 0.27 refuses algorithm_type="dpmsolver" with its default final_sigmas_type="zero"
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}

# kohya's training scheduler values, used where the scheduler config lacks them
_KOHYA_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# prompt options kohya knows but an SD UNet does not use: accepted and ignored with a warning
_IGNORED_OPTIONS = {"g": "guidance_scale", "cn": "controlnet_image", "ctr": "cfg_trunc_ratio",
                    "rcfg": "renorm_cfg", "fs": "flow_shift"}


@dataclass
class SamplePrompt:
    """One sample image: kohya's prompt-line options (`--n --w --h --d --s --l --ss`)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = 30
    scale: float = 7.5
    sampler: str | None = None  # None: the run's sample_sampler (generate_samples' `sampler`)


# ------------------------------------------------------------------------------------ prompt files
def _size(value: int) -> int:
    """kohya: floor to a multiple of 8, at least 64."""
    return max(64, value - value % 8)


def _steps(value: int) -> int:
    return max(1, min(1000, value))


def _check_sampler(name: str, where: str) -> str:
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise LoralabError(f"{where}: unknown sampler {name!r}; accepted: {', '.join(SAMPLERS)}.")
    return key


_LINE_OPTIONS: dict[str, tuple[str, str]] = {  # option → (SamplePrompt field, kind)
    "n": ("negative_prompt", "text"),
    "w": ("width", "int"),
    "h": ("height", "int"),
    "d": ("seed", "int"),
    "s": ("steps", "int"),
    "l": ("scale", "float"),
    "ss": ("sampler", "text"),
}


def parse_prompt_line(line: str, *, where: str = "prompt") -> SamplePrompt:
    """One kohya prompt line: `prompt --n <negative> --w <W> --h <H> --d <seed> --s <steps> --l <cfg> --ss <sampler>`.

    Options are split on " --" and are case-insensitive; sizes are floored to multiples of 8 (>= 64),
    steps clamped to 1..1000. `--g --cn --ctr --rcfg --fs` (other model families) are ignored with a
    warning; any other option, or a value that is not a number where one is needed, raises
    LoralabError naming `where` (file and line).
    """
    parts = line.strip().split(" --")
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        key, value = key.lower(), value.strip()
        if key in _IGNORED_OPTIONS:
            logger.warning("%s: option --%s (%s) does not apply to SD samples; ignored",
                           where, key, _IGNORED_OPTIONS[key])
            continue
        if key not in _LINE_OPTIONS:
            raise LoralabError(
                f"{where}: unknown option --{key}. Prompt lines accept --n (negative prompt), --w, --h (size), "
                "--d (seed), --s (steps), --l (CFG scale), --ss (sampler)."
            )
        name, kind = _LINE_OPTIONS[key]
        if not value and kind != "text":
            example = "512" if kind == "int" else "7.5"
            raise LoralabError(f"{where}: option --{key} needs a value, e.g. --{key} {example}")
        try:
            if kind in ("int", "float"):
                values[name] = int(value) if kind == "int" else float(value)
                if not values[name] >= 0:  # kohya's patterns only match non-negative numbers
                    raise ValueError
            else:
                values[name] = value
        except ValueError as exc:
            raise LoralabError(
                f"{where}: option --{key} {value!r} is not a non-negative "
                f"{'whole number' if kind == 'int' else 'number'}."
            ) from exc
    return _finish(values, where)


def _finish(values: dict[str, Any], where: str) -> SamplePrompt:
    p = SamplePrompt(**values)
    p.sampler = _check_sampler(str(p.sampler), where) if p.sampler else None
    p.width, p.height, p.steps = _size(int(p.width)), _size(int(p.height)), _steps(int(p.steps))
    p.scale = float(p.scale)
    p.negative_prompt = p.negative_prompt or ""
    if p.seed is not None:
        p.seed = int(p.seed)
    return p


_DICT_KEYS = {  # kohya's dict keys (and our field names) → SamplePrompt field
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "sample_steps": "steps",
    "steps": "steps",
    "scale": "scale",
    "sample_sampler": "sampler",
    "sampler": "sampler",
}


def _prompt_from_dict(entry: Mapping[str, Any], where: str) -> SamplePrompt:
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if key in _DICT_KEYS:
            values[_DICT_KEYS[key]] = value
        elif key in _IGNORED_OPTIONS.values() or key in ("enum", "subset"):
            logger.warning("%s: key %r does not apply to SD samples; ignored", where, key)
        else:
            raise LoralabError(
                f"{where}: unknown key {key!r}; accepted: prompt, negative_prompt, width, height, seed, "
                "sample_steps, scale, sample_sampler."
            )
    if not isinstance(values.get("prompt"), str):
        raise LoralabError(f"{where}: needs a 'prompt' string.")
    try:
        return _finish(values, where)
    except (TypeError, ValueError) as exc:
        raise LoralabError(
            f"{where}: a value has the wrong type ({exc}); sizes, seed and steps are whole numbers."
        ) from exc


def parse_prompt_file(path: str | Path) -> list[SamplePrompt]:
    """Read kohya's sample prompt file (`--sample_prompts`):

    - `.txt`: one prompt line per line (see `parse_prompt_line`); blank lines and lines starting with
      "#" (after leading spaces) are skipped.
    - `.toml`: `[prompt]` defaults (e.g. width, sample_steps) merged into each `[[prompt.subset]]`.
    - `.json`: a list of prompt lines or of dicts with kohya's keys (prompt, negative_prompt, width,
      height, seed, sample_steps, scale, sample_sampler).
    Prompts without `--ss` keep sampler=None: `generate_samples(sampler=...)` (kohya `--sample_sampler`).
    """
    path = Path(path)
    if not path.is_file():
        raise LoralabError(f"sample_prompts: file {path} does not exist; check the path.")
    suffix = path.suffix.lower()
    prompts: list[SamplePrompt] = []
    if suffix == ".txt":
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            prompts.append(parse_prompt_line(line, where=f"{path}:{lineno}"))
    elif suffix == ".toml":
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise LoralabError(f"{path}: not valid TOML ({exc}).") from exc
        table = data.get("prompt")
        if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
            raise LoralabError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries.")
        defaults = {k: v for k, v in table.items() if k != "subset"}
        for i, subset in enumerate(table["subset"]):
            prompts.append(_prompt_from_dict({**defaults, **subset}, f"{path}: prompt.subset[{i}]"))
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LoralabError(f"{path}: not valid JSON ({exc}).") from exc
        if not isinstance(data, list):
            raise LoralabError(f"{path}: expected a JSON list of prompt lines or objects.")
        for i, entry in enumerate(data):
            where = f"{path}: entry {i}"
            if isinstance(entry, str):
                prompts.append(parse_prompt_line(entry, where=where))
            elif isinstance(entry, dict):
                prompts.append(_prompt_from_dict(entry, where))
            else:
                raise LoralabError(f"{where}: expected a prompt line or an object.")
    else:
        raise LoralabError(f"sample_prompts: {path} must end in .txt, .toml or .json.")
    return prompts


# ----------------------------------------------------------------------------------------- samplers
def make_sampler(
    name: str,
    scheduler_config: Mapping[str, Any] | None = None,
    *,
    v_parameterization: bool = False,
    clip_sample: bool = True,
):
    """A fresh diffusers scheduler for kohya's sampler `name` (see `SAMPLERS`).

    Only the noise schedule is taken from `scheduler_config` (num_train_timesteps, beta_start,
    beta_end, beta_schedule; kohya's SD values where missing); the rest are the class defaults, as
    kohya builds them. `v_parameterization` sets prediction_type="v_prediction". `clip_sample=True`
    mirrors kohya, which forces clip_sample on (DDIM, DDPM, Heun clamp the predicted x0 to [-1, 1]).
    """
    import diffusers

    key = _check_sampler(name, "sample_sampler")
    cls_name, extra = SAMPLERS[key]
    cls = getattr(diffusers, cls_name)
    config = dict(scheduler_config or {})
    kwargs = {k: config.get(k, v) for k, v in _KOHYA_SCHEDULER.items()}
    kwargs.update(extra)
    kwargs["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    try:
        accepted = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        accepted = {}
    if "clip_sample" in accepted:
        kwargs["clip_sample"] = clip_sample
    try:
        return cls(**kwargs)
    except ImportError as exc:
        raise LoralabError(
            f"sampler {name!r} ({cls_name}) needs a package that is missing ({str(exc).strip().splitlines()[0]}); "
            "install it or choose another sampler (e.g. euler_a, ddim, dpmsolver++)."
        ) from exc


# ------------------------------------------------------------------------------------ generation
def _save_png_atomically(image: Image.Image, path: Path, info: PngInfo | None = None) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def _encode(encode_prompt: Callable, texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = encode_prompt(texts)
    if isinstance(out, tuple):
        hidden, added = out
        return hidden, dict(added or {})
    return out, {}


def _latents_to_image(vae, latents: torch.Tensor, vae_scaling_factor: float) -> Image.Image:
    vae_dtype = next(vae.parameters()).dtype
    decoded = vae.decode((latents / vae_scaling_factor).to(vae_dtype)).sample
    pixels = (decoded[0].float() / 2 + 0.5).clamp(0, 1)
    array = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array)


def vae_scale_factor(vae) -> int:
    """Pixels per latent pixel: 2 ** (VAE levels - 1), 8 for SD's VAE."""
    blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else 8


def denoise(
    *,
    unet,
    sampler,
    prompt: SamplePrompt,
    cond: torch.Tensor,
    added: dict[str, torch.Tensor],
    latent_shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one denoising loop: `prompt.steps` steps of `sampler` with classifier-free guidance

        ε = ε_neg + scale · (ε_pos − ε_neg)        (scale = prompt.scale; no guidance when scale <= 1)

    for a batch of N images: `cond` is [N negatives, N positives] with guidance, else [N positives].
    The initial noise is `noise` (N, C, h, w) when given (e.g. one seeded draw per image), else one draw
    of `latent_shape` from `generator`; it is scaled by the sampler's init_noise_sigma. Returns latents."""
    use_cfg = prompt.scale > 1.0
    sampler.set_timesteps(prompt.steps, device=device)
    if noise is None:
        noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32)
    latents = noise.to(device, torch.float32) * sampler.init_noise_sigma
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(sampler.step).parameters else {}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))
    cond = cond.to(device=device, dtype=dtype)
    added = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in added.items()}
    for t in sampler.timesteps:
        model_in = torch.cat([latents] * 2) if use_cfg else latents
        model_in = sampler.scale_model_input(model_in, t)
        with autocast:
            kwargs = {"added_cond_kwargs": added} if added else {}
            out = unet(model_in.to(dtype), t, encoder_hidden_states=cond, **kwargs).sample.float()
        if use_cfg:
            uncond, text = out.chunk(2)
            out = uncond + prompt.scale * (text - uncond)
        latents = sampler.step(out, t, latents, **step_kwargs).prev_sample
    return latents


def _sample_one(i: int, prompt: SamplePrompt, *, unet, vae, vae_scaling_factor: float, encode_prompt: Callable,
                scheduler_config: Mapping[str, Any] | None, out_dir: Path, file_stem: str, device: torch.device,
                dtype: torch.dtype, default_seed: int | None, sampler: str, v_parameterization: bool,
                clip_sample: bool) -> Path:
    """Draw prompt `i` and save it (see `generate_samples`)."""
    seed = prompt.seed
    if seed is None and default_seed is not None:
        seed = default_seed + i
    generator = torch.Generator("cpu")
    actual_seed = generator.manual_seed(seed).initial_seed() if seed is not None else generator.seed()
    sampler_name = sampler
    logger.info(
        "sample %d: %r (neg %r) %dx%d, %d steps, cfg %s, %s, seed %d",
        i, prompt.prompt, prompt.negative_prompt, prompt.width, prompt.height, prompt.steps,
        prompt.scale, sampler_name, actual_seed,
    )
    scheduler = make_sampler(sampler_name, scheduler_config, v_parameterization=v_parameterization, clip_sample=clip_sample)
    texts = [prompt.negative_prompt, prompt.prompt] if prompt.scale > 1.0 else [prompt.prompt]
    cond, added = _encode(encode_prompt, texts)
    if getattr(unet.config, "addition_embed_type", None) == "text_time" and "time_ids" not in added:
        added["time_ids"] = sample_time_ids(prompt.width, prompt.height, len(texts))  # SDXL
    factor = vae_scale_factor(vae)
    latents = denoise(
        unet=unet, sampler=scheduler, prompt=prompt, cond=cond, added=added,
        latent_shape=(1, unet.config.in_channels, prompt.height // factor, prompt.width // factor),
        generator=generator, device=device, dtype=dtype,
    )
    image = _latents_to_image(vae, latents, vae_scaling_factor)
    timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    suffix = f"_{seed}" if seed is not None else ""
    path = out_dir / f"{file_stem}_{i:02d}_{timestamp}{suffix}.png"
    info = PngInfo()
    info.add_text(
        "parameters",
        f"{prompt.prompt}\nNegative prompt: {prompt.negative_prompt}\nSteps: {prompt.steps}, "
        f"Sampler: {sampler_name}, CFG scale: {prompt.scale}, Seed: {actual_seed}, "
        f"Size: {prompt.width}x{prompt.height}",
    )
    _save_png_atomically(image, path, info)
    return path


def generate_samples(
    *,
    unet,
    vae,
    vae_scaling_factor: float,
    encode_prompt: Callable[[list[str]], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]],
    scheduler_config: Mapping[str, Any] | None,
    prompts: Sequence[SamplePrompt],
    out_dir: str | Path,
    file_stem: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    default_seed: int | None = None,
    sampler: str = "ddim",
    v_parameterization: bool = False,
    eval_modules: Sequence[torch.nn.Module] = (),
    clip_sample: bool = True,
) -> list[Path]:
    """Generate one image per prompt and save `<out_dir>/<file_stem>_<i:02d>_<YYYYmmddHHMMSS>[_<seed>].png`.

    - `encode_prompt(texts)` returns the UNet's `encoder_hidden_states` for a list of texts, shape
      (len(texts), tokens, dim); for SDXL it returns `(hidden, added_cond_kwargs)` with `text_embeds`;
      `time_ids` are added here when missing, as kohya's SDXL sampler: original = target = (h, w), crop (0, 0).
    - `vae_scaling_factor`: 0.18215 (SD 1/2), 0.13025 (SDXL); latents are divided by it before decoding.
    - Seed of prompt i: its `--d`, else `default_seed + i`, else random (then not in the file name).
    - Sampler: the prompt's `--ss`, else `sampler` (kohya `--sample_sampler`, default ddim).
    - `dtype`: the UNet's compute dtype (autocast when fp16/bf16); the VAE decodes in its own dtype.
    - The UNet and `eval_modules` (e.g. the LoRA network) are put in eval mode and every submodule is
      put back in its previous mode; the global torch and CUDA RNG states are restored afterwards.
    The PNG carries the generation settings in a "parameters" text chunk. Files are written atomically.
    """
    default_sampler = _check_sampler(sampler or "ddim", "sample_sampler")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    modules = [unet, *eval_modules]
    modes = [(m, m.training) for root in modules for m in root.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    paths: list[Path] = []
    try:
        for root in modules:
            root.eval()
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                paths.append(_sample_one(
                    i, prompt, unet=unet, vae=vae, vae_scaling_factor=vae_scaling_factor, encode_prompt=encode_prompt,
                    scheduler_config=scheduler_config, out_dir=out_dir, file_stem=file_stem, device=device,
                    dtype=dtype, default_seed=default_seed, sampler=prompt.sampler or default_sampler,
                    v_parameterization=v_parameterization, clip_sample=clip_sample))
    finally:
        for m, mode in modes:
            m.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return paths


def draw_images(
    prompts: Sequence[SamplePrompt],
    *,
    unet,
    vae,
    vae_scaling_factor: float,
    encode_prompt: Callable,
    scheduler_config: Mapping[str, Any] | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    default_seed: int = 0,
    sampler: str = "ddim",
    v_parameterization: bool = False,
    clip_sample: bool = True,
    batch_size: int = 8,
    eval_modules: Sequence[torch.nn.Module] = (),
) -> list[Image.Image]:
    """The images of `prompts` as `generate_samples` draws them, several per UNet call and not saved.

    Prompts with the same size, steps, guidance scale and sampler go through `denoise` together, up to
    `batch_size` at a time; image i starts from the noise `generate_samples` gives it (a CPU generator
    seeded with its `--d`, else `default_seed + i`). With a deterministic sampler (ddim, euler, dpmsolver++,
    ...) image i is therefore the picture `generate_samples` draws (up to float rounding of a batched
    UNet call); an ancestral sampler (euler_a, dpm_2_a) draws its step noise for the whole batch from
    the first image's seed. Modes and the global RNG state are restored as in `generate_samples`."""
    device = torch.device(device)
    default_sampler = _check_sampler(sampler or "ddim", "sample_sampler")
    factor = vae_scale_factor(vae)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        key = (p.width, p.height, p.steps, p.scale, _check_sampler(p.sampler or default_sampler, "--ss"))
        groups.setdefault(key, []).append(i)
    out: list[Image.Image | None] = [None] * len(prompts)
    modules = [unet, *eval_modules]
    modes = [(m, m.training) for root in modules for m in root.modules()]
    cpu_rng = torch.get_rng_state()
    try:
        for root in modules:
            root.eval()
        with torch.no_grad():
            for (w, h, steps, scale, name), idx in groups.items():
                for start in range(0, len(idx), max(1, batch_size)):
                    chunk = idx[start:start + max(1, batch_size)]
                    seeds = [default_seed + i if prompts[i].seed is None else prompts[i].seed for i in chunk]
                    shape = (1, unet.config.in_channels, h // factor, w // factor)
                    noise = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s),
                                                   dtype=torch.float32) for s in seeds])
                    texts = [prompts[i].negative_prompt for i in chunk] if scale > 1.0 else []
                    cond, added = _encode(encode_prompt, texts + [prompts[i].prompt for i in chunk])
                    if getattr(unet.config, "addition_embed_type", None) == "text_time" and "time_ids" not in added:
                        added["time_ids"] = sample_time_ids(w, h, cond.shape[0])  # SDXL
                    latents = denoise(unet=unet, sampler=make_sampler(name, scheduler_config,
                                      v_parameterization=v_parameterization, clip_sample=clip_sample),
                                      prompt=prompts[chunk[0]], cond=cond, added=added, latent_shape=noise.shape,
                                      generator=torch.Generator("cpu").manual_seed(seeds[0]), device=device,
                                      dtype=dtype, noise=noise)
                    for j, i in enumerate(chunk):
                        out[i] = _latents_to_image(vae, latents[j:j + 1], vae_scaling_factor)
    finally:
        for m, mode in modes:
            m.training = mode
        torch.set_rng_state(cpu_rng)
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- grids
def image_grid(
    images: Sequence[Image.Image],
    rows: int,
    cols: int,
    labels: Sequence[str] | None = None,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Paste `images` row by row into a rows × cols grid of cells as large as the largest image.

    With `labels` (one per image) each cell gets a text strip above the image. Missing images leave
    empty cells; more images than cells raise ValueError.
    """
    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows}x{cols} grid")
    if labels is not None and len(labels) != len(images):
        raise ValueError("labels must have one entry per image")
    cell_w = max((im.width for im in images), default=64)
    cell_h = max((im.height for im in images), default=64)
    font = ImageFont.load_default()
    wrapped = [_wrap(label, font, cell_w) for label in labels] if labels else []
    line_h = max(12, math.ceil(font.getbbox("Ag")[3]) + 4)
    label_h = line_h * max((len(w) for w in wrapped), default=0)
    grid = Image.new("RGB", (cols * cell_w, rows * (cell_h + label_h)), background)
    draw = ImageDraw.Draw(grid)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        x, y = c * cell_w, r * (cell_h + label_h)
        for j, text in enumerate(wrapped[k] if wrapped else []):
            draw.text((x + 2, y + 2 + j * line_h), text, fill=(0, 0, 0), font=font)
        grid.paste(im.convert("RGB"), (x, y + label_h))
    return grid


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of `text` to `width` pixels."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in re.split(r"(\s+)", paragraph):
            trial = current + word
            if current and font.getlength(trial) > width - 4:
                lines.append(current.rstrip())
                current = word.lstrip()
            else:
                current = trial
        lines.append(current.rstrip())
    return lines or [""]
