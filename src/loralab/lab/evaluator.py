"""Scoring images of the lab world: shape, colour, background and size.

Why half analytic, half learned: background, foreground colour and size are plain pixel statistics of
this world (a flat background, one flat shape), so they are measured directly, need no training and
cannot be fooled by a classifier's blind spots. Shape is not a pixel statistic, so a small CNN
classifies it, from a colour-independent input (the distance of each pixel from the background colour)
so that it never learns colour shortcuts and scores shape equally on every colour pair.

Analytic part (`analyze`), on RGB in 0..255:
* background: per-channel median of the 2-pixel border, snapped to the nearest background colour;
* distance map: Euclidean RGB distance of each pixel from that border median; p97 = its 97th percentile;
* foreground mask: distance > max(0.5·p97, 35); no pixel above 35 means "no object" (every score wrong);
* foreground colour: per-channel median of the pixels with distance ≥ 0.75·p97 (the shape's inside,
  away from blurred edges), snapped to the nearest foreground colour;
* size: the larger side of the mask's bounding box (isolated pixels removed first) over the image's
  short side, "large" above `size_threshold` (0.52: the world draws 0.40 and 0.64 ± 8 %).

Shape part: the distance map divided by p97, cropped to a square of the image's short side centred on
the mask's centroid (so 32×32, 48×32 and 32×48 images all give the same view), resized to 32×32, into a
5-conv CNN (`ShapeCNN`) trained on generator images of all seven shapes with blur, noise and contrast
augmentation (`train_evaluator`). Like any classifier it always answers one of its classes: a blob is
scored as some shape (usually circle), and `predict` reports its softmax confidence.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from loralab.lab.world import BACKGROUNDS, COLOURS, PALETTE, SHAPES

log = logging.getLogger(__name__)

ATTRIBUTES = ("shape", "colour", "background", "size")
CNN_INPUT = 32
MIN_OBJECT_DISTANCE = 35.0
SIZE_THRESHOLD = 0.52



# ------------------------------------------------------------------------------------------ analytic
def _palette(names: Sequence[str], device: torch.device) -> torch.Tensor:
    return torch.tensor([PALETTE[n] for n in names], dtype=torch.float32, device=device)


def _snap(rgb: torch.Tensor, names: Sequence[str]) -> list[str]:
    """Nearest palette name (Euclidean RGB) for each row of `rgb` (B, 3)."""
    pal = _palette(names, rgb.device)
    idx = torch.cdist(rgb.float(), pal).argmin(1)
    return [names[int(i)] for i in idx]


def border_pixels(x: torch.Tensor, width: int = 2) -> torch.Tensor:
    """The `width`-pixel frame of (B, C, H, W) images as (B, C, n)."""
    top, bottom = x[:, :, :width, :], x[:, :, -width:, :]
    left, right = x[:, :, width:-width, :width], x[:, :, width:-width, -width:]
    return torch.cat([t.flatten(2) for t in (top, bottom, left, right)], 2)


def _remove_isolated(mask: torch.Tensor) -> torch.Tensor:
    """Drop mask pixels with fewer than 2 mask neighbours (of 8): stray noise, not a shape's edge."""
    m = mask.float().unsqueeze(1)
    n = F.conv2d(m, torch.ones(1, 1, 3, 3, device=m.device), padding=1) - m
    return mask & (n.squeeze(1) >= 2)


@dataclass
class Analysis:
    """Per-image pixel statistics of a batch of one image size (see the module docstring)."""

    background_rgb: torch.Tensor  # (B, 3)
    foreground_rgb: torch.Tensor  # (B, 3), NaN where there is no object
    distance: torch.Tensor  # (B, H, W)
    p97: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B, H, W) bool
    extent: torch.Tensor  # (B,) bbox larger side / short side
    has_object: torch.Tensor  # (B,) bool


def analyze(x: torch.Tensor) -> Analysis:
    """Pixel statistics of (B, 3, H, W) RGB images in 0..255 (any float or uint8 dtype)."""
    x = x.float()
    b, _, h, w = x.shape
    bg = border_pixels(x).median(dim=2).values  # (B, 3)
    dist = (x - bg[:, :, None, None]).norm(dim=1)  # (B, H, W)
    p97 = torch.quantile(dist.flatten(1), 0.97, dim=1)
    thr = torch.clamp(0.5 * p97, min=MIN_OBJECT_DISTANCE)
    mask = dist > thr[:, None, None]
    has_object = mask.flatten(1).any(1)
    inner = (dist >= 0.75 * p97[:, None, None]) & mask
    pix = x.flatten(2).transpose(1, 2)  # (B, HW, 3)
    pix = torch.where(inner.flatten(1)[:, :, None], pix, torch.full_like(pix, float("nan")))
    fg = pix.nanmedian(dim=1).values  # (B, 3)
    clean = _remove_isolated(mask)
    clean = torch.where(clean.flatten(1).any(1)[:, None, None], clean, mask)
    rows, cols = clean.any(2), clean.any(1)  # (B, H), (B, W)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    big = 10**6

    def span(occ: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
        first = torch.where(occ, ar, big).min(1).values
        last = torch.where(occ, ar, -1).max(1).values
        return (last - first + 1).clamp(min=0)

    extent = torch.maximum(span(rows, ar_h), span(cols, ar_w)).float() / min(h, w)
    return Analysis(bg, fg, dist, p97, mask, extent, has_object)


def analytic_predict(a: Analysis, size_threshold: float = SIZE_THRESHOLD) -> list[dict]:
    """Background, colour and size from an `Analysis` (no CNN): one dict per image, with "shape" None
    and None everywhere but the background when no object is found."""
    bgs = _snap(a.background_rgb, BACKGROUNDS)
    fgs = _snap(torch.nan_to_num(a.foreground_rgb, nan=-1000.0), COLOURS)
    out = []
    for j in range(len(bgs)):
        ext = float(a.extent[j])
        if not bool(a.has_object[j]):
            out.append({"shape": None, "colour": None, "background": bgs[j], "size": None,
                        "shape_confidence": 0.0, "extent": 0.0})
        else:
            out.append({"shape": None, "colour": fgs[j], "background": bgs[j],
                        "size": "large" if ext > size_threshold else "small", "shape_confidence": 0.0,
                        "extent": ext})
    return out


def shape_input(a: Analysis, size: int = CNN_INPUT) -> torch.Tensor:
    """The CNN's input (B, 1, size, size): distance / p97, clipped to [0, 1.5], cropped to a square of the
    short side centred on the mask's centroid (clamped inside the image), resized to `size`."""
    d = (a.distance / a.p97.clamp(min=MIN_OBJECT_DISTANCE)[:, None, None]).clamp(0, 1.5)
    b, h, w = d.shape
    s = min(h, w)
    if h != w:
        m = a.mask.float()
        tot = m.sum((1, 2)).clamp(min=1)
        cy = (m.sum(2) * torch.arange(h, device=d.device)).sum(1) / tot
        cx = (m.sum(1) * torch.arange(w, device=d.device)).sum(1) / tot
        cy = torch.where(a.has_object, cy, torch.full_like(cy, (h - 1) / 2))
        cx = torch.where(a.has_object, cx, torch.full_like(cx, (w - 1) / 2))
        oy = (cy - (s - 1) / 2).round().long().clamp(0, h - s)
        ox = (cx - (s - 1) / 2).round().long().clamp(0, w - s)
        ar = torch.arange(s, device=d.device)
        rows = (oy[:, None] + ar)[:, :, None]
        cols = (ox[:, None] + ar)[:, None, :]
        d = d[torch.arange(b, device=d.device)[:, None, None], rows, cols]
    d = d.unsqueeze(1)
    if s != size:
        d = F.interpolate(d, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return d


# ------------------------------------------------------------------------------------------ CNN
class ShapeCNN(nn.Module):
    """5 conv layers (32-32 / 64-64 / 128, BatchNorm, ReLU, three 2× poolings) and an MLP, on 32×32."""

    def __init__(self, n_classes: int = len(SHAPES), width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(1, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(inplace=True),
                                  nn.Dropout(0.2), nn.Linear(256, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ------------------------------------------------------------------------------------------ augment
def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of (B, C, H, W) with its own Gaussian `sigma` (B,) in pixels (0 = unchanged)."""
    b, c, h, w = x.shape
    r = 3
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma.clamp(min=1e-3)[:, None]) ** 2)  # (B, 2r+1)
    k = k / k.sum(1, keepdim=True)
    k = k.repeat_interleave(c, 0)  # (B*C, 2r+1)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What a generated image may look like: contrast towards the background (0.6-1), Gaussian blur
    (σ 0-1.3 px), Gaussian noise (σ 0-12), on (B, 3, H, W) RGB 0..255. Draws from `gen` (on x's device)."""
    b = x.shape[0]
    dev = x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen, device=dev)

    bg = border_pixels(x).median(dim=2).values[:, :, None, None]
    x = bg + (x - bg) * u(0.6, 1.0)[:, None, None, None]
    x = gaussian_blur(x, u(0.0, 1.3))
    x = x + torch.randn(x.shape, generator=gen, device=dev) * u(0.0, 12.0)[:, None, None, None]
    return x.clamp(0, 255)


# ------------------------------------------------------------------------------------------ inputs
def to_batches(images: Sequence | torch.Tensor | np.ndarray) -> list[tuple[list[int], torch.Tensor]]:
    """Group images by size: [(indices, (n, 3, H, W) float 0..255)]. Accepts a (B, 3, H, W) tensor
    (float 0..255 or uint8), a (B, H, W, 3) uint8 array, or a list of PIL images / HWC arrays /
    CHW tensors of mixed sizes."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return [(list(range(images.shape[0])), images.float())]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [(list(range(images.shape[0])), torch.from_numpy(images).permute(0, 3, 1, 2).float())]
    groups: dict[tuple[int, int], list[int]] = {}
    tensors: list[torch.Tensor] = []
    for i, im in enumerate(images):
        if isinstance(im, torch.Tensor):
            t = im.float() if im.shape[0] == 3 else im.permute(2, 0, 1).float()
        else:
            arr = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
            t = torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1)
        tensors.append(t)
        groups.setdefault((t.shape[1], t.shape[2]), []).append(i)
    return [(idx, torch.stack([tensors[i] for i in idx])) for idx in groups.values()]


# ------------------------------------------------------------------------------------------ evaluator
@dataclass
class Evaluator:
    """Scores lab images: analytic colour/background/size plus the shape CNN."""

    cnn: ShapeCNN
    size_threshold: float = SIZE_THRESHOLD
    shapes: tuple[str, ...] = SHAPES
    info: dict = field(default_factory=dict)  # how it was trained, its own accuracy

    @property
    def device(self) -> torch.device:
        return next(self.cnn.parameters()).device

    @torch.no_grad()
    def predict_tensor(self, x: torch.Tensor, batch: int = 2048) -> list[dict]:
        """Predictions for (B, 3, H, W) RGB 0..255 images of one size."""
        self.cnn.eval()
        out: list[dict] = []
        for i in range(0, x.shape[0], batch):
            xb = x[i : i + batch].to(self.device).float()
            a = analyze(xb)
            preds = analytic_predict(a, self.size_threshold)
            probs = self.cnn(shape_input(a)).float().softmax(1)
            conf, cls = probs.max(1)
            for j, p in enumerate(preds):
                if p["colour"] is not None:
                    p["shape"] = self.shapes[int(cls[j])]
                    p["shape_confidence"] = float(conf[j])
            out += preds
        return out

    def predict(self, images) -> list[dict]:
        """One dict per image: shape, colour, background, size (None when no object is found),
        shape_confidence (the CNN's softmax) and extent (bbox side / short side)."""
        preds: list[dict | None] = [None] * (len(images) if not hasattr(images, "shape") else images.shape[0])
        for idx, x in to_batches(images):
            for i, p in zip(idx, self.predict_tensor(x)):
                preds[i] = p
        return preds  # type: ignore[return-value]

    def score(self, images, expected: Sequence[dict], predictions: list[dict] | None = None) -> dict:
        """Accuracy per attribute (fractions in 0..1) of `images` against `expected` dicts (keys among
        shape, colour, background, size; missing keys are not scored), plus "all" (every expected key
        right) and "n". Pass `predictions` to reuse earlier `predict` output."""
        preds = predictions if predictions is not None else self.predict(images)
        if len(preds) != len(expected):
            raise ValueError(f"score: {len(preds)} images but {len(expected)} expected dicts")
        return accuracy(preds, expected)

    # ---------------------------------------------------------------- files
    def save(self, path: str | Path) -> None:
        """One safetensors file: the CNN's weights, and the thresholds and class names as metadata."""
        meta = {"shapes": json.dumps(list(self.shapes)), "size_threshold": str(self.size_threshold),
                "cnn_width": str(self.cnn.features[0].out_channels), "input_size": str(CNN_INPUT),
                "info": json.dumps(self.info)}
        state = {k: v.detach().cpu().contiguous() for k, v in self.cnn.state_dict().items()}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, str(tmp), metadata=meta)
        tmp.chmod(0o644)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Evaluator":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        shapes = tuple(json.loads(meta.get("shapes", json.dumps(list(SHAPES)))))
        cnn = ShapeCNN(len(shapes), int(meta.get("cnn_width", 32)))
        cnn.load_state_dict(load_file(str(path)))
        cnn.to(device).eval()
        return cls(cnn, float(meta.get("size_threshold", SIZE_THRESHOLD)), shapes,
                   json.loads(meta.get("info", "{}")))


def accuracy(preds: Sequence[dict], expected: Sequence[dict]) -> dict:
    """Per-attribute accuracy of prediction dicts against expected dicts, plus "all" and "n"."""
    out: dict = {"n": len(expected)}
    if not expected:
        return out
    keys = [k for k in ATTRIBUTES if k in expected[0]]
    right = {k: 0 for k in keys}
    all_right = 0
    for p, e in zip(preds, expected):
        ok = [p.get(k) == e[k] for k in keys]
        for k, o in zip(keys, ok):
            right[k] += o
        all_right += all(ok)
    out.update({k: right[k] / len(expected) for k in keys})
    out["all"] = all_right / len(expected)
    return out


def confusion(preds: Sequence[dict], expected: Sequence[dict], key: str = "shape") -> dict[str, int]:
    """Counts of 'expected→predicted' mistakes for one attribute, most frequent first."""
    c: dict[str, int] = {}
    for p, e in zip(preds, expected):
        if p.get(key) != e[key]:
            k = f"{e[key]}→{p.get(key)}"
            c[k] = c.get(k, 0) + 1
    return dict(sorted(c.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------------------ training
@dataclass
class EvaluatorTrainResult:
    evaluator: Evaluator
    steps: int
    seconds: float
    final_loss: float


def train_evaluator(
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device = "cpu",
    time_budget_s: float = 60.0,
    max_steps: int = 100_000,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 32,
    progress: Callable[[int, float, float], None] | None = None,
) -> EvaluatorTrainResult:
    """Train the shape CNN on generator images until `time_budget_s` or `max_steps`, whichever first.

    `batches`: per image size, (uint8 or float images (n, 3, H, W) in 0..255, shape labels (n,) as
    indices into `SHAPES`), already on `device` ideally. Each step picks one image size (in proportion
    to its count), draws a random batch, augments it (`augment`), and takes an AdamW step; the learning
    rate follows a cosine over the *time* budget (so stopping by time still ends at a low rate).
    `progress(step, elapsed_s, loss)` is called about every 5 s.
    """
    dev = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    cnn = ShapeCNN(len(SHAPES), width).to(dev)
    opt = torch.optim.AdamW(cnn.parameters(), lr=lr, weight_decay=1e-4)
    counts = torch.tensor([float(lbl.shape[0]) for _, lbl in batches])
    probs = counts / counts.sum()
    cpu_gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    step, last_print, ema_loss = 0, t0, float("nan")
    warm = 50
    cnn.train()
    while step < max_steps:
        elapsed = time.perf_counter() - t0
        if elapsed >= time_budget_s and step > 0:
            break
        frac = min(1.0, elapsed / max(time_budget_s, 1e-6))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        bi = int(torch.multinomial(probs, 1, generator=cpu_gen))
        imgs, labels = batches[bi]
        idx = torch.randint(0, labels.shape[0], (min(batch_size, labels.shape[0]),), generator=gen, device=dev)
        x = augment(imgs[idx].to(dev).float(), gen)
        inp = shape_input(analyze(x))
        if float(torch.rand((), generator=cpu_gen)) < 0.5:  # all shapes are left-right symmetric
            inp = inp.flip(3)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = cnn(inp)
        loss = F.cross_entropy(logits.float(), labels[idx].to(dev), label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0 or step == 1:
            lv = float(loss.detach())
            ema_loss = lv if math.isnan(ema_loss) else 0.9 * ema_loss + 0.1 * lv
        now = time.perf_counter()
        if progress is not None and now - last_print >= 5.0:
            progress(step, now - t0, ema_loss)
            last_print = now
    cnn.eval()
    secs = time.perf_counter() - t0
    ev = Evaluator(cnn, info={"train_steps": step, "train_seconds": round(secs, 1), "batch_size": batch_size})
    return EvaluatorTrainResult(ev, step, secs, ema_loss)
