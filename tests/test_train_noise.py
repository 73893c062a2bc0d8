"""Noise, timesteps, targets and loss weighting against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from loralab.errors import LoralabError
from loralab.train.noise import (
    compute_snr,
    loss_per_sample,
    make_noisy_latents,
    min_snr_weight,
    noise_offset,
    prior_loss_weight,
    pyramid_noise_like,
    sample_timesteps,
    training_target,
)


def sd_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_noise_offset_adds_offset_times_per_channel_normal():
    noise = torch.randn(2, 4, 8, 8, generator=gen(1))
    out = noise_offset(noise, 0.1, generator=gen(7))
    g = gen(7)
    expected = noise + 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    assert torch.equal(out, expected)
    # the offset is constant over H, W
    diff = out - noise
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))


def test_noise_offset_random_strength_and_adaptive():
    noise = torch.randn(2, 4, 8, 8, generator=gen(1))
    latents = torch.randn(2, 4, 8, 8, generator=gen(2)) + 0.5
    out = noise_offset(noise, 0.1, random_strength=True, adaptive_noise_scale=0.05, latents=latents, generator=gen(3))
    g = gen(3)
    u = torch.rand((), generator=g).item()
    off = torch.clamp(0.1 * u + 0.05 * latents.mean(dim=(2, 3), keepdim=True).abs(), min=0)
    expected = noise + off * torch.randn(2, 4, 1, 1, generator=g)
    assert torch.allclose(out, expected)


def test_pyramid_noise_matches_step_by_step_hand_computation():
    b, c, h, w = 2, 4, 16, 16
    noise = torch.randn(b, c, h, w, generator=gen(0))
    original = noise.clone()
    out = pyramid_noise_like(noise, iterations=10, discount=0.3, generator=gen(5))
    assert torch.equal(noise, original)  # input untouched

    g = gen(5)
    acc = original.clone()
    levels = 0
    for i in range(10):
        r = torch.rand((), generator=g).item() * 2 + 2
        assert 2 <= r < 4
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        acc = acc + F.interpolate(torch.randn(b, c, hn, wn, generator=g), size=(h, w), mode="bilinear") * 0.3**i
        levels += 1
        if hn == 1 or wn == 1:
            break
    assert levels < 10  # 16 px reaches 1 px well before 10 levels: the break happened
    expected = acc / acc.std()
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)  # one global std


def test_sample_timesteps_range_and_errors():
    t = sample_timesteps(64, 100, 200, generator=gen(0))
    assert t.dtype == torch.long and t.shape == (64,)
    assert int(t.min()) >= 100 and int(t.max()) < 200
    assert torch.equal(sample_timesteps(3, 500, 500), torch.full((3,), 500))
    with pytest.raises(LoralabError, match="min_timestep"):
        sample_timesteps(2, 600, 500)


def test_make_noisy_latents_order_and_reproducibility():
    sched = sd_scheduler()
    latents = torch.randn(2, 4, 8, 8, generator=gen(9))
    kwargs = dict(noise_offset=0.1, multires_noise_iterations=3, multires_noise_discount=0.3, generator=None)
    n1, x1, t1 = make_noisy_latents(latents, sched, **{**kwargs, "generator": gen(4)})
    n2, x2, t2 = make_noisy_latents(latents, sched, **{**kwargs, "generator": gen(4)})
    assert torch.equal(n1, n2) and torch.equal(x1, x2) and torch.equal(t1, t2)

    # by hand, in kohya's order: randn, offset, pyramid, timesteps, add_noise
    g = gen(4)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    noise = noise_offset(noise, 0.1, generator=g)
    noise = pyramid_noise_like(noise, 3, 0.3, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    assert torch.equal(n1, noise) and torch.equal(t1, t)
    ac = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x1, ac.sqrt() * latents + (1 - ac).sqrt() * noise, atol=1e-6)


def test_ip_noise_only_changes_the_input_not_the_target():
    sched = sd_scheduler()
    latents = torch.randn(1, 4, 8, 8, generator=gen(1))
    n0, x0, t0 = make_noisy_latents(latents, sched, generator=gen(2))
    n1, x1, t1 = make_noisy_latents(latents, sched, ip_noise_gamma=0.1, generator=gen(2))
    assert torch.equal(n0, n1) and torch.equal(t0, t1)
    assert not torch.equal(x0, x1)


def test_v_target_is_velocity():
    sched = sd_scheduler()
    x0 = torch.randn(3, 4, 4, 4, generator=gen(1))
    eps = torch.randn(3, 4, 4, 4, generator=gen(2))
    t = torch.tensor([0, 499, 999])
    ac = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = training_target(sched, x0, eps, t, v_parameterization=True)
    assert torch.allclose(v, ac.sqrt() * eps - (1 - ac).sqrt() * x0, atol=1e-6)
    assert training_target(sched, x0, eps, t, v_parameterization=False) is eps


def test_min_snr_weights_by_hand():
    sched = sd_scheduler()
    t = torch.tensor([10, 300, 900])
    snr = compute_snr(sched, t)
    ac = sched.alphas_cumprod.double()
    for i, ti in enumerate(t.tolist()):
        s = (ac[ti] / (1 - ac[ti])).item()
        assert snr[i].item() == pytest.approx(s, rel=1e-4)
        w_eps = min_snr_weight(snr[i : i + 1], 5.0)[0].item()
        w_v = min_snr_weight(snr[i : i + 1], 5.0, v_prediction=True)[0].item()
        assert w_eps == pytest.approx(min(s, 5.0) / s, rel=1e-4)
        assert w_v == pytest.approx(min(s, 5.0) / (s + 1), rel=1e-4)
    # t=10 has snr >> 5 (weight < 1); t=900 has snr < 5 (ε weight exactly 1)
    assert min_snr_weight(snr, 5.0)[0] < 1 and min_snr_weight(snr, 5.0)[2] == 1


def test_loss_per_sample_prior_weight_and_min_snr():
    sched = sd_scheduler()
    pred = torch.zeros(3, 4, 2, 2)
    target = torch.stack([torch.full((4, 2, 2), v) for v in (1.0, 2.0, 3.0)])
    weights = prior_loss_weight([False, True, False], 0.5)
    assert weights.tolist() == [1.0, 0.5, 1.0]
    loss = loss_per_sample(pred, target, loss_weights=weights)
    assert loss.tolist() == pytest.approx([1.0, 2.0, 9.0])  # 4·0.5 only on the reg sample

    t = torch.tensor([10, 300, 900])
    snr = compute_snr(sched, t)
    for v_pred in (False, True):
        l2 = loss_per_sample(
            pred, target, loss_weights=weights, timesteps=t, scheduler=sched, min_snr_gamma=5, v_parameterization=v_pred
        )
        expected = torch.tensor([1.0, 2.0, 9.0]) * torch.tensor(
            [min(s, 5) / ((s + 1) if v_pred else s) for s in snr.tolist()]
        )
        assert torch.allclose(l2, expected, rtol=1e-5)
    assert math.isclose(loss.mean().item(), 4.0)
