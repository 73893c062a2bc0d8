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


# ---------------------------------------------------------------------------------------- embeddings
# Textual-inversion embeddings beside a LoRA (pivotal tuning), in the layouts other programs read
# (research/advanced.md §3.3, §7):
# * bundled in the LoRA file (A1111 PR #13568, `extensions-builtin/Lora/networks.py`): SD 1.x/2.x
#   `bundle_emb.<token>.string_to_param.*` [n, dim]; SDXL `bundle_emb.<token>.clip_l` [n, 768] and
#   `bundle_emb.<token>.clip_g` [n, 1280]. A1111 and SD.Next load them with the LoRA; ComfyUI does not.
# * a separate embedding file named `<token>.safetensors` (A1111 and ComfyUI call an embedding by its file
#   name): SD 1.x/2.x `{"emb_params": [n, dim]}` (kohya `train_textual_inversion.py`), SDXL
#   `{"clip_l": ..., "clip_g": ...}` (kohya `sdxl_train_textual_inversion.py`, diffusers, A1111, ComfyUI).

BUNDLE_PREFIX = "bundle_emb."
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # text encoder 1 (CLIP-L), text encoder 2 (OpenCLIP bigG)


def bundle_tensors(embeddings: Mapping[str, Sequence[torch.Tensor]], family: str) -> dict[str, torch.Tensor]:
    """{token: [one [n, dim] tensor per text encoder]} as the `bundle_emb.*` keys of a LoRA file."""
    out = {}
    for token, parts in embeddings.items():
        if family == "sdxl":
            out.update({f"{BUNDLE_PREFIX}{token}.{k}": v for k, v in zip(SDXL_EMBEDDING_KEYS, parts)})
        else:
            out[f"{BUNDLE_PREFIX}{token}.string_to_param.*"] = parts[0]
    return out


def embedding_file_tensors(parts: Sequence[torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """One embedding's tensors in a separate file: `emb_params` (SD 1.x/2.x) or `clip_l` / `clip_g` (SDXL)."""
    if family == "sdxl":
        return dict(zip(SDXL_EMBEDDING_KEYS, parts))
    return {"emb_params": parts[0]}


def split_bundle(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the network's keys, {token: {subkey: tensor}}) of a LoRA state dict; the subkey is what follows the
    token (`string_to_param.*`, `clip_l`, `clip_g`, `emb_params`, ...), as A1111's loader reads it."""
    network, bundled = {}, {}
    for key, value in sd.items():
        if key.startswith(BUNDLE_PREFIX):
            token, _, sub = key[len(BUNDLE_PREFIX):].partition(".")
            bundled.setdefault(token, {})[sub] = value
        else:
            network[key] = value
    return network, bundled


def embedding_parts(data: Mapping[str, Any], family: str, where: str) -> list[torch.Tensor]:
    """One [n, dim] tensor per text encoder from an embedding's payload, the forms A1111's
    `create_embedding_from_data` accepts: `string_to_param` (one entry; also as `string_to_param.<k>` keys),
    `clip_l` + `clip_g` (SDXL), or a single tensor under any key (kohya `emb_params`, diffusers `<token>`).
    A 1-D tensor is one vector."""
    if family == "sdxl":
        missing = [k for k in SDXL_EMBEDDING_KEYS if k not in data]
        if missing:
            raise LoralabError(f"{where}: an SDXL embedding needs clip_l and clip_g tensors; it has "
                               f"{', '.join(sorted(map(str, data))) or 'none'} (made for SD 1.x/2.x?)")
        parts = [data[k] for k in SDXL_EMBEDDING_KEYS]
    else:
        if "string_to_param" in data and isinstance(data["string_to_param"], Mapping):
            data = {f"string_to_param.{k}": v for k, v in data["string_to_param"].items()}
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if set(data) >= set(SDXL_EMBEDDING_KEYS):
            raise LoralabError(f"{where}: an SDXL embedding (clip_l, clip_g) does not fit this {family} model")
        if len(tensors) != 1:
            raise LoralabError(f"{where}: an embedding holds one tensor (string_to_param, emb_params); this one "
                               f"has {len(tensors)} ({', '.join(sorted(map(str, data)))})")
        parts = tensors
    return [p.unsqueeze(0) if p.dim() == 1 else p for p in (t.detach().to("cpu", torch.float32) for t in parts)]


def read_embedding_file(path: str | Path) -> dict[str, Any]:
    """The payload of a textual-inversion file: `.safetensors` tensors, or a `.pt` / `.bin` dict (A1111's
    `{"string_to_param": {"*": T}, "name": ...}`, kohya's `{"emb_params": T}`)."""
    path = Path(path)
    if not path.is_file():
        raise LoralabError(f"embedding file not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            return safetensors.torch.load_file(str(path), device="cpu")
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoralabError(f"cannot read embedding file {path}: {e}") from e
    if isinstance(data, torch.Tensor):
        return {"emb_params": data}
    if not isinstance(data, Mapping):
        raise LoralabError(f"{path}: not an embedding file (it holds a {type(data).__name__})")
    return dict(data)


def embeddings_folder(lora_path: str | Path) -> Path:
    """Where a pivotal LoRA file's separate embedding files go: `<lora stem>_emb/` beside it."""
    lora_path = Path(lora_path)
    return lora_path.with_name(f"{lora_path.stem}_emb")


def save_embedding_file(path: str | Path, parts: Sequence[torch.Tensor], family: str, dtype: torch.dtype | None = None,
                        metadata: Mapping[str, str] | None = None) -> None:
    """Write one embedding as a separate file (`embedding_file_tensors`), atomically; `.pt` gets A1111's
    `string_to_param` layout for SD 1.x/2.x."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors" or family == "sdxl":
        save_weights(path, embedding_file_tensors(parts, family), dtype, metadata)
        return
    t = parts[0].detach().clone().to("cpu", dtype or parts[0].dtype)
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": path.stem, "step": 0}
    atomic_write(path, lambda tmp: torch.save(data, tmp))
