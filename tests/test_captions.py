"""The caption pipeline (kohya order) and tag splitting."""

import random

import pytest

from loralab.data.captions import (
    CaptionOptions,
    caption_dropout,
    caption_tag_dropout,
    keep_tokens,
    process_caption,
    split_tags,
    token_warmup,
)


def run(caption, epoch=1, seed=0, **opts):
    return process_caption(caption, CaptionOptions(**opts), epoch=epoch, rng=random.Random(seed))


# (caption, options, epoch, expected)
CASES = [
    # keep_tokens alone does nothing (kohya only reformats with shuffle/warmup/tag dropout)
    ("sks,  girl ,smile", dict(keep_tokens=1), 1, "sks,  girl ,smile"),
    ("a ||| b", dict(keep_tokens_separator="|||"), 1, "a ||| b"),
    # tag dropout 1.0 keeps only the kept tokens
    ("sks, girl, red hair, smile", dict(keep_tokens=2, caption_tag_dropout_rate=1.0), 1, "sks, girl"),
    ("sks, girl ||| a, b ||| best", dict(keep_tokens_separator="|||", caption_tag_dropout_rate=1.0), 1,
     "sks, girl, best"),
    # caption dropout every n epochs (1-based epochs)
    ("a, b", dict(caption_dropout_every_n_epochs=2), 1, "a, b"),
    ("a, b", dict(caption_dropout_every_n_epochs=2), 2, ""),
    ("a, b", dict(caption_dropout_rate=1.0), 1, ""),
    # prefix/suffix first, joined with a space; they are then part of the first/last tag
    ("a, b", dict(caption_prefix="pre", caption_suffix="suf"), 1, "pre a, b suf"),
    ("a, b", dict(caption_prefix="pre", keep_tokens=1, caption_tag_dropout_rate=1.0), 1, "pre a"),
    # wildcard off: first line only; on: {a|b} picks one
    ("a, b\nc, d", dict(), 1, "a, b"),
    ("{{x}}, y", dict(enable_wildcard=True), 1, "{x}, y"),
    # secondary separator becomes the caption separator at the end
    ("a;;;b, c", dict(secondary_separator=";;;"), 1, "a,b, c"),
    # re-join with ", " after reformatting; empty tags dropped only with keep_tokens_separator
    ("x ; y", dict(caption_separator=";", caption_tag_dropout_rate=1.0, keep_tokens=2), 1, "x, y"),
]


@pytest.mark.parametrize("caption,opts,epoch,expected", CASES)
def test_pipeline_table(caption, opts, epoch, expected):
    assert run(caption, epoch=epoch, **opts) == expected


def test_keep_tokens_with_shuffle():
    seen = set()
    for seed in range(30):
        out = run("sks, a, b, c, d", seed=seed, keep_tokens=1, shuffle_caption=True).split(", ")
        assert out[0] == "sks" and sorted(out[1:]) == ["a", "b", "c", "d"]
        seen.add(tuple(out))
    assert len(seen) > 5  # really shuffled


def test_keep_tokens_separator_fixed_prefix_and_suffix_with_shuffle():
    for seed in range(20):
        out = run("sks, girl ||| a, b, c ||| masterpiece, best", seed=seed, keep_tokens_separator="|||",
                  shuffle_caption=True).split(", ")
        assert out[:2] == ["sks", "girl"] and out[-2:] == ["masterpiece", "best"]
        assert sorted(out[2:-2]) == ["a", "b", "c"]


def test_secondary_separator_groups_survive_shuffle():
    for seed in range(10):
        out = run("a;;;b, c, d", seed=seed, shuffle_caption=True, secondary_separator=";;;")
        assert "a,b" in out and sorted(out.replace("a,b", "ab").split(", ")) == ["ab", "c", "d"]


def test_wildcard_on_picks_a_line_and_an_option():
    outs = {run("{x|y}, z\nw", seed=s, enable_wildcard=True) for s in range(40)}
    assert outs == {"x, z", "y, z", "w"}


def test_seeded_rng_is_reproducible():
    opts = dict(shuffle_caption=True, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.2)
    first = [run("a, b, c, d, e", seed=s, **opts) for s in range(10)]
    assert first == [run("a, b, c, d, e", seed=s, **opts) for s in range(10)]
    assert len(set(first)) > 1


def test_parts():
    assert keep_tokens("a, b, c", CaptionOptions(keep_tokens=2)) == (["a", "b"], ["c"], [])
    assert keep_tokens("a ||| b ||| c", CaptionOptions(keep_tokens_separator="|||")) == (["a"], ["b"], ["c"])
    assert caption_tag_dropout(["a", "b"], 0.0, random.Random(0)) == ["a", "b"]
    assert not caption_dropout(CaptionOptions(), epoch=3, rng=random.Random(0))
    flex = ["a", "b", "c", "d", "e"]
    warm = CaptionOptions(token_warmup_min=1, token_warmup_step=4)
    assert [len(token_warmup(flex, warm, step=s, max_train_steps=100)) for s in (0, 2, 4)] == [1, 3, 5]
    frac = CaptionOptions(token_warmup_step=0.5)  # half of max_train_steps
    assert len(token_warmup(flex, frac, step=10, max_train_steps=100)) == 1
    assert len(token_warmup(flex, frac, step=50, max_train_steps=100)) == 5


def test_split_tags_like_ss_tag_frequency():
    assert split_tags(" Sks, Red Hair ,, smile , ") == ["sks", "red hair", "smile"]
    assert split_tags("a, a") == ["a", "a"]
