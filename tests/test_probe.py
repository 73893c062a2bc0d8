"""`loralab probe`: does the base model know a tag? Acceptance on the lab model (trained shape word known,
`olis` and a made-up tag new), the prompts it draws, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loralab.lab.model import lab_model_path
from loralab.models.tokenizer import clip_tokenizer
from loralab.review import probe as P

LAB = lab_model_path()
CONTEXTS = ["red {}, blue background, large", "yellow {}, black background, small",
            "white {}, green background, large", "purple {}, gray background, small"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "loralab.cli", "probe", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_prompts_put_the_tag_and_its_stand_ins_in_the_same_place():
    tok = clip_tokenizer()
    ids = P.tag_ids(tok, "jinxdef")
    assert tok.convert_ids_to_tokens(ids) == ["jin", "x", "def</w>"]
    assert list(P.fill(tok, "red {}, blue background", ids)) == tok("red jinxdef, blue background",
                                                                       add_special_tokens=False).input_ids
    assert list(P.fill(tok, "1girl, solo", ids)) == tok("jinxdef, 1girl, solo", add_special_tokens=False).input_ids
    assert list(P.fill(tok, "red {}, blue background", [])) == tok("red, blue background",
                                                                    add_special_tokens=False).input_ids
    assert list(P.fill(tok, "", [])) == []
    stand = P.stand_in_ids(tok, ids, 4)
    assert len(stand) == 4 and all(len(s) == 3 for s in stand)  # as long as the tag
    assert all(i >= P.RARE_FROM and i not in ids for s in stand for i in s)  # rare pieces, none of the tag's
    pieces = [tok.convert_ids_to_tokens(s) for s in stand]
    assert all(p[-1].endswith("</w>") and not p[0].endswith("</w>") for p in pieces)  # word ends where the tag's do
    assert stand == P.stand_in_ids(tok, ids, 4)  # fixed: every probe of a tag uses the same stand-ins


def test_the_rule():
    assert P.verdict(distinctness=1.7, text_distinctness=2.0) == "known"
    assert P.verdict(distinctness=1.78, text_distinctness=1.27) == "new"  # a scrambling made-up tag
    assert P.verdict(distinctness=1.0, text_distinctness=1.6) == "new"  # the text knows it, the images do not
    assert P.verdict(distinctness=P.IMAGE_BAR, text_distinctness=P.TEXT_BAR) == "known"


@pytest.mark.parametrize("tag, expected", [("star", "known"), ("olis", "new"), ("blorptwizz", "new")])
def test_lab_model_knows_a_trained_shape_word_and_not_olis_or_a_made_up_tag(tag, expected, tmp_path):
    r = P.probe(P.ProbeOptions(model=str(LAB), tag=tag, class_word="shape", contexts=CONTEXTS, out=str(tmp_path),
                               device="cpu"))
    assert r["verdict"] == expected, r
    if expected == "known":
        assert r["text_distinctness"] >= P.TEXT_BAR + 0.3 and r["distinctness"] >= P.IMAGE_BAR + 0.2
    else:
        assert r["text_distinctness"] < P.TEXT_BAR - 0.2
    assert 0 < r["change_without"] < 1 and 0 < r["change_class"] < 1
    assert r["advice"] == P.ADVICE[expected]


def test_probe_command_on_the_lab_model(tmp_path):
    out = tmp_path / "probe"
    r = _cli("--model", LAB, "star", "--class", "shape", *sum((["--context", c] for c in CONTEXTS), []),
             "--seeds", 4, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tag 'star' (tokens star</w>): the base model KNOWS it" in r.stdout
    assert "fewer steps" in r.stdout and "the lab evaluator reads: tag 'star': star" in r.stdout
    data = json.loads((out / "probe.json").read_text())
    assert data["verdict"] == "known" and data["prompts"][:3] == ["tag 'star'", "without the tag", "class 'shape'"]
    assert len(data["prompts"]) == 3 + P.STAND_INS and all(len(v) == 4 for v in data["judged"].values())
    from PIL import Image

    assert Image.open(out / "probe.png").height == 7 * 96  # one row per prompt


def test_bad_input_gets_a_message_and_no_traceback(tmp_path):
    cases = [
        (["--model", LAB, "   "], "is empty after tokenizing"),
        (["--model", LAB, ", ."], "is empty after tokenizing"),  # only separators: no tag left
        (["--model", tmp_path / "missing.safetensors", "star"], "no such file"),
        (["--model", LAB, "star", "--seeds", "0"], "--seeds 0: at least 1"),
        (["--model", LAB, "star", "--context", "{} and {}"], "one {}"),
    ]
    for args, message in cases:
        r = _cli(*args, "--device", "cpu", "--steps", 2, "--out", tmp_path / "o")
        assert r.returncode == 2, (args, r.stderr[-1500:])
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
