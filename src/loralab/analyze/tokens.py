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

Rating rule (`rate_tag`, the guide's rare-token advice): CLIP's BPE vocabulary was built by merging the most
frequent pair first, so a merged token's id (512 + its merge rank) is a proxy for how common it was in CLIP's
training text. Measured on the vendored vocabulary: `the</w>` 518, `red</w>` 736, `photo</w>` 1125,
`girl</w>` 1611, `hair</w>` 2225, `sword</w>` 11356, `armor</w>` 16167; `sks</w>` 48136, `ohwx</w>` 47993,
`olis</w>` 49397 (ids run to 49407). A token is *common* when its id < COMMON_MAX_ID = 20000 (the first ~40%
of the merges; single characters, ids < 512, are common too). A tag that is one token ending in `</w>` with a
common id is a *common word*; one token with id >= 20000 is a *rare token*; a tag of several tokens is
*split*, and its common pieces (`jinxdef` -> `jin`, `x`, `def</w>`: all common) carry their own meaning.
The id is only a proxy: some real words the encoder knows well have high ids (`freckles</w>` 48036,
`ponytail</w>` 43265); `loralab probe` measures what the base model actually does with a tag.

With a base model (`--model`, `add_embeddings`), each token also gets its text-encoder input embedding
measured: `norm_z`, how far its norm lies from the vocabulary's bulk (robust z: (norm - median) / (1.4826 x
MAD) over all 49,408 tokens), `known` when norm_z >= KNOWN_Z = 3, and its 3 nearest common whole words by
cosine. Tested on the lab model, whose text encoder learned only its world's words: `red</w>` 6.7,
`large</w>` 4.7, `circle</w>` 3.4 are known; the held-out `ring</w>` (-1.2), `sks</w>` (0.5), `jin` (-0.3) are
not. On real SD encoders this was not verified (every token there saw some training); read it as a hint.
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


COMMON_MAX_ID = 20000  # token ids below this are "common" (low BPE merge rank = frequent); see the docstring

COMMON_WORD, RARE_TOKEN, SPLIT, EMPTY = "common word", "rare token", "split", "empty"

ADVICE = {
    COMMON_WORD: "a common word already means something to the text encoder: training changes that meaning, so "
                 "expect its old meaning to leak into the concept (and the concept into prompts that use the word); "
                 "pick a rare token or accept the drift",
    RARE_TOKEN: "a rare single token is what the guide recommends for a new concept: it carries little meaning of "
                "its own to leak or to fight (the id is a proxy: `loralab probe` checks what the model does with it)",
    SPLIT: "split into several tokens: training moves every piece, and each piece's meaning leaks into other "
           "prompts that use it (bleeding); check pieces shared with other tags, consider a rarer tag that is one "
           "token, or pivotal tuning (train a new embedding for the tag)",
    EMPTY: "no tokens: the tokenizer keeps nothing of this tag, so it trains nothing; use letters or digits",
}


@dataclass
class TokenRating:
    """What kind of tag this is for the text encoder, by the rule of the module docstring, and the guide's advice."""

    kind: str  # "common word", "rare token", "split" or "empty"
    common: list[bool]  # per token: id < COMMON_MAX_ID
    common_pieces: list[str]  # split tags: the pieces that are common (they carry their own meaning)
    advice: str
    common_max_id: int = COMMON_MAX_ID


def rate_tag(tokens: Sequence[str], ids: Sequence[int], common_max_id: int = COMMON_MAX_ID) -> TokenRating:
    """Rate a tag's tokens: common word, rare token, split (with its common pieces) or empty."""
    common = [i < common_max_id for i in ids]
    if not ids:
        kind = EMPTY
    elif len(ids) == 1:
        kind = COMMON_WORD if common[0] and tokens[0].endswith("</w>") else RARE_TOKEN
    else:
        kind = SPLIT
    pieces = [t for t, c in zip(tokens, common) if c] if kind == SPLIT else []
    advice = ADVICE[kind]
    if kind == SPLIT and pieces:
        shown = ", ".join(p.removesuffix("</w>") for p in pieces)
        advice = f"{len(pieces)} of {len(ids)} pieces are common ({shown}) and carry their own meaning; " + advice
    return TokenRating(kind, common, pieces, advice, common_max_id)


KNOWN_Z = 3.0  # a token whose embedding norm lies this many robust standard deviations above the median is known


@dataclass
class TokenEmbedding:
    """One token's input embedding in a base model's (first) text encoder; see the module docstring."""

    token: str
    id: int
    norm: float
    norm_z: float  # (norm - median) / (1.4826 x MAD) over the vocabulary
    known: bool  # norm_z >= KNOWN_Z
    nearest: list[str]  # the 3 nearest common whole words (id < COMMON_MAX_ID, ending in </w>) by cosine


def token_embeddings(model: str | Path):
    """The (vocab, dim) token embedding matrix of a model's first text encoder, read without loading the rest
    where the weights are safetensors (a single file, or a diffusers folder's text_encoder/)."""
    import torch
    from safetensors import safe_open

    path = Path(model)
    if not path.exists():
        raise LoralabError(f"tokens: model not found: {path}")
    files = sorted(path.glob("text_encoder/*.safetensors")) if path.is_dir() else [path]
    weight = None
    for f in (f for f in files if f.suffix == ".safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys = sorted(k for k in sf.keys() if k.endswith("token_embedding.weight"))
            if keys:
                weight = sf.get_tensor(keys[0])
                break
    if weight is None:
        from loralab.models.loader import load_base_model

        weight = load_base_model(path).text_encoders[0].get_input_embeddings().weight.detach()
    weight = weight.to(torch.float32)
    if weight.ndim != 2 or weight.shape[0] != 49408:
        raise LoralabError(f"tokens: {path}'s token embedding has shape {tuple(weight.shape)}, not CLIP's 49408 tokens")
    return weight


def embed_tokens(ids: Sequence[int], weight, tokens: Sequence[str] | None = None) -> list[TokenEmbedding]:
    """Measure tokens `ids` in the embedding matrix `weight` (from `token_embeddings`)."""
    import torch

    norms = weight.norm(dim=1)
    median = norms.median()
    mad = float((norms - median).abs().median()) * 1.4826 or 1e-12
    inv = {i: t for t, i in _tokenizer().get_vocab().items()}
    common = torch.tensor([i for i in range(512, COMMON_MAX_ID) if inv[i].endswith("</w>")])
    unit = torch.nn.functional.normalize(weight, dim=1)
    out = []
    for k, i in enumerate(ids):
        sims = unit[common] @ unit[i]
        near = [inv[int(j)].removesuffix("</w>") for j in common[sims.topk(4).indices] if int(j) != i][:3]
        z = float((norms[i] - median) / mad)
        out.append(TokenEmbedding(tokens[k] if tokens else inv[i], i, round(float(norms[i]), 4), round(z, 2),
                                  z >= KNOWN_Z, near))
    return out


@dataclass
class TagTokens:
    tag: str
    tokens: list[str]  # BPE pieces; a piece ending in "</w>" ends a word
    ids: list[int]
    rating: TokenRating | None = None
    embedding: list[TokenEmbedding] | None = None  # with a base model (`add_embeddings`)

    def __post_init__(self):
        if self.rating is None:
            self.rating = rate_tag(self.tokens, self.ids)


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


def add_embeddings(result: TextTokens | DatasetTokens, model: str | Path) -> None:
    """Fill each tag's (or activation tag's) `embedding` from the base model's text encoder."""
    weight = token_embeddings(model)
    for t in (result.tags if isinstance(result, TextTokens) else result.concepts):
        if t.ids:
            t.embedding = embed_tokens(t.ids, weight, t.tokens)


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
    rating: TokenRating | None = None  # None when the concept has no activation tag
    embedding: list[TokenEmbedding] | None = None  # with a base model (`add_embeddings`)


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
                                      s.img_count * s.num_repeats / total if total else 0.0,
                                      tt.rating if act else None))
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


def render_ratings(rated: Sequence[tuple[str | None, TokenRating | None]]) -> str:
    """One line per tag: its kind and the guide's advice (the rule: ids < COMMON_MAX_ID are common)."""
    out = [f"\nwhat each tag is to the text encoder (common: token id < {COMMON_MAX_ID}, a low BPE merge rank):"]
    for tag, r in rated:
        if r is not None:
            out.append(f"  {tag}: {r.kind}: {r.advice}")
    return "\n".join(out)


def render_embeddings(measured: Sequence[tuple[str | None, list[TokenEmbedding] | None]]) -> list[str]:
    """With a base model: each token's embedding norm z-score, known or not, and its nearest common words."""
    rows = [(tag, e.token, e.id, f"{e.norm_z:+.1f}", "known" if e.known else "-", ", ".join(e.nearest))
            for tag, embs in measured for e in (embs or [])]
    if not rows:
        return []
    return [f"\nin the base model's text encoder (known: embedding norm z >= {KNOWN_Z:g} over the vocabulary):",
            format_table(["tag", "token", "id", "norm z", "known", "nearest common words"], rows, right=(2, 3))]


def render_text_tokens(result: TextTokens) -> str:
    out = [format_table(["tag", "tokens", "ids"],
                        [(t.tag, " ".join(t.tokens), " ".join(map(str, t.ids))) for t in result.tags])]
    out.append(render_ratings([(t.tag, t.rating) for t in result.tags]))
    out += render_embeddings([(t.tag, t.embedding) for t in result.tags])
    out.append(f"\nas one caption: {result.caption_tokens} tokens of the 75 the text encoder reads")
    if result.shared:
        out.append("\ntokens shared by several tags (training one also trains the others):")
        out += [f"  {s.token} ({s.id}): {', '.join(s.tags)}" for s in result.shared]
    return "\n".join(out)


def render_dataset_tokens(result: DatasetTokens) -> str:
    out = [format_table(["concept", "activation tag", "tokens", "ids", "images", "repeats", "share"],
                        [(c.name, c.activation_tag or "-", " ".join(c.tokens), " ".join(map(str, c.ids)), c.images,
                          c.repeats, f"{c.epoch_share:.0%}") for c in result.concepts], right=(4, 5, 6))]
    out.append(render_ratings([(c.activation_tag, c.rating) for c in result.concepts if c.rating]))
    out += render_embeddings([(c.activation_tag, c.embedding) for c in result.concepts])
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
