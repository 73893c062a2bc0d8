"""`loralab probe`: does the base model already know a tag? (the guide §2-3: a new concept or a modified one)

    loralab probe --model base.safetensors "jinxdef" --class "woman" --context "1girl, solo" --out probe/

The guide asks this before training: a tag the base model knows makes the LoRA *modify* an existing concept
(fewer steps; watch for drift of that concept and its neighbours); a tag it does not know is a *new* concept
(pick a rare token, or train the tag's embedding by pivotal tuning; use regularization images).

Prompts (`probe_prompts`), each drawn on `--seeds` fixed seeds (seed i uses context i mod the contexts):
- the tag in its context (`--context`: a prompt where `{}` marks the tag's place, else the tag comes first,
  "tag, context"; no context: the tag alone);
- the same prompt without the tag, and with the class word (`--class`) in the tag's place;
- STAND_INS stand-ins: the tag's place filled with as many rare CLIP tokens as the tag has pieces (drawn
  once, from a fixed seed, among the last merges of the BPE vocabulary: `stand_in_ids`). A made-up word
  the model cannot know: the control every tag is compared with.

Why the stand-ins, not "with vs without": any token added to a prompt changes the image, known or not (on
the lab model a made-up word changes the picture as much as a trained shape word: with vs without, mean
pixel change 0.15-0.17 for both). What sets a known tag apart is that its images differ from what a
made-up word in the same place gives more than made-up words differ from each other.

Measures (image change = mean |a - b| over pixels, channels and seeds, in [0, 1], `bleed.lora_change`):
- `change_without`: tag vs the prompt without it; `change_class`: tag vs the class word;
- `distinctness` = mean change(tag, stand-in) / mean change(stand-in, other stand-in), over the stand-ins;
- `text_distinctness`: the same ratio on the text encoder's output (the conditioning the UNet reads,
  mean L2 distance per position);
- with a judge (the lab evaluator on the lab model): what the images of each prompt show.

Rule: the base model knows the tag when `text_distinctness` >= TEXT_BAR (1.45) and `distinctness` >=
IMAGE_BAR (1.2): the text encoder gives the tag a meaning of its own and the UNet draws something of its own
from it. Either alone misleads: a made-up tag of several pieces scrambles the image (on the lab model
`jinxdef`: image 1.78, text 1.27), and a word the text encoder knows may draw nothing the UNet was taught.
Calibrated on the lab model (8 seeds, 4 stand-ins, 4 contexts "colour {}, background, size"; README "Does the
base model know the tag?" has the table): star, heart, square, triangle, cross: text 1.62-2.18, image 1.29-2.12
(known); olis, ring (never trained), banana, qzvkt, jinxdef, blorptwizz: text 0.79-1.27 (new). `circle` reads
as new (text 1.24, image 1.11): the lab model draws a circle for any word it does not know in a shape's place,
so its circle is its default, not a concept a tag can be told apart by.

With `--lora FILE[:WEIGHT]` / `--embedding FILE` (as `generate`, `attention`, `bleed`) the probe asks the model
as they make it: a token they load (a pivotal LoRA's bundled `bundle_emb.*`, an embedding file named after its
token) is read as its own ids, so a pivotal token can be checked after training; probe.json names the files
and the tokens loaded.

Files in `--out`: `probe.json`, `probe.png` (one row per prompt, one column per seed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from loralab.errors import LoralabError
from loralab.io import atomic_write
from loralab.review.bleed import _label_rows, _save_png, lora_change

log = logging.getLogger(__name__)

TEXT_BAR = 1.45  # text_distinctness at or above which the text encoder knows the tag (calibrated on the lab)
IMAGE_BAR = 1.2  # distinctness (images) at or above which the UNet draws something of the tag's own
STAND_INS = 4  # made-up stand-ins the tag is compared with
RARE_FROM = 40000  # stand-in tokens come from the BPE vocabulary's last merges (the rarest pieces), ids >= this
STAND_IN_SEED = 1234
Judge = Callable[[list], list]  # images -> what each shows (the lab evaluator's shape), None if unsure

ADVICE = {
    "known": ("The base model already knows this tag: training modifies an existing concept. Use fewer steps "
              "than for a new concept and watch for drift: compare the concept and its neighbours (the class "
              "word, related tags) with and without the LoRA (`loralab review` controls). If you want a concept "
              "of your own instead, pick a tag the model does not know (`loralab tokens` rates it)."),
    "new": ("The base model does not know this tag: training teaches a new concept. Use a rare token as the "
            "activation tag (one that does not split into common words: check it with `loralab tokens`), or "
            "pivotal tuning (train the tag's embedding with the LoRA), and regularization images of the class "
            "so that the class word keeps its meaning."),
}


@dataclass
class ProbeOptions:
    model: str
    tag: str
    class_word: str = ""
    contexts: list[str] = field(default_factory=list)  # "{}" marks the tag's place; else "tag, context"
    seeds: int = 8
    seed: int = 0
    stand_ins: int = STAND_INS
    width: int = 0  # 0: the model's own size
    height: int = 0
    steps: int = 25
    scale: float = 7.5
    sampler: str = ""
    out: str = "probe"
    device: str = ""
    precision: str = "fp32"
    clip_skip: int = 0
    loras: list = field(default_factory=list)  # `review.generate.LoraSpec`s applied before drawing (--lora)
    embeddings: list[str] = field(default_factory=list)  # --embedding files, loaded before the LoRAs


def _ids(tok, text: str) -> list[int]:
    """Content ids as the sampler reads `text`: a new word loaded on `tok` (pivotal token) is its own id(s)."""
    from loralab.models.embeddings import text_ids

    return text_ids(tok, text) if text.strip() else []


def split_context(context: str) -> tuple[str, str]:
    """(before, after) the tag's place: `{}` marks it; without `{}` the tag comes first ("tag, context")."""
    if "{}" in context:
        if context.count("{}") > 1:
            raise LoralabError(f"--context {context!r}: mark the tag's place with one {{}}, not several")
        before, after = context.split("{}")
        return before, after
    return "", (", " + context) if context.strip() else ""


def fill(tok, context: str, ids: Sequence[int]):
    """The prompt of `context` with token ids `ids` in the tag's place, as `models.text.TokenIds`."""
    from loralab.models.text import TokenIds

    before, after = split_context(context)
    if not ids:  # without the tag: the context alone, its separators tidied
        text = " ".join((before + after).split()).replace(" ,", ",").strip(" ,")
        return TokenIds(_ids(tok, text))
    return TokenIds(_ids(tok, before) + list(ids) + _ids(tok, after))


def stand_in_ids(tok, tag_ids: Sequence[int], n: int, seed: int = STAND_IN_SEED) -> list[list[int]]:
    """`n` made-up words as long as the tag: rare tokens (ids >= RARE_FROM, the BPE vocabulary's last merges),
    a word-end piece (`</w>`) where the tag's piece ends a word, none of the tag's own pieces."""
    vocab = tok.convert_ids_to_tokens(list(range(RARE_FROM, len(tok) - 2)))
    ends = [RARE_FROM + i for i, t in enumerate(vocab) if t.endswith("</w>") and t[:-4].isalpha()]
    inner = [RARE_FROM + i for i, t in enumerate(vocab) if not t.endswith("</w>") and t.isalpha()]
    from loralab.models.embeddings import id_names

    pieces = [p if p.endswith("</w>") or not is_new else p + "</w>"  # a new word's last id ends the word
              for p, is_new in zip(id_names(tok, tag_ids), _new_flags(tok, tag_ids))]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        word = []
        for p in pieces:
            pool = ends if p.endswith("</w>") else inner
            pick = int(pool[rng.integers(len(pool))])
            while pick in tag_ids:
                pick = int(pool[rng.integers(len(pool))])
            word.append(pick)
        out.append(word)
    return out


def _new_flags(tok, ids: Sequence[int]) -> list[bool]:
    from loralab.models.embeddings import is_new_id

    return [is_new_id(tok, i) for i in ids]


def _names(tok, ids: Sequence[int]) -> list[str]:
    from loralab.models.embeddings import id_names

    return id_names(tok, ids)


def tag_ids(tok, tag: str) -> list[int]:
    ids = _ids(tok, tag)
    if not ids or not any(ch.isalnum() for ch in tag):  # "," tokenizes to the comma: a separator, not a tag
        raise LoralabError(f"probe: the tag {tag!r} is empty after tokenizing; give a tag with letters or digits")
    return ids


def probe_prompts(tok, tag: str, class_word: str, n_stand_ins: int) -> dict[str, list[int] | None]:
    """Row label -> the ids in the tag's place (None: without the tag)."""
    ids = tag_ids(tok, tag)
    rows: dict[str, list[int] | None] = {f"tag {tag!r}": ids, "without the tag": None}
    if class_word:
        rows[f"class {class_word!r}"] = tag_ids(tok, class_word)
    for s in stand_in_ids(tok, ids, n_stand_ins):
        rows["stand-in " + "".join(tok.convert_ids_to_tokens(s)).replace("</w>", "")] = s
    return rows


def ratio(to_tag: Sequence[float], among: Sequence[float]) -> float:
    """mean(to_tag) / mean(among): how much further the tag lies from the stand-ins than they lie apart."""
    return float(np.mean(to_tag) / max(float(np.mean(among)), 1e-8))


def verdict(distinctness: float, text_distinctness: float) -> str:
    """"known" when text_distinctness >= TEXT_BAR and distinctness >= IMAGE_BAR, else "new" (the module
    docstring's rule)."""
    return "known" if text_distinctness >= TEXT_BAR and distinctness >= IMAGE_BAR else "new"


def probe(opts: ProbeOptions, judge: Judge | None = None, progress: Callable[[str], None] = lambda s: None) -> dict:
    """What `loralab probe` runs; returns the content of probe.json (see the module docstring)."""
    from loralab.review.generate import SamplingModel

    if opts.seeds < 1:
        raise LoralabError(f"--seeds {opts.seeds}: at least 1")
    if opts.stand_ins < 2:
        raise LoralabError(f"--stand-ins {opts.stand_ins}: at least 2 (their spread is the yardstick)")
    if not Path(opts.model).exists():
        raise LoralabError(f"--model {opts.model}: no such file or folder; give a base model checkpoint")
    from loralab.models.tokenizer import clip_tokenizer

    for path in opts.embeddings:  # before the model loads
        if not Path(path).is_file():
            raise LoralabError(f"--embedding {path}: not a file")
    probe_prompts(clip_tokenizer(), opts.tag, opts.class_word, opts.stand_ins)  # a bad tag: said before loading
    contexts = opts.contexts or [""]
    for c in contexts:
        split_context(c)
    sm = SamplingModel.load(opts.model, device=opts.device, precision=opts.precision, clip_skip=opts.clip_skip)
    try:
        # the model as the LoRAs and embeddings make it: a token they load (pivotal tuning) is probed as its ids
        sm.apply_all(opts.loras, opts.embeddings)
        return _probe(sm, opts, contexts, judge, progress)
    finally:
        sm.remove()


def _probe(sm, opts: ProbeOptions, contexts: list[str], judge: Judge | None, progress) -> dict:
    import torch

    from loralab.train.sampling import SamplePrompt

    m = sm.model
    tok = m.tokenizers[0]
    rows = probe_prompts(tok, opts.tag, opts.class_word, opts.stand_ins)
    width, height = opts.width or sm.native_size, opts.height or sm.native_size
    images, conds = {}, {}
    for i, (label, ids) in enumerate(rows.items()):
        progress(f"{i + 1}/{len(rows)}: {label}")
        prompts = [fill(tok, contexts[s % len(contexts)], ids or []) for s in range(opts.seeds)]
        images[label] = sm.draw([SamplePrompt(p, width=width, height=height, seed=opts.seed + s, steps=opts.steps,
                                              scale=opts.scale, sampler=opts.sampler or None)
                                 for s, p in enumerate(prompts)], seed=opts.seed)
        with torch.no_grad():
            conds[label] = sm.conditioning(prompts)[0].float()
    labels = list(rows)
    tag_label, stand = labels[0], [k for k in labels if k.startswith("stand-in")]
    pairs = list(combinations(stand, 2))
    distinct = ratio([lora_change(images[tag_label], images[s]) for s in stand],
                     [lora_change(images[a], images[b]) for a, b in pairs])

    def text_dist(a, b) -> float:
        return float((conds[a] - conds[b]).norm(dim=-1).mean())

    text_distinct = ratio([text_dist(tag_label, s) for s in stand], [text_dist(a, b) for a, b in pairs])
    found = verdict(distinct, text_distinct)
    result = {"model": str(opts.model), "loras": [[str(x.path), x.weight] for x in opts.loras],
              "embeddings": [str(e) for e in opts.embeddings], "new_tokens": list(sm.tokens),
              "tag": opts.tag, "class_word": opts.class_word, "contexts": opts.contexts,
              "seeds": opts.seeds, "size": [width, height], "prompts": labels,
              "tokens": _names(tok, rows[tag_label]),
              "change_without": round(lora_change(images[tag_label], images["without the tag"]), 4),
              "change_class": (round(lora_change(images[tag_label], images[labels[2]]), 4)
                               if opts.class_word else None),
              "distinctness": round(distinct, 3), "text_distinctness": round(text_distinct, 3),
              "bars": {"text_distinctness": TEXT_BAR, "distinctness": IMAGE_BAR}, "verdict": found, "advice": ADVICE[found],
              "judged": {k: list(judge(v)) for k, v in images.items()} if judge else {}}
    write_outputs(Path(opts.out), result, images)
    return result


def write_outputs(out: Path, result: dict, images: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "probe.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    _save_png(_label_rows(list(images.items())), out / "probe.png")


def summary(r: dict) -> list[str]:
    """The verdict in a few lines, as the command prints it."""
    who = "the model with " + ", ".join(Path(f).name for f in r["embeddings"] + [x[0] for x in r["loras"]]) \
        if r.get("loras") or r.get("embeddings") else "the base model"
    lines = [f"tag {r['tag']!r} (tokens {' '.join(r['tokens'])}): {who} "
             + ("KNOWS it" if r["verdict"] == "known" else "does NOT know it")
             + f" (text encoder distinctness {r['text_distinctness']:.2f}, image {r['distinctness']:.2f}; known at "
             f">= {r['bars']['text_distinctness']} and >= {r['bars']['distinctness']})",
             f"image change: tag vs without it {r['change_without']:.3f}"
             + (f", tag vs class word {r['change_class']:.3f}" if r["change_class"] is not None else "")]
    if r["judged"]:
        from collections import Counter

        lines.append("the lab evaluator reads: " + "; ".join(
            f"{k}: " + ", ".join(f"{s} {n}" for s, n in Counter(v).most_common(2)) for k, v in r["judged"].items()))
    return lines + [r["advice"]]
