"""Network types beyond LoRA: LoHa, LoKr, DoRA, full, DyLoRA, LyCORIS LoCon and presets (issue 11).

Oracles: the key layout A1111's Lora extension and ComfyUI read (names, shapes), a merge written from their
formulas (`loader_delta`, independent of our modules), diffusers for the types it loads, and real training runs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_network import KOHYA_TE, KOHYA_UNET_SD, KOHYA_UNET_SDXL, collect_loader_warnings, components, token_ids, unet_inputs
from test_sdxl import cfg_dict, make_images, tiny_sdxl_checkpoint  # noqa: F401 (module fixture)
from test_train import base_cfg, make_dataset

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.network.lokr import factorization
from loralab.network.lora import LoRANetwork, NetworkConfig
from loralab.recipes.lora import train

torch.set_num_threads(1)

# name -> NetworkConfig fields; each also gets dim 4, alpha 2
TYPES = {
    "loha": dict(algo="loha"),
    "loha_tucker_conv": dict(algo="loha", conv_dim=2, conv_alpha=1.0, use_tucker=True),
    "lokr": dict(algo="lokr", factor=4),
    "lokr_both_tucker": dict(algo="lokr", dim=2, conv_dim=2, conv_alpha=1.0, decompose_both=True, use_tucker=True,
                             factor=2),
    "dora": dict(algo="locon", dora_wd=True, conv_dim=2),
    "loha_dora": dict(algo="loha", dora_wd=True),
    "lokr_dora_out": dict(algo="lokr", dora_wd=True, wd_on_output=True, factor=4),
    "full": dict(algo="full"),
    "dylora": dict(algo="dylora", unit=2),
    "lycoris_full_preset": dict(algo="locon", preset="full", conv_dim=2, conv_alpha=1.0),
}
# every key suffix a type may write (A1111 network_*.py and ComfyUI weight_adapter/*.py read these)
SUFFIXES = {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a",
            "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
            "lokr_w2_b", "lokr_t2", "diff"}
LYCORIS_SD1_NAMES = {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
                     "lora_unet_time_embedding_linear_2"}


def make(family: str, kind: str, seed: int = 1, multiplier: float = 1.0):
    unet, tes = components(family)
    net = LoRANetwork.create(unet, tes, family, NetworkConfig(**{"dim": 4, "alpha": 2.0, **TYPES[kind]}),
                             multiplier=multiplier)
    randomize(net, seed)
    return unet, tes, net


def randomize(net: LoRANetwork, seed: int) -> None:
    """Every trained tensor random (so ΔW != 0 everywhere); DoRA magnitudes moved by +-10 %."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.loras:
            for name, p in m.named_parameters():
                if name == "dora_scale":
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "hada" in name else 0.1))


def file_modules(sd: dict) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name, _, suffix = k.partition(".")
        out.setdefault(name, {})[suffix] = v
    return out


# ---------------------------------------------------------------------------------------- a loader's merge


def loader_delta(t: dict[str, torch.Tensor], weight: torch.Tensor, strength: float) -> torch.Tensor:
    """W_new − W as ComfyUI's `calculate_weight` (and A1111's `calc_updown`) compute it from one module's file
    tensors, written here from their formulas: scale = alpha / rank (rank: lora_down rows, hada_w1_b rows,
    lokr_w2_b / lokr_w1_b rows, none for full or all-full LoKr), then DoRA, then strength."""
    w = weight.float()
    alpha = float(t["alpha"]) if "alpha" in t else None
    rank = None
    if "lora_down.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        rank = down.shape[0]
        if down.dim() == 4 and down.shape[2:] != (1, 1):
            diff = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            diff = up.flatten(1) @ down.flatten(1)
    elif "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            m1, m2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        diff = m1 * m2
    elif "diff" in t:
        diff = t["diff"]
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        rank = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            rank = t["lokr_w2_b"].shape[0]
            w2 = (torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
                  if "lokr_t2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        diff = torch.kron(w1.contiguous(), w2.contiguous())  # A1111 make_kron: w2.contiguous()
    scale = alpha / rank if alpha is not None and rank else 1.0
    diff = diff.reshape(w.shape) * scale
    if "dora_scale" not in t:
        return diff * strength
    ds = t["dora_scale"]
    calc = w + diff
    if ds.shape[0] == w.shape[0] and w.shape[0] != 1:  # per output channel (ComfyUI picks the axis by shape)
        norm = calc.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:  # per input channel (A1111's only layout)
        norm = calc.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(w.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)
    return (calc * (ds.reshape(norm.shape) / norm) - w) * strength


# ---------------------------------------------------------------------------------------- layout


def expected_shapes(kind: str, suffixes: set[str], w: tuple[int, ...], dim: int) -> dict[str, tuple[int, ...]]:
    """The layout A1111/ComfyUI read, per type, from the wrapped weight's shape w = (out, in[, kh, kw])."""
    out, inp, *k = w
    kk = math.prod(k)
    if "hada_w1_a" in suffixes:
        if "hada_t1" in suffixes:
            one = {"hada_w1_a": (dim, out), "hada_w1_b": (dim, inp), "hada_t1": (dim, dim, *k)}
        else:
            one = {"hada_w1_a": (out, dim), "hada_w1_b": (dim, inp * kk)}
        return {**one, **{key.replace("1", "2"): s for key, s in one.items()}}
    if "diff" in suffixes:
        return {"diff": w}
    if any(s.startswith("lokr") for s in suffixes):
        f = TYPES[kind].get("factor", -1)
        (a, b), (c, d) = factorization(out, f), factorization(inp, f)
        shapes = {"lokr_w1": (a, c)} if "lokr_w1" in suffixes else {"lokr_w1_a": (a, dim), "lokr_w1_b": (dim, c)}
        if "lokr_w2" in suffixes:
            shapes["lokr_w2"] = (b, d, *k)
        elif "lokr_t2" in suffixes:
            shapes.update(lokr_w2_a=(dim, b), lokr_w2_b=(dim, d), lokr_t2=(dim, dim, *k))
        else:
            shapes.update(lokr_w2_a=(b, dim), lokr_w2_b=(dim, d * kk))
        return shapes
    down = (dim, inp, *k) if k else (dim, inp)
    return {"lora_down.weight": down, "lora_up.weight": (out, dim, 1, 1) if k else (out, dim)}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", sorted(TYPES))
def test_every_key_name_and_shape_is_the_loaders_layout(tmp_path, family, kind):
    unet, tes, net = make(family, kind)
    path = tmp_path / "net.safetensors"
    net.save(path, torch.float16, {"ss_network_module": "lycoris.kohya"})
    sd = load_file(str(path))
    assert not [k for k in sd if k.startswith("lycoris_")]
    unet_re = KOHYA_UNET_SDXL if family == "sdxl" else KOHYA_UNET_SD
    by_name = {m.lora_name: m for m in net.loras}
    mods = file_modules(sd)
    assert set(mods) == set(by_name) and len(mods) > 20
    for name, tensors in mods.items():
        assert set(tensors) <= SUFFIXES, (name, set(tensors))
        assert (KOHYA_TE.match(name) or unet_re.match(name)
                or (kind == "lycoris_full_preset" and family == "sd1" and name in LYCORIS_SD1_NAMES)), name
        m = by_name[name]
        w = tuple(m.org_module.weight.shape)
        dim = 2 if m.is_conv3x3 and TYPES[kind].get("conv_dim") else TYPES[kind].get("dim", 4)
        expected = expected_shapes(kind, set(tensors), w, dim)
        assert {k: tuple(v.shape) for k, v in tensors.items() if k not in ("alpha", "dora_scale")} == expected, name
        if kind != "full":
            assert tensors["alpha"].shape == () and tensors["alpha"].dtype == torch.float16
        else:
            assert "alpha" not in tensors
        if TYPES[kind].get("dora_wd"):
            on_out = TYPES[kind].get("wd_on_output", False)
            assert tuple(tensors["dora_scale"].shape) == ((w[0], *[1] * (len(w) - 1)) if on_out
                                                           else (1, w[1], *[1] * (len(w) - 2)))
    if kind == "lycoris_full_preset":
        names = LYCORIS_SD1_NAMES if family == "sd1" else set()
        assert names <= set(mods) and not (LYCORIS_SD1_NAMES & set(mods) if family == "sdxl" else set())
        assert any("resnets_0_conv1" in n or "in_layers_2" in n for n in mods)  # 3x3 convs at conv_dim


def test_lokr_factorization_is_lycoris():
    """Values of lycoris-lora 4.1.3's `factorization` (its docstring table says 360 -> (8, 45); its code, which
    made the files in use, gives (18, 20)); ours matched it for every n < 1300 and factor in -1, 1..16."""
    assert [factorization(n) for n in (127, 128, 250, 360, 512, 1024)] == [
        (1, 127), (8, 16), (10, 25), (18, 20), (16, 32), (32, 32)]
    assert [factorization(n, 4) for n in (128, 250, 512)] == [(4, 32), (2, 125), (4, 128)]
    assert [factorization(n, 8) for n in (250, 360, 1024)] == [(5, 50), (8, 45), (8, 128)]


# ---------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", sorted(TYPES))
def test_a_loaders_merge_of_the_file_gives_our_output(tmp_path, family, kind):
    """The file merged into the weights with the loaders' formulas == our hooked network, at strength 1
    and 0.6 (DoRA: W + s·(W' − W), as A1111 and ComfyUI; LyCORIS's own forward differs there)."""
    strength = 0.6
    unet, tes, net = make(family, kind, multiplier=strength)
    path = tmp_path / "net.safetensors"
    net.save(path, torch.float32)
    mods = file_modules(load_file(str(path)))
    inputs, ids = unet_inputs(unet), token_ids()
    net.eval()
    with torch.no_grad():
        base = unet(**inputs).sample
        net.apply_to()
        ours, ours_te = unet(**inputs).sample, [te(ids).last_hidden_state for te in tes]
        net.restore()
        for m in net.loras:
            m.org_module.weight += loader_delta(mods[m.lora_name], m.org_module.weight, strength)
        theirs, theirs_te = unet(**inputs).sample, [te(ids).last_hidden_state for te in tes]
    assert (ours - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() < 1e-4
    for o, t in zip(ours_te, theirs_te):
        assert (o - t).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["loha_tucker_conv", "lokr_both_tucker", "dora", "lokr_dora_out", "full", "dylora"])
def test_from_weights_rebuilds_each_type_and_load_weights_continues(tmp_path, kind):
    unet, tes, net = make("sd1", kind)
    path = tmp_path / "net.safetensors"
    net.save(path, torch.float32)
    inputs = unet_inputs(unet)
    net.eval()
    with torch.no_grad():
        net.apply_to()
        ours = unet(**inputs).sample
        net.restore()
        cfg = NetworkConfig(algo="dylora", unit=2) if kind == "dylora" else None
        back = LoRANetwork.from_weights(path, unet, tes, "sd1", cfg=cfg)
        assert len(back.loras) == len(net.loras)
        assert type(back.loras[0]) is type(net.loras[0])
        back.eval()
        back.apply_to()
        assert torch.equal(unet(**inputs).sample, ours)
        back.restore()
        fresh = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(**{"dim": 4, "alpha": 2.0, **TYPES[kind]}))
        info = fresh.load_weights(path)
        assert info.loaded == len(net.loras) and info.missing == []
        fresh.eval()
        fresh.apply_to()
        assert torch.equal(unet(**inputs).sample, ours)
        fresh.restore()


def test_a_file_of_another_layout_or_type_is_refused_with_the_key(tmp_path):
    unet, tes, net = make("sd1", "loha")
    sd = net.state_dict()
    lora = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=4))
    with pytest.raises(LoralabError, match=r"hada_w1_a.*from_weights"):
        lora.load_weights(sd)
    name = net.loras[0].lora_name
    bad = {**sd, f"{name}.lora_mid.weight": torch.zeros(1)}
    with pytest.raises(LoralabError, match=rf"{name} has keys of LoCon with Tucker"):
        LoRANetwork.from_weights(bad, unet, tes, "sd1")
    partial = {k: v for k, v in sd.items() if k != f"{name}.hada_w2_b"}
    with pytest.raises(LoralabError, match=rf"{name} lacks hada_w2_b"):
        LoRANetwork.from_weights(partial, unet, tes, "sd1")
    mixed = {**sd, f"{name}.lokr_w1": torch.zeros(2, 2)}
    with pytest.raises(LoralabError, match="keys of loha and lokr at once"):
        LoRANetwork.from_weights(mixed, unet, tes, "sd1")


def test_dora_reads_both_axes_and_writes_per_input_by_default():
    unet, tes, net = make("sd1", "dora")
    m = net.loras[0]
    w = m.org_module.weight
    assert m.dora_scale.shape == (1, w.shape[1])
    fresh = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=4, algo="locon", dora_wd=True))
    assert torch.allclose(fresh.loras[0].dora_scale, w.norm(dim=0, keepdim=True))  # ‖W‖ per input column
    inputs = unet_inputs(unet)
    with torch.no_grad():  # a fresh DoRA network is the identity: lora_up = 0 and dora_scale = ‖W‖
        base = unet(**inputs).sample
        fresh.apply_to()
        assert (unet(**inputs).sample - base).abs().max() < 1e-5
        fresh.restore()
    _, _, out = make("sd1", "lokr_dora_out")
    o = out.loras[0]
    assert o.dora_scale.shape == (o.org_module.weight.shape[0], 1)
    back = LoRANetwork.from_weights(out.state_dict(), unet, tes, "sd1")
    assert back.loras[0].dora_scale.shape == (o.org_module.weight.shape[0], 1)


def test_max_norm_scales_each_type_to_the_limit():
    for kind in ("loha", "lokr", "full", "dora"):
        _, _, net = make("sd1", kind)
        before = [float(m.merge_weight().detach().norm()) for m in net.loras]
        limit = sorted(before)[len(before) // 2]
        scaled, _, top = net.max_norm(limit)
        after = [float(m.merge_weight().detach().norm()) for m in net.loras]
        assert scaled == sum(b > limit for b in before) > 0
        assert top == pytest.approx(limit, rel=1e-4) and max(after) == pytest.approx(limit, rel=1e-4)
        assert all(a == pytest.approx(b, rel=1e-6) for a, b in zip(after, before) if b <= limit)


def test_dylora_trains_one_unit_per_step_and_is_a_plain_lora_in_eval():
    unet, tes, net = make("sd1", "dylora")
    m = next(m for m in net.unet_loras if not m.is_conv)
    x = torch.randn(2, 5, m.org_module.in_features)
    net.apply_to()
    for _ in range(5):
        net.zero_grad()
        m.train()
        m.org_module(x).sum().backward()
        rows = (m.lora_down.weight.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
        cols = (m.lora_up.weight.grad.abs().sum(0) > 0).nonzero().flatten().tolist()
        assert rows == cols and len(rows) == 2 and rows[0] % 2 == 0  # one unit of 2 ranks
    m.eval()
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, m.org_module.weight, m.org_module.bias) + \
            m.lora_up(m.lora_down(x)) * m.scale
        assert torch.allclose(m.org_module(x), expected, atol=1e-6)
    net.restore()


# ---------------------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("kind", ["dylora", "lycoris_full_preset"])
def test_diffusers_loads_the_lora_layout_types_identically(tmp_path, kind):
    """DyLoRA and LyCORIS LoCon (preset full: conv_in, conv_out, time embedding too) are LoRA files."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as M

    unet, tes, net = make("sd1", kind)
    refs = copy.deepcopy([unet, *tes])
    path = tmp_path / "net.safetensors"
    net.save(path, torch.float32)
    with collect_loader_warnings() as msgs:
        sd, alphas = M.lora_state_dict(str(path))
        M.load_lora_into_unet(sd, alphas, refs[0])
        M.load_lora_into_text_encoder(sd, alphas, refs[1], prefix="text_encoder")
    assert not [m for m in msgs if re.search(r"unexpected|missing|not found|not been|unsuccessful", m, re.I)], msgs
    inputs, ids = unet_inputs(unet), token_ids()
    net.eval()
    with torch.no_grad():
        net.apply_to()
        ours, ours_te = unet(**inputs).sample, tes[0](ids).last_hidden_state
        theirs, theirs_te = refs[0](**inputs).sample, refs[1](ids).last_hidden_state
    assert (ours - theirs).abs().max() < 1e-4 and (ours_te - theirs_te).abs().max() < 1e-4


def test_diffusers_drops_dora_and_refuses_loha_lokr(tmp_path):
    """What diffusers 0.42 does with the other types (so the README can say which loaders to use)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as M

    _, _, dora = make("sd1", "dora")
    dora.save(tmp_path / "dora.safetensors", torch.float32)
    with collect_loader_warnings() as msgs:
        sd, _ = M.lora_state_dict(str(tmp_path / "dora.safetensors"))
    assert any("filter out the keys associated to 'dora_scale" in m for m in msgs)
    assert not [k for k in sd if "magnitude" in k or "dora" in k]
    for kind in ("loha", "lokr"):
        _, _, net = make("sd1", kind)
        net.save(tmp_path / f"{kind}.safetensors", torch.float32)
        with pytest.raises((ValueError, KeyError)):
            M.lora_state_dict(str(tmp_path / f"{kind}.safetensors"))


# ---------------------------------------------------------------------------------------- config and training

TRAIN_ARGS = {
    "loha": ("lycoris.kohya", "algo=loha preset=attn-mlp"),
    "lokr": ("lycoris.kohya", "algo=lokr factor=4 decompose_both=True"),
    "dora": ("lycoris.kohya", "algo=locon dora_wd=True conv_dim=2"),
    "full": ("lycoris.kohya", "algo=full preset=attn-mlp"),
    "dylora": ("networks.dylora", "unit=2"),
}
FILE_KEY = {"loha": "hada_w1_a", "lokr": "lokr_w", "dora": "dora_scale", "full": "diff", "dylora": "lora_down.weight"}


def _train_and_check(cfg, kind: str, module: str, args: str) -> None:
    result = train(cfg)
    path = result.final_file
    assert result.global_step == 2 and math.isfinite(result.last_loss)
    sd = load_file(str(path))
    assert any("." + FILE_KEY[kind] in k for k in sd)
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == module
    net_args = json.loads(md["ss_network_args"])
    for item in args.split():
        k, v = item.split("=")
        assert str(net_args[k]).lower() == v.lower()


@pytest.mark.parametrize("kind", sorted(TRAIN_ARGS))
def test_each_type_trains_on_the_tiny_sd1_model(tmp_path, tiny_sd1_checkpoint, kind):
    module, args = TRAIN_ARGS[kind]
    img, _ = make_dataset(tmp_path, reg=False)
    cfg = build_config(None, {**base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_steps=2),
                              "network_module": module, "network_args": args.split()})
    _train_and_check(cfg, kind, module, args)


@pytest.mark.parametrize("kind", sorted(TRAIN_ARGS))
def test_each_type_trains_on_the_tiny_sdxl_model(tmp_path, tiny_sdxl_checkpoint, kind):  # noqa: F811
    module, args = TRAIN_ARGS[kind]
    img = make_images(tmp_path, [(64, 64), (64, 64)])
    cfg = build_config(None, {**cfg_dict(tiny_sdxl_checkpoint, img, tmp_path / "out", max_train_steps=2),
                              "network_module": module, "network_args": args.split()})
    _train_and_check(cfg, kind, module, args)


def test_network_weights_continue_from_a_loha_file(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, reg=False)
    common = {"network_module": "lycoris.kohya", "network_args": ["algo=loha", "preset=attn-mlp"]}
    first = build_config(None, {**base_cfg(tiny_sd1_checkpoint, img, tmp_path / "a", max_train_steps=2), **common})
    train(first)
    start = next((tmp_path / "a").glob("*.safetensors"))
    second = build_config(None, {**base_cfg(tiny_sd1_checkpoint, img, tmp_path / "b", max_train_steps=2,
                                            network_weights=start), **common})
    train(second)
    a, b = load_file(str(start)), load_file(str(next((tmp_path / "b").glob("*.safetensors"))))
    assert set(a) == set(b)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("hada_w2_a"))


@pytest.mark.parametrize("module,args,match", [
    ("lycoris.kohya", ["algo=ia3"], r"network_args algo = 'ia3': loralab trains LyCORIS's lora, locon, loha"),
    ("lycoris.kohya", ["algo=lokr", "factor=0"], r"network_args factor = 0 is invalid"),
    ("lycoris.kohya", ["preset=my_preset.toml"], r"network_args preset = 'my_preset.toml' is unknown"),
    ("lycoris.kohya", ["algo=loha", "train_norm=True"], r"network_args: train_norm = True .* not supported"),
    ("lycoris.kohya", ["algo=loha", "dora_wd=maybe"], r"network_args: dora_wd='maybe' needs True or False"),
    ("networks.lora", ["algo=loha"], r"network_args algo: options of lycoris.kohya, not of networks.lora"),
    ("networks.dylora", ["unit=3"], r"network_args unit = 3 must be >= 1 and divide network_dim = 4"),
    ("lycoris.kohya", ["algo=loha", "loraplus_lr_ratio=16"], r"loraplus_lr_ratio: LoRA\+ .* algo = loha has none"),
    ("lycoris.kohya", ["algo=full", "dora_wd=True"], r"dora_wd = True does not go with algo = full"),
])
def test_bad_network_type_input_is_named_before_any_model_loads(tmp_path, module, args, match):
    img, _ = make_dataset(tmp_path, reg=False)
    missing_model = tmp_path / "not_loaded.safetensors"
    missing_model.write_bytes(b"x")  # never read: the checks come first
    with pytest.raises(LoralabError, match=match):
        build_config(None, {**base_cfg(missing_model, img, tmp_path / "out"), "network_module": module,
                            "network_args": args})


def test_lycoris_defaults_and_the_dim_warning(caplog):
    from loralab.config.fields import TrainConfig

    cfg = TrainConfig(network_module="lycoris.kohya", network_dim=48, network_alpha=8, network_args=["algo=loha"])
    with caplog.at_level(logging.WARNING):
        net = cfg.network_config()
    assert (net.algo, net.preset, net.conv_dim, net.conv_alpha) == ("loha", "full", 48, 8.0)  # LyCORIS's defaults
    assert "dims above 32 for LoHa/LoCon are refused by some tools" in caplog.text
    lin = TrainConfig(network_module="lycoris.kohya", network_args=["algo=lokr", "preset=attn-mlp", "use_cp=True"])
    assert (lin.network_config().conv_dim, lin.network_config().use_tucker) == (None, True)
