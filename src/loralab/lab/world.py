"""The lab's procedural world: one coloured shape on a plain background, with a tag-style caption.

Attributes (what a caption says, in this order): ``"<colour> <shape>, <background> background, <size>"``,
e.g. ``"red circle, blue background, large"``.

* shapes: circle, square, triangle, star, cross, heart, and ``ring``, which the base model never sees
  (``HELD_OUT_SHAPE``): a LoRA teaches it as a new concept (``write_kohya_dataset``).
* foreground colours (8) and background colours (6) share their names and RGB values, so the token
  "blue" means the same colour in both roles; a colour is never drawn on the same background colour.
* size: small (the shape's bounding box is 0.40 of the image's short side) or large (0.64), each with
  ±8 % jitter. (0.34 was too small: the tiny VAE turned small stars and crosses into blobs.)
* unscored jitter: the position (anywhere the shape fits with a margin), ±8 RGB on each colour channel.
* image sizes (width, height): 32×32, 48×32 and 32×48 by default, so that aspect-ratio buckets are
  exercised. Sizes are relative to the short side, so a "large circle" is the same at every aspect ratio.

Every image is drawn at 4× and box-filtered down (antialiased edges), from its own integer seed, so one
image's pixels depend only on its `WorldItem` (never on the order, or the process, it was rendered in).

``HELD_OUT_TRIPLES`` lists 26 of the 258 (shape, colour, background) triples of the six training
shapes (10 %) that are kept out of all base-model training, to measure how the model generalises to
prompt combinations it never saw; every (shape, colour), (shape, background) and (colour, background)
pair of them still occurs in training (``check_pairs_covered``).

Only numpy and Pillow here: worker processes import this module without torch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height)
Triple = tuple[str, str, str]  # (shape, colour, background)

TRAIN_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
HELD_OUT_SHAPE = "ring"
SHAPES: tuple[str, ...] = TRAIN_SHAPES + (HELD_OUT_SHAPE,)

# One palette for both roles; "gray" is a background only.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "blue", "green", "yellow")
SIZES: dict[str, float] = {"small": 0.40, "large": 0.64}  # bbox extent / short side
SIZE_JITTER = 0.08
COLOUR_JITTER = 8
MARGIN = 0.06  # free border around the shape, in short sides
SUPERSAMPLE = 4
DEFAULT_IMAGE_SIZES: tuple[Size, ...] = ((32, 32), (48, 32), (32, 48))

# 10 % of the 6 × 43 = 258 training-shape triples, drawn once by `draw_held_out_triples(seed=5)` and
# frozen here so the list never depends on a library's random stream. Never used in base training.
HELD_OUT_TRIPLES: tuple[Triple, ...] = (
    ('circle', 'green', 'gray'),
    ('circle', 'green', 'yellow'),
    ('circle', 'purple', 'white'),
    ('circle', 'purple', 'yellow'),
    ('cross', 'blue', 'green'),
    ('cross', 'green', 'blue'),
    ('cross', 'purple', 'gray'),
    ('cross', 'purple', 'white'),
    ('cross', 'yellow', 'blue'),
    ('heart', 'orange', 'yellow'),
    ('heart', 'white', 'green'),
    ('heart', 'white', 'yellow'),
    ('heart', 'yellow', 'blue'),
    ('square', 'blue', 'black'),
    ('square', 'green', 'white'),
    ('square', 'orange', 'yellow'),
    ('square', 'yellow', 'blue'),
    ('star', 'black', 'blue'),
    ('star', 'green', 'white'),
    ('star', 'orange', 'black'),
    ('star', 'orange', 'green'),
    ('star', 'orange', 'yellow'),
    ('triangle', 'black', 'green'),
    ('triangle', 'orange', 'gray'),
    ('triangle', 'orange', 'white'),
    ('triangle', 'red', 'black'),
)


@dataclass(frozen=True)
class WorldItem:
    """One image of the world: its attributes, its pixel size and the seed of its jitter."""

    shape: str
    colour: str
    background: str
    size: str
    width: int = 32
    height: int = 32
    seed: int = 0

    @property
    def triple(self) -> Triple:
        return (self.shape, self.colour, self.background)

    @property
    def attributes(self) -> dict[str, str]:
        """The scored attributes, as `Evaluator.score` expects them."""
        return {"shape": self.shape, "colour": self.colour, "background": self.background, "size": self.size}

    def caption(self, tag: str | None = None) -> str:
        return caption(self.shape, self.colour, self.background, self.size, tag=tag)

    def render(self) -> np.ndarray:
        return render(self.shape, self.colour, self.background, self.size, self.width, self.height,
                      np.random.default_rng(self.seed))


# ------------------------------------------------------------------------------------------ captions
def caption(shape: str, colour: str, background: str, size: str, tag: str | None = None) -> str:
    """Tag-style caption: ``"red circle, blue background, large"``.

    With an activation `tag` the shape word is replaced by it and put first, kohya style:
    ``"olis, red, blue background, large"`` (the tag carries the shape; the base model never saw it).
    """
    if tag:
        return f"{tag}, {colour}, {background} background, {size}"
    return f"{colour} {shape}, {background} background, {size}"


def parse_caption(text: str) -> dict[str, str]:
    """Inverse of `caption` (without a tag): ``{"shape", "colour", "background", "size"}``."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not parts[1].endswith(" background"):
        raise ValueError(f"not a lab caption: {text!r}")
    colour, shape = parts[0].split(" ", 1)
    return {"shape": shape, "colour": colour, "background": parts[1][: -len(" background")], "size": parts[2]}


# ------------------------------------------------------------------------------------------ triples
def all_triples(shapes: Sequence[str] = TRAIN_SHAPES) -> list[Triple]:
    """Every (shape, colour, background) with colour != background, in a fixed order."""
    return [(s, c, b) for s in shapes for c in COLOURS for b in BACKGROUNDS if c != b]


def training_triples(shapes: Sequence[str] = TRAIN_SHAPES,
                     exclude_triples: Iterable[Triple] = HELD_OUT_TRIPLES) -> list[Triple]:
    """`all_triples(shapes)` without the excluded (held-out) ones."""
    excluded = set(map(tuple, exclude_triples))
    return [t for t in all_triples(shapes) if t not in excluded]


def check_pairs_covered(train: Iterable[Triple], held_out: Iterable[Triple]) -> list[tuple[str, str]]:
    """The attribute pairs of `held_out` triples that never occur in `train` (empty = all covered)."""
    seen: set[tuple[str, str]] = set()
    for s, c, b in train:
        seen |= {("sc", s + "|" + c), ("sb", s + "|" + b), ("cb", c + "|" + b)}
    missing = []
    for s, c, b in held_out:
        for key in (("sc", s + "|" + c), ("sb", s + "|" + b), ("cb", c + "|" + b)):
            if key not in seen:
                missing.append(key)
    return missing


def draw_held_out_triples(seed: int = 5, fraction: float = 0.10) -> list[Triple]:
    """How `HELD_OUT_TRIPLES` was drawn: a seeded random 10 % of the triples, stratified by shape (4 or 5
    per shape), redrawn until every colour and background occurs and every attribute pair of them still
    occurs in training."""
    triples = all_triples()
    k = round(fraction * len(triples))
    rng = np.random.default_rng(seed)
    while True:
        counts = np.full(len(TRAIN_SHAPES), k // len(TRAIN_SHAPES))
        counts[rng.choice(len(TRAIN_SHAPES), size=k % len(TRAIN_SHAPES), replace=False)] += 1
        pick: list[Triple] = []
        for shape, m in zip(TRAIN_SHAPES, counts):
            own = [t for t in triples if t[0] == shape]
            pick += [own[i] for i in rng.choice(len(own), size=int(m), replace=False)]
        if {t[1] for t in pick} != set(COLOURS) or {t[2] for t in pick} != set(BACKGROUNDS):
            continue
        chosen = set(pick)
        if not check_pairs_covered([t for t in triples if t not in chosen], pick):
            return sorted(pick)


# ------------------------------------------------------------------------------------------ shapes
def _normalise(points: np.ndarray) -> np.ndarray:
    """Centre a polygon's bounding box on 0 and scale its larger side to 2 (the unit box [-1, 1])."""
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2) * (2.0 / (hi - lo).max())


def shape_polygon(shape: str) -> np.ndarray:
    """The outline of a polygonal shape in the unit box, y pointing down, shape (n, 2)."""
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        pts = [(0, -1), (1, 1), (-1, 1)]
    elif shape == "star":  # five points, fat inner radius so that small stars survive the VAE
        a = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.48)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif shape == "cross":  # a plus sign, arms 0.42 of the extent wide
        w = 0.42
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
    elif shape == "heart":
        t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
    else:
        raise ValueError(f"{shape!r} is not a polygon shape")
    return _normalise(np.asarray(pts, dtype=np.float64))


RING_HOLE = 0.5  # inner radius / outer radius


# ------------------------------------------------------------------------------------------ render
def _jitter_colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    rgb = np.asarray(PALETTE[name]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(rgb, 0, 255))  # type: ignore[return-value]


def render(shape: str, colour: str, background: str, size: str, width: int = 32, height: int = 32,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw one image: an (height, width, 3) uint8 array. All jitter comes from `rng` (seed 0 if None).

    The shape's bounding box is ``SIZES[size]`` (±8 %) of the short side, placed uniformly where it fits
    with a margin; colours get ±8 RGB per channel.
    """
    if shape not in SHAPES or colour not in PALETTE or background not in PALETTE or size not in SIZES:
        raise ValueError(f"unknown attribute in {(shape, colour, background, size)}")
    rng = rng if rng is not None else np.random.default_rng(0)
    bg = _jitter_colour(background, rng)
    fg = _jitter_colour(colour, rng)
    short = min(width, height)
    extent = SIZES[size] * short * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    half = extent / 2
    margin = MARGIN * short
    cx = rng.uniform(half + margin, width - half - margin)
    cy = rng.uniform(half + margin, height - half - margin)

    k = SUPERSAMPLE
    img = Image.new("RGB", (width * k, height * k), bg)
    draw = ImageDraw.Draw(img)
    if shape in ("circle", "ring"):
        box = [(cx - half) * k, (cy - half) * k, (cx + half) * k, (cy + half) * k]
        draw.ellipse(box, fill=fg)
        if shape == "ring":
            h = half * RING_HOLE
            draw.ellipse([(cx - h) * k, (cy - h) * k, (cx + h) * k, (cy + h) * k], fill=bg)
    else:
        pts = shape_polygon(shape) * half + np.array([cx, cy])
        draw.polygon([(float(x) * k, float(y) * k) for x, y in pts], fill=fg)
    img = img.resize((width, height), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def render_item(item: WorldItem) -> np.ndarray:
    return item.render()


def _render_chunk(items: Sequence[WorldItem]) -> np.ndarray:
    return np.stack([it.render() for it in items])


def render_many(items: Sequence[WorldItem], workers: int = 1, chunk: int = 2048) -> np.ndarray:
    """Render items of one image size into an (n, height, width, 3) uint8 array.

    `workers > 1` uses forked worker processes (call this before CUDA is initialised); the result is
    identical whatever `workers` is, since every item carries its own seed.
    """
    if not items:
        raise ValueError("render_many: no items")
    if len({(it.width, it.height) for it in items}) != 1:
        raise ValueError("render_many: all items must have the same image size (group them by size first)")
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    if workers <= 1 or len(chunks) == 1 or os.name != "posix":
        return np.concatenate([_render_chunk(c) for c in chunks])
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
        return np.concatenate(list(pool.map(_render_chunk, chunks)))


# ------------------------------------------------------------------------------------------ sampling
def sample_world(
    n: int,
    rng: np.random.Generator,
    shapes: Sequence[str] = TRAIN_SHAPES,
    exclude_triples: Iterable[Triple] = HELD_OUT_TRIPLES,
    sizes: Sequence[Size] = DEFAULT_IMAGE_SIZES,
    size_names: Sequence[str] = tuple(SIZES),
    triples: Sequence[Triple] | None = None,
) -> list[WorldItem]:
    """`n` random items, uniform over the allowed triples × size names × image sizes.

    The allowed triples are `triples` if given, else every triple of `shapes` minus `exclude_triples`
    (by default the held-out triples: this is the base model's training sampler). Each item gets its own
    jitter seed drawn from `rng`, so the list (and its rendering) is reproducible from `rng`'s seed.
    """
    allowed = list(triples) if triples is not None else training_triples(shapes, exclude_triples)
    if not allowed:
        raise ValueError("sample_world: no triple is allowed")
    ti = rng.integers(0, len(allowed), size=n)
    si = rng.integers(0, len(size_names), size=n)
    wi = rng.integers(0, len(sizes), size=n)
    seeds = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
    return [
        WorldItem(*allowed[t], size_names[s], sizes[w][0], sizes[w][1], int(sd))
        for t, s, w, sd in zip(ti, si, wi, seeds)
    ]


def held_out_prompts(triples: Sequence[Triple] = HELD_OUT_TRIPLES,
                     sizes: Sequence[Size] = DEFAULT_IMAGE_SIZES) -> list[WorldItem]:
    """Every held-out triple × size name, each at one image size (cycling through `sizes`); seed 0.

    26 triples × 2 sizes = 52 prompts. Use `dataclasses.replace` to change the image size or seed."""
    out = []
    for i, (t, s) in enumerate((t, s) for t in triples for s in SIZES):
        w, h = sizes[i % len(sizes)]
        out.append(WorldItem(*t, s, w, h, 0))
    return out


def group_by_image_size(items: Sequence[WorldItem]) -> dict[Size, list[int]]:
    """Indices of `items` for each (width, height), in first-seen order."""
    groups: dict[Size, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((it.width, it.height), []).append(i)
    return groups


# ------------------------------------------------------------------------------------------ kohya
def write_kohya_dataset(
    root: str | Path,
    shape: str = HELD_OUT_SHAPE,
    tag: str = "olis",
    n: int = 15,
    repeats: int = 10,
    seed: int = 0,
    sizes: Sequence[Size] = DEFAULT_IMAGE_SIZES,
    colours: Sequence[str] = COLOURS,
    backgrounds: Sequence[str] = BACKGROUNDS,
) -> Path:
    """Write a kohya-layout LoRA dataset for one shape: ``root/<repeats>_<tag>/NNNN.png`` + ``NNNN.txt``.

    Captions are ``"<tag>, <colour>, <background> background, <size>"`` (activation tag first, the shape
    word never appears). Colours, backgrounds and sizes are spread evenly (each colour/background pair
    drawn without replacement as long as possible) so the LoRA does not learn a colour along with the
    shape. Returns the image folder. Existing files of the same names are overwritten.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    rng = np.random.default_rng(seed)
    pairs = [(c, b) for c in colours for b in backgrounds if c != b]
    order = list(rng.permutation(len(pairs)))
    while len(order) < n:
        order += list(rng.permutation(len(pairs)))
    folder = Path(root) / f"{repeats}_{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    size_names = list(SIZES)
    for i in range(n):
        c, b = pairs[order[i]]
        w, h = sizes[i % len(sizes)]
        item = WorldItem(shape, c, b, size_names[i % 2], w, h, int(rng.integers(0, 2**63 - 1)))
        Image.fromarray(item.render()).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(item.caption(tag=tag) + "\n", encoding="utf-8")
    log.info("wrote %d %s images with tag %r to %s", n, shape, tag, folder)
    return folder
