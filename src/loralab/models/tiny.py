"""Tiny random models of the real architectures, for tests and benchmarks (no downloads).

They use the same classes and the same layout rules as the real checkpoints (GroupNorm with 32 groups,
CLIP vocabulary of 49408 tokens, 77 positions), only with few channels and layers, so they go through
exactly the same loading, conversion and training code as SD 1.x / 2.x models.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TINY_SD1_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_SD2_UNET = dict(TINY_SD1_UNET, cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
)
TINY_CLIP_L = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
TINY_OPENCLIP_H = dict(TINY_CLIP_L, hidden_size=48, intermediate_size=96, num_attention_heads=2, hidden_act="gelu")
# SDXL: TE2 is OpenCLIP with its projection used (pooled text embeds); the UNet's context is TE1 + TE2 wide
# (32 + 48), levels without / with attention like SDXL's [1, 2, 10] depths, and the text_time addition
# embedding fed with pooled (32) + 6 size/crop numbers x 8.
TINY_OPENCLIP_BIGG = dict(TINY_OPENCLIP_H, projection_dim=32)
TINY_SDXL_UNET = dict(
    TINY_SD1_UNET,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=32 + 48,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)


def tiny_sd_components(family: str = "sd1", seed: int = 0) -> dict:
    """Random UNet, VAE and text encoder of the SD 1.x (`sd1`) or SD 2.x (`sd2`) architecture, tiny.
    `sdxl` adds `text_encoder_2` (CLIPTextModelWithProjection)."""
    torch.manual_seed(seed)
    if family == "sd1":
        unet = UNet2DConditionModel(**TINY_SD1_UNET)
        te = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_L))
    elif family == "sd2":
        unet = UNet2DConditionModel(**TINY_SD2_UNET)
        te = CLIPTextModel(CLIPTextConfig(**TINY_OPENCLIP_H))
    elif family == "sdxl":
        unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        te = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_OPENCLIP_BIGG))
    else:
        raise ValueError(f"unknown family {family!r}")
    vae = AutoencoderKL(**TINY_VAE)
    out = {"unet": unet, "vae": vae, "text_encoder": te}
    if family == "sdxl":
        vae.register_to_config(scaling_factor=0.13025)
        out["text_encoder_2"] = te2
    for m in out.values():
        m.eval()
    return out
