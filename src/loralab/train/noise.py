"""Noise, timesteps, training target and loss weighting for one diffusion training step.

Each guide term lives in one function named after it, with its formula in the docstring:
`noise_offset`, `pyramid_noise_like` (multires noise), `input_perturbation` (ip_noise_gamma),
`sample_timesteps`, `training_target` (ε or v-parameterization), `compute_snr`, `min_snr_weight`,
`debiased_estimation_weight`, `v_pred_like_noise_pred_scale`, `prior_loss_weight`, `scheduled_huber_c`,
`elementwise_loss` (loss_type), `apply_loss_mask` (masked_loss), `loss_per_sample`. `make_noisy_latents` chains the noise steps in kohya-ss
sd-scripts' order (`train_util.get_noise_noisy_latents_and_timesteps`):

    noise = randn_like(latents)
    noise = noise_offset(noise, ...)            if noise_offset
    noise = pyramid_noise_like(noise, ...)      if multires_noise_iterations
    t     = randint(min_timestep, max_timestep)
    noisy = scheduler.add_noise(latents, noise [+ ip noise], t)   # the target stays `noise`

and `loss_per_sample` the loss in kohya's order (`train_network.py` process_batch, post_process_loss):

    loss = elementwise_loss(pred, target, loss_type, scheduled_huber_c(t))   # l2, l1, huber, smooth_l1
    loss = apply_loss_mask(loss, mask)                                       # masked_loss / alpha_mask
    loss = mean_{C,H,W}(loss) · loss_weights                                 # prior_loss_weight
    loss = loss · min_snr_weight → · scale_v_pred → + v_pred_like → · debiased_estimation_weight

Every random draw takes a `torch.Generator`, so a loop that owns one generator (and saves its state
with the training state) is exactly reproducible and resumable. With `generator=None` the global torch
RNG is used. Draws happen on the generator's device and are then moved to the latents' device, so a CPU
generator gives the same numbers whatever the training device.

These functions take plain arguments (no config object) and know nothing about the training loop.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loralab.errors import LoralabError

__all__ = [
    "LossOptions",
    "apply_loss_mask",
    "compute_snr",
    "debiased_estimation_weight",
    "elementwise_loss",
    "input_perturbation",
    "loss_per_sample",
    "make_noisy_latents",
    "min_snr_weight",
    "noise_offset",
    "prior_loss_weight",
    "pyramid_noise_like",
    "sample_timesteps",
    "scheduled_huber_c",
    "training_target",
    "v_pred_like_noise_pred_scale",
]


# ---------------------------------------------------------------------------------------- random draws
def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def _randn(shape: Sequence[int], *, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of `shape` with the dtype and device of `like`, drawn from `generator`."""
    out = torch.randn(
        tuple(shape), generator=generator, device=_draw_device(generator, like.device), dtype=like.dtype
    )
    return out.to(like.device)


def _rand_scalar(generator: torch.Generator | None, device: torch.device) -> float:
    """One U(0,1) draw as a Python float."""
    return float(torch.rand((), generator=generator, device=_draw_device(generator, device)).item())


# ----------------------------------------------------------------------------------------- noise terms
def noise_offset(
    noise: torch.Tensor,
    offset: float,
    *,
    random_strength: bool = False,
    adaptive_noise_scale: float | None = None,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise offset (crosslabs "diffusion with offset noise"; kohya `--noise_offset`).

        off   = offset · (u if random_strength else 1),   u ~ U(0,1), one scalar per batch
        off   = clamp(off + adaptive_noise_scale · |mean_HW(latents)|, min=0)   (if adaptive; per (B,C))
        noise = noise + off · randn(B, C, 1, 1)

    Draw order (kohya's): u first (only with random_strength), then the (B,C,1,1) normal.
    Returns a new tensor; `noise` is not modified.
    """
    b, c = noise.shape[0], noise.shape[1]
    off: float | torch.Tensor = offset
    if random_strength:
        off = _rand_scalar(generator, noise.device) * offset
    if adaptive_noise_scale is not None:
        if latents is None:
            raise ValueError("noise_offset with adaptive_noise_scale needs the latents")
        latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        off = torch.clamp(off + adaptive_noise_scale * latent_mean, min=0.0)
    per_channel = _randn((b, c, 1, 1), like=noise, generator=generator)
    return noise + off * per_channel


# `make_noisy_latents` has a keyword argument of the same name; it calls the function through this alias.
_noise_offset = noise_offset


def pyramid_noise_like(
    noise: torch.Tensor,
    iterations: int = 6,
    discount: float = 0.4,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pyramid ("multires") noise, kohya `custom_train_functions.pyramid_noise_like`, exactly:

        for i in range(iterations):
            r      = 2 + 2·u,  u ~ U(0,1)            # a new r in [2, 4) at every level
            h_i    = max(1, int(H / r**i)),  w_i = max(1, int(W / r**i))
            noise += upsample_bilinear(randn(B, C, h_i, w_i), (H, W)) · discount**i
            if h_i == 1 or w_i == 1: break            # the coarsest level was 1 pixel wide
        return noise / noise.std()                    # ONE std over the whole batch tensor

    Level 0 adds full-resolution noise with weight 1. kohya's function default discount is 0.4, its
    `--multires_noise_discount` default 0.3 (used by `make_noisy_latents`). Draw order per level: u, then
    the normal. kohya draws r from Python's `random`; here it comes from `generator` too, so the whole
    step is reproducible from one generator. Returns a new tensor; `noise` is not modified.
    """
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = _rand_scalar(generator, noise.device) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        level = _randn((b, c, hn, wn), like=noise, generator=generator)
        out += F.interpolate(level, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def input_perturbation(
    noise: torch.Tensor,
    gamma: float,
    *,
    random_strength: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Input perturbation noise (kohya `--ip_noise_gamma`, Ning et al. 2023).

        g = gamma · (u if random_strength else 1),   u ~ U(0,1)
        returns noise + g · randn_like(noise)

    Only the noisy input x_t uses the perturbed noise; the training target stays the unperturbed noise.
    """
    g = gamma * _rand_scalar(generator, noise.device) if random_strength else gamma
    return noise + g * _randn(noise.shape, like=noise, generator=generator)


def sample_timesteps(
    batch: int,
    min_timestep: int = 0,
    max_timestep: int = 1000,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training timesteps, one per sample: t ~ randint(min_timestep, max_timestep) (max exclusive).

    When min_timestep == max_timestep every t equals max_timestep (kohya `get_timesteps`).
    Returns a LongTensor of shape (batch,) on `device`.
    """
    if not 0 <= min_timestep <= max_timestep:
        raise LoralabError(
            f"min_timestep={min_timestep}, max_timestep={max_timestep}: need 0 <= min_timestep <= max_timestep "
            "(keys `min_timestep` / `max_timestep`); fix the values or leave them unset for 0 and 1000."
        )
    draw_device = generator.device if generator is not None else torch.device("cpu")
    if min_timestep < max_timestep:
        t = torch.randint(min_timestep, max_timestep, (batch,), generator=generator, device=draw_device)
    else:
        t = torch.full((batch,), max_timestep, device=draw_device)
    return t.long().to(device if device is not None else draw_device)


def make_noisy_latents(
    latents: torch.Tensor,
    scheduler,
    *,
    noise_offset: float | None = None,
    noise_offset_random_strength: bool = False,
    adaptive_noise_scale: float | None = None,
    multires_noise_iterations: int | None = None,
    multires_noise_discount: float = 0.3,
    min_timestep: int | None = None,
    max_timestep: int | None = None,
    ip_noise_gamma: float | None = None,
    ip_noise_gamma_random_strength: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample noise and timesteps and noise the latents, in kohya's order (see the module docstring).

    `scheduler` is the training noise scheduler (diffusers `DDPMScheduler`). Falsy `noise_offset`,
    `multires_noise_iterations` and `ip_noise_gamma` switch their step off, as in kohya. `max_timestep`
    None means `scheduler.config.num_train_timesteps`.

    Returns `(noise, noisy_latents, timesteps)`; `noise` is the ε target (without ip noise).
    """
    noise = _randn(latents.shape, like=latents, generator=generator)
    if noise_offset:
        noise = _noise_offset(
            noise,
            noise_offset,
            random_strength=noise_offset_random_strength,
            adaptive_noise_scale=adaptive_noise_scale,
            latents=latents,
            generator=generator,
        )
    if multires_noise_iterations:
        noise = pyramid_noise_like(noise, multires_noise_iterations, multires_noise_discount, generator=generator)

    t_min = 0 if min_timestep is None else min_timestep
    t_max = scheduler.config.num_train_timesteps if max_timestep is None else max_timestep
    timesteps = sample_timesteps(latents.shape[0], t_min, t_max, device=latents.device, generator=generator)

    noise_in = noise
    if ip_noise_gamma:
        noise_in = input_perturbation(
            noise, ip_noise_gamma, random_strength=ip_noise_gamma_random_strength, generator=generator
        )
    noisy_latents = scheduler.add_noise(latents, noise_in, timesteps)
    return noise, noisy_latents, timesteps


# ------------------------------------------------------------------------------------- target and loss
def training_target(
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    v_parameterization: bool,
) -> torch.Tensor:
    """What the UNet learns to predict.

        ε-prediction:      target = ε (the noise)
        v-parameterization: target = v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0   (scheduler.get_velocity)

    SD 2.x 768-v models and other v-pred fine-tunes need v_parameterization=True.
    """
    if v_parameterization:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def compute_snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of each timestep: snr_t = ᾱ_t / (1 − ᾱ_t).

    Computed as kohya does, (sqrt(ᾱ)/sqrt(1−ᾱ))², in float32 from `scheduler.alphas_cumprod`.
    With zero_terminal_snr (a scheduler built with `rescale_betas_zero_snr`) the ᾱ are those of the same
    schedule *before* the rescale: kohya fills its `all_snr` table (prepare_scheduler_for_custom_training)
    before fix_noise_scheduler_betas_for_zero_terminal_snr, so its SNR loss weights (min-SNR, debiased,
    v-pred scales) keep the original schedule. It also keeps them finite at t = T, where the rescaled
    SNR is 0. Returns a float32 tensor shaped like `timesteps`, on its device.
    """
    return _snr_table(scheduler, timesteps.device)[timesteps.detach().long()]


def _snr_table(scheduler, device: torch.device) -> torch.Tensor:
    """The SNR of every timestep, computed once per scheduler and device and kept there: indexing it with the
    step's timesteps needs no copy to the host (no GPU synchronisation in the step)."""
    tables = scheduler.__dict__.setdefault("_loralab_snr", {})
    if device not in tables:
        alphas_cumprod = _alphas_cumprod_for_snr(scheduler)
        tables[device] = ((torch.sqrt(alphas_cumprod) / torch.sqrt(1.0 - alphas_cumprod)) ** 2).to(device)
    return tables[device]


def _alphas_cumprod_for_snr(scheduler) -> torch.Tensor:
    """float32 CPU ᾱ of the scheduler, or of its schedule without the zero-terminal-SNR rescale."""
    config = dict(getattr(scheduler, "config", None) or {})
    if not config.get("rescale_betas_zero_snr", False):
        return scheduler.alphas_cumprod.detach().to("cpu", torch.float32)
    config["rescale_betas_zero_snr"] = False
    return _alphas_cumprod_of(type(scheduler), json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _alphas_cumprod_of(scheduler_class, config_json: str) -> torch.Tensor:
    """ᾱ of a scheduler built from a config (cached: building one takes milliseconds)."""
    built = scheduler_class.from_config(json.loads(config_json))
    return built.alphas_cumprod.detach().to("cpu", torch.float32)


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023; kohya `apply_snr_weight`, `--min_snr_gamma`, 5 usual):

        ε-prediction: w = min(snr, γ) / snr
        v-prediction: w = min(snr, γ) / (snr + 1)
    """
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


SNR_CAP = 1000.0  # kohya's cap of the SNR in its debiased and v-pred scales (SNR at t=0 is about 1175)


def debiased_estimation_weight(snr: torch.Tensor, v_prediction: bool = False) -> torch.Tensor:
    """Debiased estimation loss weight (Yu et al. 2024; kohya `apply_debiased_estimation`,
    `--debiased_estimation_loss`), with s = min(snr, 1000):

        ε-prediction: w = 1 / sqrt(s)
        v-prediction: w = 1 / (s + 1)
    """
    s = torch.clamp(snr, max=SNR_CAP)
    return 1 / (s + 1) if v_prediction else 1 / torch.sqrt(s)


def v_pred_like_noise_pred_scale(snr: torch.Tensor) -> torch.Tensor:
    """kohya `get_snr_scale`, with s = min(snr, 1000):  k = s / (s + 1).

    For one prediction the v error is the ε error / sqrt(ᾱ), and 1/ᾱ = (snr + 1)/snr, so ε loss = k · v loss:
    `scale_v_pred_loss_like_noise_pred` multiplies a v loss by k (it then weighs timesteps as an ε loss
    does), and `v_pred_like_loss` = λ adds λ times the v-equivalent of an ε loss: loss + λ · loss / k.
    """
    s = torch.clamp(snr, max=SNR_CAP)
    return s / (s + 1)


def prior_loss_weight(is_reg: Sequence[bool] | torch.Tensor, weight: float) -> torch.Tensor:
    """Per-sample loss weights for DreamBooth prior preservation (kohya `--prior_loss_weight`, default 1):

        w_i = weight  if sample i is a regularization (class) image,  else 1
    """
    reg = torch.as_tensor(is_reg, dtype=torch.bool)
    return torch.where(reg, torch.tensor(float(weight)), torch.tensor(1.0))


def scheduled_huber_c(scheduler, timesteps: torch.Tensor, huber_c: float = 0.1, schedule: str = "snr",
                      huber_scale: float = 1.0) -> torch.Tensor:
    """The Huber threshold c of each sample's timestep (kohya `get_huber_threshold_if_needed`,
    `--huber_schedule`, `--huber_c`, `--huber_scale`; T = num_train_timesteps):

        constant:     c_t = huber_c · huber_scale
        exponential:  c_t = huber_scale · exp(−a·t),  a = −ln(huber_c) / T     (huber_scale at t=0, → huber_c·huber_scale)
        snr:          c_t = (1 − huber_c) / (1 + σ_t)² + huber_c,  σ_t = sqrt((1 − ᾱ_t) / ᾱ_t)
                      (≈ 1 at t=0 → huber_c at high noise; kohya does not apply huber_scale here)

    ᾱ is the training scheduler's own (zero-terminal-SNR rescaled when that is on: σ_T = ∞, c_T = huber_c).
    Returns a float32 tensor of shape (B,) on the timesteps' device.
    """
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, dtype=torch.float32, device=timesteps.device)
    if schedule == "exponential":
        a = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-a * timesteps.float()) * huber_scale
    if schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod.detach().to(timesteps.device, torch.float32)[timesteps.detach().long()]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"huber_schedule {schedule!r}: use constant, exponential or snr")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each element (kohya `conditional_loss`, reduction "none", `--loss_type`); d = pred − target,
    c = huber_c of the sample (shape (B,), broadcast over the other dimensions):

        l2:         d²                              (F.mse_loss)
        l1:         |d|                             (F.l1_loss)
        huber:      2c · (sqrt(d² + c²) − c)        (pseudo-Huber: ≈ d² for |d| ≪ c, ≈ 2c·|d| for |d| ≫ c)
        smooth_l1:  2 · (sqrt(d² + c²) − c)         (the same divided by c: ≈ d²/c, then ≈ 2|d|)
    """
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"loss_type {loss_type!r}: use l2, l1, huber or smooth_l1")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs huber_c (scheduled_huber_c)")
    c = huber_c.to(pred.device, pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
    pseudo = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * pseudo if loss_type == "huber" else 2 * pseudo


def apply_loss_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sd-scripts' masked loss (`apply_masked_loss`): the element-wise loss (B, C, h, w) times each image's
    mask, area-resized from its pixel size to the latent size:

        loss · interpolate(mask, size=(h, w), mode="area")        mask: (B, 1, H, W) or (B, H, W) in [0, 1]

    A latent pixel's weight is the mean of the mask over the pixels it covers. The mean over C, h, w that
    follows is over all latent pixels, not only the masked ones (as in sd-scripts), so a mask that keeps a
    quarter of the image also makes its loss about a quarter as large."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    mask = F.interpolate(mask.to(loss.device, loss.dtype), size=loss.shape[2:], mode="area")
    return loss * mask


@dataclass(frozen=True)
class LossOptions:
    """The loss settings: kohya's arguments, the config keys of the same names (defaults: plain MSE)."""
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    huber_scale: float = 1.0
    min_snr_gamma: float = 0.0
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float = 0.0
    debiased_estimation_loss: bool = False

    def uses_snr(self) -> bool:
        return bool(self.min_snr_gamma or self.scale_v_pred_loss_like_noise_pred or self.v_pred_like_loss
                    or self.debiased_estimation_loss)


def loss_per_sample(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    loss_weights: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    scheduler=None,
    options: LossOptions = LossOptions(),
    v_parameterization: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample training loss, kohya's `process_batch` / `post_process_loss` order (k = v_pred_like_noise_pred_scale):

        l_i = mean_{C,H,W} elementwise_loss(pred_i, target_i, loss_type, scheduled_huber_c(t_i))   (in float32)
              (times the area-resized `mask` before the mean: `apply_loss_mask`, if a mask is given)
        l_i = l_i · loss_weights_i                          (prior_loss_weight for reg images, else 1)
        l_i = l_i · min_snr_weight(snr_i, γ, v_pred)        (if min_snr_gamma)
        l_i = l_i · k(snr_i)                                (if scale_v_pred_loss_like_noise_pred)
        l_i = l_i + l_i / k(snr_i) · v_pred_like_loss       (if v_pred_like_loss)
        l_i = l_i · debiased_estimation_weight(snr_i, v_pred)   (if debiased_estimation_loss)

    With the default options this is the plain MSE. Returns a tensor of shape (B,); the step's loss is its `.mean()`.
    """
    huber_c = None
    if options.loss_type in ("huber", "smooth_l1"):
        if timesteps is None or scheduler is None:
            raise ValueError(f"loss_type {options.loss_type!r} needs the timesteps and the noise scheduler")
        huber_c = scheduled_huber_c(scheduler, timesteps, options.huber_c, options.huber_schedule, options.huber_scale)
    loss = elementwise_loss(pred.float(), target.float(), options.loss_type, huber_c)
    if mask is not None:
        loss = apply_loss_mask(loss, mask)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device, loss.dtype)
    if not options.uses_snr():
        return loss
    if timesteps is None or scheduler is None:
        raise ValueError("the SNR loss weights need the timesteps and the noise scheduler")
    snr = compute_snr(scheduler, timesteps).to(loss.device)
    if options.min_snr_gamma:
        loss = loss * min_snr_weight(snr, options.min_snr_gamma, v_parameterization)
    if options.scale_v_pred_loss_like_noise_pred:
        loss = loss * v_pred_like_noise_pred_scale(snr)
    if options.v_pred_like_loss:
        loss = loss + loss / v_pred_like_noise_pred_scale(snr) * options.v_pred_like_loss
    if options.debiased_estimation_loss:
        loss = loss * debiased_estimation_weight(snr, v_parameterization)
    return loss
