"""Buckets: kohya's resolutions, bucket choice, resize and crop (hand-computed cases)."""

import logging

import pytest

from loralab.data.buckets import (
    adjust_bucket_reso_range,
    bucket_candidates,
    bucket_info,
    check_bucket_reso_steps,
    kohya_crop_ltrb,
    make_bucket_resolutions,
    round_to_steps,
    select_bucket,
)
from loralab.errors import LoralabError

SD_BUCKETS = make_bucket_resolutions((512, 512), 256, 1024, 64)


def test_kohya_17_buckets_for_512():
    half = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576)]
    expected = sorted(half + [(512, 512)] + [(h, w) for w, h in half])
    assert SD_BUCKETS == expected
    assert len(SD_BUCKETS) == 17


def test_min_floored_max_ceiled_to_steps(caplog):
    with caplog.at_level(logging.WARNING):
        assert adjust_bucket_reso_range((512, 512), 300, 1000, 64) == (256, 1024)
    assert "min_bucket_reso" in caplog.text and "max_bucket_reso" in caplog.text
    assert make_bucket_resolutions((512, 512), 300, 1000, 64) == SD_BUCKETS


def test_range_must_hold_resolution():
    with pytest.raises(LoralabError, match="min_bucket_reso"):
        make_bucket_resolutions((512, 512), 640, 1024, 64)
    with pytest.raises(LoralabError, match="max_bucket_reso"):
        make_bucket_resolutions((768, 512), 256, 704, 64)


def test_resolution_must_be_multiple_of_8():
    with pytest.raises(LoralabError, match="multiples of 8"):
        make_bucket_resolutions((500, 512), 256, 1024, 64)


def test_steps_not_multiple_of_64_warns_only(caplog):
    with caplog.at_level(logging.WARNING):
        check_bucket_reso_steps(16)
    assert "not a multiple of 64" in caplog.text
    with pytest.raises(LoralabError, match="multiple of 8"):
        check_bucket_reso_steps(12)


def test_round_to_steps():
    assert round_to_steps(591.2, 64) == 576
    assert round_to_steps(63.6, 64) == 64
    assert round_to_steps(63.4, 64) == 0


def default(size):
    return select_bucket(size, resolution=(512, 512), buckets=SD_BUCKETS, bucket_reso_steps=64, no_upscale=False)


def no_upscale(size):
    return select_bucket(size, resolution=(512, 512), buckets=None, bucket_reso_steps=64, no_upscale=True)


def test_default_mode_landscape():
    # AR 1.333: nearest bucket 576x448 (1.2857); image wider -> match height: s = 448/768
    c = default((1024, 768))
    assert c.bucket == (576, 448)
    assert c.resized == (597, 448)  # int(1024*0.58333 + .5) = int(597.83)
    assert c.crop_ltrb == (10, 0, 586, 448)  # (597-576)//2 = 10
    assert c.ar_error == pytest.approx(576 / 448 - 1024 / 768)
    assert c.image_size == (1024, 768)


def test_default_mode_portrait():
    # AR 0.333: nearest 256x832 (0.3077); image wider than bucket AR -> match height: s = 832/900
    c = default((300, 900))
    assert c.bucket == (256, 832)
    assert c.resized == (277, 832)
    assert c.crop_ltrb == (10, 0, 266, 832)


def test_default_mode_exact_size_match_and_upscale():
    c = default((448, 576))
    assert (c.bucket, c.resized, c.crop_ltrb, c.ar_error) == ((448, 576), (448, 576), (0, 0, 448, 576), 0.0)
    small = default((100, 100))
    assert small.bucket == (512, 512) and small.resized == (512, 512)  # upscaled


def test_default_mode_taller_than_bucket_matches_width():
    # AR 0.75: nearest 448x576 (0.7778); image narrower -> match width: s = 448/600
    c = default((600, 800))
    assert c.bucket == (448, 576)
    assert c.resized == (448, 597)  # int(800*0.74667 + .5) = 597
    assert c.crop_ltrb == (0, 10, 448, 586)


def test_no_upscale_large_image():
    # area 786432 > 512^2: rw = 591.2, rh = 443.4; width-rounded 576x384 (AR 1.5) loses to
    # height-rounded 512x384 (AR 1.333, exact)
    c = no_upscale((1024, 768))
    assert c.resized == (512, 384)
    assert c.bucket == (512, 384)
    assert c.crop_ltrb == (0, 0, 512, 384)
    assert c.ar_error == pytest.approx(0.0)


def test_no_upscale_small_image_is_cropped_not_scaled():
    c = no_upscale((300, 200))
    assert c.resized == (300, 200)
    assert c.bucket == (256, 192)
    assert c.crop_ltrb == (22, 4, 278, 196)
    assert c.ar_error == pytest.approx(256 / 192 - 1.5)


def test_no_upscale_too_small_image_is_an_error():
    with pytest.raises(LoralabError, match="bucket_reso_steps"):
        no_upscale((40, 300))


def test_enable_bucket_false_single_bucket_cover_and_center_crop():
    c = select_bucket((1024, 768), resolution=(512, 512), buckets=[(512, 512)], bucket_reso_steps=None,
                      no_upscale=False)
    assert c.bucket == (512, 512)
    assert c.resized == (683, 512)
    assert c.crop_ltrb == (85, 0, 597, 512)


def test_kohya_crop_ltrb_is_the_letterbox_position():
    # kohya fits the image inside the bucket: 576 wide -> 576x432, centered vertically
    assert kohya_crop_ltrb((576, 448), (1024, 768)) == (0, 8, 576, 440)
    assert kohya_crop_ltrb((512, 512), (512, 512)) == (0, 0, 512, 512)


def test_bucket_info_shape():
    a, b = default((1024, 768)), default((512, 512))
    info = bucket_info([(a, 10), (b, 3), (b, 2)])
    assert info["buckets"] == {0: {"resolution": (512, 512), "count": 5}, 1: {"resolution": (576, 448), "count": 10}}
    assert info["mean_img_ar_error"] == pytest.approx(abs(a.ar_error) / 3)


def test_bucket_candidates_by_mode():
    args = dict(min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64)
    on = bucket_candidates((512, 512), enable_bucket=True, bucket_no_upscale=False, **args)
    assert list(on.buckets) == SD_BUCKETS and (on.bucket_reso_steps, on.no_upscale) == (64, False)
    assert on.choose((768, 576)) == default((768, 576))
    no_up = bucket_candidates((512, 512), enable_bucket=True, bucket_no_upscale=True, **args)
    assert no_up.buckets is None and no_up.no_upscale
    assert no_up.choose((1024, 1024)) == no_upscale((1024, 1024))
    off = bucket_candidates((512, 512), enable_bucket=False, bucket_no_upscale=True, **args)
    assert off.buckets == ((512, 512),) and (off.bucket_reso_steps, off.no_upscale) == (None, False)
    assert off.choose((1024, 768)).bucket == (512, 512)
    with pytest.raises(LoralabError, match="min_bucket_reso"):
        bucket_candidates((512, 512), enable_bucket=True, bucket_no_upscale=False, min_bucket_reso=640,
                          max_bucket_reso=1024, bucket_reso_steps=64)
