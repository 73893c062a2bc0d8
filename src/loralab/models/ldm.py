"""Key conversion between the LDM single-file layout and diffusers / transformers, both directions.

LDM (CompVis / Stability, what A1111 and ComfyUI load) names the UNet by flat block lists
(`input_blocks.K.S`, `middle_block.S`, `output_blocks.K.S`), the VAE by `encoder.down.I.block.J`, and
the text encoders by HF CLIP names (SD 1.x) or OpenCLIP names (SD 2.x, SDXL TE2). The mapping below is
ours, written from the layout rules (facts cross-checked with diffusers' single_file_utils and ComfyUI);
it works for any number of levels and res blocks, not only the real models' 3 or 4 levels of 2.

Text-encoder state dicts on the HF side use the nested names (`text_model.encoder.layers.N...`), as in
files on disk and in CLIPTextModelWithProjection; `te_state_dict` / `load_te_state_dict` adapt them to
transformers >= 5.6's flattened CLIPTextModel (no `text_model.`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from loralab.errors import LoralabError
from loralab.models.detect import FAMILIES, UNET_PREFIX, VAE_PREFIX, TextEncoderLayout, key_prefixes

StateDict = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------- shared


def map_keys(sd: Mapping[str, torch.Tensor], rename: Callable[[str], str | None]) -> tuple[StateDict, list[str]]:
    """Apply a key renaming; keys it returns None for are collected as unmapped."""
    out: StateDict = {}
    unmapped: list[str] = []
    for k, v in sd.items():
        new = rename(k)
        if new is None:
            unmapped.append(k)
        else:
            out[new] = v
    return out, unmapped


def _rename_prefix(key: str, table: Mapping[str, str]) -> str | None:
    """Replace the first matching dotted prefix of `key` using `table` (prefix -> new prefix)."""
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return None


def _strict(sd: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], what: str) -> StateDict:
    """map_keys, raising when a key has no mapping (a conversion bug or an unsupported architecture)."""
    out, unmapped = map_keys(sd, rename)
    if unmapped:
        raise LoralabError(f"{what}: no mapping for keys {unmapped[:5]} ({len(unmapped)} in all); this architecture is not supported.")
    return out


# ---------------------------------------------------------------------------------------------- UNet

RESNET_LDM_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
RESNET_DIFFUSERS_TO_LDM = {v: k for k, v in RESNET_LDM_TO_DIFFUSERS.items()}
UNET_TOP_LDM_TO_DIFFUSERS = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
UNET_TOP_DIFFUSERS_TO_LDM = {v: k for k, v in UNET_TOP_LDM_TO_DIFFUSERS.items()}
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.*)")


def unet_layers_per_block_ldm(keys) -> int:
    """num_res_blocks of an LDM UNet (no prefix): input blocks before the first downsampler, minus conv_in."""
    ks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    ops = sorted({int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))})
    return (ops[0] if ops else len(ks)) - 1


def unet_key_ldm_to_diffusers(key: str, layers_per_block: int) -> str | None:
    """One LDM UNet key (no `model.diffusion_model.` prefix) -> diffusers, with n = layers_per_block:
    input_blocks.K (K >= 1): level, j = divmod(K-1, n+1); j < n: .0 -> down_blocks.L.resnets.j, .1 ->
    down_blocks.L.attentions.j; j == n: .0.op -> down_blocks.L.downsamplers.0.conv.
    middle_block.0/.1/.2 -> mid_block.resnets.0 / attentions.0 / resnets.1.
    output_blocks.K: level, j = divmod(K, n+1); .0 -> up_blocks.L.resnets.j; a child with `.conv`
    (index 1 without attention, 2 with) -> up_blocks.L.upsamplers.0.conv; else .1 -> up_blocks.L.attentions.j.
    Res blocks rename in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection to norm1, conv1,
    time_emb_proj, norm2, conv2, conv_shortcut. Transformer internals keep their names."""
    top = _rename_prefix(key, UNET_TOP_LDM_TO_DIFFUSERS)
    if top is not None:
        return top
    m = re.fullmatch(r"middle_block\.(\d+)\.(.*)", key)
    if m:
        sub, rest = int(m.group(1)), m.group(2)
        if sub == 1:
            return f"mid_block.attentions.0.{rest}"
        res = _rename_prefix(rest, RESNET_LDM_TO_DIFFUSERS)
        return f"mid_block.resnets.{sub // 2}.{res}" if res and sub in (0, 2) else None
    m = _BLOCK.fullmatch(key)
    if not m:
        return None
    kind, k, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    n = layers_per_block
    if kind == "input_blocks":
        level, j = divmod(k - 1, n + 1)
        if j == n:
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}" if sub == 0 and rest.startswith("op.") else None
        base = f"down_blocks.{level}"
    else:
        level, j = divmod(k, n + 1)
        base = f"up_blocks.{level}"
        if sub > 0 and rest.startswith("conv."):
            return f"{base}.upsamplers.0.{rest}" if j == n else None
    if sub == 0:
        res = _rename_prefix(rest, RESNET_LDM_TO_DIFFUSERS)
        return f"{base}.resnets.{j}.{res}" if res else None
    return f"{base}.attentions.{j}.{rest}" if sub == 1 else None


_DIFF_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)")


def unet_key_diffusers_to_ldm(key: str, layers_per_block: int, up_levels_with_attention: set[int]) -> str | None:
    """Inverse of `unet_key_ldm_to_diffusers`. The upsampler of up level L goes to output_blocks.K.2.conv
    when that level has attentions (child 1 is the transformer), else output_blocks.K.1.conv."""
    top = _rename_prefix(key, UNET_TOP_DIFFUSERS_TO_LDM)
    if top is not None:
        return top
    n = layers_per_block
    if key.startswith("mid_block."):
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if not m:
            return None
        if m.group(1) == "attentions":
            return f"middle_block.1.{m.group(3)}"
        res = _rename_prefix(m.group(3), RESNET_DIFFUSERS_TO_LDM)
        return f"middle_block.{2 * int(m.group(2))}.{res}" if res else None
    m = _DIFF_BLOCK.fullmatch(key)
    if not m:
        return None
    blocks, level, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if blocks == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * (n + 1)}.0.op.{rest[5:]}" if rest.startswith("conv.") else None
        k = 1 + level * (n + 1) + j
    else:
        if kind == "upsamplers":
            sub = 2 if level in up_levels_with_attention else 1
            return f"output_blocks.{level * (n + 1) + n}.{sub}.{rest}"
        k = level * (n + 1) + j
    if kind == "attentions":
        return f"{'input_blocks' if blocks == 'down_blocks' else 'output_blocks'}.{k}.1.{rest}"
    res = _rename_prefix(rest, RESNET_DIFFUSERS_TO_LDM)
    return f"{'input_blocks' if blocks == 'down_blocks' else 'output_blocks'}.{k}.0.{res}" if res else None


def unet_ldm_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """An LDM UNet state dict (no prefix) in diffusers names."""
    n = unet_layers_per_block_ldm(sd.keys())
    return _strict(sd, lambda k: unet_key_ldm_to_diffusers(k, n), "UNet (LDM -> diffusers)")


def unet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A diffusers UNet state dict in LDM names (no prefix)."""
    n = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    up_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return _strict(sd, lambda k: unet_key_diffusers_to_ldm(k, n, up_attn), "UNet (diffusers -> LDM)")


# ---------------------------------------------------------------------------------------------- VAE

VAE_RESNET_LDM_TO_DIFFUSERS = {"nin_shortcut": "conv_shortcut"}
VAE_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
VAE_ATTN_DIFFUSERS_TO_LDM = {v: k for k, v in VAE_ATTN_LDM_TO_DIFFUSERS.items()}
VAE_TOP = {"norm_out": "conv_norm_out"}


def _vae_resnet_rest(rest: str, table: Mapping[str, str]) -> str:
    return _rename_prefix(rest, table) or rest


def vae_key_ldm_to_diffusers(key: str, num_levels: int) -> str | None:
    """One LDM VAE key (no `first_stage_model.`) -> diffusers: encoder.down.I.block.J -> encoder.down_blocks.I.resnets.J,
    encoder.down.I.downsample -> .downsamplers.0, decoder.up.I -> decoder.up_blocks.(L-1-I) (LDM counts decoder
    levels from the lowest resolution up), mid.block_1/2 -> mid_block.resnets.0/1, mid.attn_1.{norm,q,k,v,proj_out}
    -> mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}, norm_out -> conv_norm_out, nin_shortcut ->
    conv_shortcut. conv_in, conv_out, quant_conv, post_quant_conv keep their names."""
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(.*)", key)
    if not m:
        return None
    side, rest = m.group(1), m.group(2)
    if rest.split(".")[0] in ("conv_in", "conv_out"):
        return key
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest[9:]}"
    mm = re.fullmatch(r"mid\.block_(\d)\.(.*)", rest)
    if mm:
        return f"{side}.mid_block.resnets.{int(mm.group(1)) - 1}.{_vae_resnet_rest(mm.group(2), VAE_RESNET_LDM_TO_DIFFUSERS)}"
    mm = re.fullmatch(r"mid\.attn_1\.(\w+)\.(\w+)", rest)
    if mm:
        name = VAE_ATTN_LDM_TO_DIFFUSERS.get(mm.group(1))
        return f"{side}.mid_block.attentions.0.{name}.{mm.group(2)}" if name else None
    mm = re.fullmatch(r"(down|up)\.(\d+)\.(block|downsample|upsample)\.(.*)", rest)
    if not mm:
        return None
    i = int(mm.group(2))
    blocks = "down_blocks" if mm.group(1) == "down" else "up_blocks"
    if mm.group(1) == "up":
        i = num_levels - 1 - i
    if mm.group(3) == "block":
        j, tail = mm.group(4).split(".", 1)
        return f"{side}.{blocks}.{i}.resnets.{j}.{_vae_resnet_rest(tail, VAE_RESNET_LDM_TO_DIFFUSERS)}"
    sampler = "downsamplers" if mm.group(3) == "downsample" else "upsamplers"
    return f"{side}.{blocks}.{i}.{sampler}.0.{mm.group(4)}"


def vae_key_diffusers_to_ldm(key: str, num_levels: int) -> str | None:
    """Inverse of `vae_key_ldm_to_diffusers`."""
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(.*)", key)
    if not m:
        return None
    side, rest = m.group(1), m.group(2)
    if rest.split(".")[0] in ("conv_in", "conv_out"):
        return key
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest[14:]}"
    mm = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", rest)
    if mm:
        return f"{side}.mid.block_{int(mm.group(1)) + 1}.{_vae_resnet_rest(mm.group(2), {'conv_shortcut': 'nin_shortcut'})}"
    mm = re.fullmatch(r"mid_block\.attentions\.0\.(.*)\.(\w+)", rest)
    if mm:
        name = VAE_ATTN_DIFFUSERS_TO_LDM.get(mm.group(1))
        return f"{side}.mid.attn_1.{name}.{mm.group(2)}" if name else None
    mm = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest)
    if not mm:
        return None
    i = int(mm.group(2))
    blocks = "down" if mm.group(1) == "down_blocks" else "up"
    if blocks == "up":
        i = num_levels - 1 - i
    if mm.group(3) == "resnets":
        return f"{side}.{blocks}.{i}.block.{mm.group(4)}.{_vae_resnet_rest(mm.group(5), {'conv_shortcut': 'nin_shortcut'})}"
    sampler = "downsample" if mm.group(3) == "downsamplers" else "upsample"
    return f"{side}.{blocks}.{i}.{sampler}.{mm.group(5)}"


def _is_vae_attn_weight(key: str) -> bool:
    return bool(re.search(r"(mid\.attn_1\.(q|k|v|proj_out)|mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0))\.weight$", key))


def vae_ldm_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """An LDM VAE state dict (no prefix) in diffusers names; the mid-block attention's 1x1 conv weights
    [C, C, 1, 1] become Linear weights [C, C]."""
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    out = _strict(sd, lambda k: vae_key_ldm_to_diffusers(k, levels), "VAE (LDM -> diffusers)")
    return {k: (v.reshape(v.shape[0], v.shape[1]) if v.ndim == 4 and _is_vae_attn_weight(k) else v) for k, v in out.items()}


def vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A diffusers VAE state dict in LDM names (no prefix); mid-block attention Linear weights become
    1x1 conv weights [C, C, 1, 1], as in the original checkpoints."""
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = _strict(sd, lambda k: vae_key_diffusers_to_ldm(k, levels), "VAE (diffusers -> LDM)")
    return {k: (v.reshape(*v.shape, 1, 1) if v.ndim == 2 and _is_vae_attn_weight(k) else v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- text encoders

OPENCLIP_LAYER_TO_HF = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
HF_LAYER_TO_OPENCLIP = {v: k for k, v in OPENCLIP_LAYER_TO_HF.items()}
OPENCLIP_TOP_TO_HF = {
    "token_embedding": "text_model.embeddings.token_embedding",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final": "text_model.final_layer_norm",
}
OPENCLIP_IGNORED = ("logit_scale", "attn_mask")


def clip_ldm_to_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """HF CLIP keys stored in an LDM file (prefix removed) -> nested HF names: old files without
    `text_model.` get it; `position_ids` buffers are dropped (transformers rebuilds them)."""
    out: StateDict = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith("text_model.") else "text_model." + k] = v
    return out


def clip_hf_to_ldm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Nested HF CLIP keys as stored in an LDM file (SD 1.x / SDXL TE1): the names are the same."""
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def openclip_to_hf(sd: Mapping[str, torch.Tensor], *, drop_last_layer: bool, with_projection: bool) -> StateDict:
    """OpenCLIP text tower (prefix removed) -> nested HF CLIP names.

    transformer.resblocks.N.{ln_1, ln_2, mlp.c_fc, mlp.c_proj, attn.out_proj} -> encoder.layers.N.{layer_norm1,
    layer_norm2, mlp.fc1, mlp.fc2, self_attn.out_proj}; attn.in_proj_{weight,bias} [3D, ...] is split in
    thirds into q_proj, k_proj, v_proj; token_embedding, positional_embedding (a bare tensor) and ln_final go
    to embeddings / final_layer_norm; text_projection [D, P] -> text_projection.weight [P, D] (transposed)
    when with_projection, else dropped. drop_last_layer (SD 2.x) skips the last resblock, which SD 2.x never
    uses (it conditions on the penultimate layer). logit_scale and attn_mask are dropped."""
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    last = layers[-1] if layers else -1
    out: StateDict = {}
    unmapped: list[str] = []
    for k, v in sd.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if drop_last_layer and i == last:
                continue
            base = f"text_model.encoder.layers.{i}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part.clone()
                continue
            new = _rename_prefix(rest, OPENCLIP_LAYER_TO_HF)
            if new is None:
                unmapped.append(k)
            else:
                out[base + new] = v
        elif k == "text_projection":
            if with_projection:
                out["text_projection.weight"] = v.t().contiguous()
        elif k in OPENCLIP_IGNORED:
            continue
        else:
            new = _rename_prefix(k, OPENCLIP_TOP_TO_HF)
            if new is None:
                unmapped.append(k)
            else:
                out[new] = v
    if unmapped:
        raise LoralabError(f"OpenCLIP text encoder: no mapping for keys {unmapped[:5]}; this text encoder is not supported.")
    return out


def hf_to_openclip(sd: Mapping[str, torch.Tensor], *, add_dummy_last_layer: bool, with_projection: bool) -> StateDict:
    """Nested HF CLIP names -> OpenCLIP text tower (no prefix); inverse of `openclip_to_hf`.

    q/k/v are concatenated into attn.in_proj_{weight,bias}. add_dummy_last_layer (SD 2.x): the HF model has
    one layer fewer than the file layout, so the last HF layer is written a second time as the final resblock
    (kohya does the same); text_projection (identity [D, D]) and logit_scale (ln 100) fill the
    OpenCLIP slots the HF model lacks. with_projection: text_projection.weight [P, D] is written transposed."""
    out: StateDict = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.*)", k)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        else:
            new = _rename_prefix(k, {v2: k2 for k2, v2 in OPENCLIP_TOP_TO_HF.items()})
            if new is None:
                raise LoralabError(f"CLIP text encoder key {k!r} has no OpenCLIP name.")
            out[new] = v
    for i, parts in sorted(layers.items()):
        out.update(_openclip_layer(i, parts))
    if add_dummy_last_layer and layers:
        last = max(layers)
        out.update({k: v.clone() for k, v in _openclip_layer(last + 1, layers[last]).items()})
    if not with_projection and "text_projection" not in out:
        width = out["token_embedding.weight"].shape[1]
        out["text_projection"] = torch.eye(width, dtype=out["token_embedding.weight"].dtype)
        out["logit_scale"] = torch.tensor(math.log(100.0), dtype=out["token_embedding.weight"].dtype)
    return out


def _openclip_layer(i: int, parts: Mapping[str, torch.Tensor]) -> StateDict:
    """One HF encoder layer's tensors (names after `encoder.layers.N.`) as OpenCLIP resblock i."""
    base = f"transformer.resblocks.{i}."
    out: StateDict = {}
    for kind in ("weight", "bias"):
        qkv = [parts[f"self_attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")]
        out[f"{base}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
    for name, v in parts.items():
        if name.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
            continue
        new = _rename_prefix(name, HF_LAYER_TO_OPENCLIP)
        if new is None:
            raise LoralabError(f"CLIP text encoder layer key {name!r} has no OpenCLIP name.")
        out[base + new] = v
    return out


def te_ldm_to_hf(sd: Mapping[str, torch.Tensor], layout: TextEncoderLayout) -> StateDict:
    """One text encoder's keys (prefix removed) -> nested HF names, by its layout kind."""
    if layout.kind == "clip":
        return clip_ldm_to_hf(sd)
    return openclip_to_hf(sd, drop_last_layer=layout.drop_last_layer, with_projection=layout.with_projection)


def te_hf_to_ldm(sd: Mapping[str, torch.Tensor], layout: TextEncoderLayout) -> StateDict:
    """Nested HF names -> one text encoder's LDM keys (prefix not added)."""
    if layout.kind == "clip":
        return clip_hf_to_ldm(sd)
    return hf_to_openclip(sd, add_dummy_last_layer=layout.drop_last_layer, with_projection=layout.with_projection)


def te_state_dict(model: torch.nn.Module) -> StateDict:
    """A text encoder's state dict in nested HF names (adds `text_model.` for flattened CLIPTextModel)."""
    sd = model.state_dict()
    if any(k.startswith("text_model.") for k in sd):
        return dict(sd)
    return {"text_model." + k: v for k, v in sd.items()}  # flattened CLIPTextModel: no projection to keep apart


def te_keys_for(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Nested HF names adapted to `model`: `text_model.` is stripped when the model is flattened."""
    nested = any(k.startswith("text_model.") for k in model.state_dict())
    if nested:
        return dict(sd)
    return {(k[len("text_model.") :] if k.startswith("text_model.") else k): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------- whole checkpoints


@dataclass
class Components:
    """A checkpoint split into models, each in diffusers / nested HF names."""

    unet: StateDict
    vae: StateDict | None
    text_encoders: list[StateDict] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _take(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def checkpoint_to_diffusers(sd: Mapping[str, torch.Tensor], family: str) -> Components:
    """Split an LDM single-file state dict into UNet, VAE and text encoders in diffusers / HF names.
    EMA weights (`model_ema.*`) and other keys outside the components are ignored (listed in `ignored`)."""
    fam = FAMILIES[family]
    prefixes = [UNET_PREFIX, VAE_PREFIX] + [t.prefix for t in fam.text_encoders]
    ignored = [k for k in sd if not k.startswith(tuple(prefixes))]
    vae = _take(sd, VAE_PREFIX)
    return Components(
        unet=unet_ldm_to_diffusers(_take(sd, UNET_PREFIX)),
        vae=vae_ldm_to_diffusers(vae) if vae else None,
        text_encoders=[te_ldm_to_hf(_take(sd, t.prefix), t) for t in fam.text_encoders],
        ignored=ignored,
    )


def diffusers_to_checkpoint(unet: Mapping[str, torch.Tensor], vae: Mapping[str, torch.Tensor], text_encoders: list[Mapping[str, torch.Tensor]], family: str) -> StateDict:
    """UNet, VAE and text-encoder state dicts (diffusers / nested HF names) -> one LDM single-file state dict."""
    fam = FAMILIES[family]
    if len(text_encoders) != len(fam.text_encoders):
        raise LoralabError(f"{fam.label} needs {len(fam.text_encoders)} text encoder(s), got {len(text_encoders)}.")
    out: StateDict = {UNET_PREFIX + k: v for k, v in unet_diffusers_to_ldm(unet).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_diffusers_to_ldm(vae).items()})
    for layout, te in zip(fam.text_encoders, text_encoders):
        out.update({layout.prefix + k: v for k, v in te_hf_to_ldm(te, layout).items()})
    return out


def vae_file_to_ldm(sd: Mapping[str, torch.Tensor], source: str) -> StateDict:
    """A standalone VAE file's keys -> LDM VAE names without prefix. Accepts `first_stage_model.*` (a full
    checkpoint or an extracted VAE), bare LDM names (`encoder.down.0...`, the usual standalone .safetensors
    VAE) and diffusers names (`encoder.down_blocks.0...`); other keys (e.g. `loss.*`, `model_ema.*`) are ignored."""
    if any(k.startswith(VAE_PREFIX) for k in sd):
        return _take(sd, VAE_PREFIX)
    keys = [k for k in sd if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))]
    if any(k.startswith("encoder.down.") for k in keys):
        return {k: sd[k] for k in keys}
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return vae_diffusers_to_ldm({k: sd[k] for k in keys})
    raise LoralabError(
        f"{source} is not a VAE: its keys start with {key_prefixes(sd.keys())}. Expected LDM VAE keys "
        "(`encoder.down.0...` or `first_stage_model.encoder...`) or diffusers VAE keys (`encoder.down_blocks.0...`)."
    )
