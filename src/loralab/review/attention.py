"""`loralab attention`: an image and, for each word of its prompt, where that word's cross-attention falls.

    loralab attention --model base.safetensors --lora my_lora.safetensors "olis, red, blue background" --out maps/

For each word (`--words`, else each comma-separated tag of the prompt) the DAAM heat map
(`loralab.analyze.attention`: summed over heads, layers and denoising steps, multi-token words summed
over their tokens) is drawn over the image. With a LoRA, the base model and the LoRA draw the same seed,
one row each. Files in `--out`:

- `sheet.png`: rows = base model, then the LoRA; columns = the image, then one heat map per word;
- `<row>_<word>.png`: each map overlaid on its image, at the image's size (scaled up for small images);
- `<row>_image.png`: the images;
- `attention.json`: per row and word, the token pieces, the region's share of the image (DAAM's 0.4
  threshold) and the share of the word's attention mass inside each other word's region.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from loralab.analyze.attention import (
    DAAM_THRESHOLD,
    AttentionRecorder,
    WordTokens,
    heat_mask,
    normalize,
    overlap_matrix,
    prompt_tags,
    word_positions,
)
from loralab.errors import LoralabError
from loralab.io import atomic_write

log = logging.getLogger(__name__)

MIN_VIEW = 256  # small images (the lab's 32 px) are scaled up to this short side in the PNGs


@dataclass
class WordMaps:
    """One image and the heat maps of its words: `heats` (n_words, H, W), unnormalised DAAM sums."""

    image: Image.Image
    words: list[WordTokens]
    heats: torch.Tensor

    def figures(self) -> dict:
        """The JSON figures of this image (see the module docstring)."""
        names = [w.word for w in self.words]
        area = {w.word: round(float(heat_mask(h).float().mean()), 4) for w, h in zip(self.words, self.heats)}
        return {"words": {w.word: {"tokens": list(w.tokens), "region_share": area[w.word]} for w in self.words},
                "mass_inside": overlap_matrix(names, self.heats)}


def draw_with_maps(sm, prompt, words: Sequence[str], *, seed: int = 0, sampler: str = "") -> WordMaps:
    """Draw `prompt` (a `SamplePrompt`) on the `SamplingModel` `sm` as it is (LoRAs applied or not) and
    record the DAAM maps of `words` (every occurrence of each word in the prompt)."""
    positions = word_positions(sm.model.tokenizers[0], prompt.prompt, words, sm.max_token_length)
    return draw_with_positions(sm, prompt, positions, seed=seed, sampler=sampler)


def draw_with_positions(sm, prompt, positions: Sequence[WordTokens], *, seed: int = 0, sampler: str = "") -> WordMaps:
    """`draw_with_maps` for words already placed (`WordTokens`, e.g. a token piece fed by id)."""
    factor = sm.vae_factor
    latent_hw = (prompt.height // factor, prompt.width // factor)
    with AttentionRecorder(sm.model.unet, [list(positions)], latent_hw, cfg=prompt.scale > 1.0) as rec:
        image = sm.draw([prompt], seed=seed, sampler=sampler, batch_size=1)[0]
    return WordMaps(image, list(positions), rec.maps((prompt.height, prompt.width))[0])


# -------------------------------------------------------------------------------------------- pictures
def colourize(heat: torch.Tensor) -> np.ndarray:
    """A heat map (H, W) as RGB uint8 (H, W, 3): DAAM's min-max scale (`normalize`), matplotlib's 'jet'."""
    from matplotlib import colormaps

    norm = normalize(heat).numpy()
    return (colormaps["jet"](norm)[..., :3] * 255).round().astype(np.uint8)


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """The heat map blended over the image (alpha of the map), scaled up to `MIN_VIEW` for small images."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    mixed = (1 - alpha) * base + alpha * colourize(heat).astype(np.float32)
    return _view(Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8)))


def _view(image: Image.Image) -> Image.Image:
    scale = max(1, MIN_VIEW // min(image.size))
    return image if scale == 1 else image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def sheet(rows: Sequence[tuple[str, WordMaps]]) -> Image.Image:
    """Rows (label, maps): the image then each word's overlay; the words head the columns."""
    first = _view(rows[0][1].image)
    cw, ch = first.size
    label_w, head_h = 120, 24
    words = [w.word for w in rows[0][1].words]
    out = Image.new("RGB", (label_w + cw * (1 + len(words)), head_h + ch * len(rows)), "white")
    d = ImageDraw.Draw(out)
    for j, text in enumerate(["image", *words]):
        d.text((label_w + j * cw + 4, 6), text[:40], fill="black")
    for r, (label, wm) in enumerate(rows):
        y = head_h + r * ch
        d.text((4, y + ch // 2 - 6), label[:18], fill="black")
        out.paste(_view(wm.image).resize((cw, ch), Image.NEAREST), (label_w, y))
        for j, heat in enumerate(wm.heats):
            out.paste(overlay(wm.image, heat).resize((cw, ch), Image.NEAREST), (label_w + (j + 1) * cw, y))
    return out


def _safe(word: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in word).strip("_")[:40] or "word"


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# -------------------------------------------------------------------------------------------- command
def attention(model_path: str | Path, prompt, out_dir: str | Path, *, words: Sequence[str] = (),
              loras: Sequence = (), embeddings: Sequence = (), device: str = "", precision: str = "fp32", seed: int = 0, sampler: str = "",
              clip_skip: int = 0, max_token_length: int = 75, vae: str | None = None) -> dict:
    """What `loralab attention` runs: the rows (base model, then the LoRAs and `--embedding` files applied
    together, on the same seed), their sheet, overlays and `attention.json`; returns the JSON's content.
    Each row places the words as its own sampler reads them: with a pivotal LoRA's bundled token (or an
    embedding) loaded, the token is its own position(s), while the base row sees its CLIP pieces."""
    from loralab.review.generate import SamplingModel

    for path in embeddings:  # before the model loads
        if not Path(path).is_file():
            raise LoralabError(f"--embedding {path}: not a file")
    words = list(words) or prompt_tags(prompt.prompt)
    if not words:
        raise LoralabError("the prompt has no words to map; give a prompt or --words")
    sm = SamplingModel.load(model_path, device=device, precision=precision, vae=vae, clip_skip=clip_skip,
                            max_token_length=max_token_length)
    word_positions(sm.model.tokenizers[0], prompt.prompt, words, sm.max_token_length)  # bad words: before drawing
    prompt = replace(prompt, seed=seed if prompt.seed is None else prompt.seed)
    rows = [("base model", draw_with_maps(sm, prompt, words, sampler=sampler))]
    if loras or embeddings:
        try:
            sm.apply_all(loras, embeddings)
            label = " + ".join([Path(e).stem for e in embeddings] + [f"{s.path.stem}:{s.weight:g}" for s in loras])
            rows.append((label, draw_with_maps(sm, prompt, words, sampler=sampler)))
        finally:
            sm.remove()
    return write_outputs(rows, prompt, out_dir)


def write_outputs(rows: Sequence[tuple[str, WordMaps]], prompt, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"prompt": prompt.prompt, "seed": prompt.seed, "steps": prompt.steps, "cfg": prompt.scale,
              "threshold": DAAM_THRESHOLD, "rows": []}
    for r, (label, wm) in enumerate(rows):
        stem = "base" if r == 0 else f"lora{r if len(rows) > 2 else ''}"
        _save_png(_view(wm.image), out / f"{stem}_image.png")
        for w, heat in zip(wm.words, wm.heats):
            _save_png(overlay(wm.image, heat), out / f"{stem}_{_safe(w.word)}.png")
        result["rows"].append({"label": label, "file_stem": stem, **wm.figures()})
    _save_png(sheet(rows), out / "sheet.png")
    atomic_write(out / "attention.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    return result
