"""Noise, timesteps, targets and loss weighting against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from loralab.errors import LoralabError
from loralab.train.noise import (
    LossOptions,
    compute_snr,
    debiased_estimation_weight,
    elementwise_loss,
    loss_per_sample,
    make_noisy_latents,
    min_snr_weight,
    noise_offset,
    prior_loss_weight,
    pyramid_noise_like,
    sample_timesteps,
    scheduled_huber_c,
    training_target,
    v_pred_like_noise_pred_scale,
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
        l2 = loss_per_sample(pred, target, loss_weights=weights, timesteps=t, scheduler=sched,
                             options=LossOptions(min_snr_gamma=5), v_parameterization=v_pred)
        expected = torch.tensor([1.0, 2.0, 9.0]) * torch.tensor(
            [min(s, 5) / ((s + 1) if v_pred else s) for s in snr.tolist()]
        )
        assert torch.allclose(l2, expected, rtol=1e-5)
    assert math.isclose(loss.mean().item(), 4.0)


# ------------------------------------------------------------- loss types, zero terminal SNR, SNR weights
def ztsnr_scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, rescale_betas_zero_snr=True)


def test_l2_is_bit_identical_to_the_previous_formula():
    sched = sd_scheduler()
    pred = torch.randn(3, 4, 8, 8, generator=gen(1)).half()
    target = torch.randn(3, 4, 8, 8, generator=gen(2))
    weights = prior_loss_weight([False, True, False], 0.7)
    t = torch.tensor([0, 321, 999])
    ac = sched.alphas_cumprod.float()
    snr = ((ac.sqrt() / (1.0 - ac).sqrt()) ** 2)[t]
    for v_pred in (False, True):
        before = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3]) * weights
        before = before * (snr.clamp(max=5.0) / ((snr + 1) if v_pred else snr))
        now = loss_per_sample(pred, target, loss_weights=weights, timesteps=t, scheduler=sched,
                              options=LossOptions(min_snr_gamma=5.0), v_parameterization=v_pred)
        assert torch.equal(now, before)
    plain = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    assert torch.equal(loss_per_sample(pred, target), plain)


def test_elementwise_losses_by_hand():
    d = [0.0, 0.05, -0.3, 1.0, -4.0]
    pred = torch.tensor(d).view(1, 1, 1, 5).repeat(2, 1, 1, 1)
    target = torch.zeros_like(pred)
    c = torch.tensor([0.1, 0.5])
    huber = elementwise_loss(pred, target, "huber", c)
    smooth = elementwise_loss(pred, target, "smooth_l1", c)
    for i, ci in enumerate(c.tolist()):
        for j, dj in enumerate(d):
            assert huber[i, 0, 0, j].item() == pytest.approx(2 * ci * (math.sqrt(dj**2 + ci**2) - ci), abs=1e-6)
            assert smooth[i, 0, 0, j].item() == pytest.approx(2 * (math.sqrt(dj**2 + ci**2) - ci), abs=1e-6)
    assert torch.equal(elementwise_loss(pred, target, "l1"), pred.abs())
    assert torch.equal(elementwise_loss(pred, target, "l2"), pred**2)
    # pseudo-Huber: about d² for |d| << c, about 2c·|d| for |d| >> c
    assert huber[1, 0, 0, 1].item() == pytest.approx(0.05**2, rel=0.01)
    assert huber[0, 0, 0, 4].item() == pytest.approx(2 * 0.1 * 4.0, rel=0.03)
    with pytest.raises(ValueError):
        elementwise_loss(pred, target, "huber")  # no c
    with pytest.raises(ValueError):
        elementwise_loss(pred, target, "l3")


def test_scheduled_huber_c_per_schedule_by_hand():
    sched = sd_scheduler()
    t = torch.tensor([0, 500, 999])
    const = scheduled_huber_c(sched, t, 0.1, "constant", 2.0)
    assert const.tolist() == pytest.approx([0.2, 0.2, 0.2])
    expo = scheduled_huber_c(sched, t, 0.1, "exponential", 2.0)  # 2 · exp(ln(0.1)·t/1000) = 2 · 0.1^(t/1000)
    assert expo.tolist() == pytest.approx([2.0, 2 * 0.1**0.5, 2 * 0.1**0.999], rel=1e-5)
    snr_c = scheduled_huber_c(sched, t, 0.1, "snr", 2.0)  # huber_scale not applied (kohya)
    ac = sched.alphas_cumprod.double()
    for i, ti in enumerate(t.tolist()):
        sigma = math.sqrt((1 - ac[ti].item()) / ac[ti].item())
        assert snr_c[i].item() == pytest.approx(0.9 / (1 + sigma) ** 2 + 0.1, rel=1e-5)
    assert 0.94 < snr_c[0] < 0.96 and snr_c[2] < 0.11  # ≈1 at low noise, → huber_c at high noise
    # with zero terminal SNR the last σ is infinite: c = huber_c exactly
    assert scheduled_huber_c(ztsnr_scheduler(), torch.tensor([999]), 0.1, "snr").item() == pytest.approx(0.1)
    with pytest.raises(ValueError):
        scheduled_huber_c(sched, t, 0.1, "linear")


def test_loss_per_sample_huber_and_smooth_l1_use_the_timesteps_c():
    sched = sd_scheduler()
    pred = torch.randn(2, 4, 4, 4, generator=gen(3))
    target = torch.randn(2, 4, 4, 4, generator=gen(4))
    t = torch.tensor([50, 900])
    for loss_type in ("huber", "smooth_l1"):
        for schedule in ("constant", "exponential", "snr"):
            opts = LossOptions(loss_type=loss_type, huber_c=0.2, huber_schedule=schedule, huber_scale=1.5)
            got = loss_per_sample(pred, target, timesteps=t, scheduler=sched, options=opts)
            c = scheduled_huber_c(sched, t, 0.2, schedule, 1.5).view(2, 1, 1, 1)
            per = torch.sqrt((pred - target) ** 2 + c**2) - c
            per = 2 * c * per if loss_type == "huber" else 2 * per
            assert torch.allclose(got, per.mean(dim=[1, 2, 3]), rtol=1e-6)
    got = loss_per_sample(pred, target, options=LossOptions(loss_type="l1"))
    assert torch.allclose(got, (pred - target).abs().mean(dim=[1, 2, 3]))
    with pytest.raises(ValueError, match="timesteps"):
        loss_per_sample(pred, target, options=LossOptions(loss_type="huber"))


def test_zero_terminal_snr_betas(caplog):
    from loralab.models.loader import BaseModel
    from loralab.train.sampling import make_sampler

    model = BaseModel(family="sd2", unet=None, vae=None, text_encoders=[], tokenizers=[], v_parameterization=True,
                      vae_scaling_factor=0.18215, source="", model_hash="")
    orig, fixed = model.noise_scheduler(), model.noise_scheduler(zero_terminal_snr=True)
    ac = fixed.alphas_cumprod
    assert ac[-1].item() == 0.0 and orig.alphas_cumprod[-1].item() > 0.004
    assert fixed.betas[0].item() == pytest.approx(orig.betas[0].item(), rel=1e-4) and fixed.betas[-1].item() == 1.0
    snr = ac / (1 - ac)
    assert bool((snr[1:] < snr[:-1]).all())  # strictly decreasing to 0
    # Lin et al. 2023 Algorithm 1 by hand (float64): shift sqrt(ᾱ) to end at 0, scale back to its first value
    a = torch.cumprod(1 - orig.betas.double(), 0).sqrt()
    a = (a - a[-1]) * a[0] / (a[0] - a[-1])
    assert torch.allclose(ac.double(), a**2, atol=1e-6)
    # training only: a sampler built from the training config keeps the original schedule (as kohya)
    sampler = make_sampler("ddim", dict(fixed.config))
    assert sampler.alphas_cumprod[-1].item() > 0.004
    # kohya warns without v-parameterization
    model.v_parameterization = False
    with caplog.at_level("WARNING"):
        model.noise_scheduler(zero_terminal_snr=True)
    assert "zero_terminal_snr" in caplog.text


def test_snr_weights_keep_the_schedule_before_the_zero_terminal_rescale():
    t = torch.tensor([0, 500, 999])
    assert torch.equal(compute_snr(ztsnr_scheduler(), t), compute_snr(sd_scheduler(), t))
    pred, target = torch.ones(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    for v_pred in (False, True):
        opts = LossOptions(min_snr_gamma=5, debiased_estimation_loss=True)
        loss = loss_per_sample(pred, target, timesteps=t, scheduler=ztsnr_scheduler(), options=opts,
                               v_parameterization=v_pred)
        assert torch.isfinite(loss).all()


def test_debiased_estimation_weight_by_hand():
    sched = sd_scheduler()
    t = torch.tensor([0, 10, 500, 999])
    snr = compute_snr(sched, t)
    assert snr[0] > 1000  # t=0 is capped
    for i, s in enumerate(snr.tolist()):
        capped = min(s, 1000.0)
        eps = debiased_estimation_weight(snr[i:i + 1])[0].item()
        v = debiased_estimation_weight(snr[i:i + 1], v_prediction=True)[0].item()
        assert eps == pytest.approx(1 / math.sqrt(capped), rel=1e-5)
        assert v == pytest.approx(1 / (capped + 1), rel=1e-5)
    assert debiased_estimation_weight(snr)[0].item() == pytest.approx(1 / math.sqrt(1000), rel=1e-6)
    pred, target = torch.zeros(4, 4, 2, 2), torch.full((4, 4, 2, 2), 2.0)
    loss = loss_per_sample(pred, target, timesteps=t, scheduler=sched, options=LossOptions(debiased_estimation_loss=True))
    assert torch.allclose(loss, 4.0 / torch.sqrt(snr.clamp(max=1000)))


def test_v_pred_scale_and_v_pred_like_loss_by_hand():
    sched = sd_scheduler()
    t = torch.tensor([0, 200, 800])
    snr = compute_snr(sched, t)
    k = torch.tensor([min(s, 1000.0) / (min(s, 1000.0) + 1) for s in snr.tolist()])
    assert torch.allclose(v_pred_like_noise_pred_scale(snr), k)
    pred, target = torch.zeros(3, 4, 2, 2), torch.full((3, 4, 2, 2), 3.0)  # mse 9
    scaled = loss_per_sample(pred, target, timesteps=t, scheduler=sched, v_parameterization=True,
                             options=LossOptions(scale_v_pred_loss_like_noise_pred=True))
    assert torch.allclose(scaled, 9 * k)
    like = loss_per_sample(pred, target, timesteps=t, scheduler=sched, options=LossOptions(v_pred_like_loss=0.5))
    assert torch.allclose(like, 9 + 9 / k * 0.5)
    # kohya's order: weights, min-SNR, v-scale, v-like, debiased
    w = prior_loss_weight([False, True, False], 0.5)
    opts = LossOptions(min_snr_gamma=5, scale_v_pred_loss_like_noise_pred=True, v_pred_like_loss=0.1,
                       debiased_estimation_loss=True)
    got = loss_per_sample(pred, target, loss_weights=w, timesteps=t, scheduler=sched, options=opts,
                          v_parameterization=True)
    x = 9 * w * snr.clamp(max=5) / (snr + 1) * k
    x = x + x / k * 0.1
    x = x / (snr.clamp(max=1000) + 1)
    assert torch.allclose(got, x, rtol=1e-6)


def test_loss_option_checks(tmp_path):
    from loralab.config import build_config

    (tmp_path / "m.safetensors").write_bytes(b"")
    base = {"pretrained_model_name_or_path": str(tmp_path / "m.safetensors"), "train_data_dir": str(tmp_path)}
    for extra, words in [({"huber_c": "0"}, "huber_c: must be more than 0"),
                         ({"huber_scale": "-1"}, "huber_scale: must be more than 0"),
                         ({"v_pred_like_loss": "-0.1"}, "v_pred_like_loss: must be 0 or more"),
                         ({"v_pred_like_loss": "0.1", "v_parameterization": "true"}, "cannot be used with"),
                         ({"scale_v_pred_loss_like_noise_pred": "true"}, "needs v_parameterization = true")]:
        with pytest.raises(LoralabError, match=words):
            build_config(None, {**base, **extra})
    cfg = build_config(None, {**base, "loss_type": "smooth_l1", "huber_schedule": "exponential",
                              "zero_terminal_snr": "true", "debiased_estimation_loss": "true",
                              "v_pred_like_loss": "0.2"})
    from loralab.train.step import loss_options

    assert loss_options(cfg) == LossOptions(loss_type="smooth_l1", huber_schedule="exponential",
                                            debiased_estimation_loss=True, v_pred_like_loss=0.2)


def test_training_with_huber_zero_terminal_snr_and_debiased_loss(tmp_path, tiny_sd1_checkpoint):
    import json

    from safetensors import safe_open
    from test_train import base_cfg, make_dataset

    from loralab.config import build_config
    from loralab.recipes.lora import train
    from loralab.train.callbacks import Callback

    class Seen(Callback):
        last_alpha_cumprod = None

        def on_step_end(self, run):
            Seen.last_alpha_cumprod = run.noise_scheduler.alphas_cumprod[-1].item()

    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 2),), reg=False)
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_steps=3,
                                      v_parameterization="true", loss_type="huber", huber_c="0.2",
                                      zero_terminal_snr="true", debiased_estimation_loss="true",
                                      scale_v_pred_loss_like_noise_pred="true", min_timestep=900))
    result = train(cfg, [Seen()])
    assert Seen.last_alpha_cumprod == 0.0  # the run trained on the rescaled schedule
    losses = [json.loads(line)["loss/current"] for line in result.log_file.read_text().splitlines()
              if '"kind": "step"' in line]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    with safe_open(str(result.final_file), "pt") as f:
        md = f.metadata()
    assert (md["ss_loss_type"], md["ss_huber_schedule"], md["ss_huber_c"], md["ss_huber_scale"]) == ("huber", "snr",
                                                                                                     "0.2", "1.0")
    assert md["ss_zero_terminal_snr"] == "True" and md["ss_debiased_estimation"] == "True"
