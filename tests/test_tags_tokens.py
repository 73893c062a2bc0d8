"""`loralab dataset tags` and `loralab tokens`: kohya's tag counting, pruning candidates, real CLIP token ids,
shared tokens of activation tags and the repeats that balance them."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from loralab.analyze.tags import analyze_tags, render_tags
from loralab.analyze.tokens import (
    ADVICE,
    COMMON_MAX_ID,
    COMMON_WORD,
    EMPTY,
    RARE_TOKEN,
    SPLIT,
    balance_repeats,
    rate_tag,
    dataset_tokens,
    render_dataset_tokens,
    render_text_tokens,
    text_tokens,
    tokenize_tags,
)
from loralab.data.dataset import scan_folder_dataset, tag_frequency
from loralab.errors import LoralabError


def concept(root: Path, folder: str, captions: list[str | None]) -> None:
    d = root / folder
    d.mkdir(parents=True)
    for i, caption in enumerate(captions):
        Image.new("RGB", (32, 32), (i * 20 % 256, 0, 0)).save(d / f"{i}.png")
        if caption is not None:
            (d / f"{i}.txt").write_text(caption, encoding="utf-8")


@pytest.fixture
def jinx(tmp_path) -> Path:
    """2_jinxdef: 10 images (navel on all, blue hair on all); 5_jinxarcane: 3 images; 3_vi: 4 images."""
    train = tmp_path / "train"
    concept(train, "2_jinxdef", [f"jinxdef, Blue hair, navel, {'smile' if i % 2 else 'open mouth'}, pose{i}"
                                 for i in range(10)])
    concept(train, "5_jinxarcane", [f"jinxarcane, blue hair, braid, view{i}" for i in range(3)])
    concept(train, "3_vi", ["vi, pink hair, view0", "vi, pink hair, pink hair", "vi, pink hair", None])
    return train


def test_tag_frequency_is_kohyas(jinx):
    report = analyze_tags(jinx)
    kohya = tag_frequency(scan_folder_dataset(jinx, caption_extension=".txt"))
    assert report.tag_frequency == kohya
    # lowercased, counted per caption; a tag twice in one caption counts twice (kohya), once per image here
    vi = report.concept("3_vi")
    pink = next(t for t in vi.tags if t.tag == "pink hair")
    assert (pink.count, pink.images, pink.share) == (4, 3, 0.75)
    assert report.tag_frequency["3_vi"]["vi"] == 4  # the uncaptioned image counts as its folder name "vi"
    assert report.tag_frequency["2_jinxdef"]["blue hair"] == 10


def test_pruning_candidates_and_singletons(jinx):
    report = analyze_tags(jinx, threshold=0.6)
    jd = report.concept("2_jinxdef")
    assert jd.activation_tag == "jinxdef"
    assert [t.tag for t in jd.frequent] == ["blue hair", "navel"]  # the activation tag is not a candidate
    once = {tag for tag, _ in report.once}
    assert {f"pose{i}" for i in range(10)} <= once and "view0" not in once  # view0 is in two concepts
    file = dict(report.once)["pose3"]
    assert Path(file).name == "3.png"
    text = render_tags(report)
    assert "navel" in text and "absorbs it" in text and "hide the navel" in text


def test_compare_two_concepts(jinx):
    report = analyze_tags(jinx, compare=("jinxdef", "5_jinxarcane"))
    assert report.compare == ("2_jinxdef", "5_jinxarcane")
    top = {d.tag: d.difference for d in report.differences[:3]}
    assert top == {"braid": -1.0, "navel": 1.0, "open mouth": 0.5}
    assert all(d.tag not in ("jinxdef", "jinxarcane") for d in report.differences)
    with pytest.raises(LoralabError, match="no concept folder named"):
        analyze_tags(jinx, compare=("jinxdef", "nobody"))


def test_token_ids_match_the_real_clip_tokenizer():
    blue, hair = tokenize_tags(["blue", "hair"])
    assert (blue.tokens, blue.ids) == (["blue</w>"], [1746])
    assert (hair.tokens, hair.ids) == (["hair</w>"], [2225])
    (both,) = tokenize_tags(["blue hair"])
    assert both.ids == [1746, 2225]
    # the same ids as the transformers CLIPTokenizer call training makes (BOS/EOS around them)
    from loralab.models.tokenizer import clip_tokenizer

    assert clip_tokenizer()("blue hair")["input_ids"] == [49406, 1746, 2225, 49407]


def test_jinx_tags_share_jin_and_x():
    result = text_tokens(["jinxdef, jinxarcane"])
    assert [t.tokens for t in result.tags] == [["jin", "x", "def</w>"], ["jin", "x", "ar", "cane</w>"]]
    assert [(s.token, s.id, s.tags) for s in result.shared] == [
        ("jin", 7927, ["jinxdef", "jinxarcane"]),
        ("x", 87, ["jinxdef", "jinxarcane"]),
    ]
    assert result.caption_tokens == 8  # jin x def</w> ,</w> jin x ar cane</w>


def test_balance_repeats_is_optimal():
    def spread(images, reps):
        v = [n * r for n, r in zip(images, reps)]
        return max(v) / min(v)

    for images in ([10, 3], [10, 3, 7], [40, 8, 5], [1, 1], [12, 25, 6, 9]):
        best = min(spread(images, r) for r in itertools.product(range(1, 6), repeat=len(images)))
        got = balance_repeats(images)
        assert all(1 <= r <= 5 for r in got)
        assert spread(images, got) == pytest.approx(best)
    assert balance_repeats([10, 3]) == [1, 3]
    assert balance_repeats([8, 8], current=[3, 3]) == [3, 3]  # ties keep the current repeats


def test_dataset_tokens(jinx):
    result = dataset_tokens(jinx)
    shared = {s.token: s for s in result.shared}
    assert set(shared) == {"jin", "x"}
    assert shared["jin"].concepts == ["2_jinxdef", "5_jinxarcane"]
    assert shared["jin"].epoch_shares == pytest.approx([20 / 47, 15 / 47])
    (group,) = result.groups
    assert group.concepts == ["2_jinxdef", "5_jinxarcane"]
    assert group.suggested_repeats == [1, 3] and group.suggested_ratio < group.current_ratio
    text = render_dataset_tokens(result)
    assert "images x repeats" in text and "jin (7927)" in text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "loralab.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_tokens_and_tags(jinx):
    out = run_cli("tokens", "jinxdef, jinxarcane", "blue hair")
    assert out.returncode == 0, out.stderr
    assert "jin (7927): jinxdef, jinxarcane" in out.stdout and "1746 2225" in out.stdout
    data = json.loads(run_cli("tokens", "--dataset", str(jinx), "--json").stdout)
    assert data["groups"][0]["suggested_repeats"] == [1, 3]
    tags = run_cli("dataset", "tags", str(jinx), "--json")
    assert tags.returncode == 0 and json.loads(tags.stdout)["tag_frequency"]["5_jinxarcane"]["braid"] == 3
    none = run_cli("tokens")
    assert none.returncode == 2 and none.stderr.startswith("error: ")


def test_bpe_ids_are_a_frequency_proxy():
    """The rule's premise, measured on the real vocab: frequent words have low ids, made-up tags high ones."""
    ids = {t.tag: t.ids for t in tokenize_tags(["the", "red", "girl", "hair", "sks", "ohwx", "olis"])}
    assert ids == {"the": [518], "red": [736], "girl": [1611], "hair": [2225], "sks": [48136], "ohwx": [47993],
                   "olis": [49397]}
    assert max(ids["hair"]) < COMMON_MAX_ID == 20000 < min(ids["ohwx"])


def test_rate_common_rare_split_and_empty():
    girl, sks, jinx, blue_hair = tokenize_tags(["girl", "sks", "jinxdef", "blue hair"])
    assert girl.rating.kind == COMMON_WORD and girl.rating.common == [True] and girl.rating.common_pieces == []
    assert girl.rating.advice == ADVICE[COMMON_WORD] and "pick a rare token or accept the drift" in girl.rating.advice
    assert sks.rating.kind == RARE_TOKEN and sks.rating.common == [False]
    assert "what the guide recommends for a new concept" in sks.rating.advice
    assert jinx.tokens == ["jin", "x", "def</w>"] and jinx.rating.kind == SPLIT
    assert jinx.rating.common_pieces == ["jin", "x", "def</w>"]
    assert jinx.rating.advice.startswith("3 of 3 pieces are common (jin, x, def) and carry their own meaning")
    assert "bleeding" in jinx.rating.advice and "pivotal tuning" in jinx.rating.advice
    assert blue_hair.rating.kind == SPLIT and blue_hair.rating.common_pieces == ["blue</w>", "hair</w>"]
    # a split of rare pieces: no common piece is named
    rare_split = rate_tag(["sks", "ohwx</w>"], [48135, 47993])
    assert rare_split.kind == SPLIT and rare_split.common_pieces == [] and rare_split.advice == ADVICE[SPLIT]
    # the threshold is the rule: one id either side of it
    assert rate_tag(["a</w>"], [COMMON_MAX_ID - 1]).kind == COMMON_WORD
    assert rate_tag(["a</w>"], [COMMON_MAX_ID]).kind == RARE_TOKEN
    assert rate_tag([], []).kind == EMPTY and "trains nothing" in rate_tag([], []).advice


def test_ratings_in_text_and_json(jinx):
    result = text_tokens(["jinxdef, girl, sks"])
    text = render_text_tokens(result)
    assert "jinxdef: split: 3 of 3 pieces are common" in text
    assert f"girl: common word: {ADVICE[COMMON_WORD]}" in text and f"sks: rare token: {ADVICE[RARE_TOKEN]}" in text
    data = json.loads(result.to_json())
    assert data["tags"][0]["tokens"] == ["jin", "x", "def</w>"]  # the existing fields are unchanged
    assert data["tags"][0]["rating"]["kind"] == "split" and data["tags"][2]["rating"]["kind"] == "rare token"
    assert data["tags"][0]["rating"]["common_max_id"] == COMMON_MAX_ID
    ds = dataset_tokens(jinx)
    assert "jinxarcane: split:" in render_dataset_tokens(ds)
    kinds = {c["activation_tag"]: c["rating"]["kind"] for c in json.loads(ds.to_json())["concepts"]}
    assert kinds == {"jinxdef": "split", "jinxarcane": "split", "vi": "common word"}  # vi</w> is id 4259


def test_cli_tokens_rates_tags():
    out = run_cli("tokens", "jinxdef, sks", "--json")
    assert out.returncode == 0, out.stderr
    tags = json.loads(out.stdout)["tags"]
    assert [t["rating"]["kind"] for t in tags] == ["split", "rare token"]
    assert tags[0]["rating"]["common_pieces"] == ["jin", "x", "def</w>"]


def test_embeddings_on_the_lab_model_tell_known_words_from_new_ones():
    """The lab model's text encoder learned only its world's words: those stand out, the held-out shape `ring`
    (the lab's planted new concept), `sks` and jinxdef's pieces do not."""
    from loralab.analyze.tokens import KNOWN_Z, add_embeddings
    from loralab.lab.model import lab_model_path

    result = text_tokens(["red circle, large, ring, sks, jinxdef"])
    add_embeddings(result, lab_model_path())
    known = {e.token: e.known for t in result.tags for e in t.embedding}
    assert known == {"red</w>": True, "circle</w>": True, "large</w>": True, "ring</w>": False, "sks</w>": False,
                     "jin": False, "x": False, "def</w>": False}
    red = result.tags[0].embedding[0]
    assert red.norm_z > 2 * KNOWN_Z and red.nearest[0] == "orange"  # the nearest common word is another colour
    assert all(len(e.nearest) == 3 for t in result.tags for e in t.embedding)
    text = render_text_tokens(result)
    assert "nearest common words" in text and "orange" in text
    assert json.loads(result.to_json())["tags"][3]["embedding"][0]["known"] is False


def test_cli_tokens_model(jinx, tmp_path):
    from loralab.lab.model import lab_model_path

    out = run_cli("tokens", "--dataset", str(jinx), "--model", str(lab_model_path()), "--json")
    assert out.returncode == 0, out.stderr
    concepts = json.loads(out.stdout)["concepts"]
    assert [e["token"] for e in concepts[0]["embedding"]] == concepts[0]["tokens"]
    assert "embedding" in json.loads(run_cli("tokens", "sks", "--json").stdout)["tags"][0]  # None without --model
    missing = run_cli("tokens", "sks", "--model", str(tmp_path / "nope.safetensors"))
    assert missing.returncode != 0 and "model not found" in missing.stderr and "Traceback" not in missing.stderr
