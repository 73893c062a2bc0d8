"""Bad input, as a new user gives it: every case is built here (generated, no stored binaries), run through
the CLI (`loralab.cli.main`, the code `loralab` runs), and checked for its exit code, its words (and no
traceback), whether the model was loaded before the problem was found, and that no user file changed.

Elsewhere, in the same spirit: a rerun in the same output folder (test_outputs.py), Ctrl-C and kill -9
(test_interrupt.py), a full disk (test_disk_full.py), a 12,000 px image (test_dataset.py), file modes
(test_io.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from loralab.cli import main

MODEL_LOADED = "SD 1.x checkpoint:"  # the loader's line: a problem found after it came late


def _png(path: Path, size=(64, 64), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _dataset(user: Path, folder: str = "2_thing") -> Path:
    """user/img/<folder>/ with one good captioned image; a case adds its bad file beside it."""
    _png(user / "img" / folder / "ok.png")
    (user / "img" / folder / "ok.txt").write_text("thing, red")
    return user / "img" / folder


def _captioned(path: Path) -> None:
    path.with_suffix(".txt").write_text("thing, blue")


def _train(env: dict, *extra: str, folder: str = "2_thing") -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(env["ckpt"]), "--train_data_dir", str(env["user"] / "img"),
            "--output_dir", str(env["out"]), "--output_name", "lora", "--resolution", "64", "--network_dim", "2",
            "--max_train_steps", "1", "--device", "cpu", *extra]


def _check(env: dict) -> list[str]:
    return ["dataset", "check", str(env["user"] / "img"), "--resolution", "64", "--min-bucket-reso", "64"]


# ----------------------------------------------------------------------------------------- the cases


def truncated(env):
    d = _dataset(env["user"])
    data = _png(d / "t.png", seed=1).read_bytes()
    (d / "t.png").write_bytes(data[: len(data) // 2])
    _captioned(d / "t.png")


def cmyk(env):
    Image.new("CMYK", (64, 64), (10, 200, 30, 0)).save(d := _dataset(env["user"]) / "c.jpg")
    _captioned(d)


def gray16(env):
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(d := _dataset(env["user"]) / "s.png")
    _captioned(d)


def paletted(env):
    Image.new("RGB", (64, 64), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(d := _dataset(env["user"]) / "p.png")
    _captioned(d)


def alpha(env):
    Image.new("RGBA", (64, 64), (200, 10, 10, 0)).save(d := _dataset(env["user"]) / "a.png")
    _captioned(d)


def huge(env):  # over PIL's pixel limit (lowered by the case to keep the test small)
    _captioned(_png(_dataset(env["user"]) / "h.png", (100, 100)))


def bomb(env):  # over twice PIL's pixel limit: PIL refuses to decode it
    _captioned(_png(_dataset(env["user"]) / "b.png", (200, 200)))


def latin1_caption(env):
    d = _dataset(env["user"])
    _png(d / "n.png", seed=2)
    (d / "n.txt").write_bytes("caf\xe9, thing".encode("latin-1"))


def empty_caption(env):
    d = _dataset(env["user"])
    _png(d / "e.png", seed=3)
    (d / "e.txt").write_text("")


def symlink_loop(env):
    os.symlink("loop.png", _dataset(env["user"]) / "loop.png")


def one_pixel(env):
    _captioned(_png(_dataset(env["user"]) / "dot.png", (1, 1)))


def edit_backup(env):
    d = _dataset(env["user"])
    (d.parent / ".loralab_backup" / "20260101-000000" / d.name).mkdir(parents=True)
    (d.parent / ".loralab_backup" / "20260101-000000" / d.name / "ok.txt").write_text("thing, blue")
    (d.parent / ".loralab_backup" / "20260101-000000" / "manifest.json").write_text("{}")


def plain(env):
    _dataset(env["user"])


def sample_prompts(env):
    _dataset(env["user"])
    (env["user"] / "prompts.txt").write_text("a thing --w abc\n")


def bad_toml(env):
    _dataset(env["user"])
    (env["user"] / "config.toml").write_text("network_dim = \n")


class Payload:  # unpickling this would run code: it must never happen
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['LORALAB_PAYLOAD_MARK'])}",))


def pickle_ckpt(env):
    _dataset(env["user"])
    with open(env["user"] / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)


def random_model(env):
    _dataset(env["user"])
    (env["user"] / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))


def output_is_file(env):
    _dataset(env["user"])
    env["user"].joinpath("out.txt").write_text("my notes")


def not_a_state(env):
    _dataset(env["user"])
    (env["user"] / "state").mkdir()


def part_state(env):
    not_a_state(env)
    (env["user"] / "state" / "train_state.json").write_text(
        '{"epoch": 1, "global_step": 2, "batch_in_epoch": 0, "seed": 1, "max_train_steps": 4}')
    (env["user"] / "state" / "network.safetensors").write_bytes(b"")


@dataclass
class Case:
    build: Callable[[dict], None]
    argv: Callable[[dict], list[str]]
    code: int
    says: tuple[str, ...] = ()  # each must appear (stderr + log), `{user}` is the case's folder
    quiet_about: str = ""  # a file name the output must not mention (a justified silence)
    before_model: bool = False  # the problem is found before the model loads
    pixel_limit: int | None = None  # PIL's Image.MAX_IMAGE_PIXELS for the case
    extra: dict = field(default_factory=dict)


T = "{user}/img/2_thing"
CASES = {
    # images
    "truncated image, train": Case(truncated, _train, 2, (f"{T}/t.png: the image cannot be read (OSError: image file is truncated)",)),
    "truncated image, check": Case(truncated, _check, 1, ("2_thing/t.png: the image cannot be decoded (OSError: image file is truncated)",)),
    "CMYK jpeg": Case(cmyk, _train, 0, quiet_about="c.jpg"),
    "16-bit grayscale": Case(gray16, _check, 0, ("2_thing/s.png: the image is grayscale",)),
    "16-bit grayscale, train": Case(gray16, _train, 0, quiet_about="s.png"),
    "paletted png": Case(paletted, _train, 0, quiet_about="p.png"),
    "alpha, check": Case(alpha, _check, 0, ("2_thing/a.png: the image has transparent pixels", "loralab puts them on white")),
    "alpha, train": Case(alpha, _train, 0, quiet_about="a.png"),
    "huge image": Case(huge, _train, 0, (f"{T}/h.png: a very large image (100x100, over 6000 pixels)",), pixel_limit=6000),
    "decompression bomb": Case(bomb, _train, 2, (f"{T}/b.png: the image is too large to load safely",),
                               before_model=True, pixel_limit=6000),
    # captions and folders
    "non-UTF-8 caption, train": Case(latin1_caption, _train, 2, (f"{T}/n.txt: the caption file is not UTF-8 text",
                                                                 "re-save it as UTF-8"), before_model=True),
    "non-UTF-8 caption, check": Case(latin1_caption, _check, 1, ("  2_thing/n.txt: the caption file is not UTF-8 text",)),
    "empty caption, train": Case(empty_caption, _train, 0, (f"{T}: 1 caption files are empty (e.png); those images "
                                                            "train with the caption 'thing'",)),
    "empty caption, check": Case(empty_caption, _check, 0, ("2_thing/e.txt: the caption is empty",)),
    "folder without repeats": Case(lambda env: _dataset(env["user"], "thing"), _train, 2,
                                   ("(found only thing, without a repeat count)",), before_model=True),
    "0 repeats": Case(lambda env: _dataset(env["user"], "0_thing"), _train, 2,
                      ("0 repeats means its images are never used",), before_model=True),
    "symlink loop, train": Case(symlink_loop, _train, 0, (f"{T}/loop.png: a symlink loop (following it leads back to "
                                                          "itself): it is skipped",)),
    "symlink loop, check": Case(symlink_loop, _check, 0, ("2_thing/loop.png: a symlink loop",)),
    "1x1 image": Case(one_pixel, _train, 0, (f"{T}/dot.png: 1x1 is less than half the training area 64x64",)),
    "edit backups": Case(edit_backup, _check, 0, ("a backup left by `loralab dataset edit`: 2 files from 1 edit",
                                                  'rm -r "{user}/img/.loralab_backup"')),
    # config
    "unknown key": Case(plain, lambda env: _train(env, "--netwrok_dim", "4"), 2, ("netwrok_dim", "network_dim"),
                        before_model=True),
    "network_dim 0": Case(plain, lambda env: _train(env, "--network_dim", "0"), 2, ("network_dim",), before_model=True),
    "negative learning rate": Case(plain, lambda env: _train(env, "--learning_rate", "-1"), 2, ("learning_rate",),
                                   before_model=True),
    "resolution 7": Case(plain, lambda env: _train(env, "--resolution", "7"), 2, ("resolution",), before_model=True),
    "batch size 0": Case(plain, lambda env: _train(env, "--train_batch_size", "0"), 2, ("train_batch_size",),
                         before_model=True),
    "caption dropout 1.5": Case(plain, lambda env: _train(env, "--caption_dropout_rate", "1.5"), 2,
                                ("caption_dropout_rate",), before_model=True),
    "mixed precision fp17": Case(plain, lambda env: _train(env, "--mixed_precision", "fp17"), 2,
                                 ("mixed_precision",), before_model=True),
    "scheduler typo": Case(plain, lambda env: _train(env, "--lr_scheduler", "cosine_with_restart"), 2,
                           ("lr_scheduler", "cosine_with_restarts"), before_model=True),
    "optimizer argument typo": Case(plain, lambda env: _train(env, "--optimizer_args", "beta=0.9"), 2,
                                    ("beta",), before_model=True),
    "bad sample prompt": Case(sample_prompts, lambda env: _train(env, "--sample_prompts", str(env["user"] / "prompts.txt"),
                                                                 "--sample_every_n_steps", "1"), 2,
                              ("prompts.txt", "--w"), before_model=True),
    "config file without --config": Case(bad_toml, lambda env: ["train", str(env["user"] / "config.toml"), *_train(env)[1:]], 2,
                                         ("config.toml' (a config file? give it as --config FILE)",), before_model=True),
    "broken TOML": Case(bad_toml, lambda env: _train(env, "--config_file", str(env["user"] / "config.toml")), 2,
                        ("{user}/config.toml: not valid TOML: Invalid value (at line 1, column 15)",), before_model=True),
    # models and states
    "pickle payload .ckpt": Case(pickle_ckpt, lambda env: _train(env, "--pretrained_model_name_or_path",
                                                                 str(env["user"] / "evil.ckpt")), 2,
                                 ("evil.ckpt needs to run code to load", "loralab never unpickles code")),
    "missing model": Case(plain, lambda env: _train(env, "--pretrained_model_name_or_path",
                                                       str(env["user"] / "nope.safetensors")), 2,
                          ("nope.safetensors",), before_model=True),
    "random bytes as model": Case(random_model, lambda env: _train(env, "--pretrained_model_name_or_path",
                                                                   str(env["user"] / "model.safetensors")), 2,
                                  ("model.safetensors",)),
    "not a state folder": Case(not_a_state, lambda env: _train(env, "--resume", str(env["user"] / "state")), 2,
                               ("is not a loralab state folder",), before_model=True),
    "incomplete state folder": Case(part_state, lambda env: _train(env, "--resume", str(env["user"] / "state")), 2,
                                    ("lacks optimizer.pt, scheduler.pt; it is incomplete",), before_model=True),
    # outputs
    "output_dir is a file": Case(output_is_file, lambda env: _train(env, "--output_dir", str(env["user"] / "out.txt")), 2,
                                 ("out.txt is a file",), before_model=True),
}


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, tiny_sd1_checkpoint, capsys, caplog, monkeypatch):
    case = CASES[name]
    env = {"user": tmp_path / "user", "out": tmp_path / "out", "ckpt": tiny_sd1_checkpoint}
    env["user"].mkdir()
    mark = tmp_path / "PAYLOAD_RAN"
    monkeypatch.setenv("LORALAB_PAYLOAD_MARK", str(mark))
    if case.pixel_limit:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", case.pixel_limit)
    case.build(env)
    model_before = hashlib.sha256(tiny_sd1_checkpoint.read_bytes()).hexdigest()
    before = _digest(env["user"])
    caplog.set_level(logging.INFO)

    code = main(case.argv(env))

    out = capsys.readouterr()
    text = out.err + out.out + caplog.text
    assert code == case.code, text[-3000:]
    assert "Traceback" not in text
    for words in case.says:
        assert words.format(user=env["user"]) in text, text[-3000:]
    if case.quiet_about:
        assert case.quiet_about not in text, text[-3000:]
    if case.before_model:
        assert MODEL_LOADED not in text
    if code == 0 and case.argv is _train:
        assert (env["out"] / "lora.safetensors").is_file()
    assert _digest(env["user"]) == before
    assert hashlib.sha256(tiny_sd1_checkpoint.read_bytes()).hexdigest() == model_before
    assert not mark.exists()  # the pickle payload never ran


def test_16_bit_images_train_as_their_pixels_not_as_white(tmp_path):
    """PIL's convert("RGB") clips 16-bit grayscale at 255 (kohya trains such a scan as a white picture)."""
    from loralab.data.images import load_image

    ramp = np.arange(64 * 64).reshape(64, 64) * 16  # 0 .. 65520
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "s.png")
    Image.fromarray(np.rint(ramp / 257).astype(np.uint8)).save(tmp_path / "s8.png")
    got = np.asarray(load_image(tmp_path / "s.png"), dtype=int)
    want = np.asarray(load_image(tmp_path / "s8.png"), dtype=int)
    assert got.shape == (64, 64, 3) and np.abs(got - want).max() <= 1


def test_read_only_output_dir_is_refused_before_loading(tmp_path, tiny_sd1_checkpoint):
    """A read-only file system (a tmpfs mounted read-only in a private mount namespace: file permissions do
    not stop root, a read-only mount does)."""
    ns = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(ns + ["sh", "-c", f"mount -t tmpfs -o ro,size=64k tmpfs {ro}"], capture_output=True,
                           text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root or unprivileged user namespaces): "
                    + (probe.stderr.strip() if probe else "no unshare command"))
    env = {"user": tmp_path / "user", "out": ro / "out", "ckpt": tiny_sd1_checkpoint}
    env["user"].mkdir()
    _dataset(env["user"])
    before = _digest(env["user"])
    argv = " ".join(f"'{a}'" for a in _train(env, "--output_dir", str(ro / "out")))
    r = subprocess.run(ns + ["sh", "-c", f"mount -t tmpfs -o ro,size=64k tmpfs {ro} && "
                                         f"exec {sys.executable} -m loralab.cli {argv}"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"error: output_dir: {ro} is not writable; give a folder you can write to" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and MODEL_LOADED not in r.stderr
    assert _digest(env["user"]) == before
