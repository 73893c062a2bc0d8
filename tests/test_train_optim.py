"""Optimizer args, optimizers, schedulers, warmup and the logged learning rates."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from loralab.errors import LoralabError
from loralab.train.optim import (
    create_optimizer,
    create_scheduler,
    current_lrs,
    parse_optimizer_args,
    resolve_warmup_steps,
)

PRODIGY_ARGS = (
    "decouple=True weight_decay=0.01 d_coef=0.8 use_bias_correction=True safeguard_warmup=True betas=0.9,0.99"
)


@pytest.mark.parametrize(
    "args, expected",
    [
        (None, {}),
        ("", {}),
        ([], {}),
        (
            PRODIGY_ARGS,
            dict(
                decouple=True,
                weight_decay=0.01,
                d_coef=0.8,
                use_bias_correction=True,
                safeguard_warmup=True,
                betas=(0.9, 0.99),
            ),
        ),
        (["weight_decay=0.1", "betas=(0.9, 0.999)"], {"weight_decay": 0.1, "betas": (0.9, 0.999)}),
        ("betas=0.9, 0.99 eps=1e-8", {"betas": (0.9, 0.99), "eps": 1e-8}),  # GUI split on whitespace, re-glued
        ("decay_type=cosine name='a b'", {"decay_type": "cosine", "name": "a b"}),  # unquoted word kept as str
        ("decouple=true foreach=None x=false", {"decouple": True, "foreach": None, "x": False}),
        (["step_rules='1:10,0.1:20'"], {"step_rules": "1:10,0.1:20"}),  # such strings need quotes
        ("momentum=0.9,", {"momentum": (0.9,)}),  # trailing comma gives a tuple (kohya)
        ({"weight_decay": 0.01}, {"weight_decay": 0.01}),
        (["expr='a=b'"], {"expr": "a=b"}),  # split on the first '=' only
    ],
)
def test_parse_optimizer_args(args, expected):
    assert parse_optimizer_args(args) == expected


@pytest.mark.parametrize(
    "bad, entry",
    [
        ("weight_decay", "weight_decay"),
        ("=0.1", "=0.1"),
        ("weight_decay=", "weight_decay="),
        (["w d=1"], "w d=1"),
        (["step_rules=1:10,0.1:20"], "step_rules=1:10,0.1:20"),  # neither a literal nor a bare word
        ("betas=0.9,,0.99", "betas=0.9,,0.99"),
    ],
)
def test_parse_optimizer_args_malformed(bad, entry):
    with pytest.raises(LoralabError, match="optimizer_args") as info:
        parse_optimizer_args(bad)
    assert entry in str(info.value)


def tiny_params(device: str = "cpu") -> list[dict]:
    torch.manual_seed(0)
    te = torch.nn.Parameter(torch.randn(8, 8))
    unet = torch.nn.Parameter(torch.randn(64, 80))  # 5120 elements ≥ bitsandbytes' min_8bit_size (4096)
    return [{"params": [te], "lr": 1.0, "name": "textencoder"}, {"params": [unet], "lr": 1.0, "name": "unet"}]


def one_step(optimizer: torch.optim.Optimizer) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    loss = sum((p**2).sum() for p in params)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize(
    "name, lr, args, desc_prefix",
    [
        ("", 1e-3, {}, "torch.optim.adamw.AdamW"),
        ("adamw", 1e-3, {"weight_decay": 0.01}, "torch.optim.adamw.AdamW(weight_decay=0.01)"),
        ("AdamW8bit", 1e-3, {}, "bitsandbytes.optim.adamw.AdamW8bit"),
        ("Lion", 1e-4, {}, "lion_pytorch."),
        ("SGDNesterov", 1e-2, {}, "torch.optim.sgd.SGD(momentum=0.9)"),
        ("Prodigy", 1.0, parse_optimizer_args(PRODIGY_ARGS), "prodigyopt.prodigy.Prodigy(decouple=True,"),
        ("DAdaptation", 1.0, {}, "dadaptation.experimental."),
        ("DAdaptAdam", 1.0, {}, "dadaptation.dadapt_adam.DAdaptAdam"),
        ("DAdaptLion", 1.0, {}, "dadaptation.dadapt_lion.DAdaptLion"),
        ("DAdaptSGD", 1.0, {"d0": 1e-3}, "dadaptation.dadapt_sgd.DAdaptSGD(d0=0.001)"),  # d0=1e-6: moves < fp32 ulp
        ("DAdaptAdaGrad", 1.0, {}, "dadaptation.dadapt_adagrad.DAdaptAdaGrad"),
        ("DAdaptAdan", 1.0, {}, "dadaptation.dadapt_adan.DAdaptAdan"),
        ("Adafactor", 1e-3, {}, "transformers.optimization.Adafactor(relative_step=True)"),
        ("Adafactor", 1e-3, {"relative_step": False, "scale_parameter": False}, "transformers.optimization.Adafactor"),
        ("RAdam", 1e-3, {}, "torch.optim.radam.RAdam"),
        ("torch.optim.Adam", 1e-3, {}, "torch.optim.adam.Adam"),
    ],
)
def test_each_optimizer_constructs_and_steps(name, lr, args, desc_prefix):
    opt, desc = create_optimizer(name, tiny_params(), lr, args)
    assert desc.startswith(desc_prefix), desc
    sched = create_scheduler("constant", opt, warmup_steps=0, total_steps=10)
    one_step(opt)
    sched.step()
    lrs = current_lrs(opt, sched)
    assert "lr/unet" in lrs and "lr/textencoder" in lrs
    if name.lower().startswith("dadapt") or name == "Prodigy":
        assert "lr/d*lr/unet" in lrs
        group = opt.param_groups[1]
        assert lrs["lr/d*lr/unet"] == pytest.approx(group["d"] * group["lr"])


def test_prodigy_description_and_kwargs():
    opt, desc = create_optimizer("prodigy", tiny_params(), 1.0, parse_optimizer_args(PRODIGY_ARGS))
    assert desc == (
        "prodigyopt.prodigy.Prodigy(decouple=True,weight_decay=0.01,d_coef=0.8,use_bias_correction=True,"
        "safeguard_warmup=True,betas=(0.9, 0.99))"
    )
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["d_coef"] == 0.8


def test_adaptive_low_lr_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="loralab.train.optim"):
        create_optimizer("Prodigy", [torch.nn.Parameter(torch.zeros(2))], 1e-4, {})
    assert "too low" in caplog.text


def test_unknown_optimizer_and_unknown_kwarg():
    with pytest.raises(LoralabError, match="Prodigy.*DAdaptAdam|DAdaptAdam.*Prodigy"):
        create_optimizer("Prodigyy", tiny_params(), 1.0, {})
    with pytest.raises(LoralabError, match="d_coeff.*accepts:.*d_coef"):
        create_optimizer("Prodigy", tiny_params(), 1.0, {"d_coeff": 0.8})
    with pytest.raises(LoralabError, match="no_such_module"):
        create_optimizer("no_such_module.Opt", tiny_params(), 1.0, {})
    with pytest.raises(LoralabError, match="learning_rate"):
        create_optimizer("AdamW", tiny_params(), 1.0, {"lr": 0.1})


def test_caller_groups_are_not_mutated_by_adafactor():
    groups = tiny_params()
    opt, _ = create_optimizer("Adafactor", groups, 1e-3, {})
    assert groups[0]["lr"] == 1.0
    sched = create_scheduler("adafactor", opt, warmup_steps=0, total_steps=10, initial_lr=1e-3)
    assert current_lrs(opt, sched)["lr/unet"] == pytest.approx(1e-3)
    with pytest.raises(LoralabError, match="lr_warmup_steps"):
        create_scheduler("constant", opt, warmup_steps=5, total_steps=10)


def lr_at(name: str, step: int, *, warmup: int, total: int, **kw) -> float:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = create_scheduler(name, opt, warmup_steps=warmup, total_steps=total, **kw)
    for _ in range(step):
        opt.step()
        sched.step()
    return sched.get_last_lr()[0]


def test_scheduler_values_by_hand():
    base = 2.0
    # warmup: lr·t/warmup
    assert lr_at("constant_with_warmup", 0, warmup=10, total=100) == 0.0
    assert lr_at("constant_with_warmup", 5, warmup=10, total=100) == pytest.approx(base * 5 / 10)
    assert lr_at("constant_with_warmup", 50, warmup=10, total=100) == pytest.approx(base)
    assert lr_at("constant", 37, warmup=0, total=100) == pytest.approx(base)
    # linear: lr·(1 − p), p = (t − w)/(T − w)
    assert lr_at("linear", 55, warmup=10, total=100) == pytest.approx(base * (1 - 45 / 90))
    # cosine: lr·½(1 + cos(π p))
    assert lr_at("cosine", 3, warmup=10, total=100) == pytest.approx(base * 0.3)
    assert lr_at("cosine", 40, warmup=10, total=100) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 30 / 90)))
    assert lr_at("cosine", 100, warmup=10, total=100) == pytest.approx(0.0, abs=1e-12)
    # cosine_with_restarts: ½(1 + cos(π ((c·p) mod 1)))
    p = 60 / 100
    assert lr_at("cosine_with_restarts", 60, warmup=0, total=100, num_cycles=2) == pytest.approx(
        base * 0.5 * (1 + math.cos(math.pi * ((2 * p) % 1)))
    )
    # polynomial: (lr − 1e-7)(1 − p)^power + 1e-7
    assert lr_at("polynomial", 50, warmup=0, total=100, power=2.0) == pytest.approx((base - 1e-7) * 0.25 + 1e-7)


def test_scheduler_errors():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    with pytest.raises(LoralabError, match="constant_with_warmup"):
        create_scheduler("constant", opt, warmup_steps=10, total_steps=100)
    with pytest.raises(LoralabError, match="cosine_with_restarts"):
        create_scheduler("cosine_restarts", opt, warmup_steps=0, total_steps=100)
    assert create_scheduler(None, opt, warmup_steps=0, total_steps=100).get_last_lr() == [1.0]


@pytest.mark.parametrize(
    "value, expected",
    [(None, 0), (0, 0), (100, 100), (0.1, 100), ("10%", 100), ("0.05", 50), ("250", 250), (250.0, 250), (0.0, 0)],
)
def test_resolve_warmup_steps(value, expected):
    assert resolve_warmup_steps(value, 1000) == expected


def test_resolve_warmup_float_step_count_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="loralab.train.optim"):
        assert resolve_warmup_steps(100.0, 1000) == 100
    assert "kohya" in caplog.text


@pytest.mark.parametrize("bad", [-1, 1.5, "150%", "ten", True])
def test_resolve_warmup_steps_errors(bad):
    with pytest.raises(LoralabError, match="lr_warmup_steps"):
        resolve_warmup_steps(bad, 1000)
