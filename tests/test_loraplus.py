"""LoRA+ (kohya network_args loraplus_lr_ratio / loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio): the
lora_up weights train in their own "<part> plus" groups at lr x ratio."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.models.tiny import tiny_sd_components
from loralab.network.lora import LoRANetwork, NetworkConfig
from loralab.recipes.lora import train
from test_train import base_cfg, make_dataset

torch.set_num_threads(1)


def _names(groups):
    return [(g["name"], pytest.approx(g["lr"])) for g in groups]


def _ids(params):
    return [id(p) for p in params]


def _split(loras):
    """(lora_up weights, everything else) of these modules, in module order."""
    named = [(n, p) for m in loras for n, p in m.named_parameters()]
    return [p for n, p in named if "lora_up" in n], [p for n, p in named if "lora_up" not in n]


@pytest.fixture(scope="module")
def sd1_net():
    c = tiny_sd_components("sd1", seed=0)
    return LoRANetwork.create(c["unet"], [c["text_encoder"]], "sd1", NetworkConfig(dim=2, conv_dim=2))


@pytest.fixture(scope="module")
def sdxl_net():
    c = tiny_sd_components("sdxl", seed=0)
    return LoRANetwork.create(c["unet"], [c["text_encoder"], c["text_encoder_2"]], "sdxl", NetworkConfig(dim=2))


def test_ratios_off_leave_the_groups_exactly_as_before(sd1_net):
    plain = sd1_net.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5, learning_rate=1e-3)
    for off in (None, 0.0):
        groups = sd1_net.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5, learning_rate=1e-3,
                                      loraplus_unet_ratio=off, loraplus_text_encoder_ratio=off)
        assert [(g["name"], g["lr"]) for g in groups] == [(g["name"], g["lr"]) for g in plain]
        assert [_ids(g["params"]) for g in groups] == [_ids(g["params"]) for g in plain]
        assert [set(g) for g in groups] == [{"params", "lr", "name"}] * 2


def test_sd1_with_text_encoder_and_locon(sd1_net):
    net = sd1_net
    assert any(m.lora_down.weight.dim() == 4 and m.lora_down.weight.shape[-1] == 3 for m in net.unet_loras)  # LoCon
    groups = net.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5, learning_rate=1e-3,
                              loraplus_unet_ratio=16.0, loraplus_text_encoder_ratio=16.0)
    assert _names(groups) == [("textencoder", 5e-5), ("textencoder plus", 8e-4), ("unet", 1e-4), ("unet plus", 1.6e-3)]
    te_up, te_rest = _split(net.text_encoder_loras)
    unet_up, unet_rest = _split(net.unet_loras)
    assert _ids(groups[0]["params"]) == _ids(te_rest) and _ids(groups[1]["params"]) == _ids(te_up)
    assert _ids(groups[2]["params"]) == _ids(unet_rest) and _ids(groups[3]["params"]) == _ids(unet_up)
    assert len(unet_up) == len(net.unet_loras) and len(te_up) == len(net.text_encoder_loras)
    for g in groups:  # every lora_up in a plus group, every lora_down (and nothing else) elsewhere
        names = {n.rsplit(".", 2)[-2] for n, p in net.named_parameters() if id(p) in set(_ids(g["params"]))}
        assert names == ({"lora_up"} if g["name"].endswith(" plus") else {"lora_down"})
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert "alpha" not in dict(net.named_parameters())  # alpha is a buffer: in no group


def test_unet_only_and_per_part_ratios(sd1_net):
    net = sd1_net
    # UNet only (text encoder lr 0): its LoRA frozen, no text-encoder groups
    groups = net.param_groups(unet_lr=1e-4, text_encoder_lr=0, learning_rate=1e-3, loraplus_unet_ratio=16.0,
                              loraplus_text_encoder_ratio=16.0)
    assert _names(groups) == [("unet", 1e-4), ("unet plus", 1.6e-3)]
    assert not any(p.requires_grad for m in net.text_encoder_loras for p in m.parameters())
    # a ratio for one side only: the other side keeps its single group
    groups = net.param_groups(unet_lr=None, text_encoder_lr=None, learning_rate=1e-4, loraplus_unet_ratio=4.0)
    assert _names(groups) == [("textencoder", 1e-4), ("unet", 1e-4), ("unet plus", 4e-4)]
    groups = net.param_groups(unet_lr=None, text_encoder_lr=None, learning_rate=1e-4, loraplus_text_encoder_ratio=2.0)
    assert _names(groups) == [("textencoder", 1e-4), ("textencoder plus", 2e-4), ("unet", 1e-4)]


def test_sdxl_two_text_encoder_lrs(sdxl_net):
    net = sdxl_net
    groups = net.param_groups(unet_lr=1e-4, text_encoder_lr=[1e-5, 2e-5], learning_rate=1e-3,
                              loraplus_unet_ratio=16.0, loraplus_text_encoder_ratio=8.0)
    assert _names(groups) == [("textencoder1", 1e-5), ("textencoder1 plus", 8e-5), ("textencoder2", 2e-5),
                              ("textencoder2 plus", 1.6e-4), ("unet", 1e-4), ("unet plus", 1.6e-3)]
    te1 = [m for m in net.text_encoder_loras if m.lora_name.startswith("lora_te1_")]
    te2 = [m for m in net.text_encoder_loras if m.lora_name.startswith("lora_te2_")]
    expected = [*reversed(_split(te1)), *reversed(_split(te2)), *reversed(_split(net.unet_loras))]
    assert [_ids(g["params"]) for g in groups] == [_ids(e) for e in expected]
    # one encoder at 0: only the other one's two groups
    groups = net.param_groups(unet_lr=1e-4, text_encoder_lr=[0.0, 2e-5], learning_rate=1e-3,
                              loraplus_text_encoder_ratio=8.0)
    assert _names(groups) == [("textencoder2", 2e-5), ("textencoder2 plus", 1.6e-4), ("unet", 1e-4)]


# ------------------------------------------------------------------------------------- config


@pytest.fixture
def paths(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")  # not a model: a config refused here never got as far as loading it
    (tmp_path / "data").mkdir()
    return {"pretrained_model_name_or_path": str(model), "train_data_dir": str(tmp_path / "data")}


def test_keys_from_toml_and_network_args(paths, tmp_path):
    cfg = build_config(None, paths)
    assert cfg.loraplus_lr_ratio == 0.0 and cfg.loraplus_ratios() == (None, None)
    assert "loraplus_lr_ratio" not in cfg.network_options()  # off: ss_network_args as before

    toml = tmp_path / "c.toml"
    toml.write_text("loraplus_lr_ratio = 16\nloraplus_text_encoder_lr_ratio = 4\n")
    cfg = build_config(toml, paths)
    assert cfg.loraplus_lr_ratio == 16.0 and cfg.loraplus_ratios() == (16.0, 4.0)

    toml.write_text('network_args = ["conv_dim=4", "loraplus_lr_ratio=16", "loraplus_unet_lr_ratio=8"]\n'
                    "loraplus_lr_ratio = 2\n")
    cfg = build_config(toml, paths)
    assert cfg.loraplus_ratios() == (8.0, 16.0)  # network_args win; the per-part ratio overrides
    assert cfg.network_options()["loraplus_lr_ratio"] == 16.0 and cfg.network_options()["conv_dim"] == 4


@pytest.mark.parametrize("values", [
    {"loraplus_lr_ratio": "-1"},
    {"loraplus_unet_lr_ratio": "-16"},
    {"loraplus_text_encoder_lr_ratio": "nan"},
    {"network_args": ["loraplus_lr_ratio=-2"]},
])
def test_bad_ratios_refused_before_the_model_loads(paths, values):
    with pytest.raises(LoralabError, match="loraplus_.*ratio.*0 \\(off\\) or more"):
        build_config(None, {**paths, **values})


def test_network_args_ratio_must_be_a_number(paths):
    with pytest.raises(LoralabError, match="needs a number"):
        build_config(None, {**paths, "network_args": ["loraplus_lr_ratio=big"]})


# ------------------------------------------------------------------------------------- end to end


def test_training_run_logs_plus_lrs_and_writes_metadata(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("1_solo", 2),), reg=False)
    values = base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_steps=2, text_encoder_lr="5e-4")
    cfg = build_config(None, {**values, "network_args": ["loraplus_lr_ratio=16"]})
    result = train(cfg)
    steps = [json.loads(line) for line in result.log_file.read_text().splitlines() if '"kind": "step"' in line]
    assert len(steps) == 2
    for rec in steps:
        assert rec["lr/unet plus"] == pytest.approx(16 * rec["lr/unet"]) and rec["lr/unet"] == pytest.approx(1e-3)
        assert rec["lr/textencoder plus"] == pytest.approx(16 * rec["lr/textencoder"])
        assert rec["lr/textencoder"] == pytest.approx(5e-4)
    with safe_open(str(result.final_file), "pt") as f:
        md = f.metadata()
    # kohya keeps the ratios in network_args, so they travel in ss_network_args
    assert float(json.loads(md["ss_network_args"])["loraplus_lr_ratio"]) == 16.0
