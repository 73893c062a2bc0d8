"""The lab world: reproducible rendering, captions, held-out triples, aspect ratios, the analytic
evaluator on clean images, and the kohya dataset writer. No CNN is trained here."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from loralab.lab import world as W
from loralab.lab.evaluator import Evaluator, ShapeCNN, accuracy, analytic_predict, analyze, shape_input


def _render_all(items):
    return [it.render() for it in items]


def test_same_seed_same_bytes_and_different_seed_differs():
    a = W.sample_world(40, np.random.default_rng(7))
    b = W.sample_world(40, np.random.default_rng(7))
    c = W.sample_world(40, np.random.default_rng(8))
    assert a == b
    assert b"".join(x.tobytes() for x in _render_all(a)) == b"".join(x.tobytes() for x in _render_all(b))
    assert a != c
    one = W.render("star", "red", "blue", "small", 48, 32, np.random.default_rng(3))
    assert one.tobytes() == W.render("star", "red", "blue", "small", 48, 32, np.random.default_rng(3)).tobytes()
    assert one.tobytes() != W.render("star", "red", "blue", "small", 48, 32, np.random.default_rng(4)).tobytes()


def test_render_many_independent_of_workers_and_order():
    items = [it for it in W.sample_world(60, np.random.default_rng(1)) if (it.width, it.height) == (32, 32)]
    serial = W.render_many(items, workers=1)
    forked = W.render_many(items, workers=2, chunk=max(1, len(items) // 2))
    assert serial.dtype == np.uint8 and serial.shape == (len(items), 32, 32, 3)
    np.testing.assert_array_equal(serial, forked)
    np.testing.assert_array_equal(W.render_many(items[::-1])[::-1], serial)


def test_captions():
    assert W.caption("circle", "red", "blue", "large") == "red circle, blue background, large"
    assert W.caption("ring", "red", "blue", "small", tag="olis") == "olis, red, blue background, small"
    item = W.WorldItem("heart", "white", "gray", "small", 32, 48, 5)
    assert W.parse_caption(item.caption()) == item.attributes
    with pytest.raises(ValueError):
        W.parse_caption("olis, red, blue background, small")


def test_held_out_triples_never_in_training_sampler():
    held = set(W.HELD_OUT_TRIPLES)
    assert len(held) == 26 == round(0.1 * len(W.all_triples()))
    assert list(W.HELD_OUT_TRIPLES) == W.draw_held_out_triples(5)  # the frozen list is the drawn one
    assert not W.check_pairs_covered(W.training_triples(), W.HELD_OUT_TRIPLES)
    items = W.sample_world(20_000, np.random.default_rng(0))
    assert not any(it.triple in held for it in items)
    assert not any(it.shape == W.HELD_OUT_SHAPE for it in items)
    assert all(it.colour != it.background for it in items)
    assert {it.triple for it in items} == set(W.training_triples())  # every training triple is drawn
    prompts = W.held_out_prompts()
    assert len(prompts) == 52 and {p.triple for p in prompts} == held


def test_both_aspect_ratios_and_sizes_produced():
    items = W.sample_world(300, np.random.default_rng(2))
    sizes = Counter((it.width, it.height) for it in items)
    assert set(sizes) == set(W.DEFAULT_IMAGE_SIZES) and min(sizes.values()) > 50
    assert {it.size for it in items} == set(W.SIZES)
    for (w, h), idx in W.group_by_image_size(items).items():
        assert items[idx[0]].render().shape == (h, w, 3)
        # latents of a 4x VAE must be divisible by the UNet's 2x downsampling
        assert (w // 4) % 2 == 0 and (h // 4) % 2 == 0


def _clean_batch(n: int, seed: int, size: tuple[int, int]):
    items = W.sample_world(n, np.random.default_rng(seed), shapes=W.SHAPES, triples=W.all_triples(W.SHAPES),
                           sizes=[size])
    x = torch.from_numpy(W.render_many(items)).permute(0, 3, 1, 2)
    return items, x


@pytest.mark.parametrize("size", W.DEFAULT_IMAGE_SIZES)
def test_analytic_evaluator_on_clean_images(size):
    items, x = _clean_batch(150, 11, size)
    a = analyze(x)
    preds = analytic_predict(a)
    expected = [{k: v for k, v in it.attributes.items() if k != "shape"} for it in items]
    acc = accuracy(preds, expected)
    assert acc["colour"] == acc["background"] == acc["size"] == 1.0, acc
    inp = shape_input(a)
    assert inp.shape == (len(items), 1, 32, 32) and torch.isfinite(inp).all()


def test_analytic_evaluator_finds_no_object_on_blank_image():
    x = torch.full((2, 3, 32, 32), 128.0)
    p = analytic_predict(analyze(x))
    assert p[0]["colour"] is None and p[0]["size"] is None and p[0]["background"] == "gray"


def test_evaluator_save_load_and_predict_mixed_sizes(tmp_path):
    torch.manual_seed(0)
    ev = Evaluator(ShapeCNN(), info={"note": "untrained"})
    path = tmp_path / "ev.safetensors"
    ev.save(path)
    ev2 = Evaluator.load(path)
    assert ev2.shapes == W.SHAPES and ev2.info == {"note": "untrained"}
    items = [W.WorldItem("circle", "red", "white", "large", w, h, 1) for w, h in W.DEFAULT_IMAGE_SIZES]
    images = [Image.fromarray(it.render()) for it in items]
    preds = ev2.predict(images)
    assert [p["colour"] for p in preds] == ["red"] * 3 and all(p["shape"] in W.SHAPES for p in preds)
    acc = ev2.score(images, [it.attributes for it in items])
    assert acc["n"] == 3 and acc["colour"] == 1.0 and acc["background"] == 1.0 and acc["size"] == 1.0


def test_kohya_dataset_writer(tmp_path):
    folder = W.write_kohya_dataset(tmp_path, shape="ring", tag="olis", n=9, repeats=10, seed=3)
    assert folder == tmp_path / "10_olis"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 9
    sizes = set()
    for png in pngs:
        txt = png.with_suffix(".txt").read_text().strip()
        assert txt.startswith("olis, ") and "ring" not in txt and txt.count(",") == 3
        with Image.open(png) as im:
            assert im.mode == "RGB"
            sizes.add(im.size)
    assert sizes == set(W.DEFAULT_IMAGE_SIZES)
    again = W.write_kohya_dataset(tmp_path / "b", shape="ring", tag="olis", n=9, repeats=10, seed=3)
    assert [p.read_bytes() for p in sorted(again.iterdir())] == [p.read_bytes() for p in sorted(folder.iterdir())]


def test_lab_build_tools_live_outside_the_package():
    """The base model's training script and packer are build tools in tools/lab/ (they import loralab);
    the installed package keeps only what runs: the world, the evaluator, the model's files, the demo."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from loralab.lab.model import evaluator_path, lab_model_path

    assert lab_model_path().is_file() and evaluator_path().is_file()
    for name in ("train_base", "pack"):
        assert importlib.util.find_spec(f"loralab.lab.{name}") is None
    tools = Path(__file__).resolve().parents[1] / "tools" / "lab"
    out = subprocess.run([sys.executable, str(tools / "train_base.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--budget-s" in out.stdout, out.stderr

