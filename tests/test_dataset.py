"""Folder datasets: scanning, captions, repeats, reg balancing, buckets and batches."""

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from loralab.data.buckets import BucketChoice
from loralab.data.dataset import (
    FolderDataset,
    dataset_dirs,
    reg_balancing,
    repeats_from_folder_name,
    scan_folder_dataset,
    tag_frequency,
)
from loralab.data.images import load_image, prepare_image, read_image_size
from loralab.errors import LoralabError


def make_image(path: Path, size, seed=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return path


@pytest.fixture
def layout(tmp_path):
    """train/5_alice (2 imgs 64x64, one uncaptioned), train/3_bob (3 imgs 96x64), reg/1_person (10 imgs)."""
    train, reg = tmp_path / "train", tmp_path / "reg"
    make_image(train / "5_alice" / "a1.png", (64, 64), 1)
    (train / "5_alice" / "a1.txt").write_text("Alice, smile\n", encoding="utf-8")
    make_image(train / "5_alice" / "a2.jpg", (64, 64), 2)
    for i in range(3):
        make_image(train / "3_bob" / f"b{i}.png", (96, 64), 10 + i)
        (train / "3_bob" / f"b{i}.txt").write_text(f"bob, red hair, pose{i}", encoding="utf-8")
    for i in range(10):
        make_image(reg / "1_person" / f"r{i:02d}.png", (64, 64), 100 + i)
        (reg / "1_person" / f"r{i:02d}.txt").write_text("person", encoding="utf-8")
    return train, reg


def build(subsets, **kw):
    args = dict(resolution=(64, 64), batch_size=4, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                bucket_reso_steps=16)
    args.update(kw)
    return FolderDataset(subsets, **args)


def test_folder_name_rule():
    assert repeats_from_folder_name("10_sks girl") == (10, "sks girl")
    assert repeats_from_folder_name("3_a_b") == (3, "a_b")
    assert repeats_from_folder_name("7") == (7, "")
    assert repeats_from_folder_name("mychar") is None
    assert repeats_from_folder_name("0_x") is None


def test_scan_subsets_captions_and_missing_caption_warning(layout, caplog):
    train, reg = layout
    with caplog.at_level(logging.WARNING):
        subsets = scan_folder_dataset(train, reg, caption_extension=".txt")
    assert [(s.name, s.num_repeats, s.class_tokens, s.is_reg, s.img_count) for s in subsets] == [
        ("3_bob", 3, "bob", False, 3), ("5_alice", 5, "alice", False, 2), ("1_person", 1, "person", True, 10)]
    alice = subsets[1]
    assert [(e.path.name, e.caption, e.size) for e in alice.images] == [
        ("a1.png", "Alice, smile", (64, 64)), ("a2.jpg", "alice", (64, 64))]
    assert "a2.jpg" in caplog.text and "no .txt caption" in caplog.text


def test_wrong_caption_extension_hint(layout, caplog):
    train, _ = layout
    with caplog.at_level(logging.WARNING):
        subsets = scan_folder_dataset(train)  # kohya's default ".caption"
    assert subsets[0].images[0].caption == "bob"
    assert 'caption_extension = ".txt"' in caplog.text


def test_tag_frequency_and_dataset_dirs(layout):
    subsets = scan_folder_dataset(*layout, caption_extension=".txt")
    freq = tag_frequency(subsets)
    assert freq["5_alice"] == {"alice": 2, "smile": 1}
    assert freq["3_bob"]["bob"] == 3 and freq["3_bob"]["red hair"] == 3 and freq["3_bob"]["pose0"] == 1
    assert freq["1_person"] == {"person": 10}  # kohya's folder mode counts reg folders too
    assert "1_person" not in tag_frequency(subsets, include_reg=False)
    assert dataset_dirs(subsets, reg=False) == {"3_bob": {"n_repeats": 3, "img_count": 3},
                                                "5_alice": {"n_repeats": 5, "img_count": 2}}
    assert dataset_dirs(subsets, reg=True) == {"1_person": {"n_repeats": 1, "img_count": 10}}


def test_repeats_reg_balancing_and_batches(layout):
    subsets = scan_folder_dataset(*layout, caption_extension=".txt")
    ds = build(subsets)
    assert ds.num_train_images == 2 * 5 + 3 * 3 == 19
    assert ds.num_reg_images == 10
    # 10 reg images x1 = 10 < 19, second pass +1 to the first 9 -> 19
    reg = [s for s in ds.samples if s.is_reg]
    assert [s.repeats for s in reg] == [2] * 9 + [1]
    assert ds.num_reg_samples == 19
    assert ds.num_samples_per_epoch == 38
    stats = {b.resolution: (b.images, b.count) for b in ds.buckets}
    assert stats == {(64, 64): (12, 29), (80, 48): (3, 9)}
    assert ds.num_batches_per_epoch == 8 + 3  # ceil(29/4) + ceil(9/4)
    batches = ds.batches_for_epoch(0, seed=42)
    assert len(batches) == ds.num_batches_per_epoch
    assert all(len({s.choice.bucket for s in b}) == 1 for b in batches)
    assert sorted(len(b) for b in batches) == [1, 1] + [4] * 9
    counts = {}
    for b in batches:
        for s in b:
            counts[id(s)] = counts.get(id(s), 0) + 1
    assert all(counts[id(s)] == s.repeats for s in ds.samples)
    info = ds.bucket_info()
    assert info["buckets"] == {0: {"resolution": (64, 64), "count": 29}, 1: {"resolution": (80, 48), "count": 9}}


def test_batches_deterministic_per_epoch_and_seed(layout):
    ds = build(scan_folder_dataset(*layout, caption_extension=".txt"))

    def order(epoch, seed):
        return [[str(s.entry.path) for s in b] for b in ds.batches_for_epoch(epoch, seed)]

    assert order(3, 7) == order(3, 7)
    assert order(3, 7) != order(4, 7)
    assert order(3, 7) != order(3, 8)


def test_reg_balancing_rule_surplus_unused():
    sub = SimpleNamespace(num_repeats=2)
    regs = [SimpleNamespace(subset=sub, name=i) for i in range(10)]
    used = reg_balancing(regs, 7)  # first pass stops after 4 images: 2+2+2+2 = 8 >= 7
    assert [(e.name, r) for e, r in used] == [(0, 2), (1, 2), (2, 2), (3, 2)]
    assert [r for _, r in reg_balancing(regs[:2], 7)] == [4, 3]  # 2+2, then +1 +1, then +1 -> 7
    assert reg_balancing(regs, 0) == []


def test_no_bucket_mode_single_bucket(layout):
    train, _ = layout
    ds = build(scan_folder_dataset(train, caption_extension=".txt"), enable_bucket=False)
    assert {s.choice.bucket for s in ds.samples} == {(64, 64)}
    bob = next(s for s in ds.samples if s.entry.path.name == "b0.png")
    assert bob.choice.resized == (96, 64) and bob.choice.crop_ltrb == (16, 0, 80, 64)
    assert ds.bucket_info() is None


def test_leaf_folder_selected_is_explained(layout):
    train, _ = layout
    with pytest.raises(LoralabError, match="image folder itself") as err:
        scan_folder_dataset(train / "5_alice", caption_extension=".txt")
    assert "train_data_dir" in str(err.value) and "parent" in str(err.value)


def test_folder_without_repeats(tmp_path, caplog):
    make_image(tmp_path / "train" / "mychar" / "x.png", (32, 32))
    with pytest.raises(LoralabError, match="10_mychar") as err:
        scan_folder_dataset(tmp_path / "train")
    assert "repeat count" in str(err.value)
    make_image(tmp_path / "train" / "2_other" / "y.png", (32, 32))
    with caplog.at_level(logging.WARNING):
        subsets = scan_folder_dataset(tmp_path / "train")
    assert [s.name for s in subsets] == ["2_other"]
    assert "mychar" in caplog.text


def test_missing_dirs_and_no_images(tmp_path):
    with pytest.raises(LoralabError, match="does not exist"):
        scan_folder_dataset(tmp_path / "nope")
    (tmp_path / "t" / "5_x").mkdir(parents=True)
    with pytest.raises(LoralabError, match="no images"):
        scan_folder_dataset(tmp_path / "t")
    make_image(tmp_path / "t" / "5_x" / "a.png", (32, 32))
    with pytest.raises(LoralabError, match="reg_data_dir"):
        scan_folder_dataset(tmp_path / "t", tmp_path / "missing_reg")


def test_corrupt_image_named_at_scan(tmp_path):
    bad = tmp_path / "t" / "5_x" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image at all")
    with pytest.raises(LoralabError, match="bad.png") as err:
        scan_folder_dataset(tmp_path / "t")
    assert "re-save" in str(err.value)


def test_truncated_image_named_when_loaded(tmp_path):
    path = make_image(tmp_path / "t" / "5_x" / "cut.png", (64, 64), 3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert read_image_size(path) == (64, 64)  # the header is intact
    subsets = scan_folder_dataset(tmp_path / "t")
    ds = build(subsets)
    with pytest.raises(LoralabError, match="cut.png") as err:
        prepare_image(ds.samples[0].entry.path, ds.samples[0].choice)
    assert "truncated" in str(err.value) and "Remove it" in str(err.value)


def test_prepare_image_resize_crop_flip(tmp_path):
    path = make_image(tmp_path / "w.png", (128, 64), 5)
    choice = BucketChoice(bucket=(48, 32), resized=(64, 32), crop_ltrb=(8, 0, 56, 32), ar_error=-0.5,
                          image_size=(128, 64))
    x = prepare_image(path, choice)
    assert tuple(x.shape) == (3, 32, 48) and x.min() >= -1 and x.max() <= 1
    expected = np.asarray(Image.open(path).resize((64, 32), Image.Resampling.BOX).crop((8, 0, 56, 32)), np.float32)
    assert np.allclose(x.permute(1, 2, 0).numpy(), expected / 127.5 - 1, atol=1e-5)
    flipped = prepare_image(path, choice, flip=True)
    assert np.allclose(flipped.numpy(), x.flip(2).numpy())


def test_alpha_composited_on_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_zero_repeats_folder_is_explained(tmp_path, caplog):
    make_image(tmp_path / "train" / "0_unused" / "x.png", (32, 32))
    make_image(tmp_path / "train" / "3_used" / "y.png", (32, 32))
    with caplog.at_level(logging.WARNING):
        subsets = scan_folder_dataset(tmp_path / "train")
    assert [s.name for s in subsets] == ["3_used"]
    assert "0 repeats means its images are never used" in caplog.text and "1_unused" in caplog.text
    assert "does not start with a repeat count" not in caplog.text


def test_a_very_large_image_gets_our_warning_naming_the_file(tmp_path):
    """In a real process (pytest resets warning filters): our warning naming the file, not PIL's raw one."""
    import subprocess
    import sys

    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    code = ("import logging; logging.basicConfig(); from PIL import Image; Image.MAX_IMAGE_PIXELS = 40_000; "
            "from loralab.data.images import load_image, read_image_size; "
            f"print(read_image_size({str(path)!r}), load_image({str(path)!r}).size)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "(300, 200) (300, 200)"
    assert r.stderr.count("big.png: a very large image (300x200, over 40000 pixels)") == 2
    assert "DecompressionBombWarning" not in r.stderr


def _snapshot(root: Path) -> dict[str, object]:
    """Every entry under `root`, links not followed: a file's bytes, a link's target, or "dir"."""
    import os

    out: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


SKIPPED = "it is skipped; point the link at the real file (or folder) or delete it"


def test_symlink_loops_and_broken_links_are_named_when_training(tmp_path, caplog):
    import os

    train = tmp_path / "train"
    c = train / "3_x"
    make_image(c / "ok.png", (64, 64), 1)
    try:
        os.symlink("loop.png", c / "loop.png")  # ln -s loop.png loop.png
    except (OSError, NotImplementedError):
        pytest.skip("this system cannot make symlinks")
    os.symlink("b.jpg", c / "a.jpg")  # a -> b, b -> a
    os.symlink("a.jpg", c / "b.jpg")
    os.symlink("gone.png", c / "broken.png")
    os.symlink("..", c / "up")  # a folder link to its parent: the scan does not recurse, nothing to say
    os.symlink("2_loop", train / "2_loop")
    before = _snapshot(tmp_path)
    with caplog.at_level(logging.WARNING):
        subsets = scan_folder_dataset(train, caption_extension=".txt")
        build(subsets)
    assert [e.path.name for s in subsets for e in s.images] == ["ok.png"]
    loop = f"a symlink loop (following it leads back to itself): {SKIPPED}"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and SKIPPED in r.getMessage()]
    assert warned == [
        f"{train / '2_loop'}: {loop}",
        f"{c / 'a.jpg'}: {loop}",
        f"{c / 'b.jpg'}: {loop}",
        f"{c / 'broken.png'}: a broken symlink, target missing (gone.png): {SKIPPED}",
        f"{c / 'loop.png'}: {loop}",
    ]
    # a dataset folder that is itself a looping link: an error naming it, not "does not exist"
    os.symlink("self", tmp_path / "self")
    with pytest.raises(LoralabError) as err:
        scan_folder_dataset(tmp_path / "self")
    assert str(err.value) == (
        f"train_data_dir: {tmp_path / 'self'} is a symlink loop (following it leads back to itself); point the link "
        f"at the dataset folder, or give the folder that holds <repeats>_<name>/ folders")
    (tmp_path / "self").unlink()
    # a dataset whose only concept folder is a looping link: the error names the link
    only = tmp_path / "only"
    only.mkdir()
    os.symlink("10_x", only / "10_x")
    with pytest.raises(LoralabError) as err:
        scan_folder_dataset(only)
    assert "has no <repeats>_<name>/ image folders (10_x is a symlink loop (following it leads back to itself))" \
        in str(err.value)
    (only / "10_x").unlink()
    only.rmdir()
    assert _snapshot(tmp_path) == before


def test_degenerate_images_warn_once_per_file_when_training(tmp_path, caplog):
    train, reg = tmp_path / "train", tmp_path / "reg"
    make_image(train / "5_x" / "ok.png", (64, 64), 1)
    dot = make_image(train / "5_x" / "dot.png", (1, 1), 2)
    strip = make_image(train / "5_x" / "strip.png", (192, 48), 3)
    rdot = make_image(reg / "1_person" / "rdot.png", (1, 1), 4)
    before = _snapshot(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = build(scan_folder_dataset(train, reg))
    assert ds.num_train_images == 15  # repeats do not repeat the warnings
    warned = [r.getMessage() for r in caplog.records
              if r.name == "loralab.data.dataset" and r.levelno == logging.WARNING and "caption" not in r.getMessage()]
    too_small = ("1x1 is less than half the training area 64x64: it is upscaled x64.0 to its 64x64 bucket and "
                 "trains blurry; use a larger image")
    assert sorted(warned) == sorted([
        f"{dot}: {too_small}",
        f"{rdot}: {too_small}",
        f"{strip}: aspect ratio 4.0:1 (192x48); crop it into parts closer to the bucket shapes",
    ])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build(scan_folder_dataset(train, reg), warn_degenerate=False)  # `dataset check` reports them itself
    assert "training area" not in caplog.text and "aspect ratio" not in caplog.text
    assert _snapshot(tmp_path) == before

    for i in range(5):  # 8 degenerate images: five named, then one line for the rest
        make_image(train / "5_x" / f"dot{i}.png", (1, 1), 10 + i)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build(scan_folder_dataset(train, reg))
    warned = [r.getMessage() for r in caplog.records if r.name == "loralab.data.dataset" and "caption" not in r.getMessage()]
    assert len(warned) == 6 and warned[-1] == ("... and 3 more images too small or too narrow for this resolution; "
                                               "`loralab dataset check` lists them all")
