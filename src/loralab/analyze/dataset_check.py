"""`loralab dataset check`: find what is wrong with a kohya-layout dataset before training on it.

The dataset is read the way `loralab train` reads it (`loralab.data.dataset`: the `<repeats>_<name>/`
folders, the caption files, the buckets and the batches of `FolderDataset`), except that a broken
image or caption is reported instead of stopping the scan.

Every finding is a `Problem` with a level, a code, the file and a message:

error (training fails or learns garbage)
    unreadable_image      the file cannot be decoded completely (corrupt, truncated, not an image)
    unreadable_caption    the caption file is not UTF-8 text or cannot be read
    too_small             with bucket_no_upscale, a side shorter than bucket_reso_steps (no bucket at all)
warning (training runs, but the LoRA is likely worse)
    too_small             fewer pixels than half the training area: it is upscaled and trains blurry
    alpha                 transparent pixels (kohya trains them as the hidden colour, often black)
    grayscale             a black-and-white image without a `monochrome`/`greyscale` tag
    duplicate             the same file bytes as another image (it trains twice as often)
    near_duplicate        a perceptual-hash twin of another image (resized, re-encoded, retouched)
    extreme_aspect        aspect ratio 3:1 or more
    heavy_crop            the bucket crop cuts off 25 % or more of the image
    missing_caption       no caption file: the image trains with the folder name as its caption
    empty_caption         an empty caption file: the same
    activation_missing    the concept's activation tag is not in the caption
    activation_not_first  it is in the caption but not first
    several_activation_tags  the captions of one concept start with different tags
    duplicate_tag         the same tag twice in one caption
    caption_too_long      more than 75 CLIP tokens: the rest is cut off by the text encoder
    activation_in_reg     a regularization caption holds a concept's activation tag
    empty_folder          a concept folder without images
    symlink_loop          a symlink (image, caption or folder name) that leads back to itself: it is skipped
    broken_symlink        a symlink whose target is missing: it is skipped
    partial_batches       a bucket holds fewer samples than one batch (every batch in it is short)
info
    partial_batches       a bucket's sample count is not a multiple of the batch size (one short batch)
    edit_backup           a `.loralab_backup/` folder left by `loralab dataset edit` (ignored by training)

The activation tag of a concept is `activation_tag`'s rule (see there). The modules behind the check:
`analyze.scan` (the shared scan: every image and caption, broken ones included), `analyze.image_facts`
(decoding and hashes), `analyze.activation` and `analyze.check_report` (the report and its text). This
module holds one check per problem area: `check_images`, `exact_duplicates` and `near_duplicates`,
`check_captions` and `several_activation_tags`, `check_batches`; then the summaries of concepts and images.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from loralab.analyze.activation import CANDIDATE_SHARE, ActivationTag, activation_tag
from loralab.analyze.check_report import (
    LEVELS,
    BucketInfo,
    BucketSettings,
    CheckReport,
    ConceptInfo,
    ImageInfo,
    Problem,
    format_table,
    problem,
    rel_path,
    render_report,
    shell_path,
)
from loralab.analyze.image_facts import (
    ImageFacts,
    dhash,
    hamming_pairs,
    has_transparency,
    inspect_image,
    is_grayscale,
    phash,
)
from loralab.analyze.scan import ScannedDataset, ScannedImage, scan_dataset, scan_subsets
from loralab.data.buckets import BucketCandidates, BucketChoice
from loralab.data.dataset import FolderDataset, caption_path
from loralab.data.images import (
    EXTREME_ASPECT,
    SKIPPED_LINK,
    TOO_SMALL_AREA_SHARE,
    degenerate_image,
)
from loralab.errors import LoralabError
from loralab.io import human_size

# the module's own names, and those it has always offered from the modules it was split into
__all__ = [
    # own
    "DHASH_NEAR", "GRAY_TAGS", "HEAVY_CROP_SHARE", "MAX_TOKENS", "PHASH_NEAR", "activation_problems",
    "backup_notes", "caption_encodings", "caption_file_problem", "check_batches", "check_captions", "check_dataset",
    "check_dataset_config", "check_images", "check_scanned", "concept_summaries", "cut_tags", "decode_images", "epoch_dataset", "exact_duplicates",
    "image_summaries", "image_warnings", "link_problems", "near_duplicates", "several_activation_tags",
    "suggest_batch_size", "tag_problems",
    # re-exported
    "CANDIDATE_SHARE", "EXTREME_ASPECT", "LEVELS", "TOO_SMALL_AREA_SHARE", "ActivationTag", "BucketInfo",
    "BucketSettings", "CheckReport", "ConceptInfo", "ImageFacts", "ImageInfo", "Problem", "ScannedDataset",
    "ScannedImage", "activation_tag", "degenerate_image", "dhash", "format_table", "hamming_pairs",
    "has_transparency", "inspect_image", "is_grayscale", "phash", "render_report", "scan_dataset",
]

log = logging.getLogger(__name__)

MAX_TOKENS = 75  # CLIP's 77 positions minus BOS and EOS (kohya's default max_token_length)
HEAVY_CROP_SHARE = 0.25
PHASH_NEAR = 8  # near duplicate: pHash and dHash Hamming distances (of 64 bits) both at most these
DHASH_NEAR = 10
GRAY_TAGS = ("monochrome", "greyscale", "grayscale")
MAX_REPEATS = 5  # the guide: more repeats only overfit the same images (also the balance rule in analyze/tokens.py)

Activations = dict[int, ActivationTag]  # id(train subset) -> its activation tag


# ----------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Hold a chatty library logger at WARNING for a moment (FolderDataset logs every bucket at INFO)."""
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def caption_encodings(captions: Sequence[str]) -> list:
    """The CLIP tokenization of each caption without BOS/EOS (the real tokenizer, `tokenizers` Encodings with
    `.ids` and character `.offsets`); the 75-token limit counts these tokens."""
    from loralab.models.tokenizer import clip_tokenizer

    if not captions:
        return []
    return clip_tokenizer().backend_tokenizer.encode_batch(list(captions), add_special_tokens=False)


def cut_tags(caption: str, offsets: Sequence[tuple[int, int]], limit: int) -> list[str]:
    """The tags of `caption` that fall wholly or partly past the first `limit` tokens (`offsets`: each token's
    character span in the caption)."""
    if len(offsets) <= limit:
        return []
    start = offsets[limit][0]
    k = caption[:start].count(",")
    if caption[start:start + 1] == ",":
        k += 1  # the cut starts at a comma: the tag before it is whole
    return [t.strip() for t in caption.split(",")[k:] if t.strip()]


def suggest_batch_size(counts: Sequence[int], batch_size: int) -> int | None:
    """A batch size that divides every bucket's sample count (so no batch is short), the one closest to
    `batch_size` (smaller preferred), searched from 2 to max(8, 2 x batch_size); None when none does."""
    top = max(8, 2 * batch_size)
    fits = [b for b in range(2, top + 1) if all(c % b == 0 for c in counts)]
    if not fits:
        return None
    return min(fits, key=lambda b: (abs(b - batch_size), b > batch_size))


def decode_images(ds: ScannedDataset, workers: int | None, progress: bool) -> list[ImageFacts]:
    """`inspect_image` of every scanned image, in `ds.images` order, on `workers` threads (default: up to 4,
    at most the CPU count)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(lambda im: inspect_image(im.path), ds.images), total=len(ds.images),
                         desc="checking images", unit="img", disable=None if progress else True))


# ----------------------------------------------------------------------------------------- files


def link_problems(ds: ScannedDataset) -> list[Problem]:
    """symlink_loop and broken_symlink: each link the scan could not follow (`unusable_links`); training
    skips it with a warning in the same words."""
    return [problem("warning", code, path, f"{words}: {SKIPPED_LINK}") for path, code, words in ds.links]


def backup_notes(ds: ScannedDataset) -> list[Problem]:
    """edit_backup: each `loralab dataset edit` backup folder in a dataset root, with its files, edits and
    size, and the command that removes it. Training and the check skip it (its name starts with a dot)."""
    return [problem(
        "info", "edit_backup", b.path,
        f"a backup left by `loralab dataset edit`: {b.files} files from {b.edits} "
        f"{'edit' if b.edits == 1 else 'edits'}, {human_size(b.size)}. "
        f"Training and dataset check ignore it (folders whose name starts with a dot are skipped); "
        f"`loralab dataset edit --undo` restores captions from it. Once you no longer need that, remove it: "
        f"rm -r {shell_path(b.path.absolute())}") for b in ds.backups]


# ----------------------------------------------------------------------------------------- images


def check_images(
    ds: ScannedDataset, facts: Sequence[ImageFacts], settings: BucketSettings, candidates: BucketCandidates
) -> tuple[list[Problem], dict[int, BucketChoice], set[Path]]:
    """The image problems, image by image: unreadable_image (error), too_small as an error (no bucket at all),
    then `image_warnings`. Returns them, the bucket of each image that has one (by index in `ds.images`),
    and the readable images without a bucket (training would stop on them: left out of the epoch)."""
    problems: list[Problem] = []
    choices: dict[int, BucketChoice] = {}
    unusable: set[Path] = set()
    for i, (im, fact) in enumerate(zip(ds.images, facts)):
        concept = im.subset.name
        if im.header_error or fact.error:
            problems.append(problem(
                "error", "unreadable_image", im.path,
                f"the image cannot be decoded ({fact.error}); it is corrupt, truncated or not an image. "
                f"Re-save it with an image editor or remove it", concept))
            continue
        assert im.size is not None
        try:
            choices[i] = candidates.choose(im.size)
        except LoralabError as err:  # bucket_no_upscale and a side below bucket_reso_steps: training stops
            problems.append(problem("error", "too_small", im.path, str(err), concept))
            unusable.add(im.path)
            continue
        problems += image_warnings(im, fact, choices[i], settings)
    return problems, choices, unusable


def image_warnings(im: ScannedImage, fact: ImageFacts, choice: BucketChoice, settings: BucketSettings) -> list[Problem]:
    """The warnings about one readable image: too_small and extreme_aspect (`degenerate_image`, the size rules
    that training warns about too), alpha, grayscale, heavy_crop."""
    assert im.size is not None
    concept = im.subset.name
    out = [problem("warning", code, im.path, words, concept)
           for code, words in degenerate_image(im.size, choice, settings.resolution)]
    if fact.transparent:
        out.append(problem(
            "warning", "alpha", im.path,
            "the image has transparent pixels: kohya drops the alpha channel, so they train as whatever colour "
            "they hide (often black); loralab puts them on white. Flatten it onto the background you want", concept))
    if fact.grayscale and not any(t in im.tags for t in GRAY_TAGS):
        out.append(problem(
            "warning", "grayscale", im.path,
            "the image is grayscale but its caption has no monochrome/greyscale tag: the LoRA may learn to drop "
            "colour. Tag it `monochrome, greyscale` or remove it", concept))
    crop_w, crop_h = choice.bucket
    cut = 1 - (crop_w * crop_h) / (choice.resized[0] * choice.resized[1])
    if cut >= HEAVY_CROP_SHARE:
        out.append(problem(
            "warning", "heavy_crop", im.path,
            f"the {choice.bucket[0]}x{choice.bucket[1]} bucket cuts off {cut:.0%} of the image "
            f"({'turn on buckets or ' if not settings.enable_bucket else ''}crop it yourself to keep what matters)",
            concept))
    return out


# ----------------------------------------------------------------------------------------- duplicates


def exact_duplicates(ds: ScannedDataset, facts: Sequence[ImageFacts]) -> tuple[list[Problem], set[tuple[int, int]]]:
    """duplicate: images with the same file bytes (SHA-256), one warning per copy. Also returns the pairs
    (i, j), i < j, of indices in `ds.images` that are exact copies."""
    by_hash: dict[str, list[int]] = {}
    for i, fact in enumerate(facts):
        if fact.sha256 and not fact.error:
            by_hash.setdefault(fact.sha256, []).append(i)
    roots = [ds.train_dir, ds.reg_dir]
    problems: list[Problem] = []
    pairs: set[tuple[int, int]] = set()
    for group in by_hash.values():
        if len(group) < 2:
            continue
        for i in group:
            others = [ds.images[j].path for j in group if j != i]
            pairs.update((min(i, j), max(i, j)) for j in group if j != i)
            problems.append(problem(
                "warning", "duplicate", ds.images[i].path,
                f"the same file as {', '.join(rel_path(p, roots) for p in others)}: it trains "
                f"{len(group)} times as often; remove the copies (use repeats to weight images)",
                ds.images[i].subset.name, others))
    return problems, pairs


def near_duplicates(ds: ScannedDataset, facts: Sequence[ImageFacts], exact_pairs: set[tuple[int, int]]) -> list[Problem]:
    """near_duplicate: pairs (not exact copies) whose pHash and dHash distances are at most PHASH_NEAR and
    DHASH_NEAR of 64 bits; one warning on each image of a pair."""
    hashed = [i for i, f in enumerate(facts) if f.phash is not None]
    if len(hashed) <= 1:
        return []
    roots = [ds.train_dir, ds.reg_dir]
    ph = np.stack([facts[i].phash for i in hashed])
    dh = np.stack([facts[i].dhash for i in hashed])
    problems: list[Problem] = []
    for a, b, dist in hamming_pairs(ph, PHASH_NEAR):
        i, j = hashed[a], hashed[b]
        if (i, j) in exact_pairs:
            continue
        if int(np.count_nonzero(dh[a] != dh[b])) > DHASH_NEAR:
            continue
        for x, y in ((i, j), (j, i)):
            problems.append(problem(
                "warning", "near_duplicate", ds.images[x].path,
                f"nearly the same picture as {rel_path(ds.images[y].path, roots)} (perceptual hash "
                f"distance {dist}/64): near copies overweight one pose; keep the better one",
                ds.images[x].subset.name, [ds.images[y].path]))
    return problems


# ----------------------------------------------------------------------------------------- captions


def check_captions(ds: ScannedDataset, activations: Activations, encodings: Sequence, max_tokens: int) -> list[Problem]:
    """The caption problems, image by image: `caption_file_problem` (then nothing more about that caption),
    else `tag_problems` and `activation_problems`. `encodings`: `caption_encodings` of `ds.images`."""
    problems: list[Problem] = []
    for im, encoding in zip(ds.images, encodings):
        file_problem = caption_file_problem(im, ds.extension_of(im.subset))
        if file_problem is not None:
            problems.append(file_problem)
            continue
        problems += tag_problems(im, encoding, ds.extension_of(im.subset), max_tokens)
        problems += activation_problems(im, ds, activations)
    return problems


def caption_file_problem(im: ScannedImage, caption_extension: str) -> Problem | None:
    """unreadable_caption (error), missing_caption or empty_caption; None when the caption has text."""
    concept = im.subset.name
    fallback = im.subset.class_tokens
    if im.caption_error:
        return problem("error", "unreadable_caption", caption_path(im.path, caption_extension), im.caption_error,
                       concept)
    if im.caption is None:
        others = [ext for ext in (".txt", ".caption") if ext != caption_extension
                  and caption_path(im.path, ext).is_file()]
        hint = f" (there is a {others[0]} file: pass --caption-extension {others[0]})" if others else ""
        return problem("warning", "missing_caption", im.path,
                       f"no {caption_extension} caption file: the image trains with the caption {fallback!r} "
                       f"(the folder name); write one{hint}", concept)
    if im.caption == "":
        return problem("warning", "empty_caption", caption_path(im.path, caption_extension),
                       f"the caption is empty: the image trains with the caption {fallback!r} (the folder name)",
                       concept)
    return None


def tag_problems(im: ScannedImage, encoding, caption_extension: str, max_tokens: int) -> list[Problem]:
    """duplicate_tag (a tag twice in the caption) and caption_too_long (more than `max_tokens` CLIP tokens)."""
    assert im.caption is not None
    out: list[Problem] = []
    file = caption_path(im.path, caption_extension)
    repeated = sorted(t for t, n in Counter(im.tags).items() if n > 1)
    if repeated:
        out.append(problem("warning", "duplicate_tag", file,
                           f"tag written more than once: {', '.join(repeated)} (it weighs double); remove the repeats",
                           im.subset.name))
    tokens = len(encoding.ids)
    if tokens > max_tokens:
        cut = cut_tags(im.caption, encoding.offsets, max_tokens)
        out.append(problem(
            "warning", "caption_too_long", file,
            f"{tokens} CLIP tokens, over the {max_tokens} the text encoder reads: "
            f"{len(cut)} tags at the end are cut off ({', '.join(cut[:5])}{' ...' if len(cut) > 5 else ''}); "
            f"prune tags or raise max_token_length to 150/225", im.subset.name))
    return out


def activation_problems(im: ScannedImage, ds: ScannedDataset, activations: Activations) -> list[Problem]:
    """A reg caption: activation_in_reg for each train concept's activation tag it holds. A train caption:
    activation_missing, or activation_not_first, for its concept's activation tag."""
    concept = im.subset.name
    file = caption_path(im.path, ds.extension_of(im.subset))
    tags = im.tags
    if im.subset.is_reg:
        return [problem("warning", "activation_in_reg", file,
                        f"the regularization caption holds {act!r}, the activation tag of {s.name}: reg images "
                        f"would teach it the generic look; remove it", concept)
                for s in ds.train_subsets if (act := activations[id(s)].tag) and act in tags]
    act = activations[id(im.subset)].tag
    if act is None:
        return []
    if act not in tags:
        return [problem("warning", "activation_missing", file,
                        f"the activation tag {act!r} of {concept} is missing: add it first "
                        f"(`loralab dataset edit DIR --concept {concept} --add {act!r} --position 0` adds it where "
                        f"missing)", concept)]
    if tags[0] != act:
        return [problem("warning", "activation_not_first", file,
                        f"the activation tag {act!r} is tag {tags.index(act) + 1}, not first: "
                        f"put it first (`loralab dataset edit DIR --move-first {act!r}`) and use keep_tokens = 1",
                        concept)]
    return []


def several_activation_tags(ds: ScannedDataset, activations: Activations) -> list[Problem]:
    """several_activation_tags: a train concept whose captions open with more than one candidate
    (`ActivationTag.candidates`)."""
    problems: list[Problem] = []
    for s in ds.train_subsets:
        cands = activations[id(s)].candidates
        if len(cands) > 1:
            listed = ", ".join(f"{t!r} ({n})" for t, n in cands)
            problems.append(problem(
                "warning", "several_activation_tags", s.dir,
                f"the captions start with different tags: {listed}; one concept should have one activation tag "
                f"first in every caption (or split the folder into concepts)", s.name))
    return problems


def too_many_repeats(ds: ScannedDataset) -> list[Problem]:
    """too_many_repeats: a train concept with more than MAX_REPEATS (5) repeats. The guide: more repeats only
    show the same images more often and overfit them; balance concepts with fewer repeats (or more images)."""
    return [problem("warning", "too_many_repeats", s.dir,
                    f"{s.num_repeats} repeats: more than {MAX_REPEATS} only show the same images more often and overfit "
                    f"them; use at most {MAX_REPEATS} (balance concepts with `loralab tokens --dataset`), or add images",
                    s.name)
            for s in ds.train_subsets if s.num_repeats > MAX_REPEATS]


# ----------------------------------------------------------------------------------------- buckets and batches


def epoch_dataset(ds: ScannedDataset, settings: BucketSettings, unusable: set[Path]) -> FolderDataset:
    """The epoch as `loralab train` builds it (`FolderDataset`: repeats, reg balancing, buckets, batches),
    over the readable images minus `unusable` (which are dropped from `ds.subsets` here)."""
    for s in ds.subsets:
        s.images = [e for e in s.images if e.path not in unusable]
    if not [s for s in ds.subsets if s.images and not s.is_reg]:
        raise LoralabError(f"train_data_dir: no readable images in {ds.train_dir}; see the errors above")
    with _quiet("loralab.data.dataset"):
        return FolderDataset(
            [s for s in ds.subsets if s.images],
            resolution=settings.resolution,
            batch_size=settings.batch_size,
            enable_bucket=settings.enable_bucket,
            min_bucket_reso=settings.min_bucket_reso,
            max_bucket_reso=settings.max_bucket_reso,
            bucket_reso_steps=settings.bucket_reso_steps,
            bucket_no_upscale=settings.bucket_no_upscale,
            required_reso_steps=8,
            warn_degenerate=False,  # check_images reports them
        )


def check_batches(folder_ds: FolderDataset, bs: int) -> tuple[list[BucketInfo], int | None, list[Problem]]:
    """The buckets of an epoch with their batches at batch size `bs`, a batch size that fills every batch
    (`suggest_batch_size`, when some batch is short), and partial_batches for each bucket with a short batch:
    a warning when the bucket holds fewer samples than one batch, else a note."""
    bucket_files: dict[tuple[int, int], list[Path]] = {}
    for sample in folder_ds.samples:
        bucket_files.setdefault(sample.choice.bucket, []).append(sample.entry.path)
    buckets = [BucketInfo(b.resolution, b.images, b.count, -(-b.count // bs), b.count % bs) for b in folder_ds.buckets]
    suggestion = suggest_batch_size([b.samples for b in buckets], bs) if any(b.last_batch for b in buckets) else None
    hint = (f"batch size {suggestion} divides every bucket" if suggestion
            else "no batch size from 2 to 8 divides every bucket; add or remove images (or change repeats) so each "
                 "bucket count is a multiple of the batch size")
    problems: list[Problem] = []
    for b in buckets:
        if not b.last_batch:
            continue
        files = bucket_files[b.resolution]
        w, h = b.resolution
        if b.samples < bs:
            problems.append(problem(
                "warning", "partial_batches", files[0],
                f"bucket {w}x{h} holds {b.samples} sample(s) ({b.images} image(s) x repeats), fewer than the batch "
                f"size {bs}: every batch of it is short (noisier steps); {hint}", None, files))
        else:
            problems.append(problem(
                "info", "partial_batches", files[0],
                f"bucket {w}x{h}: {b.samples} samples = {b.batches - 1} batches of {bs} + one of {b.last_batch}; "
                f"{hint}", None, files))
    return buckets, suggestion, problems


# ----------------------------------------------------------------------------------------- summaries


def concept_summaries(ds: ScannedDataset, folder_ds: FolderDataset, activations: Activations) -> list[ConceptInfo]:
    """Each concept folder's samples per epoch and share: a train concept's images x repeats of all train
    samples; a reg folder's balanced samples in use (`reg_balancing`) of all reg samples."""
    total_train = folder_ds.num_train_images
    total_reg = folder_ds.num_reg_samples
    reg_used: Counter[int] = Counter()
    for sample in folder_ds.samples:
        if sample.is_reg:
            reg_used[id(sample.entry.subset)] += sample.repeats
    concepts = []
    for s in ds.subsets:
        if s.is_reg:
            used = reg_used[id(s)]
            concepts.append(ConceptInfo(s.name, "reg", str(s.dir), s.img_count, s.num_repeats, used,
                                        used / total_reg if total_reg else 0.0, None, "none"))
        else:
            act = activations[id(s)]
            n = s.img_count * s.num_repeats
            concepts.append(ConceptInfo(s.name, "train", str(s.dir), s.img_count, s.num_repeats, n,
                                        n / total_train if total_train else 0.0, act.tag, act.source))
    return concepts


def image_summaries(ds: ScannedDataset, choices: dict[int, BucketChoice], encodings: Sequence) -> list[ImageInfo]:
    """Each image's concept, size, bucket (None without one) and CLIP token count (None without a caption)."""
    images = []
    for i, im in enumerate(ds.images):
        choice = choices.get(i)
        images.append(ImageInfo(str(im.path), im.subset.name, im.size, choice.bucket if choice else None,
                                len(encodings[i].ids) if im.caption else None))
    return images


# ----------------------------------------------------------------------------------------- the check


def check_dataset(
    train_dir: str | Path,
    reg_dir: str | Path | None = None,
    *,
    settings: BucketSettings | None = None,
    caption_extension: str = ".txt",
    max_tokens: int = MAX_TOKENS,
    workers: int | None = None,
    progress: bool = True,
) -> CheckReport:
    """Check a dataset: every image decoded and hashed, every caption read and tokenized, the buckets and
    batches of an epoch as `loralab train` would build them. See the module docstring for the problems.

    `workers`: threads that decode images (default: up to 4, at most the CPU count).
    Problems are listed errors first, then warnings, then notes; within a level, in the order the checks
    find them (empty folders, images, duplicates, captions, activation tags, batches).
    """
    ds = scan_dataset(train_dir, reg_dir, caption_extension=caption_extension)
    return check_scanned(ds, settings or BucketSettings(), max_tokens=max_tokens, workers=workers, progress=progress)


def check_dataset_config(path: str | Path, *, defaults: Mapping[str, Any] | None = None, max_tokens: int = MAX_TOKENS,
                         workers: int | None = None, progress: bool = True) -> list[CheckReport]:
    """`dataset check` of an sd-scripts dataset_config: one report per [[datasets]], with that dataset's
    resolution, batch size and buckets, and each subset's folder, repeats, class tokens and caption extension
    as training resolves them (`defaults`: the training config's values, the fallback after [general])."""
    from loralab.data.dataset_config import dataset_config_subsets

    reports = []
    for spec, folders in dataset_config_subsets(path, defaults):
        root = Path(os.path.commonpath([str(s.dir.resolve()) for s, _ in folders])) if folders else Path(path)
        ds = scan_subsets(folders, root)
        reports.append(check_scanned(ds, BucketSettings(**spec.bucket_options()), max_tokens=max_tokens,
                                     workers=workers, progress=progress))
    return reports


def check_scanned(ds: ScannedDataset, settings: BucketSettings, *, max_tokens: int = MAX_TOKENS,
                  workers: int | None = None, progress: bool = True) -> CheckReport:
    """The checks of `check_dataset` on a scanned dataset."""
    problems = [problem("warning", "empty_folder", folder,
                        "the folder has no images (.png .jpg .jpeg .webp .bmp); it is ignored")
                for folder in ds.empty_folders]
    problems += link_problems(ds) + backup_notes(ds)
    facts = decode_images(ds, workers, progress)
    image_problems, choices, unusable = check_images(ds, facts, settings, settings.candidates())
    problems += image_problems
    duplicates, exact_pairs = exact_duplicates(ds, facts)
    problems += duplicates + near_duplicates(ds, facts, exact_pairs)
    activations = {id(s): activation_tag(ds.images_of(s), s.class_tokens) for s in ds.train_subsets}
    encodings = caption_encodings([im.caption or "" for im in ds.images])
    problems += check_captions(ds, activations, encodings, max_tokens)
    problems += several_activation_tags(ds, activations) + too_many_repeats(ds)
    folder_ds = epoch_dataset(ds, settings, unusable)
    buckets, suggestion, batch_problems = check_batches(folder_ds, settings.batch_size)
    problems += batch_problems
    order = {lvl: k for k, lvl in enumerate(LEVELS)}
    problems.sort(key=lambda p: order[p.level])
    return CheckReport(
        train_data_dir=str(ds.train_dir),
        reg_data_dir=str(ds.reg_dir) if ds.reg_dir else None,
        settings=settings,
        concepts=concept_summaries(ds, folder_ds, activations),
        buckets=buckets,
        images=image_summaries(ds, choices, encodings),
        problems=problems,
        steps_per_epoch=folder_ds.num_batches_per_epoch,
        num_train_samples=folder_ds.num_train_images,
        num_reg_samples=folder_ds.num_reg_samples,
        suggested_batch_size=suggestion,
    )
