"""`loralab reg-images` (loralab.review.reg_images): kohya's reg layout with the class prompt as caption, fixed
seeds (same seed, same pixels), resume that fills in only what is missing, the count spread over a dataset's
buckets, the demo's reg images through the same code, and clear messages for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from loralab.cli import main
from loralab.lab.model import lab_model_path
from loralab.review import reg_images as R

LAB = str(lab_model_path())
PROMPTS = ("red circle, blue background, small", "green square, black background, large")



def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["reg-images", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _lab_args(out, *extra):
    return ["--model", LAB, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", str(out),
            "--steps", "4", "--batch-size", "3", *extra]


def test_spread_over_buckets_is_proportional_and_sums_to_count():
    assert R.spread_over_buckets(10, {(48, 32): 6, (32, 32): 4}) == {(32, 32): 4, (48, 32): 6}
    assert R.spread_over_buckets(5, {(48, 32): 6, (32, 32): 4}) == {(32, 32): 2, (48, 32): 3}
    # 7 · (1, 1, 1)/3 = 2.33 each: the one left over goes to the smaller resolution (equal weights)
    assert R.spread_over_buckets(7, {(32, 48): 1, (48, 32): 1, (32, 32): 1}) == {(32, 32): 3, (32, 48): 2, (48, 32): 2}
    # largest remainder first: 4 · (5, 3)/8 = 2.5, 1.5 -> both .5: the larger weight wins
    assert R.spread_over_buckets(4, {(32, 32): 3, (64, 64): 5}) == {(32, 32): 1, (64, 64): 3}
    spread = R.spread_over_buckets(1, {(32, 32): 1, (48, 32): 9})
    assert spread == {(32, 32): 0, (48, 32): 1} and sum(spread.values()) == 1


def test_layout_captions_seeds_and_resume(tmp_path, capsys, one_thread):
    out = tmp_path / "reg"
    rc, text, _ = _run(capsys, *_lab_args(out, "--count", "5", "--repeats", "2", "--seed", "10"))
    assert rc == 0 and "10 written, 0 kept" in text and "32x32: 10 images" in text
    folders = sorted(p.name for p in out.iterdir())
    assert folders == [f"2_{PROMPTS[1]}", f"2_{PROMPTS[0]}"]  # kohya reg layout: <repeats>_<class>
    for prompt in PROMPTS:
        folder = out / f"2_{prompt}"
        assert sorted(p.name for p in folder.iterdir()) == [f"{i:04d}.{e}" for i in range(5) for e in ("png", "txt")]
        for i in range(5):
            assert (folder / f"{i:04d}.txt").read_text(encoding="utf-8") == prompt + "\n"
            with Image.open(folder / f"{i:04d}.png") as im:
                assert im.size == (32, 32)
                meta = json.loads(im.text[R.META_KEY])
            assert meta["seed"] == 10 + i and meta["prompt"] == prompt and meta["sampler"] == "ddim"
            assert meta["steps"] == 4 and meta["cfg"] == 7.5 and "Negative prompt: \n" in im.text["parameters"]
    first = out / f"2_{PROMPTS[0]}"
    images = [_pixels(first / f"{i:04d}.png") for i in range(5)]
    assert all(not np.array_equal(images[0], im) for im in images[1:])  # seeds 10..14 differ

    # the same seed gives the same picture: another folder, same command -> identical pixels
    again = tmp_path / "again"
    assert _run(capsys, *_lab_args(again, "--count", "5", "--repeats", "2", "--seed", "10"))[0] == 0
    for i in range(5):
        assert np.array_equal(_pixels(again / f"2_{PROMPTS[0]}" / f"{i:04d}.png"), images[i])
    # a larger count under another seed: image i is seed 9 + i, so image i+1 here is image i there
    shifted = tmp_path / "shifted"
    assert _run(capsys, "--model", LAB, "--prompt", PROMPTS[0], "--out", str(shifted), "--steps", "4",
                "--batch-size", "3", "--count", "6", "--repeats", "2", "--seed", "9")[0] == 0
    assert np.abs(_pixels(shifted / f"2_{PROMPTS[0]}" / "0003.png") - images[2]).max() <= 2

    # resume: a deleted image and a deleted caption are filled in, the rest is not touched
    (first / "0002.png").unlink()
    (first / "0004.txt").unlink()
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.iterdir()}
    rc, text, _ = _run(capsys, *_lab_args(out, "--count", "5", "--repeats", "2", "--seed", "10"))
    assert rc == 0 and "1 written, 9 kept" in text
    assert (first / "0004.txt").read_text(encoding="utf-8") == PROMPTS[0] + "\n"
    refilled = _pixels(first / "0002.png")  # drawn alone instead of in a batch of 3: float rounding only
    assert np.abs(refilled - images[2]).max() <= 2
    for name, (mtime, data) in stamps.items():
        assert (first / name).stat().st_mtime_ns == mtime and (first / name).read_bytes() == data, name
    # a smaller count keeps its images and names the ones it does not use (kohya would train on them)
    rc, text, _ = _run(capsys, *_lab_args(out, "--count", "3", "--repeats", "2", "--seed", "10"))
    assert rc == 0 and "0 written, 6 kept" in text and "note: 4 other images" in text
    # another --repeats for the same class: one message, the existing folder is not doubled
    rc, _, err = _run(capsys, *_lab_args(out, "--count", "3", "--repeats", "1", "--seed", "10"))
    assert rc == 2 and f"holds this class with 2 repeats; rename it to 1_{PROMPTS[0]}" in err
    # other settings (steps) are not the same images: all are drawn again
    rc, text, _ = _run(capsys, *_lab_args(out, "--count", "5", "--repeats", "2", "--seed", "10", "--steps", "3"))
    assert rc == 0 and "10 written, 0 kept" in text


def test_dataset_buckets_spread_the_count(tmp_path, capsys, one_thread):
    data = tmp_path / "train"
    for folder, sizes in (("2_thing", [(48, 32)] * 3 + [(32, 32)]), ("1_other", [(32, 32)] * 2)):
        (data / folder).mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.new("RGB", size, (200, 30, 30)).save(data / folder / f"{i}.png")
            (data / folder / f"{i}.txt").write_text("thing", encoding="utf-8")
    buckets = ["--resolution", "40", "--min-bucket-reso", "32", "--max-bucket-reso", "64", "--bucket-reso-steps", "16"]
    # samples per epoch (images x repeats): 48x32: 3 x 2 = 6; 32x32: 1 x 2 + 2 x 1 = 4
    assert R.dataset_bucket_samples(data, resolution=(40, 40), min_bucket_reso=32, max_bucket_reso=64,
                                    bucket_reso_steps=16) == {(32, 32): 4, (48, 32): 6}
    out = tmp_path / "reg"
    rc, text, _ = _run(capsys, "--model", LAB, "--prompt", "shape", "--count", "5", "--out", str(out),
                       "--dataset", str(data), "--steps", "3", *buckets)
    assert rc == 0 and "32x32: 2 images" in text and "48x32: 3 images" in text
    sizes = []
    for i in range(5):
        with Image.open(out / "1_shape" / f"{i:04d}.png") as im:
            sizes.append(im.size)
    assert sizes == [(32, 32)] * 2 + [(48, 32)] * 3  # images 0.. in order of resolution


def test_tiny_sd_model(tmp_path, tiny_sd1_checkpoint, capsys, one_thread):
    """Any base model file: the tiny random SD 1.x checkpoint at its own size and at --resolution W,H."""
    out = tmp_path / "reg"
    rc, text, _ = _run(capsys, "--model", str(tiny_sd1_checkpoint), "--prompt", "woman", "--count", "3",
                       "--out", str(out), "--steps", "2", "--resolution", "48,32", "--seed", "3")
    assert rc == 0 and "3 written" in text and "48x32: 3 images" in text
    for i in range(3):
        with Image.open(out / "1_woman" / f"{i:04d}.png") as im:
            assert im.size == (48, 32) and json.loads(im.text[R.META_KEY])["seed"] == 3 + i
            assert json.loads(im.text[R.META_KEY])["model"].startswith(tiny_sd1_checkpoint.name)
        assert (out / "1_woman" / f"{i:04d}.txt").read_text() == "woman\n"


def test_demo_reg_images_use_this_code(tmp_path, one_thread):
    from loralab.lab import demo as D

    model = D.LabModel.load("cpu")
    items = D.class_prompts(4, 0)
    ev = D.DemoEval(ddim_steps=3)
    folder = D.write_reg_images(tmp_path, model, items, ev)
    (folder / "0009.png").write_bytes((folder / "0000.png").read_bytes())  # a stale image of a larger run
    stamp = (folder / "0001.png").stat().st_mtime_ns
    assert D.write_reg_images(tmp_path, model, items, ev) == folder
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:04d}.png" for i in range(4)]
    assert (folder / "0001.png").stat().st_mtime_ns == stamp  # kept, not redrawn
    for i, it in enumerate(items):
        assert (folder / f"{i:04d}.txt").read_text().strip() == it.caption()
        with Image.open(folder / f"{i:04d}.png") as im:
            meta = json.loads(im.text[R.META_KEY])
        assert (im.size, meta["seed"], meta["steps"]) == ((it.width, it.height), ev.seed + it.seed + i, 3)


@pytest.mark.parametrize("args, message", [
    (["--count", "0"], "--count 0: give how many reg images"),
    (["--count", "-3"], "--count -3"),
    (["--model", "no_such_model.safetensors"], "--model no_such_model.safetensors: no such file"),
    (["--resolution", "30,30"], "--resolution 30,30: width and height must be positive multiples of 8"),
    (["--prompt", "  "], "the class prompt is empty"),
    (["--prompt", "woman --n ugly"], "no prompt options"),
    (["--steps", "0"], "--steps 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--repeats", "0"], "--repeats 0"),
    (["--sampler", "nope"], "--sampler 'nope': unknown"),
    (["--dataset", "no_such_dir"], "--dataset no_such_dir: no such folder"),
])
def test_bad_input_is_one_message(tmp_path, capsys, args, message):
    base = {"--model": LAB, "--prompt": "woman", "--count": "2", "--out": str(tmp_path / "reg")}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    rc, _, err = _run(capsys, *[x for kv in base.items() for x in kv])
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "reg").exists()


def test_cli_subprocess_messages(tmp_path):
    """The real command: a bad count and a bad resolution exit 2 with one message each, no traceback."""
    for args, message in ((["--count", "0"], "--count 0: give how many reg images to make per prompt"),
                          (["--count", "2", "--resolution", "big"], "argument --resolution")):
        proc = subprocess.run([sys.executable, "-m", "loralab.cli", "reg-images", "--model", LAB, "--prompt", "woman",
                               "--out", str(tmp_path / "reg"), *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "loralab.cli", "reg-images", "--model", LAB, "--count", "2",
                           "--out", str(tmp_path / "reg")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "give the class prompt" in proc.stderr and "Traceback" not in proc.stderr
