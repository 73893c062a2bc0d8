"""Which modules a LoRA wraps and the names kohya-format files give them.

kohya-ss sd-scripts' `networks.lora` rules (research/kohya.md §4, formats.md §1.1), written anew:

* Targets (kohya's rules, matched on the class name): in the UNet every `nn.Linear` and `nn.Conv2d`
  inside a `Transformer2DModel` (proj_in/proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj,
  ff.net.2); with `conv_dim` ("LoCon") also inside `ResnetBlock2D`, `Downsample2D` and `Upsample2D`, where
  the 3x3 convs get `conv_dim`/`conv_alpha` and the Linear `time_emb_proj` and 1x1 `conv_shortcut` get
  `dim`/`alpha`. In each text encoder `q_proj k_proj v_proj out_proj fc1 fc2` of `CLIPAttention` /
  `CLIPSdpaAttention` / `CLIPMLP`.
* Names: `lora_name = (prefix + "." + module_path).replace(".", "_")`, prefixes `lora_unet`, `lora_te`
  (SD 1.x / 2.x) or `lora_te1` / `lora_te2` (SDXL). Text-encoder paths always start with `text_model.`
  (transformers >= 5.6 flattens `CLIPTextModel`; we add it back). SDXL UNet paths are the LDM/SGM ones
  (`input_blocks.4.1...`, `sdxl_unet_path_to_ldm`); SD 1.x / 2.x keep diffusers' paths.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from loralab.errors import LoralabError

PREFIX_UNET = "lora_unet"
PREFIX_TEXT_ENCODER = "lora_te"
PREFIX_TEXT_ENCODER_SDXL = ("lora_te1", "lora_te2")
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
FAMILIES = ("sd1", "sd2", "sdxl")
# LyCORIS's `preset` (its config.py), with diffusers' class names: (UNet classes, text-encoder classes, UNet
# modules by path). Convs in the classes are taken; 3x3 convs then need conv_dim (the presets whose LyCORIS
# `enable_conv` is False get conv_dim 0, see `preset_has_conv`). The path targets are LyCORIS's
# `unet_target_name`: they match kohya's diffusers-named SD 1.x/2.x UNet only, so on SDXL (LDM names in kohya)
# LyCORIS, and we, add none.
_LYCORIS_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
PRESETS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "full": (UNET_TARGETS + UNET_CONV_TARGETS, TEXT_ENCODER_TARGETS, _LYCORIS_NAMES),
    "full-lin": (UNET_TARGETS + ("ResnetBlock2D",), TEXT_ENCODER_TARGETS, _LYCORIS_NAMES[2:]),
    "attn-mlp": (UNET_TARGETS, TEXT_ENCODER_TARGETS, ()),
    "attn-only": (("Attention",), ("CLIPAttention", "CLIPSdpaAttention"), ()),
    "unet-only": (UNET_TARGETS + UNET_CONV_TARGETS, (), _LYCORIS_NAMES),
    "unet-transformer-only": (UNET_TARGETS, (), ()),
    "unet-convblock-only": (UNET_CONV_TARGETS, (), _LYCORIS_NAMES[:2]),
}


def preset_has_conv(preset: str) -> bool:
    """LyCORIS's `enable_conv` of a preset: False sets conv_dim to 0 (its 3x3 convs are skipped)."""
    return preset in ("full", "unet-only", "unet-convblock-only")


# ---------------------------------------------------------------------------------------- names


def kohya_lora_name(prefix: str, module_path: str) -> str:
    """kohya's lora_name: `(prefix + "." + module_path).replace(".", "_")`."""
    return f"{prefix}.{module_path}".replace(".", "_")


def text_encoder_module_path(path: str) -> str:
    """Text-encoder module path as kohya sees it: always under `text_model.`.

    transformers >= 5.6 flattens `CLIPTextModel` (`encoder.layers.0...`), while `CLIPTextModelWithProjection`
    and the CLIP models kohya loads are nested (`text_model.encoder.layers.0...`); A1111 and ComfyUI only
    match the nested names.
    """
    return path if path.startswith("text_model.") else f"text_model.{path}"


_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_inner(rest: list[str]) -> list[str]:
    if rest and rest[0] in _RESNET_LDM:
        return _RESNET_LDM[rest[0]].split(".") + rest[1:]
    return rest


def sdxl_unet_path_to_ldm(path: str, layers_per_block: int | Sequence[int],
                          up_blocks_with_attention: Collection[int]) -> str:
    """A diffusers UNet module path -> the LDM/SGM path that SDXL LoRA names use (formats.md §1.2).

    With n = layers_per_block (n resnets per down block, n+1 per up block; SDXL n = 2):
    down_blocks.i.{resnets|attentions}.j -> input_blocks.(1 + Σ_{k<i}(n_k+1) + j).{0|1};
    down_blocks.i.downsamplers.0.conv -> input_blocks.(Σ_{k<=i}(n_k+1)).0.op;
    mid_block.attentions.0 -> middle_block.1, mid_block.resnets.j -> middle_block.(2j);
    up_blocks.i.{resnets|attentions}.j -> output_blocks.(Σ_{k<i}(m_k+1) + j).{0|1} (m = reversed n);
    up_blocks.i.upsamplers.0.conv -> output_blocks.(Σ_{k<i}(m_k+1) + m_i).{2 if the block has attentions
    else 1}.conv. Inside resnets: norm1, conv1, norm2, conv2, time_emb_proj, conv_shortcut -> in_layers.0,
    in_layers.2, out_layers.0, out_layers.3, emb_layers.1, skip_connection. Inside attentions the names stay.
    Top level: time_embedding, add_embedding, conv_in, conv_norm_out, conv_out -> time_embed, label_emb.0,
    input_blocks.0.0, out.0, out.2.
    """
    for k, v in _TOP_LDM.items():
        if path == k or path.startswith(k + "."):
            return v + path[len(k):]
    parts = path.split(".")

    def per_block(i: int, up: bool) -> int:
        if isinstance(layers_per_block, int):
            return layers_per_block
        seq = list(reversed(layers_per_block)) if up else list(layers_per_block)
        return seq[i]

    if parts[0] == "down_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        start = 1 + sum(per_block(k, False) + 1 for k in range(i))
        if kind == "resnets":
            return ".".join(["input_blocks", str(start + j), "0"] + _resnet_inner(rest))
        if kind == "attentions":
            return ".".join(["input_blocks", str(start + j), "1"] + rest)
        if kind == "downsamplers":
            out = ["input_blocks", str(start + per_block(i, False)), "0"]
            return ".".join(out + (["op"] + rest[1:] if rest and rest[0] == "conv" else rest))
    elif parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "attentions":
            return ".".join(["middle_block", "1"] + rest)
        if kind == "resnets":
            return ".".join(["middle_block", str(2 * j)] + _resnet_inner(rest))
    elif parts[0] == "up_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        start = sum(per_block(k, True) + 1 for k in range(i))
        if kind == "resnets":
            return ".".join(["output_blocks", str(start + j), "0"] + _resnet_inner(rest))
        if kind == "attentions":
            return ".".join(["output_blocks", str(start + j), "1"] + rest)
        if kind == "upsamplers":
            inner = "2" if i in up_blocks_with_attention else "1"
            return ".".join(["output_blocks", str(start + per_block(i, True)), inner] + rest)
    raise ValueError(f"no LDM name for UNet module {path!r}")


# ---------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class LoRATarget:
    """One module a LoRA can wrap: its kohya name, the module, and the other names files may use for it."""

    lora_name: str
    module: nn.Module
    side: str  # "unet" | "text_encoder"
    conv3x3: bool  # gets conv_dim / conv_alpha
    aliases: tuple[str, ...] = ()


def _children_of_targets(root: nn.Module, classes: Collection[str]) -> Iterable[tuple[str, nn.Module]]:
    """kohya's walk: each module whose class name is in `classes`, then each Linear / Conv2d inside it."""
    seen: set[int] = set()
    for name, module in root.named_modules():
        if module.__class__.__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)) and id(child) not in seen:
                seen.add(id(child))
                yield (f"{name}.{child_name}" if name else child_name), child


def _is_conv3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def find_lora_targets(unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
                      include_conv: bool, preset: str | None = None, all_names: bool = False) -> list[LoRATarget]:
    """Every module kohya's networks.lora would wrap, text encoders first, with kohya names.

    `include_conv` adds the ResnetBlock2D / Downsample2D / Upsample2D children (LoCon). `preset` picks
    LyCORIS's targets instead (`PRESETS`); `all_names` adds LyCORIS's path targets on SDXL too (under LDM
    names, for reading files). Aliases are the other spellings found in files: diffusers-style SDXL UNet names,
    TE names without `text_model_`, and `lora_te1_` for single-encoder models (diffusers'
    `convert_state_dict_to_kohya`).
    """
    if preset is not None and preset not in PRESETS:
        raise LoralabError(f"network_args preset = {preset!r} is unknown; use one of {', '.join(PRESETS)} (LyCORIS's "
                           "built-in presets; preset files are not read)")
    unet_classes, te_classes, unet_paths = PRESETS[preset] if preset else (
        UNET_TARGETS + (UNET_CONV_TARGETS if include_conv else ()), TEXT_ENCODER_TARGETS, ())
    if family == "sdxl" and not all_names:
        unet_paths = ()
    if family not in FAMILIES:
        raise LoralabError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    tes = [te for te in text_encoders if te is not None]
    if family == "sdxl":
        if len(tes) not in (0, 2):
            raise LoralabError(f"an SDXL LoRA needs both text encoders, got {len(tes)}")
        prefixes: Sequence[str] = PREFIX_TEXT_ENCODER_SDXL
    else:
        if len(tes) > 1:
            raise LoralabError(f"a {family} model has one text encoder, got {len(tes)}")
        prefixes = (PREFIX_TEXT_ENCODER,)
    targets: list[LoRATarget] = []
    for prefix, te in zip(prefixes, tes):
        for path, module in _children_of_targets(te, te_classes):
            kpath = text_encoder_module_path(path)
            name = kohya_lora_name(prefix, kpath)
            flat = kpath[len("text_model."):]
            alias_prefixes = {prefix} | ({"lora_te1"} if prefix == PREFIX_TEXT_ENCODER else set())
            aliases = {kohya_lora_name(p, x) for p in alias_prefixes for x in (kpath, flat)} - {name}
            targets.append(LoRATarget(name, module, "text_encoder", False, tuple(sorted(aliases))))
    if unet is not None:
        if family == "sdxl":
            lpb = unet.config.layers_per_block
            with_attn = {i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)}
        found = list(_children_of_targets(unet, unet_classes))
        seen = {id(m) for _, m in found}
        for path in unet_paths:
            module = unet.get_submodule(path) if _has_submodule(unet, path) else None
            if isinstance(module, (nn.Linear, nn.Conv2d)) and id(module) not in seen:
                found.append((path, module))
        for path, module in found:
            diffusers_name = kohya_lora_name(PREFIX_UNET, path)
            if family == "sdxl":
                name = kohya_lora_name(PREFIX_UNET, sdxl_unet_path_to_ldm(path, lpb, with_attn))
                aliases = (diffusers_name,) if diffusers_name != name else ()
            else:
                name, aliases = diffusers_name, ()
            targets.append(LoRATarget(name, module, "unet", _is_conv3x3(module), aliases))
    return targets


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def alias_map(targets: Iterable[LoRATarget]) -> dict[str, str]:
    """Other spelling of a module found in files -> its kohya name."""
    return {a: t.lora_name for t in targets for a in t.aliases}
