"""A concept's activation tag: the tag meant to carry it, by community practice written first in every caption."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loralab.analyze.scan import ScannedImage

CANDIDATE_SHARE = 0.2  # a first tag on this share of a concept's captions is a candidate activation tag


@dataclass
class ActivationTag:
    """A concept's activation tag, where it came from, and the first tags of its captions with counts."""

    tag: str | None
    source: str  # "first tag", "folder name", "most common first tag", "none"
    first_tags: list[tuple[str, int]]  # most common first
    captions: int  # non-empty captions looked at

    @property
    def candidates(self) -> list[tuple[str, int]]:
        """First tags that open at least CANDIDATE_SHARE (20 %) of the captions, and at least 2 of them."""
        return [(t, n) for t, n in self.first_tags if n >= 2 and n >= CANDIDATE_SHARE * self.captions]


def activation_tag(images: Sequence[ScannedImage], class_tokens: str) -> ActivationTag:
    """The activation tag of one concept (the tag meant to carry it, by community practice written first).

    Rule:
    1. The tag that is first in more than half of the concept's non-empty captions.
    2. Otherwise the folder's name part (`10_jinx` -> `jinx`), when some caption holds it as a tag, or
       when there are no captions (then the folder name is the caption).
    3. Otherwise the most common first tag (ties: the one met first).
    """
    tag_lists = [im.tags for im in images if im.tags]
    firsts = Counter(tags[0] for tags in tag_lists).most_common()
    folder_tag = class_tokens.strip().lower()
    if not tag_lists:
        if folder_tag:
            return ActivationTag(folder_tag, "folder name", [], 0)
        return ActivationTag(None, "none", [], 0)
    top, count = firsts[0]
    if 2 * count > len(tag_lists):
        return ActivationTag(top, "first tag", firsts, len(tag_lists))
    if folder_tag and any(folder_tag in tags for tags in tag_lists):
        return ActivationTag(folder_tag, "folder name", firsts, len(tag_lists))
    return ActivationTag(top, "most common first tag", firsts, len(tag_lists))
