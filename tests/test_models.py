"""The model layer: detection, LDM <-> diffusers conversion, loading, tokenizer and kohya text encoding."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import DDPMScheduler

from loralab.errors import LoralabError
from loralab.models import detect, ldm, loader
from loralab.models.loader import load_base_model, save_single_file
from loralab.models.text import encode_text, final_layer_norm, tokenize
from loralab.models.tiny import tiny_sd_components
from loralab.models.tokenizer import clip_tokenizer

torch.set_num_threads(1)


def components(family: str, seed: int = 0) -> dict:
    c = tiny_sd_components(family, seed=seed)
    c["text_encoders"] = [c["text_encoder"]] + ([c["text_encoder_2"]] if "text_encoder_2" in c else [])
    return c


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "keys, family",
    [
        (["model.diffusion_model.x", "cond_stage_model.transformer.text_model.x"], "sd1"),
        (["model.diffusion_model.x", "cond_stage_model.model.transformer.resblocks.0.x"], "sd2"),
        (["model.diffusion_model.x", "conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"], "sdxl"),
    ],
)
def test_family_from_key_prefixes(keys, family):
    assert detect.detect_family(keys) == family


def test_unknown_layout_lists_prefixes_and_known_layouts():
    with pytest.raises(LoralabError) as e:
        detect.detect_family(["foo.bar.weight", "baz.qux"], source="x.safetensors")
    msg = str(e.value)
    assert "x.safetensors" in msg and "foo.bar" in msg and "baz.qux" in msg
    assert "cond_stage_model.transformer" in msg and "conditioner.embedders" in msg
    with pytest.raises(LoralabError, match="LoRA file"):
        detect.detect_family(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_detected_configs_rebuild_the_same_models(family):
    c = components(family)
    sd = ldm.diffusers_to_checkpoint(
        c["unet"].state_dict(), c["vae"].state_dict(), [ldm.te_state_dict(t) for t in c["text_encoders"]], family
    )
    meta = detect.architecture_metadata(dict(c["unet"].config), dict(c["vae"].config), [t.config for t in c["text_encoders"]])
    arch = detect.detect_architecture(sd, meta)
    assert arch.family == family
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection", "down_block_types", "up_block_types", "in_channels", "sample_size"):
        assert list(arch.unet[key]) == list(c["unet"].config[key]) if isinstance(arch.unet[key], list) else arch.unet[key] == c["unet"].config[key], key
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor"):
        got, want = arch.vae[key], c["vae"].config[key]
        assert (list(got) == list(want)) if isinstance(got, list) else got == want, key
    for te_cfg, te in zip(arch.text_encoders, c["text_encoders"]):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "vocab_size"):
            assert te_cfg[key] == getattr(te.config, key), key


def test_real_model_rules_without_metadata():
    """Without loralab metadata: SD 1.x 8 heads, SD 2.x 64 channels per head per level, CLIP hidden/64 heads."""
    for family, want_heads in (("sd1", 8), ("sd2", [1, 1])):  # SD 2.x: max(1, channels // 64) per level
        c = components(family)
        sd = ldm.diffusers_to_checkpoint(c["unet"].state_dict(), c["vae"].state_dict(), [ldm.te_state_dict(c["text_encoder"])], family)
        arch = detect.detect_architecture(sd, {})
        assert arch.unet["attention_head_dim"] == want_heads
        assert arch.text_encoders[0]["num_attention_heads"] == 1  # 32 or 48 wide: max(1, hidden // 64)
        assert arch.vae["scaling_factor"] == 0.18215
        assert arch.unet["use_linear_projection"] is (family == "sd2")


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_round_trip_is_exact(tmp_path, family):
    c = components(family)
    path = tmp_path / "m.safetensors"
    save_single_file(path, c["unet"], c["vae"], c["text_encoders"], family=family, dtype=torch.float32)
    m = load_base_model(path)
    assert m.family == family and m.model_hash == loader.file_sha256(path) and len(m.model_hash) == 64
    for a, b in ((c["unet"], m.unet), (c["vae"], m.vae), (c["text_encoder"], m.text_encoders[0])):
        assert_same_weights(a, b)
    torch.manual_seed(1)
    x = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, 77, c["unet"].config.cross_attention_dim)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    ids = torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        assert torch.equal(c["unet"](x, 10, ctx).sample, m.unet(x, 10, ctx).sample)
        assert torch.equal(c["vae"].encode(img).latent_dist.mean, m.vae.encode(img).latent_dist.mean)
        assert torch.equal(c["vae"].decode(x[:1]).sample, m.vae.decode(x[:1]).sample)
        assert torch.equal(c["text_encoder"](ids)[0], m.text_encoders[0](ids)[0])


def test_sd2_file_has_openclip_layout_with_the_extra_layer(tiny_sd2_checkpoint):
    sd = safetensors.torch.load_file(tiny_sd2_checkpoint)
    p = "cond_stage_model.model."
    assert sd[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert p + "transformer.resblocks.2.ln_1.weight" in sd  # 2 HF layers + the dummy last one
    assert p + "positional_embedding" in sd and p + "ln_final.weight" in sd and p + "text_projection" in sd
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd  # upsampler of a level without attention


def test_conversion_of_a_real_sized_layout():
    """SD 1.5's key names: 4 levels of 2 res blocks, attention at the first three, upsamplers at .1/.2."""
    n = 2
    assert ldm.unet_key_ldm_to_diffusers("input_blocks.3.0.op.weight", n) == "down_blocks.0.downsamplers.0.conv.weight"
    assert ldm.unet_key_ldm_to_diffusers("input_blocks.11.0.in_layers.2.weight", n) == "down_blocks.3.resnets.1.conv1.weight"
    assert ldm.unet_key_ldm_to_diffusers("output_blocks.2.1.conv.bias", n) == "up_blocks.0.upsamplers.0.conv.bias"
    assert ldm.unet_key_ldm_to_diffusers("output_blocks.5.2.conv.bias", n) == "up_blocks.1.upsamplers.0.conv.bias"
    assert ldm.unet_key_ldm_to_diffusers("output_blocks.11.1.proj_out.weight", n) == "up_blocks.3.attentions.2.proj_out.weight"
    assert ldm.unet_key_ldm_to_diffusers("middle_block.2.emb_layers.1.bias", n) == "mid_block.resnets.1.time_emb_proj.bias"
    assert ldm.unet_key_diffusers_to_ldm("up_blocks.1.upsamplers.0.conv.weight", n, {1, 2, 3}) == "output_blocks.5.2.conv.weight"
    assert ldm.unet_key_diffusers_to_ldm("up_blocks.0.upsamplers.0.conv.weight", n, {1, 2, 3}) == "output_blocks.2.1.conv.weight"
    assert ldm.vae_key_ldm_to_diffusers("decoder.up.3.block.0.nin_shortcut.weight", 4) == "decoder.up_blocks.0.resnets.0.conv_shortcut.weight"


def test_mapping_agrees_with_diffusers_converters():
    """Oracle: diffusers' own LDM converters read our LDM output back to the original weights, for an
    SD 1.5-shaped UNet (4 levels, no attention at the last), an SDXL-shaped one (none at the first,
    depths 1/2/3), a 4-level VAE and OpenCLIP text towers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as S
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loralab.models.tiny import TINY_OPENCLIP_H

    def same(ref, sd):
        assert set(ref) >= set(sd)
        for k in sd:
            assert torch.equal(ref[k].reshape(sd[k].shape), sd[k]), k

    torch.manual_seed(0)
    sd15 = dict(block_out_channels=(32, 32, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=8)
    sdxl = dict(block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), transformer_layers_per_block=(1, 2, 3),
                cross_attention_dim=32, attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    for cfg in (sd15, sdxl):
        u = UNet2DConditionModel(sample_size=16, layers_per_block=2, **cfg)
        ldm_sd = {"model.diffusion_model." + k: v for k, v in ldm.unet_diffusers_to_ldm(u.state_dict()).items()}
        same(S.convert_ldm_unet_checkpoint(ldm_sd, dict(u.config)), u.state_dict())
        assert ldm.unet_ldm_to_diffusers({k[22:]: v for k, v in ldm_sd.items()}).keys() == u.state_dict().keys()
    v = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    ldm_sd = {"first_stage_model." + k: t for k, t in ldm.vae_diffusers_to_ldm(v.state_dict()).items()}
    same(S.convert_ldm_vae_checkpoint(ldm_sd, dict(v.config)), v.state_dict())
    for with_projection in (False, True):
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        te = cls(CLIPTextConfig(**dict(TINY_OPENCLIP_H, projection_dim=32)))
        hf = ldm.te_state_dict(te)
        oc = ldm.hf_to_openclip(hf, add_dummy_last_layer=not with_projection, with_projection=with_projection)
        same(S.convert_open_clip_checkpoint(te, {"m." + k: t for k, t in oc.items()}, prefix="m."), hf)


def test_real_sized_layouts_detect_the_published_configs():
    """SD 1.5, SD 2.1 and SDXL models built on the meta device (no memory), written as LDM keys, are read
    back with the published configs by the real-model rules alone (no metadata)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd15 = dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280], down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
    sd21 = dict(sd15, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
    sdxl = dict(sample_size=128, block_out_channels=[320, 640, 1280], down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
                attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)
    clip_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
    clip_h = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")
    clip_g = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
    with init_empty_weights():
        for family, unet_cfg, te_cfgs in (("sd1", sd15, [clip_l]), ("sd2", sd21, [clip_h]), ("sdxl", sdxl, [clip_l, clip_g])):
            tes = [CLIPTextModel(CLIPTextConfig(**te_cfgs[0]))]
            tes += [CLIPTextModelWithProjection(CLIPTextConfig(**c)) for c in te_cfgs[1:]]
            unet, ae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae)
            sd = ldm.diffusers_to_checkpoint(unet.state_dict(), ae.state_dict(), [ldm.te_state_dict(t) for t in tes], family)
            arch = detect.detect_architecture(sd, {})
            assert arch.family == family
            assert {k: arch.unet[k] for k in unet_cfg} == unet_cfg
            assert {k: arch.vae[k] for k in vae} == vae
            for got, want in zip(arch.text_encoders, te_cfgs):
                assert {k: got[k] for k in want} == want
    n_resblocks = len({k.split(".")[6] for k in sd if ".resblocks." in k})
    assert n_resblocks == 32  # SDXL TE2 keeps all its layers


def test_old_sd1_text_encoder_keys_without_text_model():
    sd = {"embeddings.token_embedding.weight": torch.zeros(1), "embeddings.position_ids": torch.zeros(1)}
    assert list(ldm.clip_ldm_to_hf(sd)) == ["text_model.embeddings.token_embedding.weight"]


# ---------------------------------------------------------------------------------------------- loading


def test_fixture_model(tiny_sd1_model):
    m = tiny_sd1_model
    assert m.family == "sd1" and not m.v_parameterization and m.vae_scaling_factor == 0.18215
    assert m.tokenizers[0].pad_token_id == 49407
    s = m.noise_scheduler()
    assert isinstance(s, DDPMScheduler) and s.config.prediction_type == "epsilon" and s.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(tmp_path, dtype):
    c = components("sd1")
    path = tmp_path / "half.safetensors"
    save_single_file(path, c["unet"], c["vae"], c["text_encoders"], dtype=dtype)
    assert safetensors.torch.load_file(path)["model.diffusion_model.out.2.weight"].dtype == dtype
    m = load_base_model(path)  # loads as fp32 by default
    w = c["unet"].conv_out.weight
    assert m.unet.conv_out.weight.dtype == torch.float32
    assert torch.equal(m.unet.conv_out.weight, w.to(dtype).float())
    m16 = load_base_model(path, dtype=torch.float16)
    assert {p.dtype for p in m16.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in m16.text_encoders[0].parameters()} == {torch.float16}


def test_ckpt_and_ema_keys(tmp_path):
    c = components("sd1")
    st = tmp_path / "m.safetensors"
    save_single_file(st, c["unet"], c["vae"], c["text_encoders"], dtype=torch.float32)
    sd = safetensors.torch.load_file(st)
    sd.update({"model_ema.decay": torch.tensor(0.999), "model_ema.diffusion_modelout2weight": torch.zeros(4)})
    meta = {"loralab.text_encoder.num_attention_heads": "2"}
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd, "global_step": 1, "loralab_metadata": meta}, ckpt)
    m = load_base_model(ckpt)
    assert_same_weights(c["unet"], m.unet)
    assert_same_weights(c["text_encoder"], m.text_encoders[0])
    saved = tmp_path / "saved.ckpt"  # save_single_file writes .ckpt too
    save_single_file(saved, c["unet"], c["vae"], c["text_encoders"], dtype=torch.float32)
    assert_same_weights(c["vae"], load_base_model(saved).vae)


class NotATensor:
    pass


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": NotATensor()}}, path)
    with pytest.raises(LoralabError, match="never unpickles code"):
        load_base_model(path)


def test_unknown_file_layout(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"some.model.weight": torch.zeros(2)}, path)
    with pytest.raises(LoralabError, match=r"Unknown model layout.*some\.model"):
        load_base_model(path)
    with pytest.raises(LoralabError, match="not found"):
        load_base_model(tmp_path / "missing.safetensors")


def write_diffusers_folder(folder: Path, family: str, prediction_type: str = "epsilon") -> dict:
    c = components(family)
    folder.mkdir()
    c["unet"].save_pretrained(folder / "unet")
    c["vae"].save_pretrained(folder / "vae")
    c["text_encoder"].save_pretrained(folder / "text_encoder")
    clip_tokenizer("!" if family == "sd2" else "<|endoftext|>").save_pretrained(folder / "tokenizer")
    DDPMScheduler(prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return c


def test_diffusers_folder(tmp_path, no_network):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    c = write_diffusers_folder(tmp_path / "sd2", "sd2", prediction_type="v_prediction")
    m = load_base_model(tmp_path / "sd2")
    assert m.family == "sd2" and m.model_hash == "" and m.v_parameterization  # from the folder's scheduler
    assert m.tokenizers[0].pad_token_id == 0
    for a, b in ((c["unet"], m.unet), (c["vae"], m.vae), (c["text_encoder"], m.text_encoders[0])):
        assert_same_weights(a, b)
    assert not load_base_model(tmp_path / "sd2", v_parameterization=False).v_parameterization


def test_single_file_offline_and_v_flag(tiny_sd2_checkpoint, no_network):
    m = load_base_model(tiny_sd2_checkpoint, v_parameterization=True)
    assert m.family == "sd2" and m.v_parameterization
    assert m.noise_scheduler().config.prediction_type == "v_prediction"
    assert m.tokenizers[0].pad_token_id == 0
    assert load_base_model(tiny_sd2_checkpoint).v_parameterization is False


def test_vae_swap(tmp_path, tiny_sd1_checkpoint):
    base = load_base_model(tiny_sd1_checkpoint)
    other = components("sd1", seed=7)["vae"]
    ldm_sd = ldm.vae_diffusers_to_ldm(other.state_dict())
    bare = tmp_path / "vae.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in ldm_sd.items()}, bare)
    prefixed = tmp_path / "vae_prefixed.ckpt"
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in ldm_sd.items()}}, prefixed)
    diff_file = tmp_path / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file(other.state_dict(), diff_file)
    other.save_pretrained(tmp_path / "vae_folder")
    assert not torch.equal(base.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)
    for source in (bare, prefixed, diff_file, tmp_path / "vae_folder"):
        m = load_base_model(tiny_sd1_checkpoint, vae=source)
        assert_same_weights(other, m.vae)
        assert_same_weights(base.unet, m.unet)
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"foo.weight": torch.zeros(1)}, bad)
    with pytest.raises(LoralabError, match="not a VAE"):
        load_base_model(tiny_sd1_checkpoint, vae=bad)


def test_sdxl_is_detected_and_loads(tmp_path, monkeypatch):
    c = components("sdxl")
    path = tmp_path / "xl.safetensors"
    save_single_file(path, c["unet"], c["vae"], c["text_encoders"], family="sdxl", dtype=torch.float32)
    monkeypatch.setattr(loader, "SUPPORTED_FAMILIES", ("sd1", "sd2"))  # the one gate still refuses a family
    with pytest.raises(LoralabError, match="SDXL model, which loralab cannot load yet"):
        load_base_model(path)
    monkeypatch.undo()
    m = load_base_model(path)
    assert m.vae_scaling_factor == 0.13025 and [t.pad_token_id for t in m.tokenizers] == [49407, 0]
    for a, b in zip((c["unet"], c["vae"], *c["text_encoders"]), (m.unet, m.vae, *m.text_encoders)):
        assert_same_weights(a, b)


# ---------------------------------------------------------------------------------------------- tokenizer and text


def test_tokenizer_ids():
    tok = clip_tokenizer()
    assert tok("a photo of an astronaut riding a horse").input_ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    ids = tok("blue hair").input_ids
    assert ids[1:3] == [1746, 2225] and tok.convert_ids_to_tokens(ids[1:3]) == ["blue</w>", "hair</w>"]
    assert tok.model_max_length == 77 and len(tok) == 49408 and tok.pad_token_id == 49407
    assert clip_tokenizer("!").pad_token_id == 0


def test_missing_vocab_error(tmp_path):
    with pytest.raises(LoralabError, match=r"missing: .*nothere\.txt\.gz.*reinstall"):
        clip_tokenizer(vocab_path=tmp_path / "nothere.txt.gz")


def test_kohya_chunks_150():
    tok = clip_tokenizer()
    long = ", ".join(f"tag{i}" for i in range(60))  # well over 75 tokens
    ids = tokenize(tok, [long, "short caption"], 150)
    assert ids.shape == (2, 154)
    assert (ids[:, [0, 77]] == 49406).all() and (ids[:, [76, 153]] == 49407).all()
    assert ids[0, 1:76].tolist() == tok(long).input_ids[1:76]
    assert ids[1, 78] == 49407  # empty second chunk: BOS EOS EOS ...
    assert tokenize(tok, ["x"], None).shape == (1, 77) and torch.equal(tokenize(tok, ["x"], 75), tokenize(tok, ["x"], None))
    with pytest.raises(LoralabError, match="max_token_length"):
        tokenize(tok, ["x"], 100)


def test_kohya_chunks_with_pad_zero():
    """SD 2.x tokenizer (pad 0): a chunk full of text ends with EOS, an empty chunk is BOS EOS PAD..."""
    tok = clip_tokenizer("!")
    long = " ".join(["cat"] * 100)  # 100 tokens: chunk 1 full, chunk 2 has 25
    ids = tokenize(tok, [long, "cat"], 150)
    assert ids[0, 76] == 49407 and ids[0, 77 + 26] == 49407 and ids[0, 153] == 0
    assert ids[1, 78] == 49407 and ids[1, 79] == 0 and ids[1, 153] == 0


def test_encode_shapes_and_clip_skip(tiny_sd1_model):
    te, tok = tiny_sd1_model.text_encoders[0], tiny_sd1_model.tokenizers[0]
    ids = tokenize(tok, ["a photo of a cat", "blue hair, 1girl"], 150)
    with torch.no_grad():
        out = encode_text(te, ids, None)
        assert out.shape == (2, 152, 32)
        chunks = te(ids.reshape(4, 77))[0].reshape(2, 154, 32)
        assert torch.equal(out[:, 0], chunks[:, 0]) and torch.equal(out[:, 1:76], chunks[:, 1:76])
        assert torch.equal(out[:, 76:151], chunks[:, 78:153]) and torch.equal(out[:, -1], chunks[:, -1])
        one = tokenize(tok, ["a photo of a cat"], None)
        hs = te(one, output_hidden_states=True).hidden_states
        assert torch.equal(encode_text(te, one, 2), final_layer_norm(te)(hs[-2]))
        assert torch.equal(encode_text(te, one, 1), te(one)[0])
        assert encode_text(te, one, None).shape == (1, 77, 32)
