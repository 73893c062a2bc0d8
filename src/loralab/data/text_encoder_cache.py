"""The text-encoder output cache (`cache_text_encoder_outputs`, `..._to_disk`): encode each caption once.

Only valid while the text encoders are frozen and an image's caption is the same every step, which the
config checks (`config.validate`): the text encoders are not trained, and caption shuffle, tag dropout and
wildcards are off (kohya refuses the same; research/kohya.md §1.3). Caption dropout is *handled*: the
empty caption "" is cached as well, and a step whose caption was dropped uses it (kohya refuses dropout
here; the result is the same as encoding "" each time).

The cache is keyed by the caption text a step trains with, so the training step processes captions
exactly as without the cache (same random draws) and then looks each one up.

Disk files follow kohya (`library/strategy_sdxl.py` `SdxlTextEncoderOutputsCachingStrategy`):
`<image stem>_te_outputs.npz` next to the image, with kohya's keys `hidden_state1`, `hidden_state2`,
`pool2` for SDXL (one image's arrays, float32, no batch axis), so kohya can read ours; SD 1.x / 2.x (which
kohya cannot cache) use `hidden_state`. We add `ll_caption` and `ll_encoders` (the text and an id of the
encoders that made it: base model, LoRA file, token length, dtype), and rebuild the file when either
changed. kohya's own files lack them and are rebuilt once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from loralab.data.transfer import to_device
from loralab.errors import LoralabError
from loralab.io import atomic_save_npz

log = logging.getLogger(__name__)

TE_NPZ_SUFFIX = "_te_outputs.npz"
OUTPUT_NAMES = {"sdxl": ("hidden_state1", "hidden_state2", "pool2")}
DEFAULT_OUTPUT_NAMES = ("hidden_state",)
CACHE_FORMAT = 1

EncodeFn = Callable[[list[str]], Sequence[torch.Tensor]]


def output_names(family: str) -> tuple[str, ...]:
    """The arrays one cached caption holds: kohya's names for SDXL, `hidden_state` otherwise."""
    return OUTPUT_NAMES.get(family, DEFAULT_OUTPUT_NAMES)


def te_outputs_npz_path(image_path: Path) -> Path:
    """kohya's file name: `<image stem>_te_outputs.npz` next to the image."""
    return image_path.with_name(image_path.stem + TE_NPZ_SUFFIX)


def encoders_id(*, model_source: str | Path, model_hash: str, network_weights: str | Path | None,
                max_token_length: int | None, dtype: torch.dtype, clip_skip: int | None = None,
                weighted_captions: bool = False) -> str:
    """A short id of everything that changes the encoders' outputs: the base model (its sha256, or for a
    diffusers folder the names, sizes and mtimes of its text_encoder*/ files), the LoRA file of
    `network_weights` (its sha256: its text-encoder part is applied), max_token_length, clip_skip, the
    compute dtype and weighted_captions (the id of an unweighted cache is the same as before that key existed)."""
    model = model_hash
    if not model:
        folder = Path(model_source)
        files = sorted(p for sub in folder.glob("text_encoder*") if sub.is_dir() for p in sub.iterdir() if p.is_file())
        model = json.dumps([[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    lora = _file_sha256(Path(network_weights)) if network_weights else ""
    parts = [CACHE_FORMAT, model, lora, max_token_length, clip_skip, str(dtype)] + (["weighted"] if weighted_captions else [])
    text = json.dumps(parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TextEncoderCache:
    """Encoder outputs by caption text (float32, CPU, no batch axis)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self._items: dict[str, tuple[torch.Tensor, ...]] = {}
        self.num_encoded = 0
        self.num_loaded = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, caption: str) -> bool:
        return caption in self._items

    def put(self, caption: str, outputs: Sequence[torch.Tensor]) -> None:
        self._items[caption] = tuple(outputs)

    def get(self, captions: Sequence[str], device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
        """The batched outputs (one tensor per name, batch axis first) of `captions`."""
        missing = [c for c in captions if c not in self._items]
        if missing:
            raise KeyError(f"caption not in the text-encoder cache: {missing[0]!r}; the caption changed after "
                           "caching (a caption option that varies per step is on?)")
        stacked = [torch.stack([self._items[c][i] for c in captions]) for i in range(len(self.names))]
        return tuple(t if device is None else to_device(t, device) for t in stacked)


def _load_valid(npz_path: Path, names: tuple[str, ...], caption: str, encoders: str) -> tuple[torch.Tensor, ...] | None:
    if not npz_path.is_file():
        return None
    try:
        with np.load(npz_path) as npz:
            data = {k: npz[k] for k in npz.files}
    except Exception as err:  # a half-written or foreign file is rebuilt, never trusted
        log.info("%s: unreadable text-encoder cache, rebuilding (%s)", npz_path, err)
        return None
    if str(data.get("ll_caption", "")) != caption or str(data.get("ll_encoders", "")) != encoders:
        return None
    if any(name not in data for name in names):
        return None
    return tuple(torch.from_numpy(data[name]).float() for name in names)


def _save(npz_path: Path, names: tuple[str, ...], outputs: Sequence[torch.Tensor], caption: str, encoders: str) -> None:
    arrays = {name: t.numpy() for name, t in zip(names, outputs)}
    arrays["ll_caption"] = np.array(caption)
    arrays["ll_encoders"] = np.array(encoders)
    try:
        atomic_save_npz(npz_path, arrays)
    except OSError as err:
        raise LoralabError(
            f"{npz_path}: cannot write the text-encoder cache next to the image ({err}); make the folder "
            "writable or set cache_text_encoder_outputs_to_disk = false") from err


def cache_text_encoder_outputs(
    items: Sequence[tuple[Path, str]],
    encode_fn: EncodeFn,
    *,
    names: tuple[str, ...],
    to_disk: bool,
    encoders: str,
    extra_captions: Sequence[str] = (),
    batch_size: int = 1,
    progress: bool = True,
) -> TextEncoderCache:
    """Encode the caption of every (image path, caption) in `items` once, plus `extra_captions` (e.g. ""
    for caption dropout; kept in memory only), and return the cache.

    `encode_fn(captions)` returns the encoders' outputs for a list of captions (one tensor per name in
    `names`, batch axis first), computed without gradients. With `to_disk`, an image's valid
    `<stem>_te_outputs.npz` (same caption, same `encoders` id) is read instead of encoding, and new outputs
    are written there atomically. A non-finite output raises LoralabError naming the image."""
    if batch_size < 1:
        raise LoralabError(f"text-encoder cache batch size {batch_size} must be at least 1")
    cache = TextEncoderCache(names)
    to_write: list[tuple[Path, str]] = []
    checked: set[Path] = set()
    for path, caption in items:
        if to_disk and path not in checked:
            checked.add(path)
            loaded = _load_valid(te_outputs_npz_path(path), names, caption, encoders)
            if loaded is None:
                to_write.append((path, caption))
            elif caption not in cache:
                cache.put(caption, loaded)
                cache.num_loaded += 1
    wanted = dict.fromkeys([caption for _, caption in items] + list(extra_captions))
    todo = [caption for caption in wanted if caption not in cache]
    with tqdm(total=len(todo), desc="caching text-encoder outputs", unit="caption",
              disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            with torch.no_grad():
                outputs = [t.detach().float().cpu() for t in encode_fn(chunk)]
            for i, caption in enumerate(chunk):
                row = tuple(t[i].clone() for t in outputs)
                if not all(torch.isfinite(t).all() for t in row):
                    where = next((str(p) for p, c in items if c == caption), "the empty caption")
                    raise LoralabError(f"{where}: the text encoders gave NaN/inf for its caption; check the base "
                                       "model, or use mixed_precision = \"bf16\" instead of \"fp16\"")
                cache.put(caption, row)
                cache.num_encoded += 1
            bar.update(len(chunk))
    for path, caption in to_write:
        _save(te_outputs_npz_path(path), names, [t[0] for t in cache.get([caption])], caption, encoders)
    log.info("text-encoder outputs: %d captions cached (%d encoded, %d read from disk)", len(cache),
             cache.num_encoded, cache.num_loaded)
    return cache
