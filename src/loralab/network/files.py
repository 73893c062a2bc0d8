"""kohya-format LoRA files: reading, key spellings, shapes, unknown keys, writing, and the file hashes.

The layout is kohya-ss sd-scripts' `networks.lora` (research/kohya.md §4, formats.md §1.1):

* File: `<name>.lora_down.weight` [r, in] (conv [r, in, kh, kw]), `<name>.lora_up.weight` [out, r]
  (conv [out, r, 1, 1]), `<name>.alpha` (0-d). Loaded the same way by A1111, ComfyUI, diffusers and kohya.
* SD 2.x proj_in/proj_out: diffusers builds them as `nn.Linear` (use_linear_projection), kohya as 1x1
  convs, so kohya's SD2 files hold 4-D [r, in, 1, 1] weights there. We save the 2-D shape of the module we
  wrap: diffusers' loader rejects the 4-D shape for a Linear (size mismatch, checked in
  tests/test_network.py), while A1111 (`network_lora.create_module` reshapes Linear weights to 2-D) and
  ComfyUI (flattens both factors, reshapes the product to the weight's shape) accept either. On load we
  accept both shapes for Linear and for 1x1 conv targets (`fit_shape`).
* `.safetensors` files carry string metadata and kohya's `sshs_model_hash` / `sshs_legacy_hash`
  (`precalculate_safetensors_hashes`); `.pt` / `.ckpt` files hold the tensors only.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Container, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import save_file

from loralab.errors import LoralabError
from loralab.io import atomic_write

log = logging.getLogger(__name__)

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


# ---------------------------------------------------------------------------------------- reading


def read_weights(path_or_sd: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` / `.pt` / `.ckpt` LoRA file (on CPU), or a copy of a given dict."""
    if isinstance(path_or_sd, Mapping):
        return dict(path_or_sd)
    path = Path(path_or_sd)
    if not path.is_file():
        raise LoralabError(f"LoRA file not found: {path}; check network_weights (or the path you gave)")
    try:
        if path.suffix.lower() == ".safetensors":
            return safetensors.torch.load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise LoralabError(f"cannot read LoRA file {path}: {e}. The file is damaged or not a LoRA; save or download "
                           "it again") from e


def module_names(sd: Mapping[str, Any]) -> list[str]:
    """Module names of a kohya state dict, in first-seen order (keys without a "." are ignored, as kohya)."""
    return list(dict.fromkeys(k.split(".", 1)[0] for k in sd if "." in k))


def canonical_keys(sd: Mapping[str, torch.Tensor], aliases: Mapping[str, str], where: str) -> tuple[dict, int]:
    """Rename keys written under another spelling of a module to its kohya name."""
    out: dict[str, torch.Tensor] = {}
    renamed = 0
    for key, value in sd.items():
        module, sep, rest = key.partition(".")
        if module in aliases:
            module = aliases[module]
            renamed += 1
        new = module + sep + rest
        if new in out:
            raise LoralabError(f"{where}: the file holds {new} twice (under two spellings of the same module); "
                               "remove one copy")
        out[new] = value
    if renamed:
        log.info("%s: %d keys read under their kohya names (the file uses another naming style)", where, renamed)
    return out, renamed


def check_keys(sd: Mapping[str, torch.Tensor], known: Container[str], where: str, family: str,
               suffixes: Mapping[str, Container[str]] | None = None) -> None:
    """Every module of `sd` must be in `known`, and every key of a known module must end in one of its suffixes
    (`suffixes[name]`, e.g. {".hada_w1_a", ..., ".alpha"}; default SUFFIXES, LoRA's)."""
    unknown = sorted(n for n in module_names(sd) if n not in known)
    bad_suffix = sorted(k for k in sd if "." in k and k.split(".", 1)[0] in known
                        and "." + k.split(".", 1)[1] not in (suffixes or {}).get(k.split(".", 1)[0], SUFFIXES))
    if unknown or bad_suffix:
        raise unknown_keys_error(unknown + bad_suffix, where, family)


def unknown_keys_error(keys: Sequence[str], where: str, family: str) -> LoralabError:
    """The error for file keys that match no module of the network: what, where and what to do."""
    shown = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
    return LoralabError(
        f"{where}: {len(keys)} LoRA modules/keys match nothing in this {family} network: {shown}. The file was "
        "made for another model family or architecture, holds another network type than this network's modules "
        "(LoRA, LoHa, LoKr, DoRA, full: load it with LoRANetwork.from_weights), or the network was created without "
        "some of its modules; use a file made for this base model.")


def fit_shape(value: torch.Tensor, shape: torch.Size, name: str, where: str) -> tuple[torch.Tensor, bool]:
    """Accept kohya's 4-D [a, b, 1, 1] weights for Linear targets (SD2 proj_in/out) and 2-D for 1x1 convs."""
    if value.shape == shape:
        return value, False
    if value.numel() == math.prod(shape):
        if len(shape) == 2 and value.dim() == 4 and tuple(value.shape[2:]) == (1, 1):
            return value.reshape(shape), True
        if len(shape) == 4 and tuple(shape[2:]) == (1, 1) and value.dim() == 2:
            return value.reshape(shape), True
    raise LoralabError(
        f"{where}: {name} has shape {tuple(value.shape)} in the file but {tuple(shape)} in the network. The file "
        "was trained with another rank or for another model; load it with dim_from_weights (LoRANetwork.from_weights) "
        "or pick a LoRA made for this base model.")


# ---------------------------------------------------------------------------------------- writing


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write a kohya-format file atomically (`loralab.io.atomic_write`: temp file in the same folder, then
    os.replace).

    `.safetensors`: the metadata (strings only) plus `sshs_model_hash` / `sshs_legacy_hash`
    (`precalculate_safetensors_hashes`). Other suffixes (.pt/.ckpt): torch.save of the tensors, no
    metadata. `dtype` (e.g. torch.float16) casts every tensor, alpha included.
    """
    path = Path(path)
    sd = {k: v.detach().clone().to("cpu", dtype or v.dtype).contiguous() for k, v in state_dict.items()}
    if path.suffix.lower() == ".safetensors":
        md = dict(metadata or {})
        bad = sorted(k for k, v in md.items() if not isinstance(k, str) or not isinstance(v, str))
        if bad:
            raise TypeError(f"safetensors metadata values must be str; not for: {', '.join(map(str, bad))}")
        md["sshs_model_hash"], md["sshs_legacy_hash"] = precalculate_safetensors_hashes(sd, md)
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=md))
    else:
        if metadata:  # kohya's .ckpt / .pt LoRA is torch.save(state_dict) too, without metadata
            log.debug("%s: metadata is only stored in .safetensors files", path)
        atomic_write(path, lambda tmp: torch.save(sd, tmp))


def precalculate_safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's train_util and sd-webui-additional-networks compute them.

    Serialize `tensors` with only the `ss_*` metadata; model hash = sha256 hex of everything after the
    header (8-byte little-endian length n, then n header bytes); legacy hash = sha256 of the 0x10000 bytes
    at offset 0x100000, first 8 hex digits (of nothing for files under 1 MiB).
    """
    data = safetensors.torch.save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash
