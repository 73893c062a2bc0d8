"""Where each word acts: DAAM cross-attention heat maps (Tang et al., 2022, "What the DAAM").

    positions = word_positions(tokenizer, "olis, red, blue background", ["olis", "blue background"])
    with AttentionRecorder(unet, positions, latent_hw=(8, 8), cfg=True) as rec:
        ...  # one image through the sampler's denoising loop
    maps = rec.maps((32, 32))          # (n_words, 32, 32), one heat map per word

The DAAM rule (`AttentionRecorder`): in every cross-attention layer (`attn2` of each transformer block)
and at every denoising step, the attention probabilities softmax(QKᵀ/√d) of the conditional prompt are
taken at the word's token positions, summed over the heads and over the word's tokens, and added up
over the layers and steps after upsampling each layer's map to the latent grid:

    D_word(x, y) = Σ_steps Σ_layers Σ_heads Σ_{t ∈ tokens(word)} up(A_layer[head, :, t])(x, y)

Upsampling is linear, so the sum is kept per layer resolution and upsampled once at the end (bicubic,
as DAAM): memory is words × latent pixels per resolution, never steps × layers. With classifier-free
guidance only the conditional half of the batch is recorded.

`normalize` is DAAM's scale (min-max over the map) and `heat_mask` its binarisation (τ = 0.4);
`iou`, `mass_inside` and `overlap_matrix` are the figures the CLI and the bleeding report use.

The recorder goes through diffusers' attention-processor interface (`set_attn_processor`): the cross-
attention layers get `DaamProcessor`, which computes attention as diffusers' `AttnProcessor` does (the
explicit softmax is needed for the maps) and keeps the self-attention layers' processors as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loralab.errors import LoralabError

DAAM_THRESHOLD = 0.4  # DAAM's τ: a pixel is in a word's region where its min-max normalized map >= 0.4
CHUNK_TOKENS = 75  # CLIP: 75 content tokens per 77-token chunk


# ------------------------------------------------------------------------------------ words -> tokens
@dataclass(frozen=True)
class WordTokens:
    """A word (or tag) of the prompt and the positions of its tokens in the UNet's text conditioning."""

    word: str
    tokens: tuple[str, ...]  # the CLIP token pieces of the word
    positions: tuple[int, ...]  # every occurrence, all pieces


def _content_ids(tokenizer, text) -> list[int]:
    """The ids of a text without BOS/EOS; a `models.text.TokenIds` prompt is its own ids."""
    from loralab.models.embeddings import text_ids

    if not isinstance(text, str):
        return list(text)
    return text_ids(tokenizer, text)  # a loaded new word (pivotal tuning, --embedding) is its own id(s)


def word_positions(tokenizer, prompt: str, words: Sequence[str], max_token_length: int | None = None) -> list[WordTokens]:
    """Token positions of each word in the conditioning of `prompt`.

    CLIP tokenizes word by word (lower case, `</w>` ends a word), so a word's pieces are the same alone and
    in the prompt: each occurrence of the word's id sequence in the prompt's ids counts. Content token i
    sits at position 1 + i of the conditioning (after BOS; with `max_token_length` 150/225 the chunks are
    joined as kohya does, which keeps that rule). A word not in the prompt, or a prompt longer than the
    token limit, is a LoralabError. A new word loaded on the tokenizer (a pivotal LoRA's bundle, an
    `--embedding`) is read as the sampler reads it: its own id(s), one position per vector."""
    from loralab.models.embeddings import id_names

    limit = max_token_length or CHUNK_TOKENS
    ids = _content_ids(tokenizer, prompt)
    if len(ids) > limit:
        raise LoralabError(
            f"the prompt is {len(ids)} tokens long; the limit is {limit} (max_token_length), so the words after "
            f"token {limit} are cut off and have no attention. Shorten the prompt"
            + (" or use --max-token-length 150 or 225." if limit < 225 else "."))
    out = []
    for word in words:
        w_ids = _content_ids(tokenizer, word)
        if not w_ids:
            raise LoralabError(f"word {word!r} has no tokens")
        starts = [i for i in range(len(ids) - len(w_ids) + 1) if ids[i:i + len(w_ids)] == w_ids]
        if not starts:
            raise LoralabError(f"word {word!r} is not in the prompt {prompt!r}; its tags are: "
                               + ", ".join(prompt_tags(prompt)))
        pos = tuple(1 + s + j for s in starts for j in range(len(w_ids)))
        out.append(WordTokens(word, tuple(id_names(tokenizer, w_ids)), pos))
    return out


def prompt_tags(prompt: str) -> list[str]:
    """The comma-separated tags of a prompt (kohya's caption syntax), stripped, empty ones dropped."""
    return [t.strip() for t in prompt.split(",") if t.strip()]


# -------------------------------------------------------------------------------------------- recorder
class DaamProcessor:
    """A cross-attention processor that computes attention as diffusers' `AttnProcessor` and adds the
    probabilities at the recorder's token positions to its per-resolution sums."""

    def __init__(self, recorder: "AttentionRecorder") -> None:
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len = context.shape[0], context.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.recorder.record(probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def layer_grid(n_pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a layer with `n_pixels` query positions in a UNet whose latent is `latent_hw`:
    each down level halves (rounding up, as a stride-2 conv with padding 1), so h·w = n_pixels at one
    level."""
    h, w = latent_hw
    while h * w > n_pixels and h > 0:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != n_pixels:
        raise RuntimeError(f"cannot place {n_pixels} attention positions on a {latent_hw} latent")
    return h, w


class AttentionRecorder:
    """Installs `DaamProcessor` on the UNet's cross-attention layers (as a context manager) and sums the
    maps of the words at `positions` (one `WordTokens` list per image of the batch; all images must have
    the same number of words). `cfg`: the batch is [negatives, positives] and only positives count."""

    def __init__(self, unet, positions: Sequence[Sequence[WordTokens]], latent_hw: tuple[int, int],
                 cfg: bool) -> None:
        self.unet = unet
        self.latent_hw = tuple(latent_hw)
        self.cfg = cfg
        self.n_images = len(positions)
        n_words = {len(p) for p in positions}
        if len(n_words) != 1:
            raise ValueError("AttentionRecorder: every image needs the same number of words")
        self.n_words = n_words.pop()
        # index[i, k, t] = 1 where token position t belongs to word k of image i
        self._positions = positions
        self._index: torch.Tensor | None = None
        self.sums: dict[tuple[int, int], torch.Tensor] = {}  # (h, w) -> (n_images, n_words, h, w)
        self.calls = 0
        self._saved = None

    def _word_index(self, seq_len: int, device, dtype) -> torch.Tensor:
        if self._index is None or self._index.shape[-1] != seq_len:
            index = torch.zeros(self.n_images, self.n_words, seq_len)
            for i, words in enumerate(self._positions):
                for k, wt in enumerate(words):
                    for p in wt.positions:
                        if p >= seq_len:
                            raise LoralabError(f"word {wt.word!r} lies past the text conditioning ({seq_len} tokens)")
                        index[i, k, p] += 1.0
            self._index = index
        return self._index.to(device=device, dtype=dtype)

    def record(self, probs: torch.Tensor, heads: int) -> None:
        """probs: (batch·heads, pixels, tokens) of one cross-attention call."""
        bh, n_pix, seq = probs.shape
        batch = bh // heads
        probs = probs.view(batch, heads, n_pix, seq)
        if self.cfg:
            probs = probs[batch // 2:]
        if probs.shape[0] != self.n_images:
            raise RuntimeError(f"AttentionRecorder: {probs.shape[0]} images in the batch, {self.n_images} expected")
        summed = probs.float().sum(1)  # (n, pixels, tokens): heads summed
        index = self._word_index(seq, summed.device, summed.dtype)  # (n, words, tokens)
        per_word = torch.einsum("npt,nkt->nkp", summed, index)
        h, w = layer_grid(n_pix, self.latent_hw)
        grid = per_word.reshape(self.n_images, self.n_words, h, w)
        key = (h, w)
        self.sums[key] = self.sums[key] + grid if key in self.sums else grid.clone()
        self.calls += 1

    def maps(self, size: tuple[int, int]) -> torch.Tensor:
        """The summed maps upsampled (bicubic) to `size` = (height, width): (n_images, n_words, H, W), on
        the CPU, clamped at 0 (bicubic overshoot)."""
        if not self.sums:
            raise RuntimeError("AttentionRecorder: nothing was recorded (no cross-attention layer ran)")
        total = torch.zeros(self.n_images, self.n_words, *size)
        for grid in self.sums.values():
            total += F.interpolate(grid.cpu(), size=size, mode="bicubic", align_corners=False)
        return total.clamp_min(0)

    # ----------------------------------------------------------------- install / remove
    def __enter__(self) -> "AttentionRecorder":
        procs = dict(self.unet.attn_processors)
        self._saved = procs
        mine = DaamProcessor(self)
        new = {name: (mine if name.endswith("attn2.processor") else p) for name, p in procs.items()}
        if not any(name.endswith("attn2.processor") for name in procs):
            raise LoralabError("this UNet has no cross-attention layers (attn2): no attention maps")
        self.unet.set_attn_processor(new)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            self.unet.set_attn_processor(self._saved)
            self._saved = None


# -------------------------------------------------------------------------------------------- figures
def normalize(heat: torch.Tensor) -> torch.Tensor:
    """DAAM's display and threshold scale: (heat - min) / (max - min) over each map's pixels, in [0, 1]
    (all zeros for a flat map)."""
    lo = heat.amin(dim=(-2, -1), keepdim=True)
    span = heat.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (heat - lo) / span.clamp_min(1e-12), torch.zeros_like(heat))


def heat_mask(heat: torch.Tensor, threshold: float = DAAM_THRESHOLD) -> torch.Tensor:
    """DAAM's word region: normalize(heat) >= threshold (bool, same shape; all False for a flat map)."""
    norm = normalize(heat)
    flat = (heat.amax(dim=(-2, -1), keepdim=True) - heat.amin(dim=(-2, -1), keepdim=True)) <= 0
    return (norm >= threshold) & ~flat


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def mass_inside(heat: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of a map's mass that lies inside `mask`: Σ heat·mask / Σ heat (0 for an empty map)."""
    total = float(heat.sum())
    return 0.0 if total <= 0 else float((heat * mask).sum()) / total


def overlap_matrix(words: Sequence[str], heats: torch.Tensor, threshold: float = DAAM_THRESHOLD) -> dict:
    """For each word a, the share of a's normalized map mass (`normalize`: the floor of attention every
    pixel gives every token removed) inside each other word b's region (`heat_mask`): `{a: {b: share}}`.
    A high share both ways means two words act on the same pixels."""
    norms = normalize(heats)
    masks = [heat_mask(h, threshold) for h in heats]
    return {a: {b: round(mass_inside(norms[i], masks[j]), 4) for j, b in enumerate(words) if j != i}
            for i, a in enumerate(words)}
