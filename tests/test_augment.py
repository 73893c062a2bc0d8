"""kohya's per-step pixel augmentations: color_aug (hue shift or random gamma) and random_crop; their refusal with
a latent cache; SDXL's crop conditioning of a random crop; training (and resuming) with both on."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from loralab.config import build_config
from loralab.config.build import config_problems
from loralab.data.augment import (
    ColorAug,
    PixelAugment,
    apply_color_aug,
    draw_color_aug,
    draw_pixel_augment,
    hue_shift,
    random_gamma,
)
from loralab.data.buckets import center_crop_box, random_crop_box, select_bucket
from loralab.data.dataset_config import dataset_config_problems
from loralab.data.images import prepare_image
from loralab.errors import LoralabError
from loralab.models.sdxl import batch_time_ids, random_crop_top_left, sdxl_time_ids
from loralab.recipes.lora import train
from loralab.train.callbacks import Callback
from conftest import write_tiny_checkpoint
from test_dataset_config import defaults, make_folder, write
from test_sdxl import cfg_dict, make_images
from test_train import base_cfg, make_dataset


class ScriptedRng:
    """random.Random's draws used by the augmentations, with random() values given in order;
    uniform(a, b) = a + (b - a) * random(), as random.Random computes it."""

    def __init__(self, values):
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()


# ----------------------------------------------------------------------------------------- color_aug


@pytest.mark.parametrize("draws, expected", [
    ([0.34], None),  # random() > 0.33: no augmentation, one draw only
    ([0.9999], None),
    ([0.33, 0.51, 0.75], ColorAug(hue_shift=-8 + 16 * 0.75)),  # <= 0.33 applies; > 0.5: hue, uniform(-8, 8)
    ([0.0, 0.9, 0.0], ColorAug(hue_shift=-8.0)),
    ([0.1, 0.5, 0.25], ColorAug(gamma=0.95 + 0.1 * 0.25)),  # <= 0.5: gamma, uniform(0.95, 1.05)
    ([0.2, 0.01, 1.0], ColorAug(gamma=1.05)),
])
def test_color_aug_draws_kohyas_branches(draws, expected):
    rng = ScriptedRng(draws)
    got = draw_color_aug(rng)
    assert rng.values == []  # every scripted draw used, none more
    if expected is None or expected.hue_shift is not None:
        assert got == expected
    else:
        assert got.hue_shift is None and got.gamma == pytest.approx(expected.gamma)


def test_color_aug_frequencies_and_ranges():
    rng = random.Random(0)
    draws = [draw_color_aug(rng) for _ in range(20000)]
    hues = [d.hue_shift for d in draws if d and d.hue_shift is not None]
    gammas = [d.gamma for d in draws if d and d.gamma is not None]
    assert sum(d is None for d in draws) / len(draws) == pytest.approx(0.67, abs=0.015)
    assert len(hues) / len(draws) == pytest.approx(0.165, abs=0.01)
    assert len(gammas) / len(draws) == pytest.approx(0.165, abs=0.01)
    assert -8 <= min(hues) < -7.9 and 7.9 < max(hues) <= 8
    assert 0.95 <= min(gammas) < 0.951 and 1.049 < max(gammas) <= 1.05


def opencv_hsv(c0: int, c1: int, c2: int) -> tuple[float, float, int]:
    """OpenCV's 8-bit BGR -> HSV (its documented formula) of a pixel read as B=c0, G=c1, R=c2: V = max,
    S = 255 (V - min) / V, H = 60 (G - B) / (V - min) if V = R, 120 + 60 (B - R) / (V - min) if V = G,
    240 + 60 (R - G) / (V - min) if V = B, +360 if negative, halved (0..180). Unrounded."""
    b, g, r = c0, c1, c2
    v, lo = max(b, g, r), min(b, g, r)
    s = 0.0 if v == 0 else 255 * (v - lo) / v
    if v == lo:
        h = 0.0
    elif v == r:
        h = 60 * (g - b) / (v - lo)
    elif v == g:
        h = 120 + 60 * (b - r) / (v - lo)
    else:
        h = 240 + 60 * (r - g) / (v - lo)
    return (h + 360 if h < 0 else h) / 2, s, v


def opencv_hsv_to_bgr(h: int, s: int, v: int) -> tuple[int, int, int]:
    """OpenCV's 8-bit HSV -> BGR (the standard sector formula, rounded): H in 0..180 is 2H degrees."""
    hh, ss = (2 * h % 360) / 60, s / 255
    sector, f = int(hh), hh - int(hh)
    p, q, t = v * (1 - ss), v * (1 - ss * f), v * (1 - ss * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][sector]
    return round(b), round(g), round(r)


# Pixels whose OpenCV hue is a whole number (so no rounding of H is involved): (channels as stored, H, S, V)
HUE_PIXELS = [((100, 160, 220), 15, 139, 220), ((30, 5, 255), 177, 250, 255), ((0, 51, 255), 6, 255, 255),
              ((255, 0, 0), 120, 255, 255), ((128, 128, 128), 0, 0, 128)]


@pytest.mark.parametrize("shift", [3.7, -3.3, 5.2, -8.0, 8.0, 0.0])
def test_hue_shift_is_kohyas_formula(shift):
    """H' = floor((H + s) mod 180) with s = shift (+180 when negative), on OpenCV's 8-bit HSV of the RGB array
    read as BGR (kohya's call), S and V kept, back to 8-bit colour."""
    pixels = np.array([[p for p, *_ in HUE_PIXELS]], dtype=np.uint8)
    out = hue_shift(pixels, shift)
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    for (p, h, s, v), got in zip(HUE_PIXELS, out[0]):
        h_ref, s_ref, v_ref = opencv_hsv(*p)
        assert (h_ref, round(s_ref), v_ref) == pytest.approx((h, s, v))
        shifted = math.floor((h + (shift if shift >= 0 else 180 + shift)) % 180)
        expected = opencv_hsv_to_bgr(shifted, s, v)
        assert np.abs(got.astype(int) - expected).max() <= 1, (p, shift, got, expected)  # OpenCV rounds in fixed point
    if shift == 0:
        assert np.array_equal(out, pixels)
    assert list(out[0, 4]) == [128, 128, 128]  # grey has no hue
    if shift == 3.7:  # worked by hand: (100, 160, 220) is H 15 (30 degrees), S 139, V 220 -> H 18 (36 degrees)
        assert list(out[0, 0]) == [100, 172, 220] and list(out[0, 1]) == [5, 5, 255]
    if shift == 5.2:  # H 177 + 5.2 wraps to 2 (4 degrees)
        assert list(out[0, 1]) == [5, 22, 255]


def test_random_gamma_is_kohyas_formula_on_raw_values():
    """out = uint8(clip(v ** gamma, 0, 255)), truncated, on 0..255 (not on v / 255)."""
    v = np.arange(256, dtype=np.uint8)
    pixels = np.stack([v, v[::-1], np.full_like(v, 200)], axis=-1)[None]
    for gamma in (0.95, 0.987, 1.0, 1.05):
        expected = np.floor(np.minimum(pixels.astype(np.float64) ** gamma, 255)).astype(np.uint8)
        assert np.array_equal(random_gamma(pixels, gamma), expected), gamma
    bright = random_gamma(pixels, 1.05)[0, :, 0]
    assert bright[195] == 253 and all(bright[196:] == 255) and bright[0] == 0 and bright[1] == 1
    assert random_gamma(pixels, 0.95)[0, 255, 0] == 193


def test_apply_color_aug_dispatches():
    pixels = np.array([[[100, 160, 220], [30, 5, 255]]], dtype=np.uint8)
    assert apply_color_aug(pixels, None) is pixels
    assert np.array_equal(apply_color_aug(pixels, ColorAug(hue_shift=3.7)), hue_shift(pixels, 3.7))
    assert np.array_equal(apply_color_aug(pixels, ColorAug(gamma=0.96)), random_gamma(pixels, 0.96))


# ----------------------------------------------------------------------------------------- random_crop


def test_random_crop_offsets_cover_kohyas_range():
    """randint(0, excess) on each side longer than the bucket (both ends included), width first; a side
    without excess draws nothing."""
    rng = random.Random(1)
    lefts = set()
    for _ in range(400):
        box = random_crop_box((100, 64), (64, 64), rng)
        assert box[1] == 0 and box[3] == 64 and box[2] - box[0] == 64 and 0 <= box[0] <= 36
        lefts.add(box[0])
    assert lefts == set(range(37))
    tops = {random_crop_box((64, 90), (64, 64), rng)[1] for _ in range(400)}
    assert tops == set(range(27))
    state = rng.getstate()
    assert random_crop_box((64, 64), (64, 64), rng) == (0, 0, 64, 64) and rng.getstate() == state
    a, b = random.Random(5), random.Random(5)
    left, top = b.randint(0, 16), b.randint(0, 6)  # width first
    assert random_crop_box((80, 70), (64, 64), a) == (left, top, left + 64, top + 64)
    with pytest.raises(ValueError):
        random_crop_box((60, 64), (64, 64), rng)


def test_draw_pixel_augment_draws_crop_then_colour_and_nothing_when_off():
    choice = select_bucket((64, 96), resolution=(64, 64), buckets=[(64, 64)], bucket_reso_steps=None, no_upscale=False)
    rng = random.Random(3)
    state = rng.getstate()
    assert draw_pixel_augment(choice, color_aug=False, random_crop=False, rng=rng) is None
    assert rng.getstate() == state  # the default path draws nothing: runs without them are unchanged
    a, b = random.Random(9), random.Random(9)
    aug = draw_pixel_augment(choice, color_aug=True, random_crop=True, rng=a)
    assert aug == PixelAugment(crop_ltrb=random_crop_box(choice.resized, choice.bucket, b), color=draw_color_aug(b))
    only_crop = draw_pixel_augment(choice, color_aug=False, random_crop=True, rng=random.Random(9))
    assert only_crop.color is None and only_crop.crop_ltrb == aug.crop_ltrb


def coordinate_image(w: int, h: int) -> np.ndarray:
    """Each pixel says where it is: R = 2x, G = 2y, B = 77."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([2 * x, 2 * y, np.full_like(x, 77)], axis=-1).astype(np.uint8)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    return np.rint((t.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.uint8)


def test_the_crop_box_is_the_pixels_taken_then_coloured_then_flipped(tmp_path):
    arr = coordinate_image(64, 96)  # bucket 64x64 at resolution 64: no resize, 32 rows of excess
    path = tmp_path / "coords.png"
    Image.fromarray(arr).save(path)
    choice = select_bucket((64, 96), resolution=(64, 64), buckets=[(64, 64)], bucket_reso_steps=None, no_upscale=False)
    assert choice.resized == (64, 96) and choice.crop_ltrb == center_crop_box((64, 96), (64, 64)) == (0, 16, 64, 80)
    rng = random.Random(0)
    tops = set()
    for _ in range(30):
        aug = draw_pixel_augment(choice, color_aug=False, random_crop=True, rng=rng)
        left, top, right, bottom = aug.crop_ltrb
        tops.add(top)
        assert np.array_equal(to_uint8(prepare_image(path, choice, augment=aug)), arr[top:bottom, left:right])
        flipped = to_uint8(prepare_image(path, choice, flip=True, augment=aug))
        assert np.array_equal(flipped, arr[top:bottom, left:right][:, ::-1])
    assert len(tops) > 10 and min(tops) >= 0 and max(tops) <= 32
    # no augment: the centred crop, exactly as before
    plain = prepare_image(path, choice)
    assert torch.equal(plain, prepare_image(path, choice, augment=None))
    assert torch.equal(plain, prepare_image(path, choice, augment=PixelAugment()))
    assert np.array_equal(to_uint8(plain), arr[16:80])
    # colour after the crop, before the flip (kohya's order)
    aug = PixelAugment(crop_ltrb=(0, 5, 64, 69), color=ColorAug(gamma=0.95))
    got = to_uint8(prepare_image(path, choice, flip=True, augment=aug))
    assert np.array_equal(got, random_gamma(arr[5:69], 0.95)[:, ::-1])
    aug = PixelAugment(crop_ltrb=None, color=ColorAug(hue_shift=-6.5))
    assert np.array_equal(to_uint8(prepare_image(path, choice, augment=aug)), hue_shift(arr[16:80], -6.5))


# ----------------------------------------------------------------------------------------- SDXL conditioning


def test_sdxl_crop_conditioning_of_a_random_crop_is_the_crop():
    size, bucket, resized = (283, 480), (32, 96), (57, 96)  # 25 columns of excess in the resized image
    box = (17, 0, 49, 96)
    assert random_crop_top_left(box, resized) == (0, 17)
    assert random_crop_top_left(box, resized, flipped=True) == (0, 57 - 49)  # mirrored: cut on the right
    assert random_crop_top_left((0, 9, 64, 73), (64, 100)) == (9, 0)
    assert sdxl_time_ids(size, bucket, crop_top_left=(0, 17)) == (480, 283, 0, 17, 96, 32)
    ids = batch_time_ids([size, size, size], [bucket] * 3, [False, True, False], crops=[(0, 17), (0, 8), None])
    assert ids.tolist() == [[480, 283, 0, 17, 96, 32], [480, 283, 0, 8, 96, 32], list(sdxl_time_ids(size, bucket))]
    assert torch.equal(batch_time_ids([size], [bucket], [True]), batch_time_ids([size], [bucket], [True], crops=[None]))


def test_sdxl_training_with_random_crop_conditions_on_each_crop(tmp_path, monkeypatch):
    """The time_ids reaching the UNet hold, for each image, the (top, left) of the crop its pixels came from."""
    import loralab.train.step as step

    tiny_sdxl_checkpoint = write_tiny_checkpoint(tmp_path / "tiny_sdxl.safetensors", "sdxl")
    img = make_images(tmp_path, [(96, 40), (40, 96), (64, 80)])
    drawn: list = []
    seen: list = []
    draw = step.pixel_augments

    def record(run, batch, rng):
        augments = draw(run, batch, rng)
        drawn.extend((s.choice, a) for s, a in zip(batch, augments))
        return augments

    class Hook(Callback):
        def on_train_start(self, run):
            run.model.unet.register_forward_pre_hook(
                lambda m, args, kw: seen.extend(kw["added_cond_kwargs"]["time_ids"].tolist()), with_kwargs=True)

    monkeypatch.setattr(step, "pixel_augments", record)
    train(build_config(None, cfg_dict(tiny_sdxl_checkpoint, img, tmp_path / "out", max_train_steps=3,
                                      random_crop="true", network_train_unet_only="true")), [Hook()])
    assert len(seen) == len(drawn) == 6
    for (choice, aug), row in zip(drawn, seen):
        left, top, right, bottom = aug.crop_ltrb
        assert (right - left, bottom - top) == choice.bucket
        assert row == [choice.image_size[1], choice.image_size[0], top, left, choice.bucket[1], choice.bucket[0]]
    assert any(aug.crop_ltrb != choice.crop_ltrb for choice, aug in drawn)  # not all centred


# ----------------------------------------------------------------------------------------- caching


def test_cache_latents_is_refused_with_either_augmentation(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, reg=False)
    for key in ("color_aug", "random_crop"):
        for cache in ("cache_latents", "cache_latents_to_disk"):
            with pytest.raises(LoralabError) as e:
                build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", **{key: "true", cache: "true"}))
            message = str(e.value)
            assert message.startswith(f"{key}: changes the training pixels at every step")
            assert "frozen latent" in message and "cache_latents = false" in message and f"{key} = false" in message
    with pytest.raises(LoralabError, match="^2 problems") as e:
        build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", color_aug="true", random_crop="true",
                                    cache_latents="true"))
    assert "color_aug: changes" in str(e.value) and "random_crop: changes" in str(e.value)
    ok = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", color_aug="true", random_crop="true"))
    assert config_problems(ok) == []
    assert not (tmp_path / "out").exists()


def test_a_dataset_config_subset_with_augmentation_refuses_cached_latents(tmp_path):
    a, b = make_folder(tmp_path / "a", 1), make_folder(tmp_path / "b", 1)
    toml = write(tmp_path / "ds.toml", f"""
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{a}"
  random_crop = true
  [[datasets.subsets]]
  image_dir = "{b}"
""")
    assert dataset_config_problems(toml, defaults()) == []
    (problem,) = dataset_config_problems(toml, defaults(cache_latents=True))
    assert problem.startswith(f"dataset_config: {toml}: [[datasets]] #1 subset #1: random_crop: changes the training")
    assert len(dataset_config_problems(toml, defaults(cache_latents_to_disk=True))) == 1
    # the config's color_aug is every subset's default (kohya); a subset may turn it off
    assert len(dataset_config_problems(toml, defaults(cache_latents=True, color_aug=True))) == 3
    write(toml, f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{b}"\n  color_aug = false\n')
    assert dataset_config_problems(toml, defaults(cache_latents=True, color_aug=True)) == []


# ----------------------------------------------------------------------------------------- training


def test_training_with_color_aug_and_random_crop(tmp_path, tiny_sd1_checkpoint, monkeypatch):
    import loralab.train.step as step

    img, _ = make_dataset(tmp_path, concepts=(("3_alpha", 2),), reg=False)  # 64x64 and 64x96 at 64: 64x96 is cropped
    drawn: list = []
    draw = step.pixel_augments

    def record(run, batch, rng):
        augments = draw(run, batch, rng)
        drawn.extend((s.choice, a) for s, a in zip(batch, augments))
        return augments

    monkeypatch.setattr(step, "pixel_augments", record)
    result = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_epochs=2,
                                               color_aug="true", random_crop="true", flip_aug="true")))
    losses = [json.loads(line)["loss/current"] for line in result.log_file.read_text().splitlines()
              if '"kind": "step"' in line]
    assert len(losses) == result.global_step > 0 and all(math.isfinite(x) for x in losses)
    assert len(drawn) == 2 * 3 * 2  # every sample of both epochs
    assert all(a is not None and a.crop_ltrb is not None for _, a in drawn)
    assert {a.crop_ltrb for c, a in drawn if c.resized == (64, 96)} - {(0, 16, 64, 80)}  # some off-centre crops
    assert any(a.color is not None for _, a in drawn)
    with safe_open(str(result.final_file), "pt") as f:
        md = f.metadata()
    assert (md["ss_color_aug"], md["ss_random_crop"], md["ss_cache_latents"]) == ("True", "True", "False")


def test_straight_run_equals_resumed_run_with_color_aug_and_random_crop(tmp_path, tiny_sd1_checkpoint):
    img, _ = make_dataset(tmp_path, concepts=(("3_alpha", 2),), reg=False)
    common = dict(save_every_n_epochs=1, save_state="true", color_aug="true", random_crop="true", flip_aug="true",
                  lr_scheduler="cosine", optimizer_type="AdamW")
    straight = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "a", max_train_epochs=2,
                                                 **common)))

    class Interrupt(Exception):
        pass

    class CrashAfterEpoch1(Callback):
        def on_epoch_end(self, run):
            raise Interrupt

    with pytest.raises(Interrupt):
        train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "b", max_train_epochs=2, **common)),
              [CrashAfterEpoch1()])
    state = tmp_path / "b" / "lora-000001-state"
    assert state.is_dir()
    resumed = train(build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "b", max_train_epochs=2,
                                                resume=state, **common)))
    assert resumed.global_step == straight.global_step
    a, b = load_file(str(straight.final_file)), load_file(str(resumed.final_file))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_dataset_config_subset_with_random_crop_trains(tmp_path, tiny_sd1_checkpoint, monkeypatch):
    import loralab.train.step as step

    a = make_folder(tmp_path / "a", 2, size=(64, 96))
    b = make_folder(tmp_path / "b", 2, size=(96, 64), seed=1)
    toml = write(tmp_path / "ds.toml", f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 3
  random_crop = true
  [[datasets.subsets]]
  image_dir = "{b}"
  num_repeats = 3
""")
    drawn: list = []
    draw = step.pixel_augments

    def record(run, batch, rng):
        augments = draw(run, batch, rng)
        drawn.extend((s.entry.subset.dir, a) for s, a in zip(batch, augments))
        return augments

    monkeypatch.setattr(step, "pixel_augments", record)
    result = train(build_config(None, base_cfg(tiny_sd1_checkpoint, tmp_path, tmp_path / "out", dataset_config=toml,
                                               max_train_epochs=1)))
    assert result.global_step == 6 and len(drawn) == 12
    crops = {aug.crop_ltrb for d, aug in drawn if d == a}
    assert all(aug is None for d, aug in drawn if d == b)  # the other subset: centred, as the config says
    assert len(crops) > 1 and all(c[0] == 0 and 0 <= c[1] <= 32 for c in crops)
    with safe_open(str(result.final_file), "pt") as f:
        subsets = json.loads(f.metadata()["ss_datasets"])[0]["subsets"]
    assert [(s["random_crop"], s["color_aug"]) for s in subsets] == [(True, False), (False, False)]
