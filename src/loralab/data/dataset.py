"""Folder datasets ("DreamBooth" layout): scanning, captions, repeats, reg balancing, buckets, batches.

Layout (kohya `generate_dreambooth_subsets_config_by_subdirs`):

    train_data_dir/
      10_mychar/          <repeats>_<class tokens>/
        001.png
        001.txt           caption: <image stem><caption_extension>
      3_mychar casual/
    reg_data_dir/
      1_girl/             same rules; these are regularization images

Epoch composition, batching and shuffling follow kohya's `DreamBoothDataset` / `BaseDataset`. No torch
here: `loralab dataset check/tags` scan the same way as `loralab train`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loralab.data.buckets import (
    BucketChoice,
    bucket_candidates,
    bucket_info,
    check_bucket_reso_steps,
    check_resolution,
)
from loralab.data.captions import CaptionOptions, split_tags
from loralab.data.images import (
    IMAGE_EXTENSIONS,
    SKIPPED_LINK,
    degenerate_image,
    is_image_file,
    read_image_size,
    symlink_problem,
)
from loralab.errors import LoralabError

log = logging.getLogger(__name__)

_SHOW = 5  # how many file names a warning lists


@dataclass(eq=False)
class ImageEntry:
    """One image file: its caption as read from disk (before any per-step processing) and its size."""

    path: Path
    caption: str
    size: tuple[int, int]
    subset: Subset = field(repr=False)
    mask_path: Path | None = None  # its mask image (conditioning_data_dir; data/masks.py)


@dataclass(eq=False)
class Subset:
    """One `<repeats>_<class tokens>` folder, or one `[[datasets.subsets]]` of a dataset_config.

    `caption_options`, `flip_aug`, `color_aug` and `random_crop` are a dataset_config subset's own (its keys
    merged with those of its dataset, [general] and the training config); None, as in a folder dataset,
    means the run's (`subset_flag`). `alpha_mask` and `conditioning_data_dir` give its loss masks
    (data/masks.py: the alpha channel, or a folder of mask images)."""

    dir: Path
    name: str  # the folder's basename, the key of ss_dataset_dirs / ss_tag_frequency
    num_repeats: int
    class_tokens: str
    is_reg: bool
    images: list[ImageEntry] = field(default_factory=list, repr=False)
    caption_options: CaptionOptions | None = field(default=None, repr=False)
    flip_aug: bool | None = None
    color_aug: bool | None = None
    random_crop: bool | None = None
    alpha_mask: bool = False
    conditioning_data_dir: Path | None = None

    @property
    def img_count(self) -> int:
        return len(self.images)


def subset_flag(subset: Subset, name: str, run_value: bool) -> bool:
    """A per-subset switch (`flip_aug`, `color_aug`, `random_crop`): the subset's own value when it has one
    (a dataset_config subset), else the run's (`run_value`, the training config's)."""
    own = getattr(subset, name)
    return bool(run_value) if own is None else bool(own)


# ----------------------------------------------------------------------------------------- scanning


def repeats_from_folder_name(name: str) -> tuple[int, str] | None:
    """Repeats and class tokens of a `<N>_<class tokens>` folder name (kohya rule).

    N = int(name.split("_")[0]) is how many times each image is seen per epoch; the rest, joined
    with "_", is the class tokens ("10_sks girl" -> (10, "sks girl"); "10" -> (10, "")).
    Returns None when the prefix is not an integer or N < 1 (kohya skips such folders).
    """
    head, *rest = name.split("_")
    try:
        n = int(head)
    except ValueError:
        return None
    if n < 1:
        return None
    return n, "_".join(rest)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (not recursive), sorted by path like kohya's `glob_images`."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=str)


def unusable_links(folder: Path, suffixes: Sequence[str] | None = None) -> list[tuple[Path, str, str]]:
    """The symlinks in `folder` (not recursive) that cannot be followed, as (path, code, words) of
    `symlink_problem`: loops and broken links, sorted by path. Only names with one of `suffixes` (any letter
    case; None: every name), hidden names skipped, as the scan skips them. `list_images` leaves these out
    (they are not files); the scans name them instead of dropping them without a word."""
    found = []
    for p in folder.iterdir():
        if p.name.startswith(".") or (suffixes is not None and p.suffix.lower() not in suffixes):
            continue
        if (bad := symlink_problem(p)) is not None:
            found.append((p, *bad))
    return sorted(found, key=lambda t: str(t[0]))


def _warn_links(folder: Path, suffixes: Sequence[str] | None = None) -> None:
    for path, _code, words in unusable_links(folder, suffixes):
        log.warning("%s: %s: %s", path, words, SKIPPED_LINK)


def _warn_degenerate(samples: Sequence, resolution: tuple[int, int]) -> None:
    """One warning per image `degenerate_image` finds wrong by its size (each sample is one file), five named,
    then a count."""
    lines = [f"{s.entry.path}: {words}" for s in samples
             for _code, words in degenerate_image(s.entry.size, s.choice, resolution)]
    for line in lines[:_SHOW]:
        log.warning("%s", line)
    if len(lines) > _SHOW:
        log.warning("... and %d more images too small or too narrow for this resolution; `loralab dataset check` "
                    "lists them all", len(lines) - _SHOW)


def caption_path(image_path: Path, caption_extension: str) -> Path:
    """The caption file of an image: `<image stem><caption_extension>` next to it (kohya rule)."""
    return image_path.with_name(image_path.stem + caption_extension)


def read_caption(image_path: Path, caption_extension: str, enable_wildcard: bool = False) -> str | None:
    """The caption file of an image, `<stem><caption_extension>`, read as UTF-8 (kohya `read_caption`).

    Without wildcards the first line is the caption (stripped); with `enable_wildcard` all non-empty
    lines are kept, joined with newlines (process_caption picks one per step).
    Returns None when there is no caption file and "" when it is empty.
    """
    cap_path = caption_path(image_path, caption_extension)
    if not cap_path.is_file():
        return None
    try:
        text = cap_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise LoralabError(f"{cap_path}: the caption file is not UTF-8 text ({err}); re-save it as UTF-8") from err
    except OSError as err:
        raise LoralabError(f"{cap_path}: the caption file cannot be read ({err}); check its permissions") from err
    lines = text.splitlines()
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip() if lines else ""


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:_SHOW])
    return shown + (f" ... and {len(paths) - _SHOW} more" if len(paths) > _SHOW else "")


def scan_subset(subset: Subset, caption_extension: str, enable_wildcard: bool, class_tokens_fallback: bool) -> None:
    """Fill `subset.images` from its folder (see `scan_folder_dataset` for the rules); warns about images
    without a caption file, empty caption files and unusable symlinks."""
    _warn_links(subset.dir, IMAGE_EXTENSIONS + (caption_extension.lower(),))
    paths = list_images(subset.dir)
    missing: list[Path] = []
    empty: list[Path] = []
    fallback = subset.class_tokens if class_tokens_fallback else ""
    for path in paths:
        caption = read_caption(path, caption_extension, enable_wildcard)
        if caption is None:
            missing.append(path)
            caption = fallback
        elif caption == "":
            empty.append(path)
            caption = fallback
        subset.images.append(ImageEntry(path=path, caption=caption, size=read_image_size(path), subset=subset))
    if missing:
        hint = ""
        suffixes = {p.suffix for p in subset.dir.iterdir() if p.suffix.lower() in (".txt", ".caption")}
        others = sorted(suffixes - {caption_extension})
        if others:
            hint = f" (the folder has {'/'.join(others)} files: set caption_extension = \"{others[0]}\"?)"
        log.warning("%s: %d of %d images have no %s caption file (%s); they train with the caption %r%s",
                    subset.dir, len(missing), len(paths), caption_extension, _names(missing), fallback, hint)
    if empty:
        log.warning("%s: %d caption files are empty (%s); those images train with the caption %r",
                    subset.dir, len(empty), _names(empty), fallback)


def scan_root(root: Path, key: str, is_reg: bool) -> list[Subset]:
    """The `<N>_<name>` subfolders of `root` (sorted by name; kohya takes directory order)."""
    what = "give the folder that holds <repeats>_<name>/ folders"
    if not root.exists():
        bad = symlink_problem(root)
        if bad is not None:
            raise LoralabError(f"{key}: {root} is {bad[1]}; point the link at the dataset folder, or {what}")
        raise LoralabError(f"{key}: the folder {root} does not exist; {what}")
    if not root.is_dir():
        raise LoralabError(f"{key}: {root} is a file, not a folder; {what}")
    subsets = []
    skipped = []
    for sub in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name):
        parsed = repeats_from_folder_name(sub.name)
        if parsed is None:
            skipped.append(sub)
            head, _, rest = sub.name.partition("_")
            if head.lstrip("-").isdigit():  # 0_name, -1_name: a count, but not a positive one
                log.warning("%s: ignoring the folder %s: %s repeats means its images are never used (rename it "
                            "to e.g. 1_%s to train on it)", key, sub, head, rest or sub.name)
            else:
                log.warning("%s: ignoring the folder %s: its name does not start with a repeat count such as 10_ "
                            "(rename it to e.g. 10_%s to train on it)", key, sub, sub.name)
            continue
        n, tokens = parsed
        subsets.append(Subset(dir=sub, name=sub.name, num_repeats=n, class_tokens=tokens, is_reg=is_reg))
    loose = [p for p in root.iterdir() if is_image_file(p)]
    if subsets and loose:
        log.warning("%s: %d images directly in %s are ignored (%s); only <repeats>_<name>/ subfolders are read",
                    key, len(loose), root, _names(sorted(loose)))
    if not subsets:
        example = "1_girl" if is_reg else "10_mychar"
        if loose:
            raise LoralabError(
                f"{key}: {root} holds images itself, but images must be in <repeats>_<name>/ subfolders: you selected "
                f"the image folder itself. Point {key} at its parent, and name the image folder like {example}/"
            )
        found = f" (found only {_names(skipped)}, without a repeat count)" if skipped else ""
        found += "".join(f" ({path.name} is {words})" for path, _code, words in unusable_links(root)[:_SHOW])
        raise LoralabError(
            f"{key}: {root} has no <repeats>_<name>/ image folders{found}. Put the images in a subfolder such as "
            f"{root / example}/ (10 = how many times each image is seen per epoch)"
        )
    return subsets


def scan_folder_dataset(
    train_data_dir: str | Path,
    reg_data_dir: str | Path | None = None,
    *,
    caption_extension: str = ".caption",
    enable_wildcard: bool = False,
    class_tokens_fallback: bool = True,
    key: str = "train_data_dir",
    alpha_mask: bool = False,
) -> list[Subset]:
    """Scan kohya's folder layout: train subsets first, then reg subsets, each with its images.

    Rules (kohya, with the differences marked *):
    - Subfolders `<N>_<class tokens>` of each root, not recursive; other folders are skipped with a
      warning (* subsets sorted by name; kohya takes directory order).
    - Images: .png .jpg .jpeg .webp .bmp (* any letter case), hidden files skipped, sorted by path.
    - Caption: `<stem><caption_extension>` (default ".caption" like kohya; the kohya GUI uses ".txt").
      No caption file: the class tokens (the folder name after `N_`), with a warning naming the files.
      * An empty caption file also falls back to the class tokens with a warning (kohya asserts).
      `class_tokens_fallback=False` uses "" instead.
    - Image sizes come from the file headers (no decoding); an unreadable header is an error here.
    - A subset folder with no images is skipped with a warning (kohya).
    - * A symlink that loops or whose target is missing (an image or caption name in a subset folder, any
      name in a root) is skipped with a warning naming it (`unusable_links`); kohya drops it silently.
    With `alpha_mask`, each image's alpha channel is its loss mask (`data/masks.py`; one warning counts
    the images without alpha, which count whole).
    Errors (LoralabError): a root that is missing; a root without `N_name/` folders (naming the case
    where the root is the image folder itself); no training images at all; a reg_data_dir that is set
    but missing or without folders (* kohya ignores it silently).
    """
    if caption_extension and not caption_extension.startswith("."):
        log.warning("caption_extension %r has no leading dot: using %r", caption_extension, "." + caption_extension)
        caption_extension = "." + caption_extension
    roots = [(Path(train_data_dir), key, False)]  # key: the config key named in messages
    if reg_data_dir:
        roots.append((Path(reg_data_dir), "reg_data_dir", True))
    result: list[Subset] = []
    for root, key, is_reg in roots:
        subsets = scan_root(root, key, is_reg)
        _warn_links(root)
        for subset in subsets:
            subset.alpha_mask = alpha_mask
            scan_subset(subset, caption_extension, enable_wildcard, class_tokens_fallback)
            if not subset.images:
                log.warning("%s: ignoring %s: it has no images (%s)", key, subset.dir, " ".join(IMAGE_EXTENSIONS))
                continue
            log.info("%s: %d images x %d repeats%s", subset.dir, subset.img_count, subset.num_repeats,
                     " (regularization)" if is_reg else "")
            result.append(subset)
        if not any(s.is_reg == is_reg for s in result):
            raise LoralabError(
                f"{key}: no images found in the folders of {root} ({', '.join(s.name for s in subsets)}); "
                f"put {'/'.join(IMAGE_EXTENSIONS)} files in them"
            )
    if alpha_mask:
        from loralab.data.masks import attach_masks

        attach_masks(result)
    return result


def split_validation(subsets: Sequence[Subset], share: float, seed: int) -> tuple[list[Subset], list[Subset]]:
    """kohya's `validation_split`: hold a seeded share of each training folder's images out of training.

    Per training subset: its images (sorted by path) are shuffled with random.Random(seed); the first
    ceil(n · (1 − share)) train, the rest validate (kohya `split_train_val`). Reg folders are never split.
    Returns (subsets for training, subsets for validation); a folder whose images all train is left out
    of the second list (ceil keeps at least one training image per folder). share = 0 returns the subsets unchanged and no validation subsets.
    """
    if share <= 0:
        return list(subsets), []
    train: list[Subset] = []
    val: list[Subset] = []
    for subset in subsets:
        if subset.is_reg:
            train.append(subset)
            continue
        images = list(subset.images)
        random.Random(seed).shuffle(images)
        cut = math.ceil(len(images) * (1 - share))
        keep, held = sorted(images[:cut], key=lambda e: e.path), sorted(images[cut:], key=lambda e: e.path)
        train.append(dataclasses.replace(subset, images=keep))
        if held:
            val.append(dataclasses.replace(subset, images=held))
    if not val:
        log.warning("validation_split = %s holds out no image (every folder is too small); no validation loss", share)
    return train, val


# ----------------------------------------------------------------------------------------- metadata


def tag_frequency(subsets: Iterable[Subset], *, include_reg: bool = True) -> dict[str, dict[str, int]]:
    """`ss_tag_frequency`: {folder basename: {tag: count}} over the captions as read from disk.

    Tags as `split_tags` makes them (comma split, stripped, lowercased); each caption counts once
    (not x repeats); folders with the same basename are merged. kohya's folder mode includes the reg
    folders too (`set_tag_frequency` runs for every subset), hence `include_reg=True` by default.
    """
    freq: dict[str, dict[str, int]] = {}
    for subset in subsets:
        if subset.is_reg and not include_reg:
            continue
        counts = freq.setdefault(subset.name, {})
        for entry in subset.images:
            for tag in split_tags(entry.caption):
                counts[tag] = counts.get(tag, 0) + 1
    return freq


def dataset_dirs(subsets: Iterable[Subset], reg: bool) -> dict[str, dict[str, int]]:
    """`ss_dataset_dirs` (reg=False) or `ss_reg_dataset_dirs` (reg=True):
    {folder basename: {"n_repeats": N, "img_count": images}} (N as written in the folder name)."""
    return {
        s.name: {"n_repeats": s.num_repeats, "img_count": s.img_count} for s in subsets if s.is_reg == reg
    }


# ----------------------------------------------------------------------------------------- epochs


def num_train_images(subsets: Iterable[Subset]) -> int:
    """kohya's `num_train_images`: sum over non-reg subsets of images x repeats."""
    return sum(s.img_count * s.num_repeats for s in subsets if not s.is_reg)


def reg_balancing(reg_images: Sequence[ImageEntry], num_train_images: int) -> list[tuple[ImageEntry, int]]:
    """Which reg images an epoch uses, and how many times each (kohya `DreamBoothDataset`).

    Rule: walk the reg images (subset order, sorted files), counting n. First pass: register each
    image with its folder's repeats (n += repeats). Later passes: each registered image gets one more
    repeat (n += 1). Stop as soon as n >= num_train_images, even mid-pass. So an epoch holds about
    as many reg samples as train samples (exactly as many once a second pass started); surplus reg
    images are never used, and every epoch uses the same ones. No reg images when there are no
    train images.
    """
    used: list[list] = []
    n = 0
    first_pass = True
    while n < num_train_images and reg_images:
        for i, entry in enumerate(reg_images):
            if first_pass:
                used.append([entry, entry.subset.num_repeats])
                n += entry.subset.num_repeats
            else:
                used[i][1] += 1
                n += 1
            if n >= num_train_images:
                break
        first_pass = False
    return [(entry, repeats) for entry, repeats in used]


@dataclass(eq=False)
class Sample:
    """One image as trained: its entry, bucket choice, and how many times an epoch uses it."""

    entry: ImageEntry
    choice: BucketChoice
    is_reg: bool
    repeats: int


@dataclass(frozen=True)
class BucketStats:
    resolution: tuple[int, int]
    images: int  # distinct images
    count: int  # samples per epoch (with repeats)


class FolderDataset:
    """Samples, buckets and per-epoch batches of a scanned folder dataset (kohya `DreamBoothDataset`).

    - `samples`: one `Sample` per image in use (train images, then the reg images `reg_balancing`
      keeps), in kohya's registration order; each one's bucket is `candidates.choose` (the buckets
      that `bucket_candidates` gives for the bucket arguments).
    - Each sample goes `repeats` times into its bucket; batches are chunks of `batch_size` of one
      bucket (a bucket's last batch may be short; batches never mix buckets).
      num_batches_per_epoch = sum over buckets of ceil(count / batch_size).
    - `batches_for_epoch(epoch, seed)` shuffles the batch order and each bucket's contents with
      `random.Random(seed + epoch)`, from the same starting order every epoch, so any epoch can be
      rebuilt on resume. (kohya shuffles cumulatively with the global `random` and its DataLoader
      shuffles again, so its exact order cannot be reproduced; the structure is the same.)
    - Flip, colour and crop augmentation are the caller's: it draws a flip per sample and passes it to
      `prepare_image` / `LatentCache.get`, and with color_aug / random_crop a `data/augment.py`
      `PixelAugment` to `prepare_image`.
    `required_reso_steps` is the multiple that the model family wants for bucket_reso_steps
    (64 for SD 1.x/2.x, 32 for SDXL); other steps only warn.
    Each image in use whose size is degenerate (`degenerate_image`: too small, extreme aspect ratio) gets
    one warning naming it, from its header size alone; `warn_degenerate=False` is for `loralab dataset
    check`, which reports them itself.
    """

    def __init__(
        self,
        subsets: Sequence[Subset],
        *,
        resolution: tuple[int, int],
        batch_size: int,
        enable_bucket: bool = False,
        min_bucket_reso: int = 256,
        max_bucket_reso: int = 1024,
        bucket_reso_steps: int = 64,
        bucket_no_upscale: bool = False,
        required_reso_steps: int = 64,
        warn_degenerate: bool = True,
    ) -> None:
        if batch_size < 1:
            raise LoralabError(f"train_batch_size: {batch_size} must be at least 1")
        resolution = (int(resolution[0]), int(resolution[1]))
        check_resolution(resolution)
        self.resolution = resolution
        self.batch_size = batch_size
        self.enable_bucket = enable_bucket
        self.min_bucket_reso, self.max_bucket_reso = min_bucket_reso, max_bucket_reso  # as given (for metadata)
        self.subsets = list(subsets)

        if enable_bucket:
            check_bucket_reso_steps(bucket_reso_steps, required_reso_steps)
            if bucket_no_upscale:
                log.info("bucket_no_upscale: buckets come from the image sizes; min/max_bucket_reso are ignored")
        self.candidates = bucket_candidates(
            resolution, enable_bucket=enable_bucket, min_bucket_reso=min_bucket_reso, max_bucket_reso=max_bucket_reso,
            bucket_reso_steps=bucket_reso_steps, bucket_no_upscale=bucket_no_upscale,
        )
        self.bucket_no_upscale = self.candidates.no_upscale
        self.bucket_reso_steps: int | None = self.candidates.bucket_reso_steps

        self.num_train_images = num_train_images(self.subsets)
        self.num_reg_images = sum(s.img_count * s.num_repeats for s in self.subsets if s.is_reg)
        if self.num_train_images == 0:
            raise LoralabError("train_data_dir: no training images (only regularization images were given)")
        registered: list[tuple[ImageEntry, int]] = [
            (e, s.num_repeats) for s in self.subsets if not s.is_reg for e in s.images
        ]
        reg_entries = [e for s in self.subsets if s.is_reg for e in s.images]
        if reg_entries:
            if self.num_reg_images > self.num_train_images:
                log.warning("%d reg samples (images x repeats) but %d train samples: some reg images are not used",
                            self.num_reg_images, self.num_train_images)
            registered += reg_balancing(reg_entries, self.num_train_images)

        self.samples: list[Sample] = []
        for entry, repeats in registered:
            try:
                choice = self.candidates.choose(entry.size)
            except LoralabError as err:
                raise LoralabError(f"{entry.path}: {err}") from err
            self.samples.append(Sample(entry=entry, choice=choice, is_reg=entry.subset.is_reg, repeats=repeats))
        if warn_degenerate:
            _warn_degenerate(self.samples, resolution)
        self.num_reg_samples = sum(s.repeats for s in self.samples if s.is_reg)

        # bucket contents: sample indices x repeats, buckets sorted by resolution (kohya BucketManager.sort)
        resos = sorted({s.choice.bucket for s in self.samples})
        bucket_id = {reso: i for i, reso in enumerate(resos)}
        self._bucket_resos = resos
        self._bucket_contents: list[list[int]] = [[] for _ in resos]
        for i, sample in enumerate(self.samples):
            self._bucket_contents[bucket_id[sample.choice.bucket]].extend([i] * sample.repeats)
        self._batch_slots = [
            (b, k) for b, contents in enumerate(self._bucket_contents)
            for k in range(-(-len(contents) // batch_size))
        ]
        for stats in self.buckets:
            log.info("bucket %dx%d: %d images, %d samples per epoch", *stats.resolution, stats.images, stats.count)
        if enable_bucket:
            log.info("mean aspect-ratio error (without repeats): %.4f", self.bucket_info()["mean_img_ar_error"])

    @property
    def buckets(self) -> list[BucketStats]:
        """Per used bucket, sorted by resolution: distinct images and samples per epoch."""
        images = [0] * len(self._bucket_resos)
        index = {reso: i for i, reso in enumerate(self._bucket_resos)}
        for s in self.samples:
            images[index[s.choice.bucket]] += 1
        return [BucketStats(reso, images[i], len(self._bucket_contents[i]))
                for i, reso in enumerate(self._bucket_resos)]

    @property
    def num_batches_per_epoch(self) -> int:
        return len(self._batch_slots)

    @property
    def num_samples_per_epoch(self) -> int:
        """Train samples x repeats plus the balanced reg samples."""
        return sum(len(c) for c in self._bucket_contents)

    def bucket_info(self) -> dict | None:
        """kohya's `ss_bucket_info` (None when buckets are off, as in kohya)."""
        if not self.enable_bucket:
            return None
        return bucket_info((s.choice, s.repeats) for s in self.samples)

    def batches_for_epoch(self, epoch: int, seed: int) -> list[list[Sample]]:
        """The batches of one epoch, in training order (see the class docstring for the shuffle rule)."""
        rng = random.Random(seed + epoch)
        slots = list(self._batch_slots)
        rng.shuffle(slots)
        contents = [list(c) for c in self._bucket_contents]
        for c in contents:
            rng.shuffle(c)
        bs = self.batch_size
        return [[self.samples[i] for i in contents[b][k * bs:(k + 1) * bs]] for b, k in slots]
