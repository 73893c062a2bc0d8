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


# ------------------------------------------------------------------ the schedulers kohya adds, by hand
def test_cosine_with_min_lr_by_hand():
    # kohya passes num_cycles/2 to transformers: lr · (m + (1 − m) · ½(1 + cos(π · num_cycles · p)))
    def expected(p, m=0.1, cycles=1):
        return 2.0 * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * cycles * p)))

    kw = dict(warmup=10, total=100, min_lr_ratio=0.1)
    assert lr_at("cosine_with_min_lr", 5, **kw) == pytest.approx(2.0 * 5 / 10)  # warmup from 0
    assert lr_at("cosine_with_min_lr", 55, **kw) == pytest.approx(expected(45 / 90)) == pytest.approx(1.1)
    assert lr_at("cosine_with_min_lr", 100, **kw) == pytest.approx(0.2)  # lr · min_lr_ratio at the end
    assert lr_at("cosine_with_min_lr", 55, num_cycles=2, **kw) == pytest.approx(expected(0.5, cycles=2))
    assert lr_at("cosine_with_min_lr", 100, num_cycles=2, **kw) == pytest.approx(2.0)  # one full wave
    assert lr_at("cosine_with_min_lr", 55, warmup=10, total=100) == pytest.approx(1.0)  # no ratio: plain cosine


def test_inverse_sqrt_by_hand():
    # after the warmup w: lr / sqrt((t − w + s) / s); s = lr_scheduler_timescale, by default w (kohya: None)
    assert lr_at("inverse_sqrt", 5, warmup=10, total=100) == pytest.approx(1.0)
    assert lr_at("inverse_sqrt", 40, warmup=10, total=100) == pytest.approx(2.0 / math.sqrt(40 / 10))
    assert lr_at("inverse_sqrt", 40, warmup=10, total=100, timescale=5) == pytest.approx(2.0 / math.sqrt(35 / 5))
    p = torch.nn.Parameter(torch.zeros(1))
    sched = create_scheduler("inverse_sqrt", torch.optim.SGD([p], lr=2.0), warmup_steps=0, total_steps=10)
    assert 2.0 * sched.lr_lambdas[0](30_000) == pytest.approx(1.0)  # no warmup: s = 10000 (transformers)


def test_warmup_stable_decay_by_hand():
    # warmup w from lr·m, stable, decay over d as m + (1 − m)·½(1 + cos(π q)), then lr·m (m = min_lr_ratio)
    kw = dict(warmup=10, total=100, decay_steps=20, min_lr_ratio=0.1)
    assert lr_at("warmup_stable_decay", 0, **kw) == pytest.approx(0.2)
    assert lr_at("warmup_stable_decay", 5, **kw) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lr_at("warmup_stable_decay", 50, **kw) == pytest.approx(2.0)
    assert lr_at("warmup_stable_decay", 79, **kw) == pytest.approx(2.0)  # stable: 100 − 10 − 20 = 70 steps
    assert lr_at("warmup_stable_decay", 90, **kw) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lr_at("warmup_stable_decay", 100, **kw) == pytest.approx(0.2)
    with pytest.raises(LoralabError, match="lr_decay_steps"):
        lr_at("warmup_stable_decay", 0, warmup=60, total=100, decay_steps=50)


def test_piecewise_constant_and_scheduler_args_by_hand():
    rules = {"step_rules": "1:10,0.1:20,0.01"}  # ×1 before step 10, ×0.1 before step 20, then ×0.01
    values = [lr_at("piecewise_constant", t, warmup=0, total=100, scheduler_args=rules) for t in (5, 15, 25)]
    assert values == pytest.approx([2.0, 0.2, 0.02])
    with pytest.raises(LoralabError, match="step_rules"):
        lr_at("piecewise_constant", 0, warmup=0, total=100)
    # lr_scheduler_args reach the schedule function: transformers' cosine num_cycles=1.0 is one full wave,
    # polynomial's lr_end the floor: (lr − end)(1 − p)^power + end
    assert lr_at("cosine", 50, warmup=0, total=100, scheduler_args={"num_cycles": 1.0}) == pytest.approx(0.0, abs=1e-12)
    assert lr_at("polynomial", 50, warmup=0, total=100, scheduler_args={"lr_end": 0.5}) == pytest.approx(1.5 * 0.5 + 0.5)


@pytest.mark.parametrize("name, args, match", [
    ("cosine", {"bogus": 1}, "lr_scheduler_args.*bogus"),
    ("linear", {"num_warmup_steps": 3}, "lr_scheduler_args"),  # given twice: ours and the args'
    ("piecewise_constant", {"step_rules": "1:a,0.1"}, "lr_scheduler_args"),
])
def test_scheduler_args_refused_name_the_key(name, args, match):
    with pytest.raises(LoralabError, match=match):
        lr_at(name, 0, warmup=0, total=100, scheduler_args=args)


def test_lr_scheduler_type_builds_the_class_with_the_args():
    # kohya: a torch.optim.lr_scheduler class name or a dotted path, Class(optimizer, **lr_scheduler_args)
    args = {"T_max": 10, "eta_min": 0.0}
    assert lr_at("linear", 5, warmup=0, total=100, scheduler_type="CosineAnnealingLR", scheduler_args=args) == (
        pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 5 / 10))))
    step_lr = dict(scheduler_type="torch.optim.lr_scheduler.StepLR", scheduler_args={"step_size": 3, "gamma": 0.5})
    assert lr_at("constant", 7, warmup=0, total=100, **step_lr) == pytest.approx(2.0 * 0.5**2)


@pytest.mark.parametrize("scheduler_type, args, warmup, match", [
    ("StepLR", {"step_size": 3}, 5, "lr_warmup_steps"),
    ("NoSuchLR", {}, 0, "NoSuchLR"),
    ("no_such_module.Sched", {}, 0, "no_such_module"),
    ("StepLR", {"step_sise": 3}, 0, "lr_scheduler_args.*step_sise"),
    ("ReduceLROnPlateau", {}, 0, "metrics"),
])
def test_lr_scheduler_type_errors(scheduler_type, args, warmup, match):
    with pytest.raises(LoralabError, match=match):
        lr_at("constant", 0, warmup=warmup, total=100, scheduler_type=scheduler_type, scheduler_args=args)


@pytest.mark.parametrize("value, expected", [(0.2, 200), ("20%", 200), (150, 150), (0, 0)])
def test_decay_steps_follow_the_warmup_rule(value, expected):
    assert resolve_warmup_steps(value, 1000, key="lr_decay_steps") == expected
    with pytest.raises(LoralabError, match="lr_decay_steps"):
        resolve_warmup_steps(-3, 1000, key="lr_decay_steps")


def test_build_optimizer_reads_the_config_keys(caplog):
    from loralab.config import TrainConfig
    from loralab.train.optim import build_optimizer

    cfg = TrainConfig(learning_rate=2.0, optimizer_type="SGD", lr_scheduler="warmup_stable_decay",
                      lr_warmup_steps=0.1, lr_decay_steps=20.0, lr_scheduler_min_lr_ratio=0.1,
                      lr_scheduler_args=["warmup_type='linear'", "decay_type=linear"])
    with caplog.at_level(logging.WARNING, logger="loralab.train"):
        opt, desc, sched = build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 100)
    assert "float >= 1" not in caplog.text  # the config's 20.0 is the step count it was written as
    for _ in range(90):
        opt.step()
        sched.step()
    assert desc == "torch.optim.sgd.SGD" and sched.get_last_lr()[0] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    cfg = TrainConfig(learning_rate=2.0, lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=1", "gamma=0.5"])
    opt, _, sched = build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 100)
    opt.step()
    sched.step()
    assert sched.get_last_lr() == [pytest.approx(1.0)]
    with pytest.raises(LoralabError, match="lr_scheduler_args: entry 'gamma'"):
        build_optimizer(TrainConfig(lr_scheduler_type="StepLR", lr_scheduler_args=["gamma"]),
                        [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 100)


def test_fp16_grad_scaler_unscales_fp16_gradients():
    """full_fp16: torch's GradScaler refuses fp16 gradients; ours (kohya's patch) unscales them."""
    from loralab.train.optim import Fp16GradScaler, loss_scaler

    assert loss_scaler("bf16", False, "cpu") is None and loss_scaler("no", False, "cpu") is None
    assert type(loss_scaler("fp16", False, "cpu")) is torch.amp.GradScaler
    assert type(loss_scaler("fp16", True, "cpu")) is Fp16GradScaler
    for scaler, ok in ((torch.amp.GradScaler("cpu", init_scale=8.0), False), (Fp16GradScaler("cpu", init_scale=8.0), True)):
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
        opt = torch.optim.SGD([p], lr=0.5)
        scaler.scale((p.float() * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
        if not ok:
            with pytest.raises(ValueError, match="FP16"):
                scaler.unscale_(opt)
            continue
        scaler.unscale_(opt)
        assert p.grad.dtype == torch.float16 and torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]).half())
        scaler.step(opt)
        assert torch.equal(p.detach(), torch.tensor([0.5, 0.0, -0.5]).half())
