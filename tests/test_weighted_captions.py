"""weighted_captions (kohya `--weighted_captions`): A1111 attention syntax in captions scales those tokens'
text-encoder hidden states.

kohya's rules (sd-scripts v0.10 / HEAD 48d368f): `TokenizeStrategy._get_weighted_input_ids` parses and
tokenizes, `Sd/SdxlTextEncodingStrategy.encode_tokens_with_weights` multiplies each token's hidden state by
its weight (no mean rescale since the strategy refactor; v0.9.1's `get_weighted_text_embeddings` had one).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from test_train import base_cfg, make_dataset

from loralab.config import build_config
from loralab.config.build import config_problems
from loralab.data.captions import CaptionOptions, process_caption
from loralab.errors import LoralabError
from loralab.models import text as T
from loralab.models.loader import load_base_model, save_single_file
from loralab.models.text import (
    encode_captions,
    parse_prompt_attention,
    tokenize,
    tokenize_weighted,
)
from loralab.models.tiny import tiny_sd_components
from loralab.models.tokenizer import clip_tokenizer
from loralab.recipes.lora import train
from loralab.train.callbacks import Callback

RED = 736  # "red</w>" in CLIP's vocabulary


# ---------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("a [quiet] word", [("a ", 1.0), ("quiet", 1 / 1.1), (" word", 1.0)]),
    ("a (red:1.5) cat", [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]),
    ("(x:0.5)", [("x", 0.5)]),
    ("(x:-1)", [("x", -1.0)]),
    ("((x))", [("x", 1.1 * 1.1)]),
    ("[(x:1.5)]", [("x", 1.5 * (1 / 1.1))]),
    ("(a (b:2) c)", [("a ", 1.1), ("b", 2 * 1.1), (" c", 1.1)]),
    # A1111's own doctest: factors multiply in closing order, so the floats are A1111's/kohya's bit for bit
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),  # equal neighbours merge
    # escapes and backslashes
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"a \(b:1.2\) c", [("a (b:1.2) c", 1.0)]),
    (r"back\\slash", [("back\\slash", 1.0)]),
    ("lone\\x", [("lonex", 1.0)]),  # a lone backslash is dropped
    # unbalanced: an open bracket weighs the rest of the caption, a stray closer is text
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("a [b c", [("a ", 1.0), ("b c", 1 / 1.1)]),
    ("a) b] c", [("a) b] c", 1.0)]),
    ("x:1.2) y", [("x:1.2) y", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # kohya's float() would raise; we keep the text
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
])
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == expected


def test_a_shuffled_caption_keeps_each_group_but_a_comma_inside_brackets_splits_it():
    """The caption pipeline runs first and splits tags at caption_separator (kohya: brackets are not
    looked at). A group without the separator moves as one tag; `(a, b:1.2)` is cut in two, as kohya does
    (its --weighted_captions help: "No commas inside parens"); secondary_separator keeps such a group."""
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1)
    weights = {}
    for seed in range(5):
        caption = process_caption("sks, (red hair:1.2), blue eyes, [smile]", opts, epoch=1, rng=random.Random(seed))
        assert caption.startswith("sks, ")
        weights.update({t.strip(", "): w for t, w in parse_prompt_attention(caption) if t.strip(", ")})
    assert weights["red hair"] == 1.2 and weights["smile"] == 1 / 1.1
    broken = process_caption("(red hair, blue eyes:1.2)", CaptionOptions(shuffle_caption=True), epoch=1,
                             rng=random.Random(1))
    assert broken == "blue eyes:1.2), (red hair"
    assert parse_prompt_attention(broken) == [("blue eyes:1.2), ", 1.0), ("red hair", 1.1)]
    kept = process_caption("(red hair;;;blue eyes:1.2), smile", CaptionOptions(shuffle_caption=True,
                           secondary_separator=";;;"), epoch=1, rng=random.Random(1))
    assert ("red hair,blue eyes", 1.2) in parse_prompt_attention(kept)


# ---------------------------------------------------------------------------------------------- tokens


def test_tokenize_weighted_ids_and_weights():
    tok = clip_tokenizer()
    ids, w = tokenize_weighted(tok, ["a (red:1.5) cat", "(a b:0.5)", ""])
    assert torch.equal(ids, tokenize(tok, ["a red cat", "a b", ""]))
    assert ids[0, 2] == RED and w.shape == (3, 77) and w.dtype == torch.float32
    assert w[0, :5].tolist() == [1.0, 1.0, 1.5, 1.0, 1.0] and (w[0, 3:] == 1).all()
    assert w[1, :4].tolist() == [1.0, 0.5, 0.5, 1.0] and (w[2] == 1).all()
    # without weighting the same caption is literal text: the brackets, ":" and "1.5" are tokens
    literal = tokenize(tok, ["a (red:1.5) cat"])[0]
    assert literal[1:10].tolist() == [320, *tok("(red:1.5)", add_special_tokens=False).input_ids, 2368]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenize_weighted_chunks_like_tokenize(pad):
    """max_token_length 150: the same kohya chunks as `tokenize`; weights (B, 152) line up with the joined
    hidden states (row 0 BOS, rows 1..150 the tokens, row 151 the last EOS/PAD), and overlong text is cut."""
    tok = clip_tokenizer(pad)
    long = "x " * 80 + "(red:1.5) cat"
    ids, w = tokenize_weighted(tok, [long, "(y:2)", "z " * 200], 150)
    assert torch.equal(ids, tokenize(tok, ["x " * 80 + "red cat", "y", "z " * 200], 150))
    assert w.shape == (3, 152) and ids.shape == (3, 154)
    assert ids[0, 77 + 1 + 80 - 75] == RED and w[0, 81] == 1.5 and (w[0, :81] == 1).all() and (w[0, 82:] == 1).all()
    assert w[1, 1] == 2.0 and w[1].sum() == 151 + 2.0
    assert (w[2] == 1).all()
    with pytest.raises(LoralabError, match="max_token_length"):
        tokenize_weighted(tok, ["x"], 100)


# ---------------------------------------------------------------------------------------------- embeddings


def kohya_weighting(plain: torch.Tensor, rows: list[int], weight: float) -> torch.Tensor:
    """kohya's rule (`encode_tokens_with_weights`): the weighted token rows times the weight, nothing else."""
    expected = plain.clone()
    expected[:, rows] = expected[:, rows] * weight
    return expected


def v091_mean_rescale(weighted: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """sd-scripts <= v0.9.1 `get_weighted_text_embeddings` also rescaled to the unweighted mean."""
    ratio = plain.float().mean(dim=[-2, -1]) / weighted.float().mean(dim=[-2, -1])
    return weighted * ratio[:, None, None]


@pytest.mark.parametrize("max_token_length,clip_skip,prefix", [(None, None, "a "), (None, 2, "a "), (150, 2, "x " * 80)],
                         ids=["77", "77-clip_skip2", "150-clip_skip2-second_chunk"])
def test_sd1_embedding_scales_the_weighted_rows(tiny_sd1_model, max_token_length, clip_skip, prefix):
    m = tiny_sd1_model
    opts = {"max_token_length": max_token_length, "clip_skip": clip_skip}
    with torch.no_grad():
        (ours,) = encode_captions(m.family, m.text_encoders, m.tokenizers, [prefix + "(red:1.5) cat"], weighted=True,
                                  **opts)
        (plain,) = encode_captions(m.family, m.text_encoders, m.tokenizers, [prefix + "red cat"], **opts)
    row = len(prefix.split()) + 1  # BOS, the prefix tokens, then "red"
    expected = kohya_weighting(plain, [row], 1.5)
    assert torch.equal(ours, expected)
    assert not torch.allclose(ours, plain) and not torch.allclose(ours, v091_mean_rescale(expected, plain))


@pytest.fixture(scope="module")
def tiny_sdxl_model(tmp_path_factory):
    """The tiny SDXL model (as in test_sdxl.py) saved single-file and loaded back: both tokenizers as used."""
    c = tiny_sd_components("sdxl", seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors"
    save_single_file(path, c["unet"], c["vae"], [c["text_encoder"], c["text_encoder_2"]], family="sdxl",
                     dtype=torch.float32)
    return load_base_model(path)


@pytest.mark.parametrize("max_token_length,prefix", [(None, "a "), (225, "x " * 160)], ids=["77", "225-third_chunk"])
def test_sdxl_both_encoders_are_weighted_and_the_pool_is_not(tiny_sdxl_model, max_token_length, prefix):
    m = tiny_sdxl_model
    assert [t.pad_token_id for t in m.tokenizers] == [49407, 0]
    with torch.no_grad():
        h1, h2, pool = encode_captions("sdxl", m.text_encoders, m.tokenizers, [prefix + "(red:1.5) cat", "plain"],
                                       max_token_length=max_token_length, weighted=True)
        p1, p2, ppool = encode_captions("sdxl", m.text_encoders, m.tokenizers, [prefix + "red cat", "plain"],
                                        max_token_length=max_token_length)
    row = len(prefix.split()) + 1
    assert torch.equal(h1[:1], kohya_weighting(p1[:1], [row], 1.5)) and torch.equal(h1[1:], p1[1:])
    assert torch.equal(h2[:1], kohya_weighting(p2[:1], [row], 1.5)) and torch.equal(h2[1:], p2[1:])
    assert torch.equal(pool, ppool)  # kohya pools TE2's unweighted state (of the bracket-free text)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_weight_one_everywhere_is_the_normal_path_exactly(family, tiny_sd1_model, tiny_sdxl_model):
    m = tiny_sd1_model if family == "sd1" else tiny_sdxl_model
    captions = ["chara, red hair, blue background", "", "1girl, " * 40, "a:b, 16:9"]
    for opts in ({}, {"max_token_length": 150, "clip_skip": 2}):
        with torch.no_grad():
            normal = encode_captions(family, m.text_encoders, m.tokenizers, captions, **opts)
            weighted = encode_captions(family, m.text_encoders, m.tokenizers, captions, weighted=True, **opts)
            one = encode_captions(family, m.text_encoders, m.tokenizers, captions[:1], **opts)
            ones = encode_captions(family, m.text_encoders, m.tokenizers, ["chara, (red hair:1.0), blue background"],
                                   weighted=True, **opts)
        assert all(torch.equal(a, b) for a, b in zip(normal, weighted))
        assert all(torch.equal(a, b) for a, b in zip(one, ones))  # same batch size: same float kernels


def test_bf16_weights_apply_in_float32():
    hidden = torch.randn(1, 4, 8, dtype=torch.bfloat16)
    w = torch.tensor([[1.0, 1.1, 1.0, 1 / 1.1]])
    out = T.apply_token_weights(hidden, w)
    assert out.dtype == torch.bfloat16 and torch.equal(out[:, [0, 2]], hidden[:, [0, 2]])
    assert torch.equal(out[:, 1], (hidden[:, 1].float() * 1.1).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------- config and training


def _messages(tmp_path: Path, ckpt: Path, **kw) -> list[str]:
    img, _ = make_dataset(tmp_path, concepts=(("1_a", 1),), reg=False) if not (tmp_path / "img").exists() else (
        tmp_path / "img", None)
    cfg = build_config(None, base_cfg(ckpt, img, tmp_path / "out", max_train_steps=1))
    for key, value in kw.items():
        setattr(cfg, key, value)
    return config_problems(cfg)


def test_kohya_allows_every_caption_option_with_weighted_captions(tmp_path, tiny_sd1_checkpoint):
    """kohya refuses none of these with --weighted_captions in train_network.py / sdxl_train_network.py (it caches
    the weighted outputs, `is_weighted`), so loralab accepts them too; only the cache's own rules apply."""
    for combo in ({"shuffle_caption": True, "keep_tokens": 1}, {"caption_tag_dropout_rate": 0.2},
                  {"token_warmup_step": 2}, {"keep_tokens_separator": "|||", "secondary_separator": ";;;"},
                  {"cache_text_encoder_outputs": True, "network_train_unet_only": True, "caption_dropout_rate": 0.1},
                  {"max_token_length": 225, "clip_skip": 2}):
        assert _messages(tmp_path, tiny_sd1_checkpoint, weighted_captions=True, **combo) == [], combo
    cached_shuffle = _messages(tmp_path, tiny_sd1_checkpoint, weighted_captions=True, shuffle_caption=True,
                               cache_text_encoder_outputs=True, network_train_unet_only=True)
    assert len(cached_shuffle) == 1 and cached_shuffle[0].startswith("cache_text_encoder_outputs: shuffle_caption")


def _weighted_dataset(tmp_path: Path) -> Path:
    img, _ = make_dataset(tmp_path, concepts=(("2_alpha", 2), ("1_beta", 1)), reg=False)
    for i, cap in enumerate(sorted(img.rglob("*.txt"))):
        cap.write_text(f"sks, (red:1.3), [blue background], ((tag{i})), \\(literal\\)")
    return img


def _losses(result) -> list[float]:
    return [json.loads(line)["loss/current"] for line in result.log_file.read_text().splitlines()
            if '"kind": "step"' in line]


def test_training_with_weighted_captions_and_the_caption_pipeline(tmp_path, tiny_sd1_checkpoint, monkeypatch):
    """Text encoder trained, captions shuffled (first tag kept) and tags dropped each step, 150 tokens,
    clip_skip 2: every step's conditioning goes through the weights, and the loss stays finite."""
    img = _weighted_dataset(tmp_path)
    seen: list[torch.Tensor] = []
    original = T.apply_token_weights
    monkeypatch.setattr(T, "apply_token_weights", lambda h, w: (seen.append(w), original(h, w))[1])
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_steps=3,
                                      weighted_captions="true", shuffle_caption="true", keep_tokens=1,
                                      caption_tag_dropout_rate="0.2", max_token_length=150, clip_skip=2))
    losses = _losses(train(cfg))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert len(seen) >= 3 and all(w.shape[1] == 152 for w in seen)
    assert any(torch.isclose(w, torch.tensor(1.3)).any() for w in seen)


def test_cached_text_encoder_outputs_are_the_weighted_ones(tmp_path, tiny_sd1_checkpoint):
    """kohya caches the weighted outputs (`TextEncoderOutputsCachingStrategy(is_weighted=...)`); so do we."""
    img = _weighted_dataset(tmp_path)
    state = {}

    class Grab(Callback):
        def on_train_start(self, run):
            caption = next(s.entry.caption for s in run.dataset.samples)
            state["cached"] = run.te_cache.get([caption])[0]
            with torch.no_grad():
                state["weighted"] = encode_captions(run.model.family, run.model.text_encoders, run.model.tokenizers,
                                                    [caption], weighted=True)[0]

    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, img, tmp_path / "out", max_train_steps=2,
                                      weighted_captions="true", cache_text_encoder_outputs="true",
                                      network_train_unet_only="true"))
    losses = _losses(train(cfg, [Grab()]))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert torch.allclose(state["cached"], state["weighted"].float().cpu(), atol=1e-6)


def test_the_text_encoder_cache_id_changes_with_weighted_captions():
    import torch

    from loralab.data.text_encoder_cache import encoders_id

    keys = dict(model_source="m.safetensors", model_hash="abc", network_weights=None, max_token_length=75,
                dtype=torch.float32, clip_skip=None)
    plain, weighted = encoders_id(**keys), encoders_id(**keys, weighted_captions=True)
    assert plain != weighted and encoders_id(**keys, weighted_captions=False) == plain
