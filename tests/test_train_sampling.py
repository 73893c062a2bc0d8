"""Sample prompt files, samplers and sample generation with the tiny SD 1.x models."""

from __future__ import annotations

import json
import re
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from loralab.errors import LoralabError
from loralab.models.tiny import tiny_sd_components
from loralab.train.sampling import (
    SAMPLERS,
    SamplePrompt,
    generate_samples,
    image_grid,
    make_sampler,
    parse_prompt_file,
    parse_prompt_line,
)

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize(
    "line, expected",
    [
        ("a cat", SamplePrompt("a cat")),
        (
            "1girl, solo --n lowres, bad hands --w 768 --h 512 --d 42 --s 20 --l 6.5 --ss euler_a",
            SamplePrompt("1girl, solo", "lowres, bad hands", 768, 512, 42, 20, 6.5, "euler_a"),
        ),
        ("x --W 515 --H 30", SamplePrompt("x", width=512, height=64)),  # floored to ×8, at least 64
        ("x --s 0", SamplePrompt("x", steps=1)),
        ("x --s 5000", SamplePrompt("x", steps=1000)),
        ("x --ss K_EULER", SamplePrompt("x", sampler="k_euler")),
        ("x --g 3.5", SamplePrompt("x")),  # flux option, ignored with a warning
        ("(masterpiece:1.2), a dog --l 7", SamplePrompt("(masterpiece:1.2), a dog", scale=7.0)),
    ],
)
def test_parse_prompt_line(line, expected):
    assert parse_prompt_line(line) == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ("x --w big", "--w 'big'"),
        ("x --q 3", "unknown option --q"),
        ("x --ss plms", "unknown sampler 'plms'"),
        ("x --d", "--d needs a value"),
        ("x --l -2", "--l"),
    ],
)
def test_parse_prompt_line_errors(line, message):
    with pytest.raises(LoralabError, match=re.escape(message)):
        parse_prompt_line(line, where="p.txt:3")


def test_parse_prompt_files(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("# comment\n\na cat --d 1\n  # indented comment\na dog --ss dpmsolver++\n", encoding="utf-8")
    prompts = parse_prompt_file(txt)
    assert [p.prompt for p in prompts] == ["a cat", "a dog"]
    assert [p.sampler for p in prompts] == [None, "dpmsolver++"]  # None: the run's sample_sampler

    bad = tmp_path / "bad.txt"
    bad.write_text("ok\nbroken --zz 1\n", encoding="utf-8")
    with pytest.raises(LoralabError, match=re.escape(f"{bad}:2")):
        parse_prompt_file(bad)

    toml = tmp_path / "prompts.toml"
    toml.write_text(
        '[prompt]\nwidth = 640\nsample_steps = 12\n\n[[prompt.subset]]\nprompt = "a cat"\nseed = 5\n\n'
        '[[prompt.subset]]\nprompt = "a dog"\nwidth = 512\nsample_sampler = "k_dpm_2_a"\n',
        encoding="utf-8",
    )
    assert parse_prompt_file(toml) == [
        SamplePrompt("a cat", width=640, seed=5, steps=12),
        SamplePrompt("a dog", width=512, steps=12, sampler="k_dpm_2_a"),
    ]

    js = tmp_path / "prompts.json"
    js.write_text(json.dumps(["a cat --w 256", {"prompt": "a dog", "negative_prompt": "ugly", "scale": 5}]))
    assert parse_prompt_file(js) == [SamplePrompt("a cat", width=256), SamplePrompt("a dog", "ugly", scale=5.0)]

    with pytest.raises(LoralabError, match="does not exist"):
        parse_prompt_file(tmp_path / "missing.txt")


def test_every_sampler_name_builds():
    for name in SAMPLERS:
        try:
            sampler = make_sampler(name, SD_SCHEDULER, v_parameterization=True)
        except LoralabError as exc:  # LMS needs scipy
            assert "lms" in name and "install" in str(exc)
            continue
        assert sampler.config.prediction_type == "v_prediction"
        assert sampler.config.num_train_timesteps == 1000
    assert make_sampler("ddim", SD_SCHEDULER).config.clip_sample is True  # kohya forces it


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd_components("sd1")


def encode_prompt(texts: list[str]) -> torch.Tensor:
    """Stand-in text encoder: fixed random (77, 32) embeddings per prompt text."""
    out = [torch.randn(77, 32, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
    return torch.stack(out)


def run(tiny, tmp_path, prompts, **kw):
    return generate_samples(
        unet=tiny["unet"],
        vae=tiny["vae"],
        vae_scaling_factor=0.18215,
        encode_prompt=encode_prompt,
        scheduler_config=SD_SCHEDULER,
        prompts=prompts,
        out_dir=tmp_path,
        file_stem="mylora_e000002",
        device="cpu",
        **kw,
    )


def test_generate_samples_names_sizes_seeds_and_rng(tiny, tmp_path):
    prompts = [
        SamplePrompt("a cat", width=64, height=64, steps=2, seed=42),
        SamplePrompt("a dog", "ugly", width=72, height=64, steps=1, sampler="euler_a"),
        SamplePrompt("a fox", width=64, height=64, steps=1, sampler="dpmsolver++", scale=1.0),  # no CFG
    ]
    unet = tiny["unet"]
    unet.train()
    unet.conv_in.eval()  # a mixed state must come back exactly
    rng_before = torch.get_rng_state()
    paths = run(tiny, tmp_path / "a", prompts, default_seed=100)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert unet.training and not unet.conv_in.training and unet.conv_out.training

    names = [p.name for p in paths]
    assert re.fullmatch(r"mylora_e000002_00_\d{14}_42\.png", names[0])
    assert re.fullmatch(r"mylora_e000002_01_\d{14}_101\.png", names[1])  # default_seed + i
    assert re.fullmatch(r"mylora_e000002_02_\d{14}_102\.png", names[2])
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [(64, 64), (72, 64), (64, 64)]
    assert "Seed: 42" in Image.open(paths[0]).info["parameters"]
    assert not list((tmp_path / "a").glob(".*.tmp"))

    # same seeds → identical images; no seed and no default seed → random seed, no suffix
    again = run(tiny, tmp_path / "b", prompts[:2], default_seed=100)
    for p, q in zip(paths[:2], again):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(q)))
    unseeded = run(tiny, tmp_path / "c", [SamplePrompt("a cat", width=64, height=64, steps=1)], sampler="k_euler")
    assert "Sampler: k_euler" in Image.open(unseeded[0]).info["parameters"]
    assert re.fullmatch(r"mylora_e000002_00_\d{14}\.png", unseeded[0].name)


def test_image_grid():
    images = [Image.new("RGB", (32, 24), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(images, 2, 3)
    assert grid.size == (96, 48)
    assert grid.getpixel((33, 1)) == (40, 0, 0)
    labelled = image_grid(images, 2, 3, labels=[f"epoch {i}" for i in range(5)])
    assert labelled.width == 96 and labelled.height > 48
    with pytest.raises(ValueError):
        image_grid(images, 1, 2)
