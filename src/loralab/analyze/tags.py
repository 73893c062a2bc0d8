"""`loralab dataset tags`: how often each tag occurs, per concept and overall, and what to prune.

Counting is kohya's `ss_tag_frequency` (`loralab.data.dataset.tag_frequency`): tags split on commas,
stripped and lowercased, each caption counted once (not x repeats), the folder's name as the caption of
an image without one. The shares below count images: the share of a concept's images whose caption
holds the tag.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from loralab.analyze.dataset_check import ScannedDataset, activation_tag, format_table, scan_dataset
from loralab.data.captions import split_tags
from loralab.data.dataset import Subset, tag_frequency

PRUNE_EXPLANATION = (
    "Tags on most images of a concept compete with its activation tag. Whatever a tag names, the LoRA "
    "learns under that tag instead of under the activation tag: the trait then appears only when you write the "
    "tag, and fades or disappears when you leave it out (a tag such as `navel` on most images of a character "
    "teaches the LoRA to hide the navel when the tag is absent). If the trait is always part of the concept "
    "(hair and eye colour, a tattoo, a signature outfit), remove the tag from the captions so the activation tag "
    "absorbs it (loralab dataset edit DIR --remove TAG). Keep tags for what changes between images and what you "
    "want to control in prompts (clothes, pose, background)."
)


@dataclass
class TagCount:
    tag: str
    count: int  # kohya's count (a tag written twice in one caption counts twice)
    images: int  # captions holding it
    share: float  # images / the concept's images


@dataclass
class ConceptTags:
    name: str
    kind: str  # "train" | "reg"
    images: int
    activation_tag: str | None
    tags: list[TagCount]  # most frequent first
    frequent: list[TagCount]  # share >= threshold, the activation tag excluded: candidates to prune


@dataclass
class TagDifference:
    tag: str
    share_a: float
    share_b: float

    @property
    def difference(self) -> float:
        return self.share_a - self.share_b


@dataclass
class TagReport:
    threshold: float
    tag_frequency: dict[str, dict[str, int]]  # exactly kohya's ss_tag_frequency (reg folders included)
    concepts: list[ConceptTags]
    overall: list[TagCount]  # over the train concepts
    once: list[tuple[str, str]]  # (tag, file): tags in exactly one caption of the train concepts
    compare: tuple[str, str] | None = None
    differences: list[TagDifference] | None = None

    def concept(self, name: str) -> ConceptTags:
        return next(c for c in self.concepts if c.name == name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["explanation"] = PRUNE_EXPLANATION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def _counts(captions: list[str], total: int) -> list[TagCount]:
    count: Counter[str] = Counter()
    present: Counter[str] = Counter()
    for caption in captions:
        tags = split_tags(caption)
        count.update(tags)
        present.update(set(tags))
    return sorted((TagCount(t, count[t], present[t], present[t] / total if total else 0.0) for t in count),
                  key=lambda c: (-c.images, -c.count, c.tag))


def _captions(subset: Subset) -> list[str]:
    """The captions training reads for the readable images (folder name for a missing or empty one)."""
    return [entry.caption for entry in subset.images]


def tag_differences(a: ConceptTags, b: ConceptTags, top: int = 20) -> list[TagDifference]:
    """Tags whose share of images differs most between two concepts (largest |share_a - share_b| first),
    the activation tags left out."""
    share_a = {t.tag: t.share for t in a.tags}
    share_b = {t.tag: t.share for t in b.tags}
    skip = {a.activation_tag, b.activation_tag}
    diffs = [TagDifference(t, share_a.get(t, 0.0), share_b.get(t, 0.0)) for t in set(share_a) | set(share_b)
             if t not in skip]
    diffs.sort(key=lambda d: (-abs(d.difference), d.tag))
    return diffs[:top]


def analyze_tags(
    train_dir: str | Path,
    reg_dir: str | Path | None = None,
    *,
    threshold: float = 0.5,
    compare: tuple[str, str] | None = None,
    caption_extension: str = ".txt",
    dataset: ScannedDataset | None = None,
) -> TagReport:
    """Tag counts per concept and overall, tags on at least `threshold` of a concept's images (pruning
    candidates), tags used once, and with `compare=(A, B)` the tags whose share differs most between two
    concepts (named by folder, folder name part or activation tag)."""
    ds = dataset or scan_dataset(train_dir, reg_dir, caption_extension=caption_extension)
    concepts = []
    for subset in ds.subsets:
        counts = _counts(_captions(subset), subset.img_count)
        act = None if subset.is_reg else activation_tag(ds.images_of(subset), subset.class_tokens).tag
        frequent = [c for c in counts if c.share >= threshold and c.tag != act]
        concepts.append(ConceptTags(subset.name, "reg" if subset.is_reg else "train", subset.img_count, act, counts,
                                    frequent))
    train = ds.train_subsets
    all_captions = [c for s in train for c in _captions(s)]
    overall = _counts(all_captions, len(all_captions))
    once_tags = {c.tag for c in overall if c.count == 1}
    once = [(tag, str(entry.path)) for s in train for entry in s.images for tag in split_tags(entry.caption)
            if tag in once_tags]
    report = TagReport(threshold, tag_frequency(ds.subsets), concepts, overall, sorted(once))
    if compare:
        a, b = (ds.find_subset(name).name for name in compare)
        report.compare = (a, b)
        report.differences = tag_differences(report.concept(a), report.concept(b))
    return report


def render_tags(report: TagReport, top: int = 15) -> str:
    """The report as text for the terminal."""
    out: list[str] = []
    for c in report.concepts:
        act = f", activation tag {c.activation_tag!r}" if c.activation_tag else ""
        out.append(f"{c.name} ({c.kind}, {c.images} images{act}): {len(c.tags)} distinct tags")
        rows = [(t.tag, t.count, f"{t.share:.0%}") for t in c.tags[:top]]
        out.append(format_table(["tag", "count", "images"], rows, right=(1, 2)))
        if len(c.tags) > top:
            out.append(f"... {len(c.tags) - top} more (see --json)")
        out.append("")
    out.append(f"overall (train concepts): {len(report.overall)} distinct tags")
    out.append(format_table(["tag", "count", "images"],
                            [(t.tag, t.count, f"{t.share:.0%}") for t in report.overall[:top]], right=(1, 2)))
    out.append("")
    frequent = [(c.name, t) for c in report.concepts if c.kind == "train" for t in c.frequent]
    if frequent:
        out.append(f"tags on at least {report.threshold:.0%} of a concept's images (candidates to prune):")
        out.append(format_table(["concept", "tag", "images"],
                                [(n, t.tag, f"{t.images} ({t.share:.0%})") for n, t in frequent], right=(2,)))
        out.append(PRUNE_EXPLANATION)
    else:
        out.append(f"no tag is on {report.threshold:.0%} or more of a concept's images besides its activation tag")
    out.append("")
    if report.once:
        out.append(f"tags used in one caption only ({len(report.once)}; typos, or too rare to learn):")
        for tag, file in report.once[:40]:
            out.append(f"  {tag}  ({Path(file).parent.name}/{Path(file).name})")
        if len(report.once) > 40:
            out.append(f"  ... and {len(report.once) - 40} more (see --json)")
    if report.compare and report.differences is not None:
        a, b = report.compare
        out.append("")
        out.append(f"tags whose share differs most between {a} and {b}:")
        out.append(format_table(["tag", a, b, "difference"],
                                [(d.tag, f"{d.share_a:.0%}", f"{d.share_b:.0%}", f"{d.difference:+.0%}")
                                 for d in report.differences], right=(1, 2, 3)))
    return "\n".join(out)
