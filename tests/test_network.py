"""The LoRA network: kohya targets and names, diffusers load equivalence, max-norm, dropouts, files."""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from loralab.errors import LoralabError
from loralab.models.tiny import tiny_sd_components
from loralab.network import files as LF
from loralab.network import modules as LM
from loralab.network import targets as LT
from loralab.network.lora import LoRANetwork, NetworkConfig
from loralab.network.modules import LoRAModule
from loralab.network.targets import sdxl_unet_path_to_ldm

torch.set_num_threads(1)

KOHYA_UNET_SD = re.compile(
    r"^lora_unet_(down_blocks_\d+|mid_block|up_blocks_\d+)_"
    r"(attentions_\d+_(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))"
    r"|resnets_\d+_(conv1|conv2|time_emb_proj|conv_shortcut)|downsamplers_0_conv|upsamplers_0_conv)$")
KOHYA_UNET_SDXL = re.compile(
    r"^lora_unet_(input_blocks_\d+|middle_block|output_blocks_\d+)_\d+_"
    r"(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2)"
    r"|in_layers_2|out_layers_3|emb_layers_1|skip_connection|op|conv)$")
KOHYA_TE = re.compile(r"^lora_te[12]?_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")


def components(family: str) -> tuple[nn.Module, list[nn.Module]]:
    c = tiny_sd_components(family)
    return c["unet"], [c["text_encoder"]] + ([c["text_encoder_2"]] if "text_encoder_2" in c else [])


def randomize(net: LoRANetwork, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.loras:
            for p in (m.lora_down.weight, m.lora_up.weight):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def kohya_expected_children(root: nn.Module, classes: tuple[str, ...]) -> list[str]:
    """Independent recount: Linear/Conv2d modules inside modules whose class name is in `classes`."""
    out = []
    for name, module in root.named_modules():
        if type(module).__name__ in classes:
            out += [f"{name}.{c}" for c, m in module.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    return out


def unet_inputs(unet: nn.Module, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor([10, 500]),
              encoder_hidden_states=torch.randn(2, 8, unet.config.cross_attention_dim, generator=g))
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    return kw


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 49408, (2, 8), generator=torch.Generator().manual_seed(seed))


@contextmanager
def collect_loader_warnings():
    """Warnings and WARNING+ log records from diffusers, peft and transformers while loading."""
    records: list[str] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    h = H(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(h)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records
    for lg in loggers:
        lg.removeHandler(h)
    records += [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------- targets and names


def test_sd1_module_counts_and_names():
    unet, tes = components("sd1")
    net = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=4, alpha=1))
    # tiny SD1: 6 Transformer2DModels (2 down, 1 mid, 3 up) x (proj_in, proj_out, 4+4 attention, 2 ff) = 72;
    # CLIP: 2 layers x (q, k, v, out, fc1, fc2) = 12
    assert len(net.unet_loras) == 72 == len(kohya_expected_children(unet, ("Transformer2DModel",)))
    assert len(net.text_encoder_loras) == 12 == len(kohya_expected_children(tes[0], ("CLIPAttention", "CLIPMLP")))
    names = [m.lora_name for m in net.loras]
    assert all(KOHYA_UNET_SD.match(n) for n in names if n.startswith("lora_unet_"))
    assert all(KOHYA_TE.match(n) for n in names if n.startswith("lora_te"))
    for n in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0",
              "lora_unet_mid_block_attentions_0_proj_in",
              "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2",
              "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj",  # the TE is flattened: text_model_ added
              "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        assert n in names
    # state dict = kohya file layout, TE modules first, 3 tensors per module
    sd = net.state_dict()
    assert len(sd) == 3 * 84 and next(iter(sd)).startswith("lora_te_")
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (4, 64, 1, 1)  # SD1: 1x1 conv
    assert sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"].shape == (64, 4)
    assert sd["lora_unet_mid_block_attentions_0_proj_in.alpha"].shape == ()
    # the models' own module names and state dicts are untouched
    assert not any("lora" in k for k in unet.state_dict()) and not any("lora" in k for k in tes[0].state_dict())


def test_locon_targets_and_dims():
    unet, tes = components("sd1")
    net = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=4, alpha=2, conv_dim=3))
    expected = kohya_expected_children(unet, ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"))
    assert len(net.unet_loras) == len(expected) == 72 + 12 * 3 + 7 + 2  # 12 resnets, 7 conv_shortcuts, 2 samplers
    mods = {m.lora_name: m for m in net.loras}
    assert all(KOHYA_UNET_SD.match(n) for n in mods if n.startswith("lora_unet_"))
    conv1 = mods["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert (conv1.lora_dim, float(conv1.alpha)) == (3, 1.0)  # conv_alpha defaults to 1
    assert tuple(conv1.lora_down.weight.shape) == (3, 32, 3, 3) and tuple(conv1.lora_up.weight.shape) == (32, 3, 1, 1)
    down = mods["lora_unet_down_blocks_0_downsamplers_0_conv"]
    assert down.lora_down.stride == (2, 2) and down.lora_dim == 3
    assert mods["lora_unet_up_blocks_0_upsamplers_0_conv"].lora_dim == 3
    for n in ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", "lora_unet_down_blocks_1_resnets_0_conv_shortcut"):
        assert (mods[n].lora_dim, float(mods[n].alpha)) == (4, 2.0)  # Linear / 1x1 get dim / alpha
    assert NetworkConfig(conv_dim=8, conv_alpha=4).conv_alpha == 4


def test_sd2_linear_proj_and_te():
    unet, tes = components("sd2")
    net = LoRANetwork.create(unet, tes, "sd2", NetworkConfig(dim=4))
    sd = net.state_dict()
    # diffusers SD2 proj_in is Linear: we write 2-D (see the module docstring and the diffusers test below)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 2
    assert len(net.text_encoder_loras) == 12 and all(m.lora_name.startswith("lora_te_text_model_") for m in net.text_encoder_loras)


def test_sdxl_ldm_names():
    unet, tes = components("sdxl")
    net = LoRANetwork.create(unet, tes, "sdxl", NetworkConfig(dim=4, conv_dim=2))
    names = [m.lora_name for m in net.loras]
    assert all(KOHYA_UNET_SDXL.match(n) for n in names if n.startswith("lora_unet_")), \
        [n for n in names if n.startswith("lora_unet_") and not KOHYA_UNET_SDXL.match(n)]
    assert all(KOHYA_TE.match(n) for n in names if n.startswith("lora_te"))
    for n in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_mlp_fc2",
              "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
              "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k",  # 2 transformer layers at level 1
              "lora_unet_middle_block_1_proj_in", "lora_unet_output_blocks_0_1_proj_out",
              "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
              "lora_unet_input_blocks_1_0_out_layers_3", "lora_unet_input_blocks_3_0_op",
              "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_middle_block_2_in_layers_2",
              "lora_unet_output_blocks_2_2_conv"):  # up_blocks.0.upsamplers.0: after a resnet and an attention
        assert n in names, n
    assert len(net.text_encoder_loras) == 24


def test_sdxl_path_mapping_table():
    f = lambda p: sdxl_unet_path_to_ldm(p, 2, {0, 1})  # noqa: E731
    assert f("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2") == "input_blocks.8.1.transformer_blocks.9.ff.net.2"
    assert f("down_blocks.1.downsamplers.0.conv") == "input_blocks.6.0.op"
    assert f("down_blocks.0.resnets.1.time_emb_proj") == "input_blocks.2.0.emb_layers.1"
    assert f("mid_block.resnets.1.conv2") == "middle_block.2.out_layers.3"
    assert f("up_blocks.1.resnets.2.conv_shortcut") == "output_blocks.5.0.skip_connection"
    assert f("up_blocks.1.upsamplers.0.conv") == "output_blocks.5.2.conv"
    assert sdxl_unet_path_to_ldm("up_blocks.0.upsamplers.0.conv", 2, set()) == "output_blocks.2.1.conv"
    assert f("add_embedding.linear_2") == "label_emb.0.2" and f("conv_in") == "input_blocks.0.0"


# ---------------------------------------------------------------------------------------- diffusers oracle


@pytest.mark.parametrize("family,conv_dim", [("sd1", None), ("sd1", 3), ("sd2", None), ("sdxl", 2)])
def test_diffusers_loads_our_file_identically(tmp_path, family, conv_dim):
    """Our file through diffusers' kohya loader (formats.md §1.3) == our in-memory network, all keys used."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from peft.tuners.lora import LoraLayer

    unet, tes = components(family)
    refs = copy.deepcopy([unet, *tes])
    net = LoRANetwork.create(unet, tes, family, NetworkConfig(dim=4, alpha=2.0, conv_dim=conv_dim, conv_alpha=1.5))
    randomize(net)
    path = tmp_path / "lora.safetensors"
    net.save(path, torch.float32, {"ss_network_dim": "4"})

    mixin = StableDiffusionXLLoraLoaderMixin if family == "sdxl" else StableDiffusionLoraLoaderMixin
    with collect_loader_warnings() as msgs:
        kw = {"unet_config": refs[0].config} if family == "sdxl" else {}
        sd, alphas = mixin.lora_state_dict(str(path), **kw)
        mixin.load_lora_into_unet(sd, alphas, refs[0])
        for te, prefix in zip(refs[1:], ("text_encoder", "text_encoder_2")):
            mixin.load_lora_into_text_encoder(sd, alphas, te, prefix=prefix)
    assert not [m for m in msgs if re.search(r"unexpected|missing|not found|not been|unsuccessful", m, re.I)], msgs
    assert sum(isinstance(m, LoraLayer) for m in refs[0].modules()) == len(net.unet_loras)
    te_counts = [sum(isinstance(m, LoraLayer) for m in te.modules()) for te in refs[1:]]
    assert sum(te_counts) == len(net.text_encoder_loras) and all(te_counts)

    inputs, ids = unet_inputs(unet), token_ids()
    with torch.no_grad():
        base = unet(**inputs).sample
        base_te = [te(ids).last_hidden_state for te in tes]
        net.apply_to()
        ours = unet(**inputs).sample
        ours_te = [te(ids).last_hidden_state for te in tes]
        theirs = refs[0](**inputs).sample
        theirs_te = [te(ids).last_hidden_state for te in refs[1:]]
    assert (ours - base).abs().max() > 1e-2  # the LoRA does something
    assert (ours - theirs).abs().max() < 1e-4
    for o, t, b in zip(ours_te, theirs_te, base_te):
        assert (o - b).abs().max() > 1e-2
        assert (o - t).abs().max() < 1e-4
    net.restore()
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, base)


def test_diffusers_rejects_4d_linear_proj(tmp_path):
    """Why SD2 proj_in/proj_out are saved 2-D: diffusers cannot load kohya's 4-D shape onto its Linear."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as M

    unet, _ = components("sd2")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    sd4 = {f"{name}.lora_down.weight": torch.randn(2, 32, 1, 1), f"{name}.lora_up.weight": torch.randn(32, 2, 1, 1),
           f"{name}.alpha": torch.tensor(1.0)}
    s, a = M.lora_state_dict(dict(sd4))
    with pytest.raises(Exception, match="size mismatch"):
        M.load_lora_into_unet(s, a, copy.deepcopy(unet))
    # ... while we read that 4-D kohya shape fine
    net = LoRANetwork.create(unet, [], "sd2", NetworkConfig(dim=2, train_text_encoder=False))
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith(name)} | sd4
    info = net.load_weights(sd)
    assert info.reshaped == 1 and torch.equal(net.get_submodule(name).lora_down.weight, sd4[f"{name}.lora_down.weight"][:, :, 0, 0])


# ---------------------------------------------------------------------------------------- max-norm


def test_max_norm_hand_computed():
    big, small = nn.Linear(3, 2, bias=False), nn.Linear(3, 2, bias=False)
    a = LoRAModule("lora_unet_a", big, dim=1, alpha=1.0)
    b = LoRAModule("lora_unet_b", small, dim=2, alpha=1.0)  # scale 1/2
    with torch.no_grad():
        a.lora_down.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        a.lora_up.weight.copy_(torch.tensor([[3.0], [4.0]]))  # ΔW = [[3,0,0],[4,0,0]], ‖ΔW‖ = 5
        b.lora_down.weight.copy_(torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        b.lora_up.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # ΔW = 0.5 * 0.6 = 0.3 < max/2
    net = LoRANetwork([a, b], "sd1")
    b_before = [b.lora_down.weight.clone(), b.lora_up.weight.clone()]
    keys_scaled, mean, mx = net.max_norm(1.0)
    assert keys_scaled == 1
    assert a.merge_weight().norm().item() == pytest.approx(1.0, abs=1e-6)
    assert a.lora_up.weight[:, 0].tolist() == pytest.approx([3 / 5 ** 0.5, 4 / 5 ** 0.5])  # × sqrt(1/5) each
    assert torch.equal(b.lora_down.weight, b_before[0]) and torch.equal(b.lora_up.weight, b_before[1])
    assert (mean, mx) == (pytest.approx((1.0 + 0.3) / 2), pytest.approx(1.0))
    # a module between max/2 and max is untouched too
    assert net.max_norm(2.0)[0] == 0


def test_merge_weight_matches_forward():
    torch.manual_seed(0)
    for org, x in ((nn.Linear(6, 5), torch.randn(2, 3, 6)), (nn.Conv2d(4, 5, 1), torch.randn(2, 4, 6, 6)),
                   (nn.Conv2d(4, 5, 3, stride=2, padding=1), torch.randn(2, 4, 7, 7))):
        m = LoRAModule("lora_unet_x", org, dim=3, alpha=1.5)
        nn.init.normal_(m.lora_up.weight)
        with torch.no_grad():
            base = org(x)
            m.apply_to()
            out = org(x)
            m.restore()
            dw = m.merge_weight()
            if isinstance(org, nn.Linear):
                merged = F_linear(x, org.weight + dw, org.bias)
            else:
                merged = torch.nn.functional.conv2d(x, org.weight + dw, org.bias, org.stride, org.padding)
        assert dw.shape == org.weight.shape
        assert (out - merged).abs().max() < 1e-5 and (out - base).abs().max() > 1e-3


def F_linear(x, w, b):
    return torch.nn.functional.linear(x, w, b)


# ---------------------------------------------------------------------------------------- dropouts


def _module(**kw) -> tuple[LoRAModule, nn.Linear]:
    torch.manual_seed(0)
    org = nn.Linear(8, 8)
    m = LoRAModule("lora_unet_x", org, dim=8, alpha=4.0, **kw)
    nn.init.normal_(m.lora_up.weight)
    m.apply_to()
    return m, org


def test_module_dropout():
    m, org = _module(module_dropout=1.0)
    x = torch.randn(4, 8)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, org.weight, org.bias)
        m.train()
        assert torch.equal(org(x), base)  # the whole module skipped
        m.eval()
        full = base + m.lora_up(m.lora_down(x)) * 0.5
        assert torch.allclose(org(x), full, atol=1e-6) and not torch.allclose(full, base)


def test_rank_dropout_mask_and_scale():
    torch.manual_seed(0)
    lx, factor = LM.rank_dropout(torch.ones(4000, 16), 0.25, training=True, conv=False)
    assert factor == pytest.approx(1 / 0.75)
    assert (lx != 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    # whole ranks per sample: broadcast over tokens (Linear) and over H, W (conv)
    lx3, _ = LM.rank_dropout(torch.ones(64, 5, 16), 0.5, training=True, conv=False)
    assert torch.equal(lx3, lx3[:, :1, :].expand_as(lx3))
    lx4, _ = LM.rank_dropout(torch.ones(64, 16, 3, 3), 0.5, training=True, conv=True)
    assert torch.equal(lx4, lx4[:, :, :1, :1].expand_as(lx4))
    assert LM.rank_dropout(lx, 0.25, training=False, conv=False)[1] == 1.0

    m, org = _module(rank_dropout=0.5)
    x = torch.randn(3, 8)
    m.train()
    with torch.no_grad():
        torch.manual_seed(7)
        out = org(x)
        torch.manual_seed(7)
        mask = torch.rand(3, 8) > 0.5
        expected = torch.nn.functional.linear(x, org.weight, org.bias) + m.lora_up(m.lora_down(x) * mask) * 0.5 / 0.5
        assert torch.allclose(out, expected, atol=1e-6)
        m.eval()
        full = torch.nn.functional.linear(x, org.weight, org.bias) + m.lora_up(m.lora_down(x)) * 0.5
        assert torch.allclose(org(x), full, atol=1e-6)


def test_network_dropout_only_in_training():
    torch.manual_seed(0)
    y = LM.network_dropout(torch.ones(10000), 0.5, training=True)
    assert set(y.unique().tolist()) == {0.0, 2.0} and (y == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(LM.network_dropout(torch.ones(5), 0.5, training=False), torch.ones(5))
    m, org = _module(dropout=0.5)
    x = torch.randn(16, 8)
    with torch.no_grad():
        full = torch.nn.functional.linear(x, org.weight, org.bias) + m.lora_up(m.lora_down(x)) * 0.5
        m.eval()
        assert torch.allclose(org(x), full, atol=1e-6)
        m.train()
        assert not torch.allclose(org(x), full, atol=1e-3)


def test_config_validation():
    with pytest.raises(LoralabError, match="rank_dropout"):
        NetworkConfig(rank_dropout=1.0)
    with pytest.raises(LoralabError, match="network_dim"):
        NetworkConfig(dim=0)
    assert NetworkConfig(conv_dim=4).conv_alpha == 1.0
    assert LM.alpha_scale(0, 8) == 1.0 and LM.alpha_scale(None, 8) == 1.0 and LM.alpha_scale(2, 8) == 0.25


# ---------------------------------------------------------------------------------------- hooking, groups


def test_apply_restore_and_multiplier():
    unet, tes = components("sd1")
    net = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=4, alpha=4))
    randomize(net)
    ids = token_ids()
    with torch.no_grad():
        base = tes[0](ids).last_hidden_state
        net.apply_to()
        net.apply_to()  # idempotent
        full = tes[0](ids).last_hidden_state
        net.set_multiplier(0.0)
        assert torch.allclose(tes[0](ids).last_hidden_state, base, atol=1e-6)
        net.set_multiplier(1.0)
        assert not torch.allclose(full, base, atol=1e-3)
        net.restore()
        assert torch.equal(tes[0](ids).last_hidden_state, base)
    assert "forward" not in tes[0].encoder.layers[0].self_attn.q_proj.__dict__


def test_param_groups_and_frozen_side_saved(tmp_path):
    unet, tes = components("sd1")
    net = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=4))
    groups = net.param_groups(unet_lr=None, text_encoder_lr=5e-5, learning_rate=1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("textencoder", 5e-5), ("unet", 1e-4)]
    assert sum(len(g["params"]) for g in groups) == 2 * len(net.loras)
    groups = net.param_groups(unet_lr=1e-4, text_encoder_lr=0, learning_rate=1e-4)
    assert [g["name"] for g in groups] == ["unet"]
    assert not any(p.requires_grad for m in net.text_encoder_loras for p in m.parameters())
    assert all(p.requires_grad for m in net.unet_loras for p in m.parameters())
    net.save(tmp_path / "x.safetensors")
    sd = safetensors.torch.load_file(str(tmp_path / "x.safetensors"))
    assert torch.count_nonzero(sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]) == 0
    assert net.param_groups(unet_lr=None, text_encoder_lr=None, learning_rate=None) == []
    # train_text_encoder False: no TE modules at all (kohya's network_train_unet_only)
    assert not LoRANetwork.create(unet, tes, "sd1", NetworkConfig(train_text_encoder=False)).text_encoder_loras


# ---------------------------------------------------------------------------------------- files


def test_save_load_round_trip_and_hashes(tmp_path):
    unet, tes = components("sd1")
    net = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=4, alpha=2, conv_dim=2, conv_alpha=1))
    randomize(net)
    md = {"ss_network_dim": "4", "modelspec.title": "x"}
    p32, p16 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    net.save(p32, torch.float32, md)
    net.save(p16, torch.float16, md)

    other = LoRANetwork.create(*components("sd1"), "sd1", NetworkConfig(dim=4, alpha=1, conv_dim=2, conv_alpha=3))
    info = other.load_weights(p32)
    assert info.loaded == len(net.loras) and not info.missing
    for k, v in net.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    assert other.get_submodule("lora_unet_down_blocks_0_resnets_0_conv1").scale == 0.5  # scale from the file alpha

    with safetensors.safe_open(str(p16), "pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert meta["modelspec.title"] == "x" and meta["ss_network_dim"] == "4"
    other.load_weights(p16)
    for k, v in net.state_dict().items():
        assert torch.equal(other.state_dict()[k], v.half().float()), k

    # sshs_model_hash: sha256 of the bytes after the header (what A1111 computes from the file)
    data = p32.read_bytes()
    n = int.from_bytes(data[:8], "little")
    with safetensors.safe_open(str(p32), "pt") as f:
        meta32 = f.metadata()
    assert meta32["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert meta32["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # file < 1 MiB: nothing at 1 MiB


def test_legacy_hash_reads_at_one_mib():
    sd = {"w": torch.arange(600_000, dtype=torch.float32)}  # 2.4 MB
    md = {"ss_x": "1", "other": "ignored"}
    data = safetensors.torch.save(sd, {"ss_x": "1"})
    model_hash, legacy = LF.precalculate_safetensors_hashes(sd, md)
    assert legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert model_hash == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_from_weights_mixed_dims(tmp_path):
    unet, tes = components("sd1")
    g = torch.Generator().manual_seed(0)
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    conv = "lora_unet_up_blocks_0_resnets_1_conv2"
    sd = {f"{q}.lora_down.weight": torch.randn(2, 32, generator=g), f"{q}.lora_up.weight": torch.randn(32, 2, generator=g),
          f"{q}.alpha": torch.tensor(1.0),
          f"{to_k}.lora_down.weight": torch.randn(8, 32, generator=g), f"{to_k}.lora_up.weight": torch.randn(32, 8, generator=g),
          # no alpha: alpha = dim
          f"{conv}.lora_down.weight": torch.randn(3, 64, 3, 3, generator=g),
          f"{conv}.lora_up.weight": torch.randn(64, 3, 1, 1, generator=g), f"{conv}.alpha": torch.tensor(0.5)}
    path = tmp_path / "mixed.safetensors"
    safetensors.torch.save_file(sd, str(path))
    net = LoRANetwork.from_weights(path, unet, tes, "sd1", cfg=NetworkConfig(dropout=0.1))
    mods = {m.lora_name: m for m in net.loras}
    assert set(mods) == {q, to_k, conv}
    assert [(mods[n].lora_dim, float(mods[n].alpha)) for n in (q, to_k, conv)] == [(2, 1.0), (8, 8.0), (3, 0.5)]
    assert mods[conv].scale == pytest.approx(0.5 / 3) and mods[q].dropout == 0.1
    for k, v in sd.items():
        assert torch.equal(net.state_dict()[k], v)
    # train_text_encoder False: the TE module is left out
    unet_only = LoRANetwork.from_weights(path, unet, tes, "sd1", cfg=NetworkConfig(train_text_encoder=False))
    assert {m.lora_name for m in unet_only.loras} == {to_k, conv}


def test_from_weights_diffusers_style_sdxl_names(tmp_path):
    unet, tes = components("sdxl")
    net = LoRANetwork.create(unet, tes, "sdxl", NetworkConfig(dim=4, alpha=2, conv_dim=2))
    randomize(net)
    targets = {t.lora_name: t for t in LT.find_lora_targets(unet, tes, "sdxl", include_conv=True)}
    renamed = {}
    for k, v in net.state_dict().items():
        mod, rest = k.split(".", 1)
        alias = next((a for a in targets[mod].aliases if a.startswith("lora_unet_")), mod)
        renamed[f"{alias}.{rest}"] = v
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in renamed
    loaded = LoRANetwork.from_weights(renamed, *components("sdxl"), "sdxl")
    assert loaded.state_dict().keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_unknown_keys_error():
    unet, tes = components("sd1")
    net = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=4))
    sd = dict(net.state_dict())
    sd["lora_unet_foo_bar.lora_down.weight"] = torch.zeros(4, 4)
    sd["lora_unet_mid_block_attentions_0_proj_in.hada_w1_a"] = torch.zeros(4, 4)
    with pytest.raises(LoralabError, match=r"lora_unet_foo_bar.*hada_w1_a|hada_w1_a.*lora_unet_foo_bar") as e:
        net.load_weights(sd)
    assert "2 LoRA modules/keys" in str(e.value)
    with pytest.raises(LoralabError, match="lora_unet_foo_bar"):
        LoRANetwork.from_weights({"lora_unet_foo_bar.lora_down.weight": torch.zeros(4, 4)}, unet, tes, "sd1")
    bad = dict(net.state_dict())
    bad["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"] = torch.zeros(8, 64, 1, 1)
    with pytest.raises(LoralabError, match="dim_from_weights"):
        net.load_weights(bad)


def test_atomic_save(tmp_path, monkeypatch):
    unet, tes = components("sd1")
    net = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=4))
    path = tmp_path / "out" / "lora.safetensors"

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(LF, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        net.save(path)
    assert list(path.parent.iterdir()) == []  # no final file, no temp file
    monkeypatch.undo()
    net.save(path)
    good = path.read_bytes()
    monkeypatch.setattr(LF, "save_file", broken_save_file)
    with pytest.raises(OSError):
        net.save(path)
    assert path.read_bytes() == good and list(path.parent.iterdir()) == [path]  # the old file survives


def test_low_precision_base_with_fp32_lora():
    """The trainer keeps the LoRA in fp32 while the base model runs in fp16/bf16 (with or without autocast)."""
    unet, _ = components("sd1")
    net = LoRANetwork.create(unet, [], "sd1", NetworkConfig(dim=4, conv_dim=2, train_text_encoder=False))
    randomize(net)
    net.apply_to()
    unet.to(torch.bfloat16)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in unet_inputs(unet).items()}
    out = unet(**inputs).sample
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = [m.lora_up.weight.grad for m in net.unet_loras]
    assert all(g is not None and g.dtype == torch.float32 for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(unet(**inputs).sample).all()
