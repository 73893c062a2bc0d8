"""`loralab bleed`: the probes a pair of tags sharing a piece gets, pieces fed as token ids, the findings'
rules on known numbers, the command end to end on the lab model, and bad input without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import write_tiny_checkpoint
from loralab.lab import world as W
from loralab.lab.model import lab_model_path
from loralab.models.text import TokenIds, tokenize
from loralab.models.tokenizer import clip_tokenizer
from loralab.network.lora import LoRANetwork, NetworkConfig
from loralab.review.bleed import Probe, bleed_probes, findings, fixes, with_context

LAB = str(lab_model_path())


def test_probes_of_two_tags_sharing_a_piece():
    tok = clip_tokenizer()
    probes = bleed_probes(tok, ["vexdef", "vexarcane"], class_word="shape")
    assert [(p.kind, p.label) for p in probes] == [
        ("tag", "vexdef"), ("tag", "vexarcane"),
        ("piece", "piece 'vex' of vexdef, vexarcane"), ("piece", "piece 'def</w>' of vexdef"),
        ("piece", "piece 'ar' of vexarcane"), ("piece", "piece 'cane</w>' of vexarcane"),
        ("class", "class word 'shape'"), ("pair", "vexdef, vexarcane")]
    vex = probes[2]
    assert isinstance(vex.body, TokenIds) and list(vex.body) == [tok.convert_tokens_to_ids("vex")]
    assert vex.body != tuple(tok("vex", add_special_tokens=False).input_ids)  # the text "vex" is `vex</w>`
    pair = probes[-1]
    assert [w.positions for w in pair.words] == [(1, 2), (4, 5, 6)]  # vex def , vex ar cane
    # a piece with its context is the same ids as the text would be, where a text can spell it
    whole = TokenIds(tok("vexdef", add_special_tokens=False).input_ids)
    assert torch.equal(tokenize(tok, [with_context(tok, whole, "red, blue background")])[0],
                       tokenize(tok, ["vexdef, red, blue background"])[0])


def test_token_ids_pad_like_text_for_both_sdxl_tokenizers():
    for pad in ("<|endoftext|>", "!"):
        tok = clip_tokenizer(pad)
        text = "a red circle, blue background"
        ids = TokenIds(tok(text, add_special_tokens=False).input_ids)
        for n in (75, 150):
            a = tokenize(tok, [text, ids], n)
            assert torch.equal(a[0], a[1])


def _probe(kind, label, tags, change, judged=(), base=()):
    return Probe(kind, label, label, [], list(tags), change=change, judged=list(judged), judged_base=list(base))


def test_findings_rules_on_known_numbers():
    a, b = _probe("tag", "vexdef", ["vexdef"], 0.2, ["ring"] * 3 + ["star"]), \
        _probe("tag", "vexarcane", ["vexarcane"], 0.1, ["heart", "heart", "ring", "ring"], ["cross"] * 4)
    piece = _probe("piece", "piece 'vex'", ["vexdef", "vexarcane"], 0.15, ["ring", "ring", "ring", "heart"],
                   ["ring", "cross", "cross", "cross"])
    piece.words = [type("W", (), {"word": "vex"})()]
    found = findings([a, b, piece], {"vexdef": 0.9, "vexarcane": 0.1})
    assert found["concepts"] == {"vexdef": "ring", "vexarcane": "heart"}
    (p,) = found["shared_pieces"]
    assert p["carry"] == {"vexdef": 0.75, "vexarcane": 1.5}
    assert p["judged"]["vexdef"] == {"with": 0.75, "without": 0.25, "lift": 0.5}
    assert p["bleeds"] and p["measured_by"] == "judge"
    assert p["dominant"] == "vexdef" and p["dominant_because"] == "90% of an epoch's images x repeats"
    into = {(x["from"], x["into"]): x for x in found["tag_into_tag"]}
    assert into[("vexdef", "vexarcane")]["with"] == 0.5 and into[("vexdef", "vexarcane")]["lift"] == 0.5
    assert into[("vexarcane", "vexdef")]["with"] == 0.0
    text = fixes(found, [])
    assert any(t.startswith("piece 'vex' carries a concept by itself") for t in text)
    assert any(t.startswith("vexdef bleeds into vexarcane: 50%") for t in text)
    assert any("pivotal tuning" in t for t in text)
    # balanced dataset: the dominant concept is the one the piece's images show most
    balanced = findings([a, b, piece], {"vexdef": 0.5, "vexarcane": 0.5})["shared_pieces"][0]
    assert balanced["dominant"] == "vexdef" and "balanced" in balanced["dominant_because"]
    # no judge: carry decides, the bar is 0.5
    a.judged = b.judged = piece.judged = []
    nojudge = findings([a, b, piece], {})
    assert nojudge["shared_pieces"][0]["bleeds"] and nojudge["shared_pieces"][0]["measured_by"] == "carry"
    assert nojudge["shared_pieces"][0]["dominant"] == "vexdef"  # the larger change
    piece.change = 0.04  # carry 0.2 and 0.4: below the bar
    quiet = findings([a, b, piece], {})
    assert not quiet["shared_pieces"][0]["bleeds"] and fixes(quiet, []) == []


@pytest.fixture(scope="module")
def lab_setup(tmp_path_factory):
    from loralab.models.loader import load_base_model

    root = tmp_path_factory.mktemp("bleed")
    W.write_kohya_dataset(root / "data", shape="ring", tag="vexdef", n=4, repeats=10, seed=0)
    W.write_kohya_dataset(root / "data", shape="heart", tag="vexarcane", n=2, repeats=2, seed=1)
    m = load_base_model(LAB)
    net = LoRANetwork.create(m.unet, [], m.family, NetworkConfig(dim=4, alpha=4))
    torch.manual_seed(0)
    for mod in net.loras:
        torch.nn.init.normal_(mod.lora_up.weight, std=0.3)
    net.save(root / "lora.safetensors", torch.float32, {})
    return root


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "loralab.cli", "bleed", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_bleed_command_on_the_lab_model(lab_setup):
    out = lab_setup / "report"
    r = _cli("--model", LAB, "--lora", lab_setup / "lora.safetensors", "--dataset", lab_setup / "data",
             "--class-word", "shape", "--context", "red, blue background, large", "--context", "white, gray background",
             "--seeds", 2, "--steps", 4, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["bleed.json", "grid.png", "maps.png", "report.md"]
    data = json.loads((out / "bleed.json").read_text())
    assert data["tags"] == ["vexdef", "vexarcane"]
    assert data["epoch_share"] == {"vexdef": pytest.approx(40 / 44), "vexarcane": pytest.approx(4 / 44)}
    assert len(data["probes"]) == 8 and all(len(p["judged"]) == 2 for p in data["probes"])  # the lab judge read them
    assert all(0 < p["change"] < 1 for p in data["probes"])
    (piece,) = data["shared_pieces"]
    assert piece["piece"] == "vex" and piece["dominant"] == "vexdef"
    assert piece["dominant_because"] == "91% of an epoch's images x repeats"
    pair = data["probes"][-1]
    assert set(pair["overlap"]) == {"vexdef", "vexarcane"}
    assert any(f.startswith("fewer repeats on the dominant concept: 10_vexdef 10 -> ") for f in data["fixes"])
    report = (out / "report.md").read_text()
    assert "## Shared pieces" in report and "`vex` (in vexdef, vexarcane)" in report
    from PIL import Image

    assert Image.open(out / "grid.png").height == 16 * 96  # 8 probes x (without, with)


def test_bad_input_gets_a_message_and_no_traceback(lab_setup, tmp_path):
    from loralab.models.loader import load_base_model

    xl = write_tiny_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    m = load_base_model(xl)
    LoRANetwork.create(m.unet, m.text_encoders, "sdxl", NetworkConfig(dim=2, alpha=2)).save(
        tmp_path / "xl_lora.safetensors", torch.float32, {})
    lora = lab_setup / "lora.safetensors"
    cases = [
        (["--lora", tmp_path / "xl_lora.safetensors", "--tags", "vexdef"], "does not fit the base model"),
        (["--lora", lora], "no tags to probe"),
        (["--lora", lora, "--tags", "vexdef", "--seeds", "0"], "--seeds 0: at least 1"),
        (["--lora", lora, "--tags", "vexdef", "--context", ", ".join(["red circle"] * 30)], "the limit is 75"),
        (["--lora", tmp_path / "missing.safetensors", "--tags", "a"], "is not a file"),
    ]
    for args, message in cases:
        r = _cli("--model", LAB, "--device", "cpu", "--steps", 2, "--seeds", 1, "--out", tmp_path / "o", *args)
        assert r.returncode == 2, (args, r.stderr[-1500:])
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
