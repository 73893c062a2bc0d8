"""Block-wise training (issue 11): kohya's down/mid/up_lr_weight, block_lr_zero_threshold, block_dims,
block_alphas, conv_block_dims, conv_block_alphas.

Oracles: kohya's rules transcribed here independently of network/blocks.py (`kohya_block`, the preset
formulas, the expected module set of `networks.lora` walked from the model), A1111's IN/OUT numbering read off
the LDM names (which kohya's SD numbering equals), and real training runs.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from test_network import components, kohya_expected_children
from test_sdxl import tiny_sdxl_checkpoint  # noqa: F401 (module fixture)
from test_train import base_cfg, make_dataset
from torch import nn

from loralab.cli import main as cli_main
from loralab.config import build_config
from loralab.config.gui import gui_to_kohya
from loralab.errors import LoralabError
from loralab.network.blocks import block_index, block_plan, block_problems, lr_preset
from loralab.network.lora import LoRANetwork, NetworkConfig
from loralab.network.targets import sdxl_unet_path_to_ldm
from loralab.recipes.lora import train

torch.set_num_threads(1)

N_BLOCKS = {"sd1": 25, "sdxl": 23}


def kohya_block(name: str, family: str) -> int:
    """kohya's get_block_index, transcribed from sd-scripts networks/lora.py (for UNet names)."""
    if family == "sdxl":
        m = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", name)
        return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m[1]] + int(m[2])
    m = re.search(r"(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_", name)
    if m is None:
        assert "mid_block_" in name
        return 12
    j = 2 if m[3].endswith("samplers") else int(m[4])
    return (1 if m[1] == "down" else 13) + 3 * int(m[2]) + j


def kohya_unet_modules(unet: nn.Module, family: str, conv: bool) -> dict[str, nn.Module]:
    """networks.lora's UNet modules (kohya name -> wrapped module), walked from the model."""
    classes = ("Transformer2DModel",) + (("ResnetBlock2D", "Downsample2D", "Upsample2D") if conv else ())
    lpb = unet.config.layers_per_block
    with_attn = {i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)}
    out = {}
    for path in kohya_expected_children(unet, classes):
        ldm = sdxl_unet_path_to_ldm(path, lpb, with_attn) if family == "sdxl" else path
        out["lora_unet_" + ldm.replace(".", "_")] = unet.get_submodule(path)
    return out


def expected_file(unet: nn.Module, family: str, dims: list[int], alphas: list[float], conv_dims: list[int] | None,
                  weights: list[float] | None) -> dict[str, tuple]:
    """{UNet key: shape} of the file kohya writes for these per-block values (kohya's rules, independently)."""
    out = {}
    for name, mod in kohya_unet_modules(unet, family, conv_dims is not None).items():
        k = kohya_block(name, family)
        conv3 = isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1)
        r = (conv_dims[k] if conv3 else dims[k]) if (not conv3 or conv_dims is not None) else 0
        if weights is not None and weights[k] == 0:
            r = 0
        if r == 0:
            continue
        if isinstance(mod, nn.Linear):
            down, up = (r, mod.in_features), (mod.out_features, r)
        else:
            down, up = (r, mod.in_channels, *mod.kernel_size), (mod.out_channels, r, 1, 1)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"], out[f"{name}.alpha"] = down, up, ()
    return out


def csv(values) -> str:
    return ",".join(str(v) for v in values)


# ---------------------------------------------------------------------------------------- numbering


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_block_index_is_kohyas(family):
    unet, _ = components(family)
    fam = "sdxl" if family == "sdxl" else "sd1"
    names = kohya_unet_modules(unet, fam, conv=True)
    assert names and {n: block_index(n, family) for n in names} == {n: kohya_block(n, fam) for n in names}
    assert block_index("lora_te_text_model_encoder_layers_0_mlp_fc1", family) == -1


def test_sd_numbering_is_a1111s_in_out_numbering():
    """On the SD 1.x layout (layers_per_block 2), kohya's 1+3i+j / 13+3i+j is input_blocks.N -> IN N and
    output_blocks.N -> OUT N of the LDM names (A1111's block names)."""
    unet, _ = components("sd1")
    assert unet.config.layers_per_block == 2
    with_attn = {i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)}
    for path in kohya_expected_children(unet, ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")):
        ldm = sdxl_unet_path_to_ldm(path, 2, with_attn)
        m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)", ldm)
        want = {"input_blocks": int(m[2]), "middle_block": 12, "output_blocks": 13 + int(m[2])}[m[1]]
        assert block_index("lora_unet_" + path.replace(".", "_"), "sd1") == want, path


def test_lr_presets_follow_kohyas_formulas():
    n = 12
    assert lr_preset("down_lr_weight", "sine", n) == pytest.approx([math.sin(math.pi / 2 * i / 11) for i in range(n)])
    assert lr_preset("up_lr_weight", "cosine", n) == pytest.approx([math.sin(math.pi / 2 * i / 11) for i in range(n)][::-1])
    assert lr_preset("down_lr_weight", "linear", 9) == pytest.approx([i / 8 for i in range(9)])
    assert lr_preset("down_lr_weight", "reverse_linear", 9) == pytest.approx([1 - i / 8 for i in range(9)])
    assert lr_preset("up_lr_weight", "zeros+0.5", n) == [0.5] * n
    cos = lr_preset("up_lr_weight", "cosine+.25", n)  # kohya's docs: cosine+.25 spans 0.25..1.25
    assert cos[0] == pytest.approx(1.25) and cos[-1] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------- the network


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_modules_and_dims_follow_the_blocks_as_kohya_writes_them(family, tmp_path):
    unet, tes = components(family)
    n = N_BLOCKS[family]
    side, mid = (12, 1) if family == "sd1" else (9, 3)
    dims = [1 + i % 4 for i in range(n)]
    alphas = [0.5 * (1 + i % 3) for i in range(n)]
    conv_dims = [2 + i % 2 for i in range(n)]
    down = [0, 0, 0.5] + [1.0] * (side - 3)  # IN00 (no LoRA), IN01 off, IN02 at 0.5
    up = [0.05] + [2.0] * (side - 1)  # OUT00 under the threshold
    blocks = {"down_lr_weight": csv(down), "mid_lr_weight": csv([1.5] * mid), "up_lr_weight": csv(up),
              "block_lr_zero_threshold": "0.1", "block_dims": csv(dims), "block_alphas": csv(alphas),
              "conv_block_dims": csv(conv_dims)}
    net = LoRANetwork.create(unet, tes, family, NetworkConfig(dim=8, alpha=4, blocks=blocks))
    weights = down + [1.5] * mid + [0.0] + up[1:]
    weights = [1.0] + weights + [1.0] if family == "sdxl" else weights
    weights = [0.0 if w <= 0.1 else w for w in weights]
    path = tmp_path / "blocks.safetensors"
    net.save(path)
    with safe_open(str(path), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        alpha_of = {k: float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
    want = expected_file(unet, family, dims, alphas, conv_dims, weights)
    assert {k: v for k, v in got.items() if k.startswith("lora_unet_")} == want
    for key, alpha in alpha_of.items():
        if key.startswith("lora_unet_"):
            name = key[: -len(".alpha")]
            conv3 = len(got[f"{name}.lora_down.weight"]) == 4 and got[f"{name}.lora_down.weight"][2:] != (1, 1)
            assert alpha == (1.0 if conv3 else alphas[kohya_block(name, family)]), key  # conv_block_alphas: 1
        else:
            assert alpha == 4.0  # the text encoders keep network_dim / network_alpha
    assert all(got[k][0] == 8 for k in got if k.startswith("lora_te") and k.endswith("lora_down.weight"))
    # zero-weight blocks are absent, and some blocks of each kind are present
    present = {kohya_block(k.split(".")[0], family) for k in got if k.startswith("lora_unet_")}
    assert not {k for k, w in enumerate(weights) if w == 0} & present
    assert present & set(range(13, n)) and (12 in present or 11 in present)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_param_groups_are_lr_times_the_block_weight(family):
    unet, tes = components(family)
    side, mid = (12, 1) if family == "sd1" else (9, 3)
    blocks = {"down_lr_weight": "sine+.5", "mid_lr_weight": csv([0.25] * mid), "up_lr_weight": "linear"}
    net = LoRANetwork.create(unet, tes, family, NetworkConfig(dim=2, blocks=blocks))
    sine = [math.sin(math.pi / 2 * i / (side - 1)) + 0.5 for i in range(side)]
    linear = [i / (side - 1) for i in range(side)]
    weights = sine + [0.25] * mid + linear
    weights = [1.0] + weights + [1.0] if family == "sdxl" else weights
    groups = net.param_groups(unet_lr=1e-3, text_encoder_lr=5e-4, learning_rate=1e-2)
    assert [g["name"] for g in groups if "text" in g["name"]] == ["textencoder"]
    assert next(g["lr"] for g in groups if g["name"] == "textencoder") == 5e-4
    unet_groups = [g for g in groups if g["name"].startswith("unet_block")]
    assert unet_groups and len(unet_groups) == len(groups) - 1
    seen = set()
    for g in unet_groups:
        k = int(g["name"].removeprefix("unet_block"))
        assert g["lr"] == pytest.approx(1e-3 * weights[k]), g["name"]
        ids = {id(p) for p in g["params"]}
        want = {id(p) for m in net.unet_loras if kohya_block(m.lora_name, family) == k for p in m.parameters()}
        assert ids == want
        seen |= ids
    assert seen == {id(p) for m in net.unet_loras for p in m.parameters()}
    assert 13 not in {int(g["name"][10:]) for g in unet_groups}  # up weight 0 at OUT00: no modules, no group
    # LoRA+ splits every block group; the lora_up groups at lr x weight x ratio
    plus = net.param_groups(unet_lr=1e-3, text_encoder_lr=5e-4, loraplus_unet_ratio=16)
    for g in plus:
        if g["name"].startswith("unet_block"):
            k = int(g["name"].split()[0].removeprefix("unet_block"))
            ratio = 16 if g["name"].endswith(" plus") else 1
            assert g["lr"] == pytest.approx(1e-3 * weights[k] * ratio)
            assert all(("lora_up" in n) == (ratio == 16) for m in net.unet_loras for n, p in m.named_parameters()
                       if any(p is q for q in g["params"]))
    assert len(plus) == 1 + 2 * len(unet_groups)


def test_block_dims_alone_keep_one_unet_group_and_zero_dims_leave_modules_out():
    unet, tes = components("sd1")
    dims = [4] * 25
    dims[12] = 0  # MID
    net = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=2, blocks={"block_dims": csv(dims)}))
    assert not [m for m in net.unet_loras if "mid_block" in m.lora_name]
    assert {m.lora_dim for m in net.unet_loras} == {4} and {m.lora_dim for m in net.text_encoder_loras} == {2}
    assert [g["name"] for g in net.param_groups(learning_rate=1e-3)] == ["textencoder", "unet"]
    # block_alphas alone: kohya ignores it (block mode needs block_dims or an lr weight)
    plain = LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=2, blocks={"block_alphas": csv([8] * 25)}))
    assert plain.block_plan is None and {float(m.alpha) for m in plain.unet_loras} == {1.0}


def test_from_weights_takes_the_block_lr_weights(tmp_path):
    unet, tes = components("sd1")
    LoRANetwork.create(unet, tes, "sd1", NetworkConfig(dim=2)).save(tmp_path / "a.safetensors")
    blocks = {"up_lr_weight": csv([0.5] * 12)}
    net = LoRANetwork.from_weights(tmp_path / "a.safetensors", unet, tes, "sd1", cfg=NetworkConfig(dim=2, blocks=blocks))
    lrs = {g["name"]: g["lr"] for g in net.param_groups(learning_rate=1e-3)}
    assert lrs["textencoder"] == 1e-3 and all(lr == pytest.approx(5e-4 if int(n[10:]) >= 13 else 1e-3)
                                              for n, lr in lrs.items() if n.startswith("unet_block"))


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message", [
    (["down_lr_weight=1,1,1"], "down_lr_weight: 3 values, but this needs 12 (SD 1.x/2.x)"),
    ([f"block_dims={csv([4] * 23)}"], "block_dims: 23 values, but this needs 25 (SD 1.x/2.x)"),
    (["mid_lr_weight=1,1,1"], "mid_lr_weight: 3 values, but this needs 1"),
    (["up_lr_weight=1,x,1,1,1,1,1,1,1,1,1,1"], "up_lr_weight: 'x' is not a number"),
    (["up_lr_weight=sawtooth"], "up_lr_weight=sawtooth: unknown preset 'sawtooth'"),
    (["down_lr_weight=sine+abc"], "'abc' after '+' is not a number"),
    ([f"block_dims={csv([4] * 24 + [2.5])}"], "block_dims: '2.5' is not a number"),
    (["block_lr_zero_threshold=low", "down_lr_weight=sine"], "block_lr_zero_threshold: 'low' is not a number"),
])
def test_bad_block_args_name_the_key_before_the_model_loads(tmp_path, tiny_sd1_checkpoint, args, message, monkeypatch):
    from loralab.models import loader

    monkeypatch.setattr(loader, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    img, _ = make_dataset(tmp_path, concepts=(("1_solo", 1),), reg=False)
    with pytest.raises(LoralabError, match=re.escape(message)):
        build_config(None, {**base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out"), "network_args": args})


def test_lengths_are_checked_against_the_models_family(tmp_path, tiny_sdxl_checkpoint):  # noqa: F811
    img, _ = make_dataset(tmp_path, concepts=(("1_solo", 1),), reg=False)
    values = base_cfg(tiny_sdxl_checkpoint, img, tmp_path / "out")
    with pytest.raises(LoralabError, match=re.escape("down_lr_weight: 12 values, but this needs 9 (SDXL)")):
        build_config(None, {**values, "network_args": [f"down_lr_weight={csv([1] * 12)}"]})
    cfg = build_config(None, {**values, "network_args": [f"down_lr_weight={csv([1] * 9)}", "mid_lr_weight=1,0,1",
                                                          f"block_dims={csv([4] * 23)}"]})
    assert cfg.network_config().blocks["mid_lr_weight"] == "1,0,1"


def test_without_a_known_family_each_length_fits_one_family():
    assert block_problems({"down_lr_weight": csv([1] * 9)}) == []  # SDXL's length
    assert block_problems({"down_lr_weight": csv([1] * 12), "block_dims": csv([4] * 25)}) == []
    (problem,) = block_problems({"down_lr_weight": csv([1] * 12), "block_dims": csv([4] * 23)})
    assert "different model families" in problem
    (problem,) = block_problems({"down_lr_weight": csv([1] * 10)})
    assert "10 values, but this needs 12 (SD 1.x/2.x) or 9 (SDXL)" in problem
    with pytest.raises(LoralabError, match="block_dims: 25 values, but this needs 23"):
        block_plan({"block_dims": csv([4] * 25)}, "sdxl", 4, 1.0, None, None)


def test_block_args_belong_to_networks_lora(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_solo", 1),), reg=False)
    values = base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", network_module="lycoris.kohya")
    with pytest.raises(LoralabError, match="down_lr_weight: block-wise dims and learning rates are kohya's "
                                           "networks.lora options"):
        build_config(None, {**values, "network_args": ["algo=loha", "down_lr_weight=sine"]})


# ---------------------------------------------------------------------------------------- end to end


def test_two_step_training_with_block_args(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_solo", 2),), reg=False)
    dims = [2] * 12 + [6] + [3] * 12
    args = ["down_lr_weight=0,0,0,0,1,1,1,1,1,1,1,1", "mid_lr_weight=0.5", "up_lr_weight=cosine+.25",
            f"block_dims={csv(dims)}", "conv_block_dims=" + csv([1] * 25), "loraplus_unet_lr_ratio=4"]
    cfg = build_config(None, {**base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_steps=2,
                                         text_encoder_lr="5e-4"), "network_args": args})
    result = train(cfg)
    steps = [json.loads(line) for line in result.log_file.read_text().splitlines() if '"kind": "step"' in line]
    assert len(steps) == 2
    cos = [math.sin(math.pi / 2 * i / 11) + 0.25 for i in range(12)][::-1]
    for rec in steps:
        assert rec["lr/unet_block12"] == pytest.approx(5e-4) and rec["lr/textencoder"] == pytest.approx(5e-4)
        assert rec["lr/unet_block13"] == pytest.approx(1e-3 * cos[0])
        assert rec["lr/unet_block13 plus"] == pytest.approx(4e-3 * cos[0])
        assert rec["lr/unet_block4"] == pytest.approx(1e-3) and not any(f"lr/unet_block{k}" in rec for k in (1, 2, 3))
    with safe_open(str(result.final_file), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        md = f.metadata()
    unet, _ = components("sd1")
    weights = [0.0] * 4 + [1.0] * 8 + [0.5] + cos
    assert {k: v for k, v in shapes.items() if k.startswith("lora_unet_")} == \
        expected_file(unet, "sd1", dims, [2.0] * 25, [1] * 25, weights)
    assert json.loads(md["ss_network_args"])["down_lr_weight"] == "0,0,0,0,1,1,1,1,1,1,1,1"
    # the file continues as the modules it holds
    net = LoRANetwork.from_weights(result.final_file, unet, components("sd1")[1], "sd1")
    assert {m.lora_name for m in net.unet_loras} == {k.split(".")[0] for k in shapes if k.startswith("lora_unet_")}


def test_sdxl_training_with_block_args(tmp_path, tiny_sdxl_checkpoint):  # noqa: F811
    img, _ = make_dataset(tmp_path, concepts=(("1_solo", 2),), reg=False)
    args = [f"down_lr_weight={csv([0] * 5 + [1] * 4)}", "mid_lr_weight=0,1,0", "up_lr_weight=sine"]
    cfg = build_config(None, {**base_cfg(tiny_sdxl_checkpoint, img, tmp_path / "out", max_train_steps=2,
                                         network_train_unet_only="true"), "network_args": args})
    result = train(cfg)
    with safe_open(str(result.final_file), "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
    blocks = {kohya_block(n, "sdxl") for n in names}
    # the tiny SDXL's transformers sit in input_blocks 4, 5, middle_block 1, output_blocks 0-2: IN04 is off, and
    # OUT00 (sine starts at 0)
    assert blocks == {6, 11, 14, 15}


# ---------------------------------------------------------------------------------------- GUI, help, dry run


def test_gui_block_fields_convert_and_build(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_solo", 1),), reg=False)
    doc = {"LoRA_type": "Standard", "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": 5e-5, "epoch": 1,
           "max_train_steps": 0, "lr_warmup": 0, "sdxl": False, "down_lr_weight": "sine+.5", "mid_lr_weight": "1.5",
           "up_lr_weight": "cosine+.5", "block_lr_zero_threshold": "0.1", "block_dims": csv([4] * 25),
           "block_alphas": "", "conv_block_dims": "", "conv_block_alphas": ""}
    c = gui_to_kohya(doc, "x.json")
    assert c.keys["network_args"] == ["down_lr_weight=sine+.5", "mid_lr_weight=1.5", "up_lr_weight=cosine+.5",
                                      "block_lr_zero_threshold=0.1", f"block_dims={csv([4] * 25)}"]
    keys = {**c.keys, "pretrained_model_name_or_path": str(tiny_sd1_checkpoint), "train_data_dir": str(img),
            "output_dir": str(tmp_path / "out")}
    cfg = build_config(None, keys)
    assert cfg.network_config().blocks["up_lr_weight"] == "cosine+.5"
    # kohya's networks.dylora reads no block field: the GUI's DyLoRA type drops them with a note
    c = gui_to_kohya(doc | {"LoRA_type": "Kohya DyLoRA", "unit": 2}, "x.json")
    assert "unit=2" in c.keys["network_args"] and not [a for a in c.keys["network_args"] if "lr_weight" in a or "block" in a]
    assert dict(c.dropped)["down_lr_weight"].startswith("LoRA_type \"Kohya DyLoRA\": kohya's networks.dylora ignores")


def test_help_shows_the_block_numbering(capsys):
    assert cli_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "SD 1.x / 2.x, 25 blocks" in out and "SDXL, 23 blocks" in out and "down_lr_weight 9 values" in out


def test_dry_run_lists_the_blocks(tmp_path, tiny_sd1_checkpoint, capsys):
    img, _ = make_dataset(tmp_path, concepts=(("1_solo", 1),), reg=False)
    toml = tmp_path / "c.toml"
    toml.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out").items())
                    + '\nnetwork_args = ["up_lr_weight=zeros+.5", "mid_lr_weight=0"]\n')
    assert cli_main(["train", "--config", str(toml), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 MID    dim 0, alpha 2, lr x 0" in out and "13 OUT00  dim 4, alpha 2, lr x 0.5" in out
