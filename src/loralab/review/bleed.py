"""`loralab bleed`: do a LoRA's concepts bleed into each other through the token pieces their tags share?

    loralab bleed --model base.safetensors --lora my_lora.safetensors --dataset train/ --out bleed/

The guide (§5): two activation tags that share a CLIP token piece (`jinxdef` and `jinxarcane` share `jin`,
`x`) may both call up the concept trained most; the piece alone may carry it. `loralab tokens --dataset`
finds the shared pieces before training; this command measures what the trained LoRA does with them.

Probes (`bleed_probes`), each drawn on `--seeds` seeds with and without the LoRA (same seed, so the two
images differ only by what the LoRA does), after each probe the `--context` tags (cycled over the seeds):
- each activation tag alone;
- each token piece of a tag alone, fed as its token id (`models.text.TokenIds`: the text "jin" is the
  other token `jin</w>`); a piece in several tags is one probe;
- the class word (`--class-word`), and each pair of tags ("a, b").

Measures (`Probe` results):
- LoRA change = mean |image with LoRA − image without| over pixels and seeds, in [0, 1];
- `carry` of a piece for a tag = change(piece) / change(tag): how much of what the LoRA does for the whole
  tag the piece alone calls up; without a judge, a shared piece with carry >= CARRY_BAR (0.5) bleeds;
- DAAM maps (`analyze.attention`) of each probe's words with the LoRA: for a pair, the share of one tag's map
  inside the other's region (`overlap_matrix`): a high share means the two tags act on the same pixels;
- with a judge (the lab evaluator on lab-model LoRAs) reading what each image shows: a tag's concept = what
  most of its LoRA images show; a probe's lift for a concept = its share of images showing it with the LoRA
  minus without. A shared piece bleeds when its lift for a tag's concept is >= JUDGED_BAR (0.25); tag A
  bleeds into tag B when B's lift for A's concept is >= JUDGED_BAR.

Dominant concept of the tags sharing a piece: the one with the most images × repeats in the dataset (its
share of an epoch) when the shares differ by BALANCED_RATIO (1.5×) or more; else the one whose concept the
piece's images show most (judge), else the tag the LoRA changes most. The fixes the guide gives, where they
apply: fewer repeats on the dominant concept (the balance `loralab tokens --dataset` computes), a distinct
activation tag (no shared piece), pivotal tuning (train the tag's embedding).

A pivotal LoRA (its file bundles `bundle_emb.<token>.*`) or an `--embedding` file loads its new tokens while
the report is drawn: a tag that is a new token is read as the sampler reads it, its own id(s), so it has no
shared pieces and no piece probes (`pivotal_tags` in bleed.json); its DAAM map is its own position(s). The
images "without the LoRA" keep the new token loaded (only the LoRA's weights come off).

Files in `--out`: `bleed.json`, `report.md`, `grid.png` (per probe a row without and a row with the LoRA,
one column per seed), `maps.png` (the probe's words' maps with the LoRA, first seed).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from loralab.analyze.attention import WordTokens, overlap_matrix
from loralab.errors import LoralabError
from loralab.io import atomic_write

log = logging.getLogger(__name__)

CARRY_BAR = 0.5  # a piece whose LoRA change is at least half its tag's carries the concept by itself
JUDGED_BAR = 0.25  # with a judge: a piece or tag whose LoRA images show a concept this much more often than without
BALANCED_RATIO = 1.5  # images x repeats within this ratio: no concept dominates by the dataset
Judge = Callable[[list], list]  # images -> what each shows (e.g. the lab evaluator's shape), None if unsure


@dataclass
class Probe:
    """One bleeding probe: its kind (tag, piece, class, pair), label, prompt body and mapped words."""

    kind: str
    label: str
    body: object  # str, or models.text.TokenIds for a piece
    words: list[WordTokens]  # positions in the body (context comes after)
    tags: list[str] = field(default_factory=list)  # the tags it belongs to (a piece: every tag that has it)
    change: float = 0.0
    judged: list = field(default_factory=list)  # the judge's reading of each LoRA image
    judged_base: list = field(default_factory=list)  # ... and of each image without the LoRA
    overlap: dict = field(default_factory=dict)


def _pieces(tokenizer, tag: str) -> list[tuple[int, str]]:
    """The tag's (id, piece) as the sampler reads it: a loaded new word (a pivotal LoRA's token) is its own
    id(s), named `word` or `word#i`."""
    from loralab.models.embeddings import id_names, text_ids

    ids = text_ids(tokenizer, tag)
    return list(zip(ids, id_names(tokenizer, ids)))


def _shared_pieces(tokenizer, tag: str) -> list[tuple[int, str]]:
    """The pieces of a tag that other tags can share: none for a tag that is a new word (pivotal tuning:
    its vectors are its own ids, no other word reads them), else its base-vocabulary pieces."""
    from loralab.models.embeddings import is_new_id

    pieces = _pieces(tokenizer, tag)
    if len(pieces) < 2 or any(is_new_id(tokenizer, t) for t, _ in pieces):
        return []
    return pieces


def bleed_probes(tokenizer, tags: Sequence[str], class_word: str = "") -> list[Probe]:
    """The probes of `tags` (see the module docstring), tags first, then pieces, class word and pairs."""
    from loralab.models.text import TokenIds

    probes = []
    for tag in tags:
        n = len(_pieces(tokenizer, tag))
        probes.append(Probe("tag", tag, tag, [WordTokens(tag, (), tuple(range(1, n + 1)))], [tag]))
    seen: dict[int, Probe] = {}
    for tag in tags:
        pieces = _shared_pieces(tokenizer, tag)
        for tid, token in pieces:
            if tid in seen:
                if tag not in seen[tid].tags:
                    seen[tid].tags.append(tag)
                continue
            seen[tid] = Probe("piece", f"piece {token!r}", TokenIds([tid]), [WordTokens(token, (token,), (1,))], [tag])
            probes.append(seen[tid])
    for p in seen.values():
        p.label = f"piece {p.words[0].word!r} of " + ", ".join(p.tags)
    if class_word:
        n = len(_pieces(tokenizer, class_word))
        probes.append(Probe("class", f"class word {class_word!r}", class_word,
                            [WordTokens(class_word, (), tuple(range(1, n + 1)))]))
    for a, b in combinations(tags, 2):
        na, nb = len(_pieces(tokenizer, a)), len(_pieces(tokenizer, b))
        probes.append(Probe("pair", f"{a}, {b}", f"{a}, {b}",
                            [WordTokens(a, (), tuple(range(1, na + 1))),
                             WordTokens(b, (), tuple(range(na + 2, na + nb + 2)))], [a, b]))
    return probes


def with_context(tokenizer, body, context: str):
    """The probe's prompt: its body, then ", <context>" (a `TokenIds` body gets the context's ids)."""
    if not context:
        return body
    if isinstance(body, str):
        return f"{body}, {context}"
    from loralab.models.text import TokenIds

    from loralab.models.embeddings import text_ids

    return TokenIds(list(body) + text_ids(tokenizer, ", " + context))


# ------------------------------------------------------------------------------------------- drawing
@dataclass
class Drawn:
    base: list[Image.Image]
    lora: list[Image.Image]
    maps: object = None  # review.attention.WordMaps of the first seed, with the LoRA


def draw_probe(sm, probe: Probe, net, prompt_for: Callable[[object, int], object], seeds: int) -> Drawn:
    """Each seed without then with the LoRA `net` (applied on `sm` once for the whole report; taken off for the
    images without it), maps recorded with the LoRA on the first seed."""
    from loralab.review.attention import draw_with_positions

    prompts = [prompt_for(probe.body, s) for s in range(seeds)]
    net.restore()
    try:
        base = sm.draw(prompts, seed=0)
    finally:
        net.apply_to()
    maps = draw_with_positions(sm, prompts[0], probe.words)
    lora_images = [maps.image] + (sm.draw(prompts[1:], seed=0) if seeds > 1 else [])
    return Drawn(base, lora_images, maps)


def lora_change(base: Sequence[Image.Image], lora: Sequence[Image.Image]) -> float:
    """Mean |with − without| over pixels, channels and seeds, in [0, 1]."""
    diffs = [np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean() / 255.0
             for a, b in zip(base, lora)]
    return float(np.mean(diffs)) if diffs else 0.0


# ------------------------------------------------------------------------------------------- findings
def concept_of(probes: Sequence[Probe]) -> dict[str, str | None]:
    """With a judge: each tag's concept = what most of its LoRA images show (None when no judge)."""
    out = {}
    for p in probes:
        if p.kind == "tag":
            labels = [j for j in p.judged if j is not None]
            out[p.label] = Counter(labels).most_common(1)[0][0] if labels else None
    return out


def judged_shares(probe: Probe, concepts: dict[str, str | None]) -> dict[str, dict[str, float]]:
    """Per tag whose concept is known: the share of the probe's images showing it with the LoRA, without it,
    and the lift (with − without)."""
    if not probe.judged:
        return {}
    out = {}
    for tag, c in concepts.items():
        if c is None:
            continue
        with_ = sum(j == c for j in probe.judged) / len(probe.judged)
        without = sum(j == c for j in probe.judged_base) / max(1, len(probe.judged_base))
        out[tag] = {"with": round(with_, 3), "without": round(without, 3), "lift": round(with_ - without, 3)}
    return out


def _dominant(p: Probe, tags: dict[str, Probe], weights: dict[str, float], judged: dict) -> tuple[str, str]:
    w = [weights.get(t, 0.0) for t in p.tags]
    if weights and min(w) > 0 and max(w) / min(w) >= BALANCED_RATIO:
        top = max(p.tags, key=lambda t: weights.get(t, 0.0))
        return top, f"{weights[top]:.0%} of an epoch's images x repeats"
    if judged:
        top = max(p.tags, key=lambda t: judged.get(t, {}).get("lift", 0.0))
        return top, "the piece's LoRA images show its concept most" + (" (the dataset is balanced)" if weights else "")
    top = max(p.tags, key=lambda t: tags[t].change)
    return top, "the largest LoRA change" + (" (the dataset is balanced)" if weights else " (no dataset given)")


def findings(probes: Sequence[Probe], weights: dict[str, float]) -> dict:
    """The report's conclusions: per shared piece, its carry for each tag, whether it bleeds, the dominant
    concept of the tags sharing it; with a judge, tag-into-tag bleeding."""
    tags = {p.label: p for p in probes if p.kind == "tag"}
    concepts = concept_of(probes)
    pieces = []
    for p in (p for p in probes if p.kind == "piece" and len(p.tags) > 1):
        carry = {t: round(p.change / tags[t].change, 3) if tags[t].change > 0 else 0.0 for t in p.tags}
        judged = judged_shares(p, {t: concepts.get(t) for t in p.tags})
        dominant, why = _dominant(p, tags, weights, judged)
        bleeds = (max(v["lift"] for v in judged.values()) >= JUDGED_BAR if judged
                  else max(carry.values()) >= CARRY_BAR)
        pieces.append({"piece": p.words[0].word, "tags": p.tags, "change": round(p.change, 4), "carry": carry,
                       "judged": judged, "bleeds": bleeds, "measured_by": "judge" if judged else "carry",
                       "dominant": dominant, "dominant_because": why})
    into = []
    for b, pb in tags.items():
        for a, ca in concepts.items():
            if a != b and ca is not None and ca != concepts.get(b):
                share = judged_shares(pb, {a: ca})[a]
                into.append({"from": a, "into": b, "concept": ca, **share})
    return {"concepts": concepts, "shared_pieces": pieces, "tag_into_tag": into}


def fixes(found: dict, groups: Sequence) -> list[str]:
    """The guide's fixes that apply to the findings (`groups`: `analyze.tokens.BalanceGroup`s of the dataset)."""
    out = []
    for p in found["shared_pieces"]:
        if not p["bleeds"]:
            continue
        if p["measured_by"] == "judge":
            how = ", ".join(f"{t}'s concept {v['with']:.0%} (without the LoRA {v['without']:.0%})"
                            for t, v in p["judged"].items())
        else:
            how = "carry " + ", ".join(f"{t} {c:.0%}" for t, c in p["carry"].items())
        out.append(f"piece {p['piece']!r} carries a concept by itself ({how}); dominant: {p['dominant']}.")
    for x in found["tag_into_tag"]:
        if x["lift"] >= JUDGED_BAR:
            out.append(f"{x['from']} bleeds into {x['into']}: {x['with']:.0%} of {x['into']}'s images show "
                       f"{x['concept']} (without the LoRA {x['without']:.0%}).")
    bleeding = bool(out)
    for g in groups:
        if g.current_ratio >= BALANCED_RATIO and g.suggested_ratio < g.current_ratio:
            out.append("fewer repeats on the dominant concept: " + ", ".join(
                f"{c} {r} -> {s}" for c, r, s in zip(g.concepts, g.current_repeats, g.suggested_repeats))
                + f" (images x repeats {g.current_ratio:.1f}:1 -> {g.suggested_ratio:.1f}:1, `loralab tokens --dataset`).")
    if bleeding and found["shared_pieces"]:
        out.append("a distinct activation tag for each concept, sharing no token piece (check it with "
                   "`loralab tokens \"tag1, tag2\"`).")
        out.append("pivotal tuning (train the tag's embedding with the LoRA) keeps each tag's meaning apart: "
                   "token_string / init_word in the training config (README: pivotal tuning).")
    return out


# -------------------------------------------------------------------------------------------- pictures
def _label_rows(rows: Sequence[tuple[str, list[Image.Image]]], view: int = 96) -> Image.Image:
    cols = max(len(imgs) for _, imgs in rows)
    label_w = 260
    out = Image.new("RGB", (label_w + cols * view, len(rows) * view), "white")
    d = ImageDraw.Draw(out)
    for r, (label, imgs) in enumerate(rows):
        d.text((4, r * view + view // 2 - 6), label[:42], fill="black")
        for c, im in enumerate(imgs):
            out.paste(im.convert("RGB").resize((view, view * im.height // im.width), Image.NEAREST),
                      (label_w + c * view, r * view))
    return out


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# -------------------------------------------------------------------------------------------- command
@dataclass
class BleedOptions:
    model: str
    lora: Path
    weight: float = 1.0
    tags: list[str] = field(default_factory=list)  # else the dataset's activation tags
    dataset: str = ""  # a kohya folder dataset (weights and balance advice)
    class_word: str = ""
    contexts: list[str] = field(default_factory=list)  # appended to every probe, cycled over the seeds
    seeds: int = 4
    seed: int = 0
    width: int = 0  # 0: the model's own size (UNet sample_size × the VAE's factor)
    height: int = 0
    steps: int = 25
    scale: float = 7.5
    sampler: str = ""
    out: str = "bleed"
    device: str = ""
    precision: str = "fp32"
    clip_skip: int = 0
    caption_extension: str = ".txt"
    embeddings: list[str] = field(default_factory=list)  # --embedding files, loaded before the LoRA


def dataset_weights(opts: BleedOptions) -> tuple[list[str], dict[str, float], list]:
    """The tags (given, else the dataset's activation tags), each tag's share of an epoch (images × repeats)
    and the dataset's balance groups (`analyze.tokens.dataset_tokens`)."""
    weights: dict[str, float] = {}
    groups: list = []
    tags = list(opts.tags)
    if opts.dataset:
        from loralab.analyze.tokens import dataset_tokens

        dt = dataset_tokens(opts.dataset, caption_extension=opts.caption_extension)
        for c in dt.concepts:
            if c.activation_tag:
                weights[c.activation_tag] = weights.get(c.activation_tag, 0.0) + c.epoch_share
        groups = dt.groups
        tags = tags or list(dict.fromkeys(c.activation_tag for c in dt.concepts if c.activation_tag))
    tags = list(dict.fromkeys(t.strip() for t in tags if t.strip()))
    if len(tags) < 1:
        raise LoralabError("bleed: no tags to probe: give --tags a,b or --dataset DIR (whose captions start with "
                           "an activation tag)")
    return tags, weights, groups


def bleed(opts: BleedOptions, judge: Judge | None = None, progress: Callable[[str], None] = lambda s: None) -> dict:
    """What `loralab bleed` runs; returns the content of bleed.json (see the module docstring)."""
    from loralab.review.generate import LoraSpec, SamplingModel

    if opts.seeds < 1:
        raise LoralabError(f"--seeds {opts.seeds}: at least 1")
    for path in opts.embeddings:  # before the model loads
        if not Path(path).is_file():
            raise LoralabError(f"--embedding {path}: not a file")
    tags, weights, groups = dataset_weights(opts)
    sm = SamplingModel.load(opts.model, device=opts.device, precision=opts.precision, clip_skip=opts.clip_skip)
    sm.apply_all([LoraSpec(opts.lora, opts.weight)], opts.embeddings)  # a LoRA for another base model: said before any drawing
    try:
        return _bleed(sm, opts, tags, weights, groups, judge, progress)
    finally:
        sm.remove()


def _bleed(sm, opts: BleedOptions, tags: list[str], weights: dict[str, float], groups: list, judge, progress) -> dict:
    from loralab.train.sampling import SamplePrompt

    from loralab.models.embeddings import is_new_id

    (net,) = sm.networks
    width, height = opts.width or sm.native_size, opts.height or sm.native_size
    tok = sm.model.tokenizers[0]
    probes = bleed_probes(tok, tags, opts.class_word)
    contexts = opts.contexts or [""]

    def prompt_for(body, s: int) -> SamplePrompt:
        return SamplePrompt(with_context(tok, body, contexts[s % len(contexts)]), width=width,
                            height=height, seed=opts.seed + s, steps=opts.steps, scale=opts.scale,
                            sampler=opts.sampler or None)

    _check_lengths(tok, probes, contexts, prompt_for)
    rows, maps = [], []
    for i, p in enumerate(probes):
        progress(f"probe {i + 1}/{len(probes)}: {p.label}")
        d = draw_probe(sm, p, net, prompt_for, opts.seeds)
        p.change = lora_change(d.base, d.lora)
        p.judged, p.judged_base = (list(judge(d.lora)), list(judge(d.base))) if judge else ([], [])
        p.overlap = overlap_matrix([w.word for w in p.words], d.maps.heats) if len(p.words) > 1 else {}
        rows += [(f"{p.label} (without)", d.base), (f"{p.label} (LoRA)", d.lora)]
        maps.append((p.label, d.maps))
    found = findings(probes, weights)
    result = {"model": str(opts.model), "lora": str(opts.lora), "weight": opts.weight, "tags": tags,
              "epoch_share": weights, "new_tokens": sorted(sm.tokens),
              "pivotal_tags": [t for t in tags if any(is_new_id(tok, i) for i, _ in _pieces(tok, t))], "contexts": opts.contexts, "seeds": opts.seeds, "carry_bar": CARRY_BAR,
              "probes": [{"kind": p.kind, "label": p.label, "tags": p.tags, "change": round(p.change, 4),
                          "judged": p.judged, "judged_without": p.judged_base, "overlap": p.overlap}
                         for p in probes],
              **found, "fixes": fixes(found, groups)}
    write_outputs(Path(opts.out), result, rows, maps)
    return result


def _check_lengths(tok, probes: Sequence[Probe], contexts: Sequence[str], prompt_for) -> None:
    from loralab.analyze.attention import CHUNK_TOKENS, _content_ids

    for p in probes:
        for s in range(len(contexts)):
            n = len(_content_ids(tok, prompt_for(p.body, s).prompt))
            if n > CHUNK_TOKENS:
                raise LoralabError(f"bleed: the probe {p.label!r} with its context is {n} tokens long; the limit is "
                                   f"{CHUNK_TOKENS}: shorten --context")


def write_outputs(out: Path, result: dict, rows: list, maps: list) -> None:
    from loralab.review.attention import sheet

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bleed.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    _save_png(_label_rows(rows), out / "grid.png")
    sheets = [sheet([(label, wm)]) for label, wm in maps]
    width = max(s.width for s in sheets)
    stacked = Image.new("RGB", (width, sum(s.height for s in sheets)), "white")
    y = 0
    for s in sheets:
        stacked.paste(s, (0, y))
        y += s.height
    _save_png(stacked, out / "maps.png")
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(render_report(result), encoding="utf-8"))


def render_report(r: dict) -> str:
    """report.md: probes, shared pieces, tag-into-tag bleeding, the fixes that apply."""
    lines = [f"# Bleeding report: {Path(r['lora']).name} (weight {r['weight']:g})", "",
             f"Tags: {', '.join(r['tags'])}. {r['seeds']} seeds per probe"
             + (f", context: {' | '.join(r['contexts'])}" if r["contexts"] else "") + ".", "",
             "| probe | LoRA change | what the LoRA images show | maps: share inside the other tag |",
             "|---|---|---|---|"]
    for p in r["probes"]:
        shows = ", ".join(f"{k} {v}" for k, v in Counter(p["judged"]).most_common(3)) if p["judged"] else ""
        overlap = "; ".join(f"{a} in {b} {v:.0%}" for a, other in p["overlap"].items() for b, v in other.items())
        lines.append(f"| {p['label']} | {p['change']:.3f} | {shows} | {overlap} |")
    lines += ["", "## Shared pieces", ""]
    if r.get("pivotal_tags"):
        lines.append(f"Pivotal tags ({', '.join(r['pivotal_tags'])}): each is its own trained token (the LoRA's "
                     "bundled embedding or --embedding), not CLIP pieces, so it has no piece to share or probe.")
    if not r["shared_pieces"]:
        lines.append("The tags share no token piece.")
    for p in r["shared_pieces"]:
        carry = ", ".join(f"{t} {c:.0%}" for t, c in p["carry"].items())
        judged = ("; its images show " + ", ".join(f"{t}'s concept {v['with']:.0%} (without the LoRA {v['without']:.0%})"
                                                  for t, v in p["judged"].items()) if p["judged"] else "")
        bar = f"judge lift >= {JUDGED_BAR:.0%}" if p["measured_by"] == "judge" else f"carry >= {r['carry_bar']:.0%}"
        lines.append(f"- `{p['piece']}` (in {', '.join(p['tags'])}): carry {carry}{judged} — "
                     + ("**bleeds**" if p["bleeds"] else "no bleeding") + f" ({bar}); dominant concept: "
                     f"**{p['dominant']}** ({p['dominant_because']}).")
    if r["tag_into_tag"]:
        lines += ["", "## Tag into tag (judge)", ""]
        for x in r["tag_into_tag"]:
            lines.append(f"- {x['from']} into {x['into']}: {x['with']:.0%} of {x['into']}'s LoRA images show "
                         f"{x['from']}'s concept ({x['concept']}); without the LoRA {x['without']:.0%}.")
    lines += ["", "## Fixes that apply", ""] + [f"- {f}" for f in r["fixes"] or ["none: no bleeding found."]]
    lines += ["", "![probes](grid.png)", "", "![maps](maps.png)", ""]
    return "\n".join(lines)
