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
    partial_batches       a bucket holds fewer samples than one batch (every batch in it is short)
info
    partial_batches       a bucket's sample count is not a multiple of the batch size (one short batch)

The activation tag of a concept is `activation_tag`'s rule (see there). The checks also give what
the other analysis commands share: `scan_dataset` (every image and caption, broken ones included).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from loralab.data.buckets import BucketChoice, make_bucket_resolutions, select_bucket
from loralab.data.captions import split_tags
from loralab.data.dataset import (
    FolderDataset,
    ImageEntry,
    Subset,
    scan_root,
    list_images,
    read_caption,
)
from loralab.data.images import READ_ERRORS, read_image_size
from loralab.errors import LoralabError

log = logging.getLogger(__name__)

LEVELS = ("error", "warning", "info")
MAX_TOKENS = 75  # CLIP's 77 positions minus BOS and EOS (kohya's default max_token_length)
TOO_SMALL_AREA_SHARE = 0.5  # below this share of the training area an image counts as too small
EXTREME_ASPECT = 3.0
HEAVY_CROP_SHARE = 0.25
PHASH_NEAR = 8  # near duplicate: pHash and dHash Hamming distances (of 64 bits) both at most these
DHASH_NEAR = 10
CANDIDATE_SHARE = 0.2  # a first tag on this share of a concept's captions is a candidate activation tag
GRAY_TAGS = ("monochrome", "greyscale", "grayscale")


# ----------------------------------------------------------------------------------------- scanning


@dataclass(eq=False)
class ScannedImage:
    """One image file of a concept folder, whatever state it is in."""

    path: Path
    subset: Subset
    caption: str | None  # the caption file's text as training reads it; None: no caption file
    caption_error: str | None = None  # set when the caption file exists but cannot be read
    size: tuple[int, int] | None = None  # None: the header cannot be read
    header_error: str | None = None

    @property
    def tags(self) -> list[str]:
        """The caption's tags as kohya counts them (`split_tags`); [] without a caption."""
        return split_tags(self.caption) if self.caption else []


@dataclass(eq=False)
class ScannedDataset:
    """A kohya-layout dataset as `loralab train` sees it (`subsets`, readable images with the folder-name
    fallback caption) plus every image file with its raw caption (`images`)."""

    train_dir: Path
    reg_dir: Path | None
    caption_extension: str
    subsets: list[Subset]
    images: list[ScannedImage]
    empty_folders: list[Path] = field(default_factory=list)

    def images_of(self, subset: Subset) -> list[ScannedImage]:
        return [im for im in self.images if im.subset is subset]

    @property
    def train_subsets(self) -> list[Subset]:
        return [s for s in self.subsets if not s.is_reg]

    @property
    def reg_subsets(self) -> list[Subset]:
        return [s for s in self.subsets if s.is_reg]

    def find_subset(self, name: str) -> Subset:
        """A train concept by folder name (`10_jinx`), class tokens (`jinx`) or activation tag."""
        wanted = name.strip().lower()
        for subset in self.train_subsets:
            if wanted in (subset.name.lower(), subset.class_tokens.lower()):
                return subset
        for subset in self.train_subsets:
            if activation_tag(self.images_of(subset), subset.class_tokens).tag == wanted:
                return subset
        names = ", ".join(s.name for s in self.train_subsets)
        raise LoralabError(f"{self.train_dir}: no concept folder named {name!r}; the concepts are: {names}")


def _normalise_extension(caption_extension: str) -> str:
    if caption_extension and not caption_extension.startswith("."):
        return "." + caption_extension
    return caption_extension


def scan_dataset(
    train_dir: str | Path, reg_dir: str | Path | None = None, *, caption_extension: str = ".txt"
) -> ScannedDataset:
    """Scan the `<repeats>_<name>/` folders of `train_dir` (and `reg_dir`) like `scan_folder_dataset`,
    but keep going past broken files: an image whose header cannot be read is left out of the subsets
    (training would stop on it) and recorded with its error; an unreadable caption is recorded too.

    Captions as training reads them (`read_caption`: the first line, stripped); a missing or empty caption
    trains as the folder's class tokens, and so does it in `subsets`.
    """
    caption_extension = _normalise_extension(caption_extension)
    roots = [(Path(train_dir), "train_data_dir", False)]
    if reg_dir:
        roots.append((Path(reg_dir), "reg_data_dir", True))
    subsets: list[Subset] = []
    images: list[ScannedImage] = []
    empty: list[Path] = []
    for root, key, is_reg in roots:
        for subset in scan_root(root, key, is_reg):
            paths = list_images(subset.dir)
            if not paths:
                empty.append(subset.dir)
                continue
            for path in paths:
                scanned = ScannedImage(path=path, subset=subset, caption=None)
                try:
                    scanned.caption = read_caption(path, caption_extension)
                except LoralabError as err:
                    scanned.caption_error = str(err)
                try:
                    scanned.size = read_image_size(path)
                except LoralabError as err:
                    scanned.header_error = str(err)
                images.append(scanned)
                if scanned.size is not None:
                    caption = scanned.caption or subset.class_tokens
                    subset.images.append(ImageEntry(path=path, caption=caption, size=scanned.size, subset=subset))
            subsets.append(subset)
    if not any(not s.is_reg for s in subsets):
        raise LoralabError(
            f"train_data_dir: no images in the concept folders of {train_dir}; put .png/.jpg/.jpeg/.webp/.bmp files "
            f"in its <repeats>_<name>/ folders"
        )
    reg_path = Path(reg_dir) if reg_dir else None
    return ScannedDataset(Path(train_dir), reg_path, caption_extension, subsets, images, empty)


# ----------------------------------------------------------------------------------------- activation tag


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


# ----------------------------------------------------------------------------------------- image facts


@dataclass
class ImageFacts:
    """What decoding one image tells: an error, or its mode facts and hashes."""

    sha256: str = ""
    error: str | None = None
    transparent: bool = False
    grayscale: bool = False
    phash: np.ndarray | None = None  # (64,) bool
    dhash: np.ndarray | None = None  # (64,) bool


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: D @ x is the DCT of a length-n vector x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash(gray: Image.Image) -> np.ndarray:
    """Perceptual hash, 64 bits: the 8x8 lowest frequencies of the 2-D DCT of the 32x32 grayscale
    image, each bit = coefficient > their median. Resizing, re-encoding and small edits keep most bits."""
    x = np.asarray(gray.resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT32 @ x @ _DCT32.T)[:8, :8].ravel()
    return low > np.median(low)


def dhash(gray: Image.Image) -> np.ndarray:
    """Difference hash, 64 bits: on a 9x8 grayscale image, each bit = pixel brighter than its right neighbour."""
    x = np.asarray(gray.resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    return (x[:, 1:] > x[:, :-1]).ravel()


def is_grayscale(img: Image.Image, tolerance: int = 6) -> bool:
    """No colour: a one-channel mode, or RGB whose channels differ by at most `tolerance` everywhere
    (on a 64x64 box-filtered copy, so JPEG chroma noise does not count as colour)."""
    if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    small = img.convert("RGB").resize((64, 64), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.int16)
    spread = arr.max(axis=2) - arr.min(axis=2)
    return int(spread.max()) <= tolerance


def has_transparency(img: Image.Image) -> bool:
    """Some pixel is not fully opaque (an alpha channel that is all 255 is harmless)."""
    if img.mode in ("RGBA", "LA", "PA"):
        return img.getchannel("A").getextrema()[0] < 255
    if img.mode == "P" and "transparency" in img.info:
        return img.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def inspect_image(path: Path) -> ImageFacts:
    """Decode the whole image (a truncated file fails here, not at its header) and compute its facts."""
    facts = ImageFacts()
    try:
        data = path.read_bytes()
    except OSError as err:
        facts.error = f"cannot read the file ({err})"
        return facts
    facts.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            facts.transparent = has_transparency(img)
            facts.grayscale = is_grayscale(img)
            if img.mode in ("RGBA", "LA", "PA", "P"):
                rgba = img.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                gray = Image.alpha_composite(flat, rgba).convert("L")
            else:
                gray = img.convert("L")
    except UnidentifiedImageError:
        facts.error = "not an image format PIL can read"
        return facts
    except READ_ERRORS as err:
        facts.error = f"{type(err).__name__}: {err}"
        return facts
    facts.phash = phash(gray)
    facts.dhash = dhash(gray)
    return facts


def hamming_pairs(bits: np.ndarray, max_distance: int, block: int = 1024) -> Iterator[tuple[int, int, int]]:
    """(i, j, distance) for every pair i < j of rows of the (n, 64) bool array within `max_distance`."""
    b = bits.astype(np.float32)
    ones = b.sum(axis=1)
    n = len(b)
    for start in range(0, n, block):
        rows = b[start:start + block]
        dist = ones[start:start + block, None] + ones[None, :] - 2 * rows @ b.T
        ii, jj = np.nonzero(dist <= max_distance + 0.5)
        for i, j in zip(ii.tolist(), jj.tolist()):
            if start + i < j:
                yield start + i, j, int(round(dist[i, j]))


# ----------------------------------------------------------------------------------------- report


@dataclass
class Problem:
    level: str  # "error" | "warning" | "info"
    code: str
    file: str | None  # the file (or folder) it is about; None for the whole dataset
    message: str
    concept: str | None = None
    files: list[str] = field(default_factory=list)  # other files involved (duplicates, a bucket's images)


@dataclass
class ConceptInfo:
    name: str
    kind: str  # "train" | "reg"
    dir: str
    images: int
    repeats: int
    samples_per_epoch: int  # images x repeats (train) or the balanced reg samples in use (reg)
    epoch_share: float  # share of the train samples of an epoch (reg: share of the reg samples)
    activation_tag: str | None
    activation_source: str


@dataclass
class BucketInfo:
    resolution: tuple[int, int]
    images: int
    samples: int
    batches: int
    last_batch: int  # size of the short last batch, 0 when every batch is full


@dataclass
class ImageInfo:
    file: str
    concept: str
    size: tuple[int, int] | None
    bucket: tuple[int, int] | None
    tokens: int | None


@dataclass
class BucketSettings:
    """kohya's bucket arguments (same names); `enable_bucket` defaults on here, as in the kohya GUI."""

    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass
class CheckReport:
    train_data_dir: str
    reg_data_dir: str | None
    settings: BucketSettings
    concepts: list[ConceptInfo]
    buckets: list[BucketInfo]
    images: list[ImageInfo]
    problems: list[Problem]
    steps_per_epoch: int
    num_train_samples: int
    num_reg_samples: int
    suggested_batch_size: int | None

    @property
    def has_errors(self) -> bool:
        return any(p.level == "error" for p in self.problems)

    def counts(self) -> dict[str, int]:
        return {level: sum(p.level == level for p in self.problems) for level in LEVELS}

    def by_code(self, code: str) -> list[Problem]:
        return [p for p in self.problems if p.code == code]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counts"] = self.counts()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------------------- checks


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


def _rel(path: Path, roots: Sequence[Path | None]) -> str:
    for root in roots:
        if root is not None:
            with contextlib.suppress(ValueError):
                return str(path.relative_to(root))
    return str(path)


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
    """
    settings = settings or BucketSettings()
    ds = scan_dataset(train_dir, reg_dir, caption_extension=caption_extension)
    problems: list[Problem] = []
    concept_of = {id(s): s.name for s in ds.subsets}

    def add(level: str, code: str, file: Path | None, message: str, concept: str | None = None,
            files: Sequence[Path] = ()) -> None:
        problems.append(Problem(level, code, str(file) if file is not None else None, message, concept,
                                [str(f) for f in files]))

    for folder in ds.empty_folders:
        add("warning", "empty_folder", folder, "the folder has no images (.png .jpg .jpeg .webp .bmp); it is ignored")

    # --- images: decode fully, hash
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        facts = list(tqdm(pool.map(lambda im: inspect_image(im.path), ds.images), total=len(ds.images),
                          desc="checking images", unit="img", disable=None if progress else True))

    res = settings.resolution
    train_area = res[0] * res[1]
    predefined = None
    if settings.enable_bucket and not settings.bucket_no_upscale:
        predefined = make_bucket_resolutions(res, settings.min_bucket_reso, settings.max_bucket_reso,
                                             settings.bucket_reso_steps)
    elif not settings.enable_bucket:
        predefined = [res]
    choices: dict[int, BucketChoice] = {}
    unusable: set[Path] = set()  # images that have no bucket (left out of the epoch below)

    for i, (im, fact) in enumerate(zip(ds.images, facts)):
        concept = concept_of[id(im.subset)]
        if im.header_error or fact.error:
            add("error", "unreadable_image", im.path,
                f"the image cannot be decoded ({fact.error}); it is corrupt, truncated or not an image. "
                f"Re-save it with an image editor or remove it", concept)
            continue
        assert im.size is not None
        w, h = im.size
        try:
            choice = select_bucket(im.size, resolution=res, buckets=predefined,
                                   bucket_reso_steps=settings.bucket_reso_steps if settings.enable_bucket else None,
                                   no_upscale=settings.enable_bucket and settings.bucket_no_upscale)
            choices[i] = choice
        except LoralabError as err:  # bucket_no_upscale and a side below bucket_reso_steps: training stops
            add("error", "too_small", im.path, str(err), concept)
            unusable.add(im.path)
            continue
        if w * h < TOO_SMALL_AREA_SHARE * train_area:
            scale = choice.resized[0] / w
            how = (f"it is upscaled x{scale:.1f} to its {choice.bucket[0]}x{choice.bucket[1]} bucket and trains blurry"
                   if scale > 1 else f"it trains in a small {choice.bucket[0]}x{choice.bucket[1]} bucket")
            add("warning", "too_small", im.path,
                f"{w}x{h} is less than half the training area {res[0]}x{res[1]}: {how}; use a larger image", concept)
        if fact.transparent:
            add("warning", "alpha", im.path,
                "the image has transparent pixels: kohya drops the alpha channel, so they train as whatever colour "
                "they hide (often black); loralab puts them on white. Flatten it onto the background you want", concept)
        if fact.grayscale and not any(t in im.tags for t in GRAY_TAGS):
            add("warning", "grayscale", im.path,
                "the image is grayscale but its caption has no monochrome/greyscale tag: the LoRA may learn to drop "
                "colour. Tag it `monochrome, greyscale` or remove it", concept)
        aspect = max(w / h, h / w)
        if aspect >= EXTREME_ASPECT:
            add("warning", "extreme_aspect", im.path,
                f"aspect ratio {aspect:.1f}:1 ({w}x{h}); crop it into parts closer to the bucket shapes", concept)
        crop_w, crop_h = choice.bucket
        cut = 1 - (crop_w * crop_h) / (choice.resized[0] * choice.resized[1])
        if cut >= HEAVY_CROP_SHARE:
            add("warning", "heavy_crop", im.path,
                f"the {choice.bucket[0]}x{choice.bucket[1]} bucket cuts off {cut:.0%} of the image "
                f"({'turn on buckets or ' if not settings.enable_bucket else ''}crop it yourself to keep what matters)",
                concept)

    # --- duplicates
    by_hash: dict[str, list[int]] = {}
    for i, fact in enumerate(facts):
        if fact.sha256 and not fact.error:
            by_hash.setdefault(fact.sha256, []).append(i)
    roots = [ds.train_dir, ds.reg_dir]
    exact_pairs: set[tuple[int, int]] = set()
    for group in by_hash.values():
        if len(group) < 2:
            continue
        for i in group:
            others = [ds.images[j].path for j in group if j != i]
            exact_pairs.update((min(i, j), max(i, j)) for j in group if j != i)
            add("warning", "duplicate", ds.images[i].path,
                f"the same file as {', '.join(_rel(p, roots) for p in others)}: it trains "
                f"{len(group)} times as often; remove the copies (use repeats to weight images)",
                concept_of[id(ds.images[i].subset)], others)
    hashed = [i for i, f in enumerate(facts) if f.phash is not None]
    if len(hashed) > 1:
        ph = np.stack([facts[i].phash for i in hashed])
        dh = np.stack([facts[i].dhash for i in hashed])
        for a, b, dist in hamming_pairs(ph, PHASH_NEAR):
            i, j = hashed[a], hashed[b]
            if (i, j) in exact_pairs:
                continue
            ddist = int(np.count_nonzero(dh[a] != dh[b]))
            if ddist > DHASH_NEAR:
                continue
            for x, y in ((i, j), (j, i)):
                add("warning", "near_duplicate", ds.images[x].path,
                    f"nearly the same picture as {_rel(ds.images[y].path, roots)} (perceptual hash "
                    f"distance {dist}/64): near copies overweight one pose; keep the better one",
                    concept_of[id(ds.images[x].subset)], [ds.images[y].path])

    # --- captions
    activations = {id(s): activation_tag(ds.images_of(s), s.class_tokens) for s in ds.subsets if not s.is_reg}
    captions = [im.caption or "" for im in ds.images]
    encodings = caption_encodings(captions)
    token_counts = [len(e.ids) for e in encodings]
    for i, im in enumerate(ds.images):
        concept = concept_of[id(im.subset)]
        fallback = im.subset.class_tokens
        if im.caption_error:
            add("error", "unreadable_caption", im.path.with_name(im.path.stem + ds.caption_extension),
                im.caption_error, concept)
            continue
        if im.caption is None:
            others = [ext for ext in (".txt", ".caption") if ext != ds.caption_extension
                      and im.path.with_name(im.path.stem + ext).is_file()]
            hint = f" (there is a {others[0]} file: pass --caption-extension {others[0]})" if others else ""
            add("warning", "missing_caption", im.path,
                f"no {ds.caption_extension} caption file: the image trains with the caption {fallback!r} "
                f"(the folder name); write one{hint}", concept)
            continue
        if im.caption == "":
            add("warning", "empty_caption", im.path.with_name(im.path.stem + ds.caption_extension),
                f"the caption is empty: the image trains with the caption {fallback!r} (the folder name)", concept)
            continue
        tags = im.tags
        repeated = sorted(t for t, n in Counter(tags).items() if n > 1)
        if repeated:
            add("warning", "duplicate_tag", im.path.with_name(im.path.stem + ds.caption_extension),
                f"tag written more than once: {', '.join(repeated)} (it weighs double); remove the repeats", concept)
        if token_counts[i] > max_tokens:
            cut = cut_tags(im.caption, encodings[i].offsets, max_tokens)
            add("warning", "caption_too_long", im.path.with_name(im.path.stem + ds.caption_extension),
                f"{token_counts[i]} CLIP tokens, over the {max_tokens} the text encoder reads: "
                f"{len(cut)} tags at the end are cut off ({', '.join(cut[:5])}{' ...' if len(cut) > 5 else ''}); "
                f"prune tags or raise max_token_length to 150/225", concept)
        if im.subset.is_reg:
            for s in ds.train_subsets:
                act = activations[id(s)].tag
                if act and act in tags:
                    add("warning", "activation_in_reg", im.path.with_name(im.path.stem + ds.caption_extension),
                        f"the regularization caption holds {act!r}, the activation tag of {s.name}: reg images "
                        f"would teach it the generic look; remove it", concept)
            continue
        act = activations[id(im.subset)].tag
        if act is None:
            continue
        if act not in tags:
            add("warning", "activation_missing", im.path.with_name(im.path.stem + ds.caption_extension),
                f"the activation tag {act!r} of {concept} is missing: add it first "
                f"(`loralab dataset edit DIR --concept {concept} --add {act!r} --position 0` adds it where missing)",
                concept)
        elif tags[0] != act:
            add("warning", "activation_not_first", im.path.with_name(im.path.stem + ds.caption_extension),
                f"the activation tag {act!r} is tag {tags.index(act) + 1}, not first: "
                f"put it first (`loralab dataset edit DIR --move-first {act!r}`) and use keep_tokens = 1", concept)
    for s in ds.train_subsets:
        cands = activations[id(s)].candidates
        if len(cands) > 1:
            listed = ", ".join(f"{t!r} ({n})" for t, n in cands)
            add("warning", "several_activation_tags", s.dir,
                f"the captions start with different tags: {listed}; one concept should have one activation tag "
                f"first in every caption (or split the folder into concepts)", s.name)

    # --- buckets and batches, as training builds them
    for s in ds.subsets:
        s.images = [e for e in s.images if e.path not in unusable]
    train_subsets = [s for s in ds.subsets if s.images and not s.is_reg]
    if not train_subsets:
        raise LoralabError(f"train_data_dir: no readable images in {ds.train_dir}; see the errors above")
    with _quiet("loralab.data.dataset"):
        folder_ds = FolderDataset(
            [s for s in ds.subsets if s.images],
            resolution=res,
            batch_size=settings.batch_size,
            enable_bucket=settings.enable_bucket,
            min_bucket_reso=settings.min_bucket_reso,
            max_bucket_reso=settings.max_bucket_reso,
            bucket_reso_steps=settings.bucket_reso_steps,
            bucket_no_upscale=settings.bucket_no_upscale,
            required_reso_steps=8,
        )
    bs = settings.batch_size
    bucket_files: dict[tuple[int, int], list[Path]] = {}
    for sample in folder_ds.samples:
        bucket_files.setdefault(sample.choice.bucket, []).append(sample.entry.path)
    buckets = []
    for b in folder_ds.buckets:
        last = b.count % bs
        buckets.append(BucketInfo(b.resolution, b.images, b.count, -(-b.count // bs), last))
    counts = [b.samples for b in buckets]
    suggestion = suggest_batch_size(counts, bs) if any(b.last_batch for b in buckets) else None
    hint = (f"batch size {suggestion} divides every bucket" if suggestion
            else "no batch size from 2 to 8 divides every bucket; add or remove images (or change repeats) so each "
                 "bucket count is a multiple of the batch size")
    for b in buckets:
        if not b.last_batch:
            continue
        files = bucket_files[b.resolution]
        w, h = b.resolution
        if b.samples < bs:
            add("warning", "partial_batches", files[0],
                f"bucket {w}x{h} holds {b.samples} sample(s) ({b.images} image(s) x repeats), fewer than the batch "
                f"size {bs}: every batch of it is short (noisier steps); {hint}", None, files)
        else:
            add("info", "partial_batches", files[0],
                f"bucket {w}x{h}: {b.samples} samples = {b.batches - 1} batches of {bs} + one of {b.last_batch}; "
                f"{hint}",
                None, files)

    # --- summaries
    total_train = folder_ds.num_train_images
    reg_used: Counter[int] = Counter()
    for sample in folder_ds.samples:
        if sample.is_reg:
            reg_used[id(sample.entry.subset)] += sample.repeats
    total_reg = folder_ds.num_reg_samples
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
    images = []
    for i, im in enumerate(ds.images):
        choice = choices.get(i)
        images.append(ImageInfo(str(im.path), concept_of[id(im.subset)], im.size,
                                choice.bucket if choice else None, token_counts[i] if im.caption else None))
    order = {lvl: k for k, lvl in enumerate(LEVELS)}
    problems.sort(key=lambda p: order[p.level])
    return CheckReport(
        train_data_dir=str(ds.train_dir),
        reg_data_dir=str(ds.reg_dir) if ds.reg_dir else None,
        settings=settings,
        concepts=concepts,
        buckets=buckets,
        images=images,
        problems=problems,
        steps_per_epoch=folder_ds.num_batches_per_epoch,
        num_train_samples=total_train,
        num_reg_samples=total_reg,
        suggested_batch_size=suggestion,
    )


# ----------------------------------------------------------------------------------------- terminal


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """A plain fixed-width table; columns listed in `right` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(widths[k]) if k in right else c.ljust(widths[k]) for k, c in enumerate(r)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def render_report(report: CheckReport, max_per_code: int = 20) -> str:
    """The report as text for the terminal: concepts, buckets, then problems (errors first)."""
    roots = [Path(report.train_data_dir)] + ([Path(report.reg_data_dir)] if report.reg_data_dir else [])
    s = report.settings
    if not s.enable_bucket:
        buckets = "off"
    elif s.bucket_no_upscale:
        buckets = "no upscale"
    else:
        buckets = f"{s.min_bucket_reso}-{s.max_bucket_reso} step {s.bucket_reso_steps}"
    out = [f"dataset {report.train_data_dir}" + (f" (reg {report.reg_data_dir})" if report.reg_data_dir else ""),
           f"resolution {s.resolution[0]}x{s.resolution[1]}, batch size {s.batch_size}, buckets {buckets}", ""]
    rows = [(c.name, c.kind, c.images, c.repeats, c.samples_per_epoch, f"{c.epoch_share:.0%}",
             f"{c.activation_tag} ({c.activation_source})" if c.activation_tag else "-")
            for c in report.concepts]
    out.append(format_table(["concept", "kind", "images", "repeats", "samples/epoch", "share", "activation tag"],
                            rows, right=(2, 3, 4, 5)))
    out.append("")
    brow = [(f"{b.resolution[0]}x{b.resolution[1]}", b.images, b.samples, b.batches,
             f"short batch of {b.last_batch}" if b.last_batch else "") for b in report.buckets]
    out.append(format_table(["bucket", "images", "samples", "batches", ""], brow, right=(1, 2, 3)))
    out.append(f"\nsteps per epoch: {report.steps_per_epoch} (batch size {s.batch_size}, {report.num_train_samples} "
               f"train + {report.num_reg_samples} reg samples)")
    if report.suggested_batch_size:
        out.append(f"batch size {report.suggested_batch_size} would fill every batch")
    counts = report.counts()
    out.append(f"\n{counts['error']} errors, {counts['warning']} warnings, {counts['info']} notes")
    groups: dict[tuple[str, str], list[Problem]] = {}
    for p in report.problems:  # already sorted by level; codes in order of first appearance
        groups.setdefault((p.level, p.code), []).append(p)
    for (level, code), items in groups.items():
        out.append(f"\n{level} {code} ({len(items)})")
        for p in items[:max_per_code]:
            where = _rel(Path(p.file), roots) if p.file else "dataset"
            if p.code == "partial_batches" and len(p.files) > 1:
                where += f" (+{len(p.files) - 1} more)"
            out.append(f"  {where}: {p.message}")
        if len(items) > max_per_code:
            out.append(f"  ... and {len(items) - max_per_code} more (see --json)")
    return "\n".join(out)
