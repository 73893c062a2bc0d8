"""`loralab generate`: images from a base model with LoRAs at chosen weights, through the one sampler.

The guide's test loop ("the tag alone", "add that tag back", "does it still work at weight 0.8") as a
command: each prompt in kohya's line syntax (`prompt --n neg --w 512 --h 512 --d seed --s steps --l cfg
--ss sampler`), fixed seeds (`--d`, else seed + prompt index), the sampler code of training samples
(`train/sampling.py`), so an image here and a sample image of the same settings are the same picture.
Several LoRAs stack (each adds weight · its delta); weight 0 gives the base model's image.

Embeddings (textual inversion, pivotal tuning): a LoRA file with `bundle_emb.<token>.*` tensors adds its
tokens while it is applied (A1111's bundle rule: a token already loaded from an `--embedding` file is kept,
the bundled copy skipped), and `--embedding FILE` loads a separate embedding file whose name is its token
(`vexdef.safetensors` -> the word `vexdef`; A1111 `.pt`, kohya `emb_params`, SDXL `clip_l` / `clip_g`). The
embeddings do not depend on the LoRA weight (A1111 neither).

`SamplingModel` (a base model loaded for drawing, LoRAs applied and removed) is shared with `loralab review`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from loralab.errors import LoralabError

log = logging.getLogger(__name__)


def choose_threads(threads: int | None, device: str) -> int | None:
    """Torch CPU threads for the demo. None = automatic: on a CPU whose load average is already above one
    (other programs running), 1 thread; else torch's default. Why: this model's kernels are tiny, and when
    the cores are busy, torch's worker threads wait on each other and every step gets 10-20× slower
    (measured on 2 shared cores: 26 samples in 5.7 s with 1 thread, 102 s with 2), while on idle cores
    2 threads are only ~1.6× faster than 1."""
    import os

    if threads is not None or torch.device(device).type != "cpu":
        return threads
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return 1 if load > 1.0 else None


@dataclass
class LoraSpec:
    path: Path
    weight: float = 1.0


def parse_lora_arg(text: str) -> LoraSpec:
    """`FILE` or `FILE:WEIGHT` (weight 1.0 by default; a Windows drive letter is not a weight)."""
    m = re.fullmatch(r"(.+):([-+]?(?:\d+\.?\d*|\.\d+))", text)
    path, weight = (m.group(1), float(m.group(2))) if m else (text, 1.0)
    if not Path(path).is_file():
        raise LoralabError(f"--lora {text}: {path} is not a file")
    return LoraSpec(Path(path), weight)


@dataclass
class SamplingModel:
    """A base model on `device`, frozen, ready for the sampler; LoRAs come and go with `apply` / `remove`.

    `clip_skip` and `max_token_length` as in training (a LoRA trained with clip_skip 2 wants it here too)."""

    model: Any  # models.loader.BaseModel
    model_path: str
    device: torch.device
    dtype: torch.dtype
    clip_skip: int = 0
    max_token_length: int = 75
    networks: list = field(default_factory=list)
    tokens: list = field(default_factory=list)  # new tokens loaded (embeddings), in load order

    @classmethod
    def load(cls, model_path: str | Path, *, device: str = "", precision: str = "fp32", vae: str | None = None,
             v_parameterization: bool = False, clip_skip: int = 0, max_token_length: int = 75) -> "SamplingModel":
        from loralab.models.loader import load_base_model
        from loralab.train.run import move_frozen

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision not in ("fp32", "fp16", "bf16"):
            raise LoralabError(f"precision {precision!r}: one of fp32, fp16, bf16")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        model = load_base_model(model_path, vae=vae, v_parameterization=v_parameterization or None)
        for m in (model.unet, model.vae, *model.text_encoders):
            m.requires_grad_(False).eval()
            move_frozen(m, dev, dtype if m is model.unet else torch.float32)
        return cls(model, str(model_path), dev, dtype, clip_skip, max_token_length)

    @property
    def default_sampler(self) -> str:
        return "euler_a" if self.model.family == "sdxl" else "ddim"

    def apply(self, path: str | Path, weight: float = 1.0):
        """Load the LoRA file `path` onto the model at `weight`; returns the network (`set_multiplier`
        changes its weight). A file that does not fit the model is a LoralabError naming both. Embeddings
        bundled in the file are loaded with it; a file that holds only an embedding is loaded as one (None)."""
        from loralab.network.files import read_weights, split_bundle
        from loralab.network.lora import LoRANetwork

        m = self.model
        sd, bundled = split_bundle(read_weights(path))
        if not bundled and is_embedding_payload(sd):
            self.apply_embedding(path)  # an embedding file given as a LoRA
            return None
        for token, data in bundled.items():
            if token.lower() in self.tokens:
                log.info("%s: its bundled embedding %r is skipped: that token is already loaded", path, token)
                continue
            self._add_embedding(token, data, f"{path} (bundle_emb.{token})")
        if not sd:
            return None
        try:
            net = LoRANetwork.from_weights(sd, m.unet, m.text_encoders, m.family, multiplier=weight)
        except LoralabError as e:
            raise LoralabError(f"{path}: it does not fit the base model {self.model_path} ({m.family}); pick the "
                               f"base model it was trained on. Details: {e}") from None
        net.apply_to()
        net.to(self.device, dtype=torch.float32)
        net.eval()
        self.networks.append(net)
        return net

    def _add_embedding(self, token: str, data, where: str) -> None:
        from loralab.models.embeddings import add_new_token, check_word
        from loralab.network.files import embedding_parts

        m = self.model
        word = check_word(token, where)
        parts = embedding_parts(data, m.family, where)
        add_new_token(m.tokenizers, m.text_encoders, word, parts)
        self.tokens.append(word)
        log.info("embedding %r (%d vector(s)) from %s", word, parts[0].shape[0], where)

    def apply_embedding(self, path: str | Path) -> str:
        """Load a separate embedding file; its token is the file name without the suffix (A1111, ComfyUI).
        Returns the token."""
        from loralab.network.files import read_embedding_file

        path = Path(path)
        token = path.stem
        if token.lower() in self.tokens:
            raise LoralabError(f"--embedding {path}: the token {token!r} is already loaded; give it once")
        self._add_embedding(token, read_embedding_file(path), str(path))
        return token.lower()

    def apply_all(self, loras: Sequence["LoraSpec"], embeddings: Sequence[str | Path] = ()) -> None:
        """`apply_embedding` each `--embedding` file, then `apply` each `--lora` spec; a file that does not fit
        is a LoralabError starting with `--embedding` / `--lora`."""
        for path in embeddings:
            try:
                self.apply_embedding(path)
            except LoralabError as e:
                raise LoralabError(f"--embedding {e}") from None
        for spec in loras:
            try:
                self.apply(spec.path, spec.weight)
            except LoralabError as e:
                raise LoralabError(f"--lora {e}") from None
            log.info("LoRA %s at weight %s", spec.path.name, spec.weight)

    @property
    def vae_factor(self) -> int:
        from loralab.train.sampling import vae_scale_factor

        return vae_scale_factor(self.model.vae)

    @property
    def native_size(self) -> int:
        """The model's own image side: UNet sample_size × the VAE's factor (512 SD 1.x, 1024 SDXL, 32 lab)."""
        return self.model.unet.config.sample_size * self.vae_factor

    def remove(self) -> None:
        """Take every applied LoRA and embedding off the model (the base model's weights are untouched)."""
        from loralab.models.embeddings import clear_new_tokens

        while self.networks:
            self.networks.pop().restore()
        if self.tokens:
            clear_new_tokens(self.model.tokenizers, self.model.text_encoders)
            self.tokens.clear()

    def conditioning(self, texts: list[str]):
        from loralab.models.text import encode_captions, unet_text_conditioning

        m = self.model
        outputs = encode_captions(m.family, m.text_encoders, m.tokenizers, texts,
                                  max_token_length=self.max_token_length, clip_skip=self.clip_skip or None)
        hidden, added = unet_text_conditioning(m.family, outputs)
        return hidden.to(self.dtype), added

    def _common(self, sampler: str, seed: int) -> dict:
        m = self.model
        return dict(unet=m.unet, vae=m.vae, vae_scaling_factor=m.vae_scaling_factor, encode_prompt=self.conditioning,
                    scheduler_config=dict(m.noise_scheduler().config), device=self.device, dtype=self.dtype,
                    default_seed=seed, v_parameterization=m.v_parameterization,
                    sampler=sampler or self.default_sampler, eval_modules=list(self.networks),
                    clip_sample=getattr(m, "sample_clip", True))

    def save_images(self, prompts: Sequence, out_dir: str | Path, *, sampler: str = "", seed: int = 0,
                    file_stem: str = "gen") -> list[Path]:
        """`generate_samples` with the applied LoRAs: one PNG per prompt in `out_dir`."""
        from loralab.train.sampling import generate_samples

        return generate_samples(prompts=prompts, out_dir=out_dir, file_stem=file_stem, **self._common(sampler, seed))

    def draw(self, prompts: Sequence, *, sampler: str = "", seed: int = 0, batch_size: int = 8) -> list:
        """`draw_images` with the applied LoRAs: PIL images, several prompts per UNet call."""
        from loralab.train.sampling import draw_images

        return draw_images(prompts, batch_size=batch_size, **self._common(sampler, seed))


def is_embedding_payload(sd) -> bool:
    """A file of a textual-inversion embedding rather than a LoRA: no key names a module (`emb_params`,
    `clip_l` / `clip_g`, a diffusers `<token>` key), one tensor or SDXL's two."""
    keys = list(sd)
    return bool(keys) and all("." not in k for k in keys) and (len(keys) == 1 or set(keys) == {"clip_l", "clip_g"})


def generate(model_path: str | Path, prompts: Sequence, out_dir: str | Path, *, loras: Sequence[LoraSpec] = (),
             device: str = "", precision: str = "fp32", sampler: str = "", seed: int = 0,
             clip_skip: int = 0, max_token_length: int = 75, vae: str | None = None,
             v_parameterization: bool = False, embeddings: Sequence[str | Path] = (),
             file_stem: str = "gen") -> list[Path]:
    """Draw each prompt (`SamplePrompt`s) with the embeddings loaded and the LoRAs applied; returns the PNG
    paths in `out_dir`.
    `v_parameterization` for v-prediction models (SD 2.x 768-v) whose file does not say so."""
    for path in embeddings:  # before the model loads
        if not Path(path).is_file():
            raise LoralabError(f"--embedding {path}: not a file")
    sm = SamplingModel.load(model_path, device=device, precision=precision, vae=vae,
                            v_parameterization=v_parameterization, clip_skip=clip_skip,
                            max_token_length=max_token_length)
    try:
        sm.apply_all(loras, embeddings)
        return sm.save_images(prompts, out_dir, sampler=sampler, seed=seed, file_stem=file_stem)
    finally:
        sm.remove()
