"""`loralab dataset check`: each planted problem is reported with its file; a clean dataset reports none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loralab.analyze.dataset_check import (
    BucketSettings,
    activation_tag,
    check_dataset,
    dhash,
    phash,
    render_report,
    scan_dataset,
    suggest_batch_size,
)


def picture(size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth random colour picture (distinct seeds give unrelated pictures, far apart in pHash)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img)


def write_image(path: Path, size=(512, 512), seed=0, mode="RGB", caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = picture(size, seed)
    img = Image.fromarray(arr, "RGB")
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
        alpha = np.full((size[1], size[0]), 255, np.uint8)
        alpha[: size[1] // 4] = 0
        img.putalpha(Image.fromarray(alpha, "L"))
    img.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def clean_dataset(root: Path) -> Path:
    """train/5_alice: 4 captioned 512x512 images; train/5_bob: 4 images 384x640 (one bucket)."""
    train = root / "train"
    for i in range(4):
        write_image(train / "5_alice" / f"a{i}.png", seed=i, caption=f"alice, smile, pose{i}")
        write_image(train / "5_bob" / f"b{i}.png", (384, 640), seed=100 + i, caption=f"bob, red hair, view{i}")
    return train


def codes_by_file(report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in report.problems:
        out.setdefault(Path(p.file).name if p.file else "", set()).add(p.code)
    return out


def test_clean_dataset_reports_nothing(tmp_path):
    train = clean_dataset(tmp_path)
    report = check_dataset(train, settings=BucketSettings(batch_size=4), progress=False)
    assert report.problems == []
    assert not report.has_errors
    alice = next(c for c in report.concepts if c.name == "5_alice")
    assert (alice.images, alice.repeats, alice.samples_per_epoch) == (4, 5, 20)
    assert alice.activation_tag == "alice" and alice.activation_source == "first tag"
    assert alice.epoch_share == pytest.approx(20 / 40)
    assert [b.resolution for b in report.buckets] == [(384, 640), (512, 512)]
    assert report.steps_per_epoch == 5 + 5
    text = render_report(report)
    assert "5_alice" in text and "0 errors, 0 warnings" in text


@pytest.fixture
def planted(tmp_path):
    """One file per problem type, next to well-formed images of the concept `jinx`."""
    train = tmp_path / "train"
    c = train / "3_jinx"
    for i in range(6):
        write_image(c / f"ok{i}.png", seed=i, caption=f"jinx, blue hair, pose{i}")
    # unreadable: truncated png (header intact) and garbage bytes
    write_image(c / "truncated.png", seed=50, caption="jinx, truncated")
    data = (c / "truncated.png").read_bytes()
    (c / "truncated.png").write_bytes(data[: len(data) // 2])
    (c / "garbage.png").write_bytes(b"this is not a png at all")
    (c / "garbage.txt").write_text("jinx, garbage", encoding="utf-8")
    # exact duplicate of ok0 and a near duplicate of ok1 (resized, re-encoded as JPEG)
    (c / "copy_of_ok0.png").write_bytes((c / "ok0.png").read_bytes())
    (c / "copy_of_ok0.txt").write_text("jinx, copy", encoding="utf-8")
    Image.open(c / "ok1.png").resize((448, 448)).save(c / "near_ok1.jpg", quality=85)
    (c / "near_ok1.txt").write_text("jinx, near", encoding="utf-8")
    # captions
    write_image(c / "no_activation.png", seed=60, caption="blue hair, smile")
    write_image(c / "not_first.png", seed=61, caption="blue hair, jinx, smile")
    write_image(c / "long.png", seed=62, caption=", ".join(["jinx"] + [f"very long tag number {k}" for k in range(30)]))
    write_image(c / "dup_tag.png", seed=63, caption="jinx, smile, smile")
    write_image(c / "no_caption.png", seed=64)
    write_image(c / "empty_caption.png", seed=65, caption="")
    # images
    write_image(c / "gray.png", seed=70, mode="L", caption="jinx, gray")
    write_image(c / "gray_tagged.png", seed=71, mode="L", caption="jinx, monochrome")
    write_image(c / "alpha.png", seed=72, mode="RGBA", caption="jinx, alpha")
    write_image(c / "small.png", (128, 128), seed=73, caption="jinx, small")
    write_image(c / "wide.png", (1024, 256), seed=74, caption="jinx, wide")
    # a bucket with one image at batch size 4: the only 768x448-ish image
    write_image(c / "lonely.png", (640, 384), seed=75, caption="jinx, lonely")
    return train


def test_planted_problems_are_reported_with_their_files(planted):
    report = check_dataset(planted, settings=BucketSettings(batch_size=4), progress=False)
    got = codes_by_file(report)
    expect = {
        "truncated.png": "unreadable_image",
        "garbage.png": "unreadable_image",
        "copy_of_ok0.png": "duplicate",
        "ok0.png": "duplicate",
        "near_ok1.jpg": "near_duplicate",
        "ok1.png": "near_duplicate",
        "no_activation.txt": "activation_missing",
        "not_first.txt": "activation_not_first",
        "long.txt": "caption_too_long",
        "dup_tag.txt": "duplicate_tag",
        "no_caption.png": "missing_caption",
        "empty_caption.txt": "empty_caption",
        "gray.png": "grayscale",
        "alpha.png": "alpha",
        "small.png": "too_small",
        "wide.png": "extreme_aspect",
        "lonely.png": "partial_batches",
    }
    for name, code in expect.items():
        assert code in got.get(name, set()), (name, code, got.get(name))
    assert "grayscale" not in got.get("gray_tagged.png", set())
    # the well-formed images carry no problem of their own
    for i in range(2, 6):
        assert got.get(f"ok{i}.png", set()) <= {"partial_batches"}
    errors = {Path(p.file).name for p in report.problems if p.level == "error"}
    assert errors == {"truncated.png", "garbage.png"}
    assert report.has_errors
    lonely = next(p for p in report.by_code("partial_batches") if Path(p.file).name == "lonely.png")
    assert lonely.level == "warning" and "fewer than the batch size 4" in lonely.message
    long = report.by_code("caption_too_long")[0]
    assert "very long tag number 29" in long.message or "cut off" in long.message
    # the 1024x256 image lies in the 1024x256 bucket; the broken ones have no bucket
    by_name = {Path(i.file).name: i for i in report.images}
    assert by_name["wide.png"].bucket == (1024, 256)
    assert by_name["garbage.png"].bucket is None and by_name["garbage.png"].size is None


def test_several_activation_tags_and_reg(tmp_path):
    train = tmp_path / "train"
    for i in range(4):
        write_image(train / "3_jinx" / f"a{i}.png", seed=i, caption=f"jinx, pose{i}")
        write_image(train / "3_jinx" / f"b{i}.png", seed=10 + i, caption=f"jinxarcane, pose{i}")
    reg = tmp_path / "reg"
    write_image(reg / "1_girl" / "r0.png", seed=40, caption="1girl, jinx")
    write_image(reg / "1_girl" / "r1.png", seed=41, caption="1girl")
    report = check_dataset(train, reg, settings=BucketSettings(batch_size=1), progress=False)
    several = report.by_code("several_activation_tags")
    assert len(several) == 1 and several[0].concept == "3_jinx"
    assert [Path(p.file).name for p in report.by_code("activation_in_reg")] == ["r0.txt"]
    reg_info = next(c for c in report.concepts if c.kind == "reg")
    assert reg_info.images == 2 and reg_info.samples_per_epoch == 24  # balanced up to the 24 train samples


def test_activation_tag_rule(tmp_path):
    train = tmp_path / "train"
    write_image(train / "2_vi" / "a.png", seed=1, caption="1girl, vi")
    write_image(train / "2_vi" / "b.png", seed=2, caption="solo, vi")
    write_image(train / "2_vi" / "c.png", seed=3)
    ds = scan_dataset(train)
    act = activation_tag(ds.images_of(ds.subsets[0]), ds.subsets[0].class_tokens)
    assert (act.tag, act.source) == ("vi", "folder name")


def test_suggest_batch_size():
    assert suggest_batch_size([8, 12, 4], 4) == 4
    assert suggest_batch_size([6, 12, 18], 4) == 3
    assert suggest_batch_size([5, 7], 4) is None


def test_hashes_tell_near_from_different():
    a = Image.fromarray(picture((256, 256), 1)).convert("L")
    near = a.resize((200, 200))
    other = Image.fromarray(picture((256, 256), 2)).convert("L")
    assert np.count_nonzero(phash(a) != phash(near)) <= 4
    assert np.count_nonzero(dhash(a) != dhash(near)) <= 6
    assert np.count_nonzero(phash(a) != phash(other)) > 16


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "loralab.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_check_json_exit_status(tmp_path):
    train = clean_dataset(tmp_path)
    ok = run_cli("dataset", "check", str(train), "--json", "--batch-size", "4")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["counts"] == {"error": 0, "warning": 0, "info": 0}
    (train / "5_alice" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    bad = run_cli("dataset", "check", str(train), "--json")
    assert bad.returncode == 1
    data = json.loads(bad.stdout)
    assert [Path(p["file"]).name for p in data["problems"] if p["level"] == "error"] == ["broken.png"]
    table = run_cli("dataset", "check", str(train))
    assert table.returncode == 1 and "unreadable_image" in table.stdout
    missing = run_cli("dataset", "check", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")


def test_errors_that_stop_training_and_empty_folders(tmp_path):
    train = tmp_path / "train"
    write_image(train / "1_a" / "big.png", seed=1, caption="a, b")
    write_image(train / "1_a" / "tiny.png", (40, 300), seed=2, caption="a, c")
    write_image(train / "1_a" / "latin1.png", seed=3)
    (train / "1_a" / "latin1.txt").write_bytes("a, caf\u00e9".encode("latin-1"))
    (train / "2_empty").mkdir()
    (train / "1_a" / "old.caption").write_text("a", encoding="utf-8")
    write_image(train / "1_a" / "old.png", seed=4)
    report = check_dataset(train, settings=BucketSettings(bucket_no_upscale=True), progress=False)
    found = {(p.level, p.code, Path(p.file).name) for p in report.problems}
    assert ("error", "too_small", "tiny.png") in found  # no bucket at all with bucket_no_upscale
    assert ("error", "unreadable_caption", "latin1.txt") in found
    assert ("warning", "empty_folder", "2_empty") in found
    old = next(p for p in report.problems if p.code == "missing_caption" and Path(p.file).name == "old.png")
    assert "--caption-extension .caption" in old.message
    assert sum(b.images for b in report.buckets) == 3  # tiny.png is left out of the epoch, as training must


def tree_state(root: Path) -> dict[str, object]:
    """Every entry under `root`, links not followed: a file's bytes, a link's target, or "dir"."""
    out: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


def symlink_or_skip(link: Path, target: str) -> None:
    try:
        os.symlink(target, link)
    except (OSError, NotImplementedError):
        pytest.skip("this system cannot make symlinks")


LOOP = ("a symlink loop (following it leads back to itself): it is skipped; point the link at the real file "
        "(or folder) or delete it")


def test_symlink_loops_and_broken_links_are_findings_not_silence(tmp_path):
    train = clean_dataset(tmp_path)
    c = train / "5_alice"
    symlink_or_skip(c / "loop.png", "loop.png")  # ln -s loop.png loop.png
    os.symlink("b.png", c / "a.png")  # a -> b, b -> a
    os.symlink("a.png", c / "b.png")
    os.symlink("gone.png", c / "broken.png")
    (c / "a3.txt").unlink()
    os.symlink("a3.txt", c / "a3.txt")  # a caption that loops
    os.symlink("..", c / "up")  # a folder link to its parent: not recursed into
    os.symlink("7_loop", train / "7_loop")  # a concept folder that loops
    before = tree_state(tmp_path)
    report = check_dataset(train, settings=BucketSettings(batch_size=4), progress=False)
    found = {(p.level, p.code, Path(p.file).name): p.message for p in report.problems if "symlink" in p.code}
    assert found == {
        ("warning", "symlink_loop", "loop.png"): LOOP,
        ("warning", "symlink_loop", "a.png"): LOOP,
        ("warning", "symlink_loop", "b.png"): LOOP,
        ("warning", "symlink_loop", "a3.txt"): LOOP,
        ("warning", "symlink_loop", "7_loop"): LOOP,
        ("warning", "broken_symlink", "broken.png"): "a broken symlink, target missing (gone.png): it is skipped; "
                                                     "point the link at the real file (or folder) or delete it",
    }
    text = render_report(report)
    assert f"5_alice/loop.png: {LOOP}" in text and "7_loop: " + LOOP in text
    assert next(x for x in report.concepts if x.name == "5_alice").images == 4
    assert tree_state(tmp_path) == before
    cli = run_cli("dataset", "check", str(train), "--json")
    assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr
    codes = sorted(p["code"] for p in json.loads(cli.stdout)["problems"] if "symlink" in p["code"])
    assert codes == ["broken_symlink"] + ["symlink_loop"] * 5
    assert tree_state(tmp_path) == before


def test_a_1x1_image_is_named_by_the_check_and_by_training_in_the_same_words(tmp_path, caplog):
    import logging

    from loralab.data.dataset import FolderDataset, scan_folder_dataset

    train = clean_dataset(tmp_path)
    dot = write_image(train / "5_alice" / "dot.png", (1, 1), seed=9, caption="alice, dot")
    before = tree_state(tmp_path)
    words = ("1x1 is less than half the training area 512x512: it is upscaled x512.0 to its 512x512 bucket and "
             "trains blurry; use a larger image")
    with caplog.at_level(logging.WARNING):
        report = check_dataset(train, settings=BucketSettings(batch_size=4), progress=False)
    assert [(p.level, p.message) for p in report.by_code("too_small")] == [("warning", words)]
    assert "dot.png" not in caplog.text  # the check reports it once, in its report
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        subsets = scan_folder_dataset(train, caption_extension=".txt")
        FolderDataset(subsets, resolution=(512, 512), batch_size=4, enable_bucket=True)
    # one warning for the file, though its folder repeats it 5 times an epoch
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", f"{dot}: {words}")]
    assert tree_state(tmp_path) == before
