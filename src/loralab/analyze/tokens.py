"""`loralab tokens`: the CLIP tokens of tags, and which concepts train the tokens their activation tags share.

The tokenizer is the real CLIP BPE (`loralab.models.tokenizer.clip_tokenizer`, offline), the one of SD 1.x,
SD 2.x and both SDXL text encoders. A rare made-up tag such as `jinxdef` is not one token: it is split into
known pieces (`jin`, `x`, `def</w>`; `</w>` marks the end of a word). Two activation tags that share pieces
(`jinxdef` and `jinxarcane` share `jin` and `x`) train the same token embeddings' meaning in the model, so
the concepts bleed into each other, and the concept that is seen most per epoch wins the shared tokens.

Balancing rule (`balance_repeats`): each concept's share of an epoch is proportional to images x repeats
(reg images are not counted: they carry no activation tag). Choose repeats r_i from 1 to 5 (more repeats
only show the same images more often and overfit them) so that images_i x r_i are as equal as possible:
minimise the ratio max(images_i x r_i) / min(images_i x r_i); among equal ratios keep the repeats closest to
the current ones, then the smaller ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loralab.analyze.dataset_check import MAX_REPEATS, activation_tag, format_table, scan_dataset
from loralab.analyze.scan import ScannedDataset
from loralab.errors import LoralabError

BALANCE_EXPLANATION = (
    "Why balance: tokens shared by several activation tags are trained by every concept that has them, and "
    "each concept pulls them towards its own look in proportion to how often it is seen. Each epoch shows every "
    "image of a concept `repeats` times, so a concept's share of an epoch is images x repeats divided by the "
    "total (regularization images excluded). The concept with the largest share wins the shared tokens and the "
    f"others bleed into it. The suggested repeats (1 to {MAX_REPEATS}; more only repeat the same images and "
    "overfit them) make images x repeats as equal as possible, so each concept pulls the shared tokens equally. "
    "Better still, pick activation tags that share no tokens."
)


@dataclass
class TagTokens:
    tag: str
    tokens: list[str]  # BPE pieces; a piece ending in "</w>" ends a word
    ids: list[int]


def _tokenizer():
    from loralab.models.tokenizer import clip_tokenizer

    return clip_tokenizer().backend_tokenizer


def tokenize_tags(tags: Sequence[str], tokenizer=None) -> list[TagTokens]:
    """The CLIP tokens and ids of each tag (no BOS/EOS), with the real tokenizer."""
    tok = tokenizer or _tokenizer()
    out = []
    for tag, enc in zip(tags, tok.encode_batch(list(tags), add_special_tokens=False)):
        out.append(TagTokens(tag, list(enc.tokens), list(enc.ids)))
    return out


@dataclass
class SharedToken:
    token: str
    id: int
    tags: list[str]  # the tags (activation tags, in dataset mode) that contain it
    concepts: list[str] = field(default_factory=list)  # dataset mode: the concepts training it
    epoch_shares: list[float] = field(default_factory=list)  # dataset mode: each concept's share of an epoch


def shared_tokens(tagged: Sequence[TagTokens]) -> list[SharedToken]:
    """Tokens (by id) that occur in two or more different tags, in order of first appearance."""
    seen: dict[int, SharedToken] = {}
    for t in tagged:
        for token, tid in zip(t.tokens, t.ids):
            entry = seen.setdefault(tid, SharedToken(token, tid, []))
            if t.tag not in entry.tags:
                entry.tags.append(t.tag)
    return [s for s in seen.values() if len(s.tags) > 1]


@dataclass
class TextTokens:
    """`loralab tokens TEXT...`: the tags of the text, their tokens, the tokens shared between tags."""

    tags: list[TagTokens]
    shared: list[SharedToken]
    caption_tokens: int  # the whole text as one caption ("a, b, c"), without BOS/EOS

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def text_tokens(texts: Sequence[str]) -> TextTokens:
    """Split the texts into tags (commas; a text without commas is one tag) and tokenize each."""
    tags: list[str] = []
    for text in texts:
        for tag in (t.strip() for t in text.split(",")):
            if tag and tag not in tags:
                tags.append(tag)
    if not tags:
        raise LoralabError("tokens: give at least one tag, e.g. loralab tokens \"jinxdef, blue hair\"")
    tok = _tokenizer()
    tagged = tokenize_tags(tags, tok)
    caption = ", ".join(tags)
    n = len(tok.encode(caption, add_special_tokens=False).ids)
    return TextTokens(tagged, shared_tokens(tagged), n)


# ----------------------------------------------------------------------------------------- dataset mode


def balance_repeats(images: Sequence[int], current: Sequence[int] | None = None,
                    max_repeats: int = MAX_REPEATS) -> list[int]:
    """Repeats r_i in 1..max_repeats that make images_i x r_i as equal as possible (see the module docstring).

    Exact: for every candidate smallest value m (some images_j x r_j), each concept takes the smallest
    repeats with images_i x r_i >= m; that minimises the largest value for this m, so the best ratio over
    all m is the optimum. Ties: closest to `current` (sum of |r_i - current_i|), then smaller repeats.
    """
    if any(n < 1 for n in images):
        raise ValueError("every concept needs at least one image")
    current = list(current) if current is not None else [1] * len(images)
    best: tuple | None = None
    for m in sorted({n * r for n in images for r in range(1, max_repeats + 1)}):
        reps = []
        for n in images:
            r = -(-m // n)  # ceil(m / n)
            if r > max_repeats:
                break
            reps.append(r)
        else:
            values = [n * r for n, r in zip(images, reps)]
            key = (max(values) / min(values), sum(abs(r - c) for r, c in zip(reps, current)), sum(reps))
            if best is None or key < best[0]:
                best = (key, reps)
    assert best is not None  # m = the smallest images x 1 always works
    return best[1]


@dataclass
class ConceptTokens:
    name: str
    activation_tag: str | None
    tokens: list[str]
    ids: list[int]
    images: int
    repeats: int
    epoch_share: float  # images x repeats / sum over train concepts


@dataclass
class BalanceGroup:
    """Concepts linked by shared tokens, with the repeats that would balance them."""

    concepts: list[str]
    tokens: list[str]
    current_repeats: list[int]
    suggested_repeats: list[int]
    images: list[int]
    current_ratio: float  # max/min of images x repeats now
    suggested_ratio: float


@dataclass
class DatasetTokens:
    concepts: list[ConceptTokens]
    shared: list[SharedToken]
    groups: list[BalanceGroup]
    explanation: str = BALANCE_EXPLANATION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def dataset_tokens(train_dir: str | Path | None, *, caption_extension: str = ".txt",
                   dataset: ScannedDataset | None = None) -> DatasetTokens:
    """Tokens of each concept's activation tag, the tokens they share, who trains them with what share of an
    epoch, and balancing repeats per group of concepts linked by shared tokens. `dataset`: already scanned
    (e.g. `scan.scan_dataset_config`) instead of `train_dir`."""
    ds = dataset or scan_dataset(train_dir, caption_extension=caption_extension)
    subsets = [s for s in ds.train_subsets if s.img_count]
    total = sum(s.img_count * s.num_repeats for s in subsets)
    tok = _tokenizer()
    concepts: list[ConceptTokens] = []
    for s in subsets:
        act = activation_tag(ds.images_of(s), s.class_tokens).tag
        tt = tokenize_tags([act], tok)[0] if act else TagTokens("", [], [])
        concepts.append(ConceptTokens(s.name, act, tt.tokens, tt.ids, s.img_count, s.num_repeats,
                                      s.img_count * s.num_repeats / total if total else 0.0))
    # shared tokens between concepts (two concepts with the same activation tag share all its tokens)
    by_id: dict[int, SharedToken] = {}
    for c in concepts:
        for token, tid in zip(c.tokens, c.ids):
            entry = by_id.setdefault(tid, SharedToken(token, tid, []))
            if c.name not in entry.concepts:
                entry.concepts.append(c.name)
                entry.epoch_shares.append(c.epoch_share)
                if c.activation_tag not in entry.tags:
                    entry.tags.append(c.activation_tag or "")
    shared = [s for s in by_id.values() if len(s.concepts) > 1]
    # groups: connected components of "shares a token"
    parent = {c.name: c.name for c in concepts}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for s in shared:
        for other in s.concepts[1:]:
            parent[root(other)] = root(s.concepts[0])
    members: dict[str, list[ConceptTokens]] = {}
    for c in concepts:
        members.setdefault(root(c.name), []).append(c)
    groups = []
    for group in members.values():
        if len(group) < 2:
            continue
        names = [c.name for c in group]
        tokens = [s.token for s in shared if set(s.concepts) & set(names)]
        images = [c.images for c in group]
        current = [c.repeats for c in group]
        suggested = balance_repeats(images, current)
        groups.append(BalanceGroup(names, tokens, current, suggested, images, _spread(images, current),
                                   _spread(images, suggested)))
    return DatasetTokens(concepts, shared, groups)


def _spread(images: Sequence[int], repeats: Sequence[int]) -> float:
    values = [n * r for n, r in zip(images, repeats)]
    return max(values) / min(values)


# ----------------------------------------------------------------------------------------- terminal


def render_text_tokens(result: TextTokens) -> str:
    out = [format_table(["tag", "tokens", "ids"],
                        [(t.tag, " ".join(t.tokens), " ".join(map(str, t.ids))) for t in result.tags])]
    out.append(f"\nas one caption: {result.caption_tokens} tokens of the 75 the text encoder reads")
    if result.shared:
        out.append("\ntokens shared by several tags (training one also trains the others):")
        out += [f"  {s.token} ({s.id}): {', '.join(s.tags)}" for s in result.shared]
    return "\n".join(out)


def render_dataset_tokens(result: DatasetTokens) -> str:
    out = [format_table(["concept", "activation tag", "tokens", "ids", "images", "repeats", "share"],
                        [(c.name, c.activation_tag or "-", " ".join(c.tokens), " ".join(map(str, c.ids)), c.images,
                          c.repeats, f"{c.epoch_share:.0%}") for c in result.concepts], right=(4, 5, 6))]
    if not result.shared:
        out.append("\nthe activation tags share no token: the concepts do not compete for tokens")
        return "\n".join(out)
    out.append("\nshared tokens (concept: share of an epoch):")
    for s in result.shared:
        who = ", ".join(f"{c}: {share:.0%}" for c, share in zip(s.concepts, s.epoch_shares))
        out.append(f"  {s.token} ({s.id}) is trained by {who}")
    for g in result.groups:
        out.append(f"\nbalancing {', '.join(g.concepts)} (shared tokens: {' '.join(g.tokens)}):")
        rows = [(n, i, c, i * c, s, i * s) for n, i, c, s in zip(g.concepts, g.images, g.current_repeats,
                                                                  g.suggested_repeats)]
        out.append(format_table(["concept", "images", "repeats", "images x repeats", "suggested", "images x suggested"],
                                rows, right=(1, 2, 3, 4, 5)))
        out.append(f"largest / smallest: {g.current_ratio:.2f} now, {g.suggested_ratio:.2f} with the suggested repeats "
                   f"(rename the folders, e.g. {g.suggested_repeats[0]}_{g.concepts[0].split('_', 1)[-1]})")
        now = sum(i * c for i, c in zip(g.images, g.current_repeats))
        then = sum(i * s for i, s in zip(g.images, g.suggested_repeats))
        if now != then:
            out.append(f"these concepts give {now} samples per epoch now and {then} with the suggested repeats: "
                       f"change the epochs (or max_train_steps) to keep the training length")
    out.append("\n" + result.explanation)
    return "\n".join(out)
