"""The checks of `loralab doctor` that draw images with the base model: does it know each activation tag
(`probe`), and do concepts that share a token piece bleed into each other (`bleed`). The rules are in
probe.py and bleed.py; here they become findings (`doctor.Finding`, ranks in doctor.py's docstring)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError


def activation_tags(ds) -> list[tuple[str, str, list[str]]]:
    """(concept folder, activation tag, up to 4 of its captions with the tag's place as `{}`) per train concept."""
    from loralab.analyze.activation import activation_tag

    out = []
    for s in ds.train_subsets:
        images = ds.images_of(s)
        tag = activation_tag(images, s.class_tokens).tag
        if not tag:
            continue
        contexts = []
        for im in images:
            if tag in im.tags and len(contexts) < 4:
                contexts.append(", ".join("{}" if t == tag else t for t in im.tags))
        out.append((s.name, tag, contexts))
    return out


def probe_findings(model: str, ds, values: dict, opts, out: Path, checked: list[str],
                   progress: Callable[[str], None], extra: dict[str, Any]) -> list:
    """Rank 5: an activation tag the base model already knows (`probe`, 8 seeds: its calibration)."""
    from loralab.review.doctor import PROBE_TAGS, Finding
    from loralab.review.probe import ADVICE, ProbeOptions, probe

    found, said = [], []
    for concept, tag, contexts in activation_tags(ds)[:PROBE_TAGS]:
        progress(f"probe {tag}")
        try:
            r = probe(ProbeOptions(model, tag, contexts=contexts, seeds=2 * opts.seeds, out=str(out / "probe" / concept),
                                   device=opts.device, clip_skip=int(values.get("clip_skip") or 0)))
        except LoralabError as e:
            said.append(f"{tag}: not probed ({e})")
            continue
        said.append(f"{tag}: {r['verdict']}")
        extra.setdefault("probed", []).append(concept)
        if r["verdict"] == "known":
            found.append(Finding(5, f"the base model already knows the tag {tag!r}", [
                f"text encoder distinctness {r['text_distinctness']:.2f}, image {r['distinctness']:.2f} (known at "
                f">= {r['bars']['text_distinctness']} and >= {r['bars']['distinctness']}; probe/{concept}/probe.png)"],
                ADVICE["known"], "probe", r["text_distinctness"]))
    checked.append("the activation tags against the base model (probe: " + "; ".join(said) + ")")
    return found


def bleed_findings(model: str, lora: Path, ds, tokens, values: dict, opts, out: Path, checked: list[str],
                   shape_reader: Callable | None, progress: Callable[[str], None], extra: dict[str, Any]) -> list:
    """Rank 2: bleeding between concepts whose activation tags share a token piece (`bleed` on the
    recommended epoch; `tokens`: the dataset's `analyze.tokens.DatasetTokens`); nothing to measure when no two tags
    share a piece."""
    from loralab.review.bleed import JUDGED_BAR, BleedOptions, bleed
    from loralab.review.doctor import Finding

    if not tokens.groups:
        checked.append("bleeding: not measured (no two activation tags share a token piece)")
        return []
    progress("bleed")
    r = bleed(BleedOptions(model, lora, dataset=str(ds.train_dir), seeds=opts.seeds, out=str(out / "bleed"),
                           device=opts.device, clip_skip=int(values.get("clip_skip") or 0),
                           caption_extension=str(values.get("caption_extension") or ".txt")), judge=shape_reader)
    extra["bleed"] = {"shared_pieces": r["shared_pieces"], "tag_into_tag": r["tag_into_tag"]}
    extra.setdefault("drew", []).append("bleed")
    checked.append(f"bleeding between concepts (bleed on {lora.name}: bleed/report.md)")
    found = []
    for p in r["shared_pieces"]:
        if p["bleeds"]:
            found.append(Finding(2, f"the shared piece {p['piece']!r} carries a concept by itself", [
                f"tags {', '.join(p['tags'])}; carry {p['carry']}; dominant: {p['dominant']} ({p['dominant_because']})"],
                "; ".join(r["fixes"][-3:]) or "see bleed/report.md", "bleed", max(p["carry"].values())))
    for x in r["tag_into_tag"]:
        if x["lift"] >= JUDGED_BAR:
            found.append(Finding(2, f"{x['from']} bleeds into {x['into']}", [
                f"{x['with']:.0%} of {x['into']}'s images show {x['concept']} (without the LoRA {x['without']:.0%})"],
                "fewer repeats on the dominant concept, a distinct tag, or pivotal tuning (bleed/report.md)", "bleed",
                x["lift"]))
    return found
