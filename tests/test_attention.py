"""`loralab attention`: DAAM maps summed exactly by the rule, the processor changes nothing in the UNet's
output, words map to their tokens, the command's files and figures, SDXL, and bad input without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import write_tiny_checkpoint
from loralab.analyze.attention import (
    AttentionRecorder,
    WordTokens,
    heat_mask,
    iou,
    layer_grid,
    mass_inside,
    normalize,
    overlap_matrix,
    word_positions,
)
from loralab.cli import main
from loralab.errors import LoralabError
from loralab.lab.model import lab_model_path
from loralab.models.tokenizer import clip_tokenizer
from loralab.network.lora import LoRANetwork, NetworkConfig
from loralab.review.attention import draw_with_maps
from loralab.review.generate import SamplingModel
from loralab.train.sampling import SamplePrompt

LAB = str(lab_model_path())


@pytest.fixture(scope="module")
def lab_sm():
    return SamplingModel.load(LAB, device="cpu")


def test_word_positions_follow_the_tokens():
    tok = clip_tokenizer()
    words = word_positions(tok, "red circle, blue background, red", ["red", "blue background", "circle"])
    assert [w.word for w in words] == ["red", "blue background", "circle"]
    assert words[0].tokens == ("red</w>",) and words[0].positions == (1, 7)  # both occurrences
    assert words[1].tokens == ("blue</w>", "background</w>") and words[1].positions == (4, 5)
    assert words[2].positions == (2,)
    with pytest.raises(LoralabError, match=r"'square' is not in the prompt .*tags are: red circle, blue background, red"):
        word_positions(tok, "red circle, blue background, red", ["square"])
    long = ", ".join(["red circle"] * 30)  # 89 tokens
    with pytest.raises(LoralabError, match=r"89 tokens long; the limit is 75 .*--max-token-length 150"):
        word_positions(tok, long, ["circle"])
    (w,) = word_positions(tok, long, ["circle"], max_token_length=150)  # chunks joined: content i at 1 + i
    assert w.positions == tuple(1 + 3 * i + 1 for i in range(30))


def test_layer_grid_halves_rounding_up():
    assert layer_grid(96, (8, 12)) == (8, 12)
    assert layer_grid(24, (8, 12)) == (4, 6)
    assert layer_grid(6, (5, 9)) == (2, 3)  # 5x9 -> 3x5 -> 2x3
    with pytest.raises(RuntimeError):
        layer_grid(7, (8, 8))


def test_figures_on_known_maps():
    heat = torch.zeros(2, 4, 4)
    heat[0, :2, :2] = 1.0  # word a: top-left quarter
    heat[1, :, 2:] = 3.0  # word b: right half
    heat[1, 0, 0] = 1.0
    assert torch.equal(normalize(heat)[1], heat[1] / 3)
    a, b = heat_mask(heat[0]), heat_mask(heat[1])
    assert int(a.sum()) == 4 and int(b.sum()) == 8  # 1/3 < 0.4: the lone pixel is not b's region
    assert iou(a, b) == 0.0 and iou(a, a) == 1.0
    assert mass_inside(heat[1], b) == pytest.approx(24 / 25)
    m = overlap_matrix(["a", "b"], heat)
    assert m == {"a": {"b": 0.0}, "b": {"a": pytest.approx(round((1 / 3) / 8.333333, 4), abs=1e-4)}}
    assert not heat_mask(torch.full((4, 4), 2.0)).any()  # a flat map has no region


def test_recorder_sums_every_head_layer_and_step_and_leaves_the_output_alone(lab_sm):
    unet = lab_sm.model.unet
    procs = dict(unet.attn_processors)
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=cond).sample
        everything = [WordTokens("all", (), tuple(range(77))), WordTokens("bos", (), (0,))]
        with AttentionRecorder(unet, [everything], (8, 12), cfg=True) as rec:
            mapped = unet(x, t, encoder_hidden_states=cond).sample
            unet(x, t, encoder_hidden_states=cond)
        alone = unet(x[1:], t, encoder_hidden_states=cond[1:]).sample
        with AttentionRecorder(unet, [everything], (8, 12), cfg=False) as rec1:
            unet(x[1:], t, encoder_hidden_states=cond[1:])
            unet(x[1:], t, encoder_hidden_states=cond[1:])
    assert dict(unet.attn_processors) == procs  # put back
    torch.testing.assert_close(mapped, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, plain[1:], atol=1e-5, rtol=1e-5)
    n_cross = sum(name.endswith("attn2.processor") for name in procs)
    assert rec.calls == 2 * n_cross
    assert set(rec.sums) == {(8, 12), (4, 6)}  # one sum per resolution, never per step or layer
    heads = {m.heads for n, m in unet.named_modules() if n.endswith("attn2")}
    (h,) = heads
    maps = rec.maps((32, 48))
    assert maps.shape == (1, 2, 32, 48)
    # softmax over the tokens sums to 1 per head: all 77 tokens give heads x calls at every pixel
    torch.testing.assert_close(maps[0, 0], torch.full((32, 48), float(h * rec.calls)), atol=1e-3, rtol=1e-4)
    assert float(maps[0, 1].min()) > 0
    torch.testing.assert_close(rec1.maps((32, 48)), maps, atol=1e-4, rtol=1e-4)  # cfg: only the positives


def test_maps_of_a_lab_generation(lab_sm):
    p = SamplePrompt("red circle, blue background, large", width=48, height=32, seed=3, steps=10, scale=7.5,
                     sampler="ddim")
    plain = lab_sm.draw([p], seed=0)[0]
    wm = draw_with_maps(lab_sm, p, ["red circle", "blue background"])
    assert np.array_equal(np.asarray(wm.image), np.asarray(plain))  # recording does not change the picture
    assert wm.heats.shape == (2, 32, 48) and float(wm.heats.min()) >= 0
    fig = wm.figures()
    assert fig["words"]["red circle"]["tokens"] == ["red</w>", "circle</w>"]
    assert 0 < fig["words"]["red circle"]["region_share"] < 1
    assert set(fig["mass_inside"]["red circle"]) == {"blue background"}


@pytest.fixture(scope="module")
def lab_lora(tmp_path_factory, lab_sm):
    import copy

    m = lab_sm.model
    unet = copy.deepcopy(m.unet)
    net = LoRANetwork.create(unet, [], m.family, NetworkConfig(dim=4, alpha=4))
    torch.manual_seed(0)
    for mod in net.loras:
        torch.nn.init.normal_(mod.lora_up.weight, std=0.3)
    path = tmp_path_factory.mktemp("lora") / "lab_rand.safetensors"
    net.save(path, torch.float32, {"ss_network_dim": "4"})
    return path


def test_attention_command_writes_rows_maps_and_figures(tmp_path, lab_lora, capsys):
    out = tmp_path / "maps"
    rc = main(["attention", "--model", LAB, "--lora", f"{lab_lora}:0.8", "--out", str(out), "--device", "cpu",
               "red circle, blue background, large --w 32 --h 32 --s 8 --d 5 --l 7.5"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attention.json", "base_blue_background.png", "base_image.png", "base_large.png",
                     "base_red_circle.png", "lora_blue_background.png", "lora_image.png", "lora_large.png",
                     "lora_red_circle.png", "sheet.png"]
    data = json.loads((out / "attention.json").read_text())
    assert data["seed"] == 5 and data["threshold"] == 0.4
    assert [r["label"] for r in data["rows"]] == ["base model", "lab_rand:0.8"]
    for row in data["rows"]:
        assert set(row["words"]) == {"red circle", "blue background", "large"}
        assert all(0 <= v <= 1 for other in row["mass_inside"].values() for v in other.values())
    from PIL import Image

    base, lora = (Image.open(out / f"{r}_image.png") for r in ("base", "lora"))
    assert base.size == (256, 256)
    assert not np.array_equal(np.asarray(base), np.asarray(lora))  # the LoRA row is the LoRA's picture, same seed
    assert "'red circle': region" in capsys.readouterr().out


def test_attention_on_sdxl(tmp_path):
    ck = write_tiny_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    sm = SamplingModel.load(ck, device="cpu")
    p = SamplePrompt("a red thing, on grass", width=64, height=64, seed=1, steps=3, scale=5.0, sampler="ddim")
    wm = draw_with_maps(sm, p, ["red thing", "grass"])
    assert wm.heats.shape == (2, 64, 64) and float(wm.heats.sum()) > 0
    assert wm.figures()["words"]["grass"]["tokens"] == ["grass</w>"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "loralab.cli", "attention", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_bad_input_gets_a_message_and_no_traceback(tmp_path):
    xl = write_tiny_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    sm = SamplingModel.load(xl, device="cpu")
    net = LoRANetwork.create(sm.model.unet, sm.model.text_encoders, "sdxl", NetworkConfig(dim=2, alpha=2))
    xl_lora = tmp_path / "xl_lora.safetensors"
    net.save(xl_lora, torch.float32, {})
    cases = [
        (["--words", "square", "red circle, blue background --w 32 --h 32 --s 2"], "'square' is not in the prompt"),
        ([", ".join(["red circle"] * 30) + " --w 32 --h 32 --s 2"], "tokens long; the limit is 75"),
        (["--lora", str(xl_lora), "red circle --w 32 --h 32 --s 2"], "does not fit the base model"),
        (["--lora", str(tmp_path / "none.safetensors"), "red circle --w 32 --h 32 --s 2"], "is not a file"),
    ]
    for args, message in cases:
        r = _cli("--model", LAB, "--device", "cpu", "--out", tmp_path / "o", *args)
        assert r.returncode == 2, (args, r.stderr[-1500:])
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
