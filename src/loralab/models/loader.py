"""Load base models offline (LDM single file .safetensors/.ckpt, or a diffusers folder) and save them.

Nothing is fetched: models are built from configs read off the checkpoint itself (`detect.py`), weights
are renamed by our own mapping (`ldm.py`), and the tokenizer comes from the vendored CLIP vocabulary
(or the diffusers folder's own `tokenizer/`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import safetensors
import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loralab.errors import LoralabError
from loralab.io import atomic_write
from loralab.models import ldm
from loralab.models.detect import (
    FAMILIES,
    Architecture,
    TextEncoderLayout,
    architecture_metadata,
    detect_architecture,
    detect_family,
    detect_vae_config,
)
from loralab.models.tokenizer import clip_tokenizer, has_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CKPT_METADATA_KEY = "loralab_metadata"
SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl")  # the one switch: a detected family not listed here is refused


@dataclass
class BaseModel:
    """A loaded base model: its family, models, tokenizers and the facts training needs."""

    family: str  # "sd1" | "sd2" | "sdxl"
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list  # [CLIPTextModel] for sd1/sd2; [CLIPTextModel, CLIPTextModelWithProjection] for sdxl
    tokenizers: list  # [CLIPTokenizer] per text encoder
    v_parameterization: bool
    vae_scaling_factor: float  # 0.18215 sd1/sd2, 0.13025 sdxl, or metadata `loralab.vae_scaling_factor`
    source: str  # the path loaded
    model_hash: str  # sha256 of the file (for ss_new_sd_model_hash), "" for folders
    sample_clip: bool = True  # samplers clip the predicted x0 (kohya); off for a file marked `loralab.sample_clip: 0`

    def noise_scheduler(self, zero_terminal_snr: bool = False) -> DDPMScheduler:
        """kohya's training scheduler: DDPM, 1000 steps, scaled_linear betas 0.00085..0.012, no sample
        clipping; prediction_type "v_prediction" for v-parameterized models (SD 2.x 768-v), else "epsilon".

        zero_terminal_snr (Lin et al. 2023, Algorithm 1): the betas are rescaled so that sqrt(ᾱ_t) is
        shifted and scaled to end at 0 and keep its first value,

            sqrt(ᾱ'_t) = (sqrt(ᾱ_t) − sqrt(ᾱ_last)) · sqrt(ᾱ_0) / (sqrt(ᾱ_0) − sqrt(ᾱ_last))
            β'_0 = 1 − ᾱ'_0,   β'_t = 1 − ᾱ'_t / ᾱ'_(t−1)

        so ᾱ'_last = 0 (the last timestep is pure noise) and β'_0 = β_0. diffusers' `rescale_betas_zero_snr` computes exactly
        kohya's fix_noise_scheduler_betas_for_zero_terminal_snr. It changes training only: kohya samples
        with a fresh scheduler of the original betas, and so do we (`train/sampling.py` make_sampler reads
        only the beta keys of this config). kohya warns when it is used without v-parameterization.
        """
        if zero_terminal_snr and not self.v_parameterization:
            log.warning("zero_terminal_snr is on but v_parameterization is not: training will be unexpected (kohya "
                        "warns the same); zero terminal SNR is meant for v-prediction models.")
        return DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            prediction_type="v_prediction" if self.v_parameterization else "epsilon",
            rescale_betas_zero_snr=zero_terminal_snr,
        )


# ---------------------------------------------------------------------------------------------- reading files


def file_sha256(path: str | Path) -> str:
    """sha256 of the whole file, hex (kohya's ss_new_sd_model_hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a .safetensors or .ckpt file. A .ckpt is read with torch.load(weights_only=True)
    so no code is ever unpickled; its "state_dict" entry is unwrapped; non-tensor entries are dropped."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return safetensors.torch.load_file(str(path)), metadata
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise LoralabError(f"Cannot read {path} as safetensors ({e}). The file may be incomplete: download it again.") from e
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle_checkpoint(path)
    raise LoralabError(
        f"{path}: unknown checkpoint type {path.suffix!r}. Use a .safetensors or .ckpt file, or a diffusers folder "
        "(with model_index.json)."
    )


def _load_weights_only(path: Path, **kw):
    """torch.load that never unpickles code; torch's note about the pickle protocol (a file that is refused
    anyway, or loads fine) is not shown: the outcome is our message."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(str(path), map_location="cpu", weights_only=True, **kw)


def _read_pickle_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        obj = _load_weights_only(path)
    except pickle.UnpicklingError as e:
        raise LoralabError(
            f"{path} needs to run code to load (it pickles more than tensors), and loralab never unpickles code. "
            "Use the model's .safetensors version, or convert it with a tool you trust."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise LoralabError(f"Cannot read {path} ({e}). The file may be incomplete: download it again.") from e
    if not isinstance(obj, dict):
        raise LoralabError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    metadata = obj.get(CKPT_METADATA_KEY) if isinstance(obj.get(CKPT_METADATA_KEY), dict) else {}
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {str(k): str(v) for k, v in metadata.items()}


# ---------------------------------------------------------------------------------------------- building models


def build_model(factory: Callable[[], torch.nn.Module], state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str, source: str) -> torch.nn.Module:
    """Create a model with empty (meta) parameters and assign the state dict's tensors, cast to dtype.
    Every parameter must be in the state dict and every tensor must be used (strict)."""
    with init_empty_weights(include_buffers=False):
        model = factory()
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise LoralabError(
            f"{source}: the {what} weights do not fit the architecture read from the file: missing "
            f"{result.missing_keys[:5]} ({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} "
            f"({len(result.unexpected_keys)}). The file may be damaged or of an unsupported variant."
        )
    # torch's Module.to on purpose: the weights are already cast; this casts float buffers made at init
    # without diffusers' warning about _keep_in_fp32_modules (none in SD's UNet/VAE/CLIP)
    return torch.nn.Module.to(model, dtype).eval()


def text_encoder_class(layout: TextEncoderLayout) -> type:
    """CLIPTextModelWithProjection for encoders whose projection is used (SDXL TE2), else CLIPTextModel."""
    return CLIPTextModelWithProjection if layout.with_projection else CLIPTextModel


def _build_text_encoder(layout: TextEncoderLayout, config: dict, sd: Mapping[str, torch.Tensor], dtype, source: str):
    cls = text_encoder_class(layout)
    factory = lambda: cls(CLIPTextConfig(**config))  # noqa: E731
    with init_empty_weights(include_buffers=False):
        probe = factory()
    return build_model(factory, ldm.te_keys_for(probe, sd), dtype, "text encoder", source)


def _require_supported(family: str, source: str) -> None:
    """The one family gate: a family that is detected but not (yet) trainable is refused here."""
    if family not in SUPPORTED_FAMILIES:
        raise LoralabError(
            f"{source} is an {FAMILIES[family].label} model, which loralab cannot load yet; "
            f"use one of: {', '.join(FAMILIES[f].label for f in SUPPORTED_FAMILIES)}."
        )


def _tokenizers(family: str) -> list:
    return [clip_tokenizer(pad) for pad in FAMILIES[family].pad_tokens]


def load_single_file(path: Path, dtype: torch.dtype) -> tuple[str, UNet2DConditionModel, AutoencoderKL | None, list, float]:
    """(family, unet, vae or None, text encoders, VAE scaling factor) of an LDM single-file checkpoint."""
    sd, metadata = read_checkpoint(path)
    arch = detect_architecture(sd, metadata, source=str(path))
    log.info("%s (%s)", arch.describe(), path.name)
    _require_supported(arch.family, str(path))
    parts = ldm.checkpoint_to_diffusers(sd, arch.family)
    del sd
    ema = [k for k in parts.ignored if k.startswith("model_ema.")]
    if ema:
        log.info("ignoring %d EMA weights (model_ema.*)", len(ema))
    other = [k for k in parts.ignored if not k.startswith("model_ema.")]
    if other:
        log.debug("ignoring %d keys outside the models, e.g. %s", len(other), other[:3])
    unet = build_model(lambda: UNet2DConditionModel(**arch.unet), parts.unet, dtype, "UNet", str(path))
    vae = None
    if parts.vae is not None:
        vae = build_model(lambda: AutoencoderKL(**arch.vae), parts.vae, dtype, "VAE", str(path))
    layouts = FAMILIES[arch.family].text_encoders
    tes = [_build_text_encoder(l, c, s, dtype, str(path)) for l, c, s in zip(layouts, arch.text_encoders, parts.text_encoders)]
    scaling = arch.vae["scaling_factor"] if arch.vae else FAMILIES[arch.family].vae_scaling_factor
    return arch.family, unet, vae, tes, scaling


def _folder_family(folder: Path, index: dict) -> str:
    """sdxl when the pipeline has text_encoder_2; sd2 when the text encoder is OpenCLIP (gelu), else sd1."""
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    te_cfg = folder / "text_encoder" / "config.json"
    if te_cfg.is_file() and json.loads(te_cfg.read_text()).get("hidden_act") == "gelu":
        return "sd2"
    return "sd1"


def load_diffusers_folder(folder: Path, dtype: torch.dtype) -> tuple[str, UNet2DConditionModel, AutoencoderKL, list, list, str | None]:
    """(family, unet, vae, text encoders, tokenizers, scheduler prediction_type) of a diffusers pipeline folder."""
    index = json.loads((folder / "model_index.json").read_text())
    family = _folder_family(folder, index)
    _require_supported(family, str(folder))
    for sub in ("unet", "vae", "text_encoder"):
        if not (folder / sub).is_dir():
            raise LoralabError(f"{folder} has no {sub}/ folder; a diffusers Stable Diffusion folder needs unet/, vae/ and text_encoder/.")
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=dtype, local_files_only=True).eval()
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=dtype, local_files_only=True).eval()
    tes, toks = [], []
    for i, (layout, pad) in enumerate(zip(FAMILIES[family].text_encoders, FAMILIES[family].pad_tokens)):
        suffix = "" if i == 0 else f"_{i + 1}"
        te = text_encoder_class(layout).from_pretrained(str(folder / f"text_encoder{suffix}"), dtype=dtype, local_files_only=True)
        tes.append(te.eval())
        tok_dir = folder / f"tokenizer{suffix}"
        tok = load_tokenizer(tok_dir) if has_tokenizer(tok_dir) else clip_tokenizer(pad)
        if pad == "!" and tok.pad_token_id != 0:
            # OpenCLIP encoders pad with id 0 (formats.md §4); kohya forces it for SDXL's tokenizer_2 too
            log.info("%s pads with id %s; using id 0 (\"!\"), as OpenCLIP and kohya do", tok_dir, tok.pad_token_id)
            tok.pad_token = "!"
        toks.append(tok)
    sched = folder / "scheduler" / "scheduler_config.json"
    prediction = json.loads(sched.read_text()).get("prediction_type") if sched.is_file() else None
    arch = Architecture(family, dict(unet.config), dict(vae.config), [te.config.to_dict() for te in tes])
    log.info("diffusers folder: %s (%s)", arch.describe(), folder.name)
    return family, unet, vae, tes, toks, prediction


def peek_family(path: str | Path) -> str | None:
    """The family of a base model without loading its weights (for checks made before the slow load):
    key names of a .safetensors file or a .ckpt (memory-mapped), or the folder's model_index.json.
    None when it cannot tell (missing or unreadable files: `load_base_model` reports those)."""
    path = Path(path)
    try:
        if path.is_dir() and (path / "model_index.json").is_file():
            return _folder_family(path, json.loads((path / "model_index.json").read_text()))
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            with safetensors.safe_open(str(path), framework="pt") as f:
                return detect_family(f.keys(), str(path))
        if path.suffix.lower() in PICKLE_SUFFIXES:
            obj = _load_weights_only(path, mmap=True)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            return detect_family(obj.keys(), str(path)) if isinstance(obj, dict) else None
    except (LoralabError, OSError, RuntimeError, ValueError, pickle.UnpicklingError, safetensors.SafetensorError):
        return None
    return None


def load_vae(path: str | Path, family: str, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A separate VAE: a diffusers VAE folder (or a pipeline folder's vae/), or a file with LDM
    `first_stage_model.*` keys, bare LDM VAE keys (the usual standalone VAE .safetensors/.ckpt) or diffusers keys."""
    path = Path(path)
    if path.is_dir():
        sub = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (sub / "config.json").is_file():
            raise LoralabError(f"VAE folder {path} has no config.json; pass a diffusers VAE folder or a VAE file.")
        return AutoencoderKL.from_pretrained(str(sub), torch_dtype=dtype, local_files_only=True).eval()
    if not path.is_file():
        raise LoralabError(f"VAE not found: {path}. Check the vae= path.")
    sd, metadata = read_checkpoint(path)
    ldm_sd = ldm.vae_file_to_ldm(sd, str(path))
    config = detect_vae_config(ldm_sd, family, metadata, prefix="")
    vae = build_model(lambda: AutoencoderKL(**config), ldm.vae_ldm_to_diffusers(ldm_sd), dtype, "VAE", str(path))
    ch = config["block_out_channels"]
    log.info("VAE from %s: %dch x%s z%d", path.name, ch[0], [c // ch[0] for c in ch], config["latent_channels"])
    return vae


def load_base_model(
    path: str | Path, *, vae: str | Path | None = None, v_parameterization: bool | None = None, dtype: torch.dtype = torch.float32
) -> BaseModel:
    """Load a base model offline from an LDM single file (.safetensors / .ckpt, with or without EMA weights)
    or a diffusers folder (model_index.json), optionally with a separate VAE (`vae=`).

    v_parameterization: kohya's flag (SD 2.x 768-v models); a file cannot tell, so None means False for
    single files, and the scheduler's prediction_type for diffusers folders."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise LoralabError(f"{path} is a folder without model_index.json: pass a checkpoint file or a diffusers pipeline folder.")
        family, unet, base_vae, tes, toks, prediction = load_diffusers_folder(path, dtype)
        scaling = float(base_vae.config.scaling_factor)
        model_hash = ""
        if v_parameterization is None:
            v_parameterization = prediction == "v_prediction"
            if v_parameterization:
                log.info("the folder's scheduler predicts v: v_parameterization on")
    elif path.is_file():
        family, unet, base_vae, tes, scaling = load_single_file(path, dtype)
        toks = _tokenizers(family)
        model_hash = file_sha256(path)
        if family == "sd2" and v_parameterization is None:
            log.info("SD 2.x: training as epsilon-prediction; a 768-v model (e.g. SD 2.1 768) needs v_parameterization=True")
    else:
        raise LoralabError(
            f"Base model not found: {path}. Check pretrained_model_name_or_path; loralab loads local files only "
            "(a .safetensors/.ckpt file or a diffusers folder), so download a hub model first."
        )
    if vae is not None:
        base_vae = load_vae(vae, family, dtype)
    if base_vae is None:
        raise LoralabError(f"{path} has no VAE (no first_stage_model.* keys): pass a VAE file with vae=.")
    return BaseModel(
        family=family,
        unet=unet,
        vae=base_vae,
        text_encoders=tes,
        tokenizers=toks,
        v_parameterization=bool(v_parameterization),
        vae_scaling_factor=scaling,
        source=str(path),
        model_hash=model_hash,
        sample_clip=_sample_clip(path),
    )


def _sample_clip(path: Path) -> bool:
    """kohya's samplers clip the predicted x0 to [-1, 1]. A model whose latents often lie outside that range
    says `loralab.sample_clip: "0"` in its metadata (the lab model, whose latents are scaled to unit variance,
    is marked by `loralab.lab_model`) and is sampled without clipping, as it was trained to be."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return True
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged header was reported when the model loaded
        return True
    return not (meta.get("loralab.sample_clip") == "0" or meta.get("loralab.lab_model") == "1")


# ---------------------------------------------------------------------------------------------- saving


def save_single_file(
    path: str | Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoders: list,
    *,
    family: str = "sd1",
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
) -> None:
    """Save models as one LDM-layout checkpoint (what A1111/ComfyUI/kohya load). `.safetensors` gets
    metadata: the `loralab.*` architecture keys (head counts etc., so tiny models load back exactly) plus
    `metadata`; a `.ckpt` path is written with torch.save({"state_dict": ..., "loralab_metadata": ...})."""
    path = Path(path)
    if family not in FAMILIES:
        raise LoralabError(f"Unknown family {family!r}; use one of {sorted(FAMILIES)}.")
    sd = ldm.diffusers_to_checkpoint(unet.state_dict(), vae.state_dict(), [ldm.te_state_dict(te) for te in text_encoders], family)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu() for k, v in sd.items()}
    meta = architecture_metadata(dict(unet.config), dict(vae.config), [te.config for te in text_encoders])
    meta.update(metadata or {})
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        atomic_write(path, lambda tmp: safetensors.torch.save_file(sd, tmp, metadata=meta))
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        atomic_write(path, lambda tmp: torch.save({"state_dict": sd, CKPT_METADATA_KEY: meta}, tmp))
    else:
        raise LoralabError(f"Cannot save {path}: use a .safetensors (recommended) or .ckpt file name.")
    log.info("saved %s checkpoint %s (%d tensors, %s)", FAMILIES[family].label, path, len(sd), dtype)
