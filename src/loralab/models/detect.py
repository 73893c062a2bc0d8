"""Read a checkpoint's architecture from its own keys and tensor shapes, as ComfyUI does.

The family comes from the text-encoder key prefixes (`FAMILIES`, the one place that lists them), every
dimension from tensor shapes, so real models, fine-tunes, merges and our tiny test models load through one
path. Two numbers cannot be read from shapes: the attention head count of the UNet and of each text encoder.
For those the real-model rules apply (SD 1.x: 8 heads; SD 2.x / SDXL: 64 channels per head; CLIP: 64
channels per head), unless the file's safetensors metadata says otherwise (`loralab.*` keys, written by
`loader.save_single_file`, e.g. for tiny models).

The results are plain dicts: kwargs for diffusers `UNet2DConditionModel` / `AutoencoderKL` and
transformers `CLIPTextConfig`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

from loralab.errors import LoralabError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# safetensors metadata keys for what shapes cannot tell (values are JSON)
META_UNET_HEADS = "loralab.unet.attention_head_dim"
META_UNET_SAMPLE_SIZE = "loralab.unet.sample_size"
META_UNET_TIME_EMBED = "loralab.unet.addition_time_embed_dim"
META_VAE_SCALING = "loralab.vae_scaling_factor"
META_VAE_SAMPLE_SIZE = "loralab.vae.sample_size"
META_TE_HEADS = ("loralab.text_encoder.num_attention_heads", "loralab.text_encoder_2.num_attention_heads")


@dataclass(frozen=True)
class TextEncoderLayout:
    """Where one text encoder lives in an LDM checkpoint and how its keys are laid out.

    kind "clip": HF CLIP names under `prefix` (SD 1.x and SDXL TE1: OpenAI CLIP-L).
    kind "openclip": OpenCLIP names (`transformer.resblocks.N.attn.in_proj_weight`, ...).
    drop_last_layer: the file stores one more layer than the HF model uses (SD 2.x: 24 vs 23, the
    penultimate layer is baked in). with_projection: CLIPTextModelWithProjection (SDXL TE2)."""

    kind: str
    prefix: str
    hidden_act: str
    drop_last_layer: bool = False
    with_projection: bool = False


@dataclass(frozen=True)
class Family:
    """One model family: its name, the text encoders that identify it, and its fixed numbers."""

    name: str
    label: str
    text_encoders: tuple[TextEncoderLayout, ...]
    unet_heads_rule: str  # "num_heads_8" | "head_dim_64"
    vae_scaling_factor: float
    unet_sample_size: int
    vae_sample_size: int
    pad_tokens: tuple[str, ...]  # tokenizer pad token per text encoder


FAMILIES: dict[str, Family] = {
    "sdxl": Family(
        "sdxl",
        "SDXL",
        (
            TextEncoderLayout("clip", "conditioner.embedders.0.transformer.", "quick_gelu"),
            TextEncoderLayout("openclip", "conditioner.embedders.1.model.", "gelu", with_projection=True),
        ),
        "head_dim_64",
        0.13025,
        128,
        1024,
        ("<|endoftext|>", "!"),
    ),
    "sd2": Family(
        "sd2",
        "SD 2.x",
        (TextEncoderLayout("openclip", "cond_stage_model.model.", "gelu", drop_last_layer=True),),
        "head_dim_64",
        0.18215,
        64,
        512,
        ("!",),
    ),
    "sd1": Family(
        "sd1",
        "SD 1.x",
        (TextEncoderLayout("clip", "cond_stage_model.transformer.", "quick_gelu"),),
        "num_heads_8",
        0.18215,
        64,
        512,
        ("<|endoftext|>",),
    ),
}
# the prefix that identifies each family, checked in this order
FAMILY_KEYS = (("sdxl", "conditioner.embedders."), ("sd2", "cond_stage_model.model."), ("sd1", "cond_stage_model.transformer."))


@dataclass
class Architecture:
    """What a checkpoint contains: its family and plain config dicts for each model."""

    family: str
    unet: dict
    vae: dict | None
    text_encoders: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the log, e.g. 'SD 1.x checkpoint: UNet 320ch x[1,2,4,4], ...'."""
        u = self.unet
        ch = u["block_out_channels"]
        mult = [c // ch[0] for c in ch]
        attn = [i for i, t in enumerate(u["down_block_types"]) if t.startswith("CrossAttn")]
        parts = [
            f"UNet {ch[0]}ch x{mult}, {u['layers_per_block']} res blocks, attention at levels {attn} "
            f"depth {u['transformer_layers_per_block']}, context {u['cross_attention_dim']}, heads {u['attention_head_dim']}"
            + (", linear proj" if u["use_linear_projection"] else "")
            + (f", in_channels {u['in_channels']}" if u["in_channels"] != 4 else "")
        ]
        if self.vae:
            v = self.vae
            vch = v["block_out_channels"]
            parts.append(f"VAE {vch[0]}ch x{[c // vch[0] for c in vch]} z{v['latent_channels']}")
        for te in self.text_encoders:
            parts.append(f"TE {te['hidden_size']}x{te['num_hidden_layers']} layers {te['num_attention_heads']} heads {te['hidden_act']}")
        return f"{FAMILIES[self.family].label} checkpoint: " + "; ".join(parts)


def key_prefixes(keys, depth: int = 2, limit: int = 8) -> list[str]:
    """The first `limit` distinct prefixes of `depth` dotted parts, in file order (for error messages)."""
    seen: list[str] = []
    for k in keys:
        p = ".".join(k.split(".")[:depth])
        if p not in seen:
            seen.append(p)
            if len(seen) >= limit:
                break
    return seen


def detect_family(keys, source: str = "the checkpoint") -> str:
    """sdxl if any key starts `conditioner.embedders.`, sd2 for `cond_stage_model.model.` (OpenCLIP),
    sd1 for `cond_stage_model.transformer.` (CLIP-L); a UNet is required too (`model.diffusion_model.`)."""
    keys = list(keys)
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    for name, prefix in FAMILY_KEYS:
        if has_unet and any(k.startswith(prefix) for k in keys):
            return name
    known = "; ".join(f"{FAMILIES[n].label}: {UNET_PREFIX}* + {p}*" for n, p in FAMILY_KEYS)
    hint = ""
    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) for k in keys):
        hint = " It looks like a LoRA file, not a base model."
    elif any(k.startswith(("down_blocks.", "unet.", "encoder.down", "decoder.up")) for k in keys):
        hint = " It looks like a single model in diffusers or VAE layout, not a full checkpoint."
    raise LoralabError(
        f"Unknown model layout in {source}: its keys start with {key_prefixes(keys)} "
        f"({len(keys)} keys). Known single-file layouts: {known}.{hint} "
        "Pass a full Stable Diffusion checkpoint (.safetensors/.ckpt) or a diffusers folder."
    )


def _indices(keys, prefix: str) -> list[int]:
    """Sorted distinct integers N of keys that start with `prefix` + 'N.'."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _meta_json(metadata: Mapping[str, str] | None, key: str):
    """The JSON value of a metadata key, or None when absent."""
    if not metadata or key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except ValueError as e:
        raise LoralabError(f"Metadata key {key!r} holds {metadata[key]!r}, which is not JSON; fix or remove it.") from e


def _unet_levels(sd: Mapping[str, torch.Tensor], p: str) -> list[dict]:
    """Walk input_blocks: each level is its res blocks (out channels, transformer depth, 0 = no attention),
    closed by a downsampler (`input_blocks.K.0.op`) except the last level."""
    keys = list(sd)
    levels: list[dict] = [{"res": []}]
    for k in _indices(keys, f"{p}input_blocks.")[1:]:
        b = f"{p}input_blocks.{k}."
        if _has(keys, b + "0.op."):
            levels.append({"res": []})
            continue
        ch = sd[b + "0.out_layers.3.weight"].shape[0]
        depth = len(_indices(keys, b + "1.transformer_blocks."))
        levels[-1]["res"].append((ch, depth))
    return levels


def _transformer_depth(levels: list[dict], mid_depth: int) -> int | list[int]:
    """diffusers transformer_layers_per_block: an int when every attention level and the mid block agree,
    else one entry per level (levels without attention take 1, the last takes the mid block's depth,
    because diffusers builds the mid block from the last entry)."""
    depths = [lv["res"][0][1] for lv in levels]
    used = {d for d in depths if d} | {mid_depth}
    if len(used) == 1:
        return used.pop()
    out = [d or 1 for d in depths]
    out[-1] = mid_depth
    return out


def detect_unet_config(sd: Mapping[str, torch.Tensor], family: str, metadata: Mapping[str, str] | None = None, prefix: str = UNET_PREFIX) -> dict:
    """diffusers UNet2DConditionModel kwargs from LDM UNet keys under `prefix`.

    model_channels and in_channels from input_blocks.0.0.weight; channel_mult from each level's res block
    out channels; num_res_blocks per level; attention levels and transformer depth from
    `input_blocks.K.1.transformer_blocks.N`; context_dim from attn2.to_k.weight's input width;
    use_linear_projection when proj_in.weight is 2-D. Heads: metadata `loralab.unet.attention_head_dim`,
    else SD 1.x 8 heads, SD 2.x/SDXL model_channels*mult/64 per level. SDXL's label_emb gives the
    text_time addition embedding."""
    keys = list(sd)
    conv_in = sd.get(f"{prefix}input_blocks.0.0.weight")
    if conv_in is None:
        raise LoralabError(f"No UNet in the checkpoint: key {prefix}input_blocks.0.0.weight is missing.")
    model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
    levels = _unet_levels(sd, prefix)
    nres = {len(lv["res"]) for lv in levels}
    if len(nres) != 1 or 0 in nres:
        raise LoralabError(f"UNet with uneven res blocks per level ({[len(lv['res']) for lv in levels]}) is not supported.")
    block_out = [lv["res"][0][0] for lv in levels]
    attn = [lv["res"][0][1] > 0 for lv in levels]
    to_k = next((k for k in keys if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in keys if k.startswith(prefix) and k.endswith("proj_in.weight")), None)
    if to_k is None or proj_in is None:
        raise LoralabError(f"The UNet has no cross-attention (no {prefix}...attn2.to_k.weight): not a Stable Diffusion UNet.")
    mid_depth = len(_indices(keys, f"{prefix}middle_block.1.transformer_blocks."))
    heads = _meta_json(metadata, META_UNET_HEADS)
    if heads is None:
        if FAMILIES[family].unet_heads_rule == "num_heads_8":
            heads = 8
        else:
            heads = [max(1, c // 64) for c in block_out]
    elif isinstance(heads, list):
        heads = [int(h) for h in heads]
    cfg = dict(
        sample_size=_meta_json(metadata, META_UNET_SAMPLE_SIZE) or FAMILIES[family].unet_sample_size,
        in_channels=int(in_channels),
        out_channels=int(sd[f"{prefix}out.2.weight"].shape[0]),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=[int(c) for c in block_out],
        layers_per_block=nres.pop(),
        transformer_layers_per_block=_transformer_depth(levels, mid_depth),
        cross_attention_dim=int(sd[to_k].shape[1]),
        attention_head_dim=heads,
        use_linear_projection=sd[proj_in].ndim == 2,
        norm_num_groups=32,
        act_fn="silu",
        upcast_attention=False,
    )
    label_emb = sd.get(f"{prefix}label_emb.0.0.weight")
    if label_emb is not None and family != "sdxl":
        raise LoralabError(
            f"This {FAMILIES[family].label} UNet has a class/label embedding ({prefix}label_emb.*), as in unCLIP or "
            "upscaler variants, which loralab does not support; use a plain text-to-image checkpoint."
        )
    if label_emb is not None:
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=_meta_json(metadata, META_UNET_TIME_EMBED) or 256,
            projection_class_embeddings_input_dim=int(label_emb.shape[1]),
        )
    if sd[f"{prefix}time_embed.0.weight"].shape[0] != 4 * model_channels:
        raise LoralabError("UNet time embedding is not 4 x model_channels wide: not a Stable Diffusion UNet.")
    return cfg


def detect_vae_config(sd: Mapping[str, torch.Tensor], family: str, metadata: Mapping[str, str] | None = None, prefix: str = VAE_PREFIX) -> dict:
    """diffusers AutoencoderKL kwargs from LDM VAE keys under `prefix`: ch and in_channels from
    encoder.conv_in, ch_mult from each encoder.down.I.block.0 width, num_res_blocks from encoder.down.0.block.*,
    z_channels from decoder.conv_in's input width, mid attention when encoder.mid.attn_1 exists. scaling_factor:
    metadata `loralab.vae_scaling_factor`, else 0.18215 (SD 1.x/2.x) or 0.13025 (SDXL)."""
    keys = list(sd)
    conv_in = sd.get(f"{prefix}encoder.conv_in.weight")
    if conv_in is None:
        raise LoralabError(f"No VAE in the checkpoint: key {prefix}encoder.conv_in.weight is missing. Pass a VAE file with vae=.")
    levels = _indices(keys, f"{prefix}encoder.down.")
    block_out = [int(sd[f"{prefix}encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
    return dict(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(sd[f"{prefix}decoder.conv_out.weight"].shape[0]),
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        block_out_channels=block_out,
        layers_per_block=len(_indices(keys, f"{prefix}encoder.down.0.block.")),
        latent_channels=int(sd[f"{prefix}decoder.conv_in.weight"].shape[1]),
        norm_num_groups=32,
        act_fn="silu",
        sample_size=_meta_json(metadata, META_VAE_SAMPLE_SIZE) or FAMILIES[family].vae_sample_size,
        scaling_factor=float(_meta_json(metadata, META_VAE_SCALING) or FAMILIES[family].vae_scaling_factor),
        mid_block_add_attention=_has(keys, f"{prefix}encoder.mid.attn_1."),
    )


def detect_text_encoder_config(
    sd: Mapping[str, torch.Tensor], layout: TextEncoderLayout, metadata: Mapping[str, str] | None = None, index: int = 0
) -> dict:
    """transformers CLIPTextConfig kwargs for one text encoder: hidden size and vocabulary from the token
    embedding, positions from the position embedding, layers by counting them (SD 2.x: minus the dropped
    last one), intermediate size from fc1/c_fc, heads from metadata `loralab.text_encoder[_2].num_attention_heads`
    else hidden/64, act quick_gelu (OpenAI CLIP-L) or gelu (OpenCLIP)."""
    p = layout.prefix
    keys = list(sd)
    if layout.kind == "clip":
        base = p + "text_model." if _has(keys, p + "text_model.") else p
        tok = sd[base + "embeddings.token_embedding.weight"]
        positions = sd[base + "embeddings.position_embedding.weight"].shape[0]
        layers = len(_indices(keys, base + "encoder.layers."))
        inter = sd[base + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection = tok.shape[1]
    else:
        tok = sd[p + "token_embedding.weight"]
        positions = sd[p + "positional_embedding"].shape[0]
        layers = len(_indices(keys, p + "transformer.resblocks.")) - int(layout.drop_last_layer)
        inter = sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        proj = sd.get(p + "text_projection")
        projection = proj.shape[1] if proj is not None and layout.with_projection else tok.shape[1]
    hidden = int(tok.shape[1])
    heads = _meta_json(metadata, META_TE_HEADS[index]) or max(1, hidden // 64)
    return dict(
        vocab_size=int(tok.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(inter),
        num_hidden_layers=int(layers),
        num_attention_heads=int(heads),
        max_position_embeddings=int(positions),
        hidden_act=layout.hidden_act,
        projection_dim=int(projection),
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def detect_architecture(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, source: str = "the checkpoint") -> Architecture:
    """Family and configs of a full LDM single-file checkpoint (UNet + VAE + text encoders)."""
    family = detect_family(sd.keys(), source)
    fam = FAMILIES[family]
    vae = detect_vae_config(sd, family, metadata) if _has(sd.keys(), VAE_PREFIX) else None
    tes = [detect_text_encoder_config(sd, layout, metadata, i) for i, layout in enumerate(fam.text_encoders)]
    return Architecture(family, detect_unet_config(sd, family, metadata), vae, tes)


def architecture_metadata(unet_config: Mapping, vae_config: Mapping | None, text_encoder_configs: list) -> dict[str, str]:
    """The `loralab.*` metadata that records what shapes cannot tell (head counts, sample sizes, VAE
    scaling factor), so that a file we write loads back into exactly the same architecture."""
    meta = {
        META_UNET_HEADS: json.dumps(_plain(unet_config["attention_head_dim"])),
        META_UNET_SAMPLE_SIZE: json.dumps(unet_config["sample_size"]),
    }
    if unet_config.get("addition_time_embed_dim"):
        meta[META_UNET_TIME_EMBED] = json.dumps(unet_config["addition_time_embed_dim"])
    if vae_config is not None:
        meta[META_VAE_SAMPLE_SIZE] = json.dumps(vae_config["sample_size"])
        meta[META_VAE_SCALING] = json.dumps(vae_config["scaling_factor"])
    for key, cfg in zip(META_TE_HEADS, text_encoder_configs):
        heads = cfg["num_attention_heads"] if isinstance(cfg, Mapping) else cfg.num_attention_heads
        meta[key] = json.dumps(heads)
    return meta


def _plain(value):
    """Tuples (diffusers configs) as lists, for JSON."""
    return list(value) if isinstance(value, (list, tuple)) else value
