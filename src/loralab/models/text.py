"""kohya's text encoding: max_token_length chunks and clip_skip (SD 1.x / 2.x), and SDXL's two encoders.

Facts from kohya-ss sd-scripts `library/strategy_base.py` (`TokenizeStrategy._get_input_ids`),
`library/strategy_sd.py` (`SdTextEncodingStrategy.encode_tokens`) and `library/strategy_sdxl.py`
(`SdxlTokenizeStrategy`, `SdxlTextEncodingStrategy`); the code is ours.

The loop sees two family-independent steps: `encode_captions` gives the encoders' outputs as kohya caches
them (what `data/text_encoder_cache.py` stores), and `unet_text_conditioning` turns those into the UNet's
`encoder_hidden_states` and (SDXL) `added_cond_kwargs`.

`weighted_captions` (A1111 attention syntax, `(tag:1.2)`): `parse_prompt_attention`, `tokenize_weighted` and
`apply_token_weights`, after kohya's `TokenizeStrategy._get_weighted_input_ids` and
`Sd/SdxlTextEncodingStrategy.encode_tokens_with_weights` (sd-scripts v0.10 / HEAD 48d368f).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import CLIPTokenizer

from loralab.errors import LoralabError
from loralab.models.embeddings import caption_ids

CHUNK = 77  # CLIP's context: BOS + 75 tokens + EOS
CHUNK_BODY = CHUNK - 2


def num_chunks(max_token_length: int | None) -> int:
    """kohya `--max_token_length`: None or 75 -> 1 chunk, 150 -> 2, 225 -> 3 (75 tokens each)."""
    if max_token_length is None:
        return 1
    if max_token_length not in (75, 150, 225):
        raise LoralabError(
            f"max_token_length={max_token_length} is not supported: use 75 (or leave it unset), 150 or 225 "
            "(kohya's values; each 75 tokens is one CLIP chunk)."
        )
    return max_token_length // CHUNK_BODY


def kohya_chunks(ids: torch.Tensor, n: int, pad_id: int, eos_id: int) -> torch.Tensor:
    """Cut ids (B, n*75+2) = BOS t1..t_{n*75} EOS/PAD into n chunks of 77, as kohya does.

    Rule: chunk c = [ids[0]] + ids[1+75c : 76+75c] + [ids[-1]] (the first BOS and the very last id).
    When the tokenizer pads with a token other than EOS (SD 2.x / SDXL TE2, pad id 0), two fixes follow:
    a chunk whose 76th id is neither EOS nor PAD (text runs to its end) gets EOS as its last id, and a chunk
    that starts with PAD (empty: BOS PAD ...) gets EOS as its second id. Returns (B, n, 77)."""
    chunks = []
    for c in range(n):
        body = ids[:, 1 + CHUNK_BODY * c : 1 + CHUNK_BODY * (c + 1)]
        chunk = torch.cat([ids[:, :1], body, ids[:, -1:]], dim=1).clone()
        if pad_id != eos_id:
            runs_to_end = (chunk[:, -2] != eos_id) & (chunk[:, -2] != pad_id)
            chunk[:, -1] = torch.where(runs_to_end, torch.full_like(chunk[:, -1], eos_id), chunk[:, -1])
            empty = chunk[:, 1] == pad_id
            chunk[:, 1] = torch.where(empty, torch.full_like(chunk[:, 1], eos_id), chunk[:, 1])
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


class TokenIds(tuple):
    """A caption given as CLIP token ids (no BOS/EOS) instead of text: for prompts that no text spells, such as
    one word piece alone (`vex` of `vexdef`: the text "vex" is the other token `vex</w>`). `tokenize` wraps it
    BOS ... EOS and pads it like a text caption."""


def with_new_tokens(tokenizer: CLIPTokenizer, caption):
    """A text caption that holds new tokens (pivotal tuning, a loaded embedding: `models/embeddings.py`) as
    `TokenIds`, each new word replaced by its ids; any other caption as it is."""
    if not isinstance(caption, str):
        return caption
    ids = caption_ids(tokenizer, caption)
    return caption if ids is None else TokenIds(ids)


def _text_ids(tokenizer: CLIPTokenizer, text: str) -> list[int]:
    """The ids of a piece of text without BOS/EOS, new tokens included."""
    ids = caption_ids(tokenizer, text)
    return ids if ids is not None else tokenizer(text, add_special_tokens=False, verbose=False).input_ids


def _ids_row(tokenizer: CLIPTokenizer, caption, length: int) -> list[int]:
    if isinstance(caption, str):
        return list(tokenizer(caption, padding="max_length", truncation=True, max_length=length).input_ids)
    body = list(caption)[:length - 2]
    row = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    return row + [tokenizer.pad_token_id] * (length - len(row))


def tokenize(tokenizer: CLIPTokenizer, captions: list, max_token_length: int | None = None) -> torch.Tensor:
    """Token ids (B, n*77) of captions for kohya's `--max_token_length` (n = 1, 2 or 3).

    n = 1: the usual BOS + 75 tokens + EOS, padded/truncated to 77. n > 1: the caption is tokenized to
    n*75 tokens between one BOS and one EOS, padded with the tokenizer's pad token and truncated, then cut
    into n chunks of 77, each wrapped BOS ... EOS/PAD (`kohya_chunks`). Chunk c lives at [:, 77c : 77(c+1)].
    A caption may be `TokenIds` (ids without BOS/EOS) instead of text; a text caption that holds new tokens
    (`models/embeddings.py`) gets their ids in place of the words."""
    n = num_chunks(max_token_length)
    length = CHUNK if n == 1 else n * CHUNK_BODY + 2
    captions = [with_new_tokens(tokenizer, c) for c in captions]
    if all(isinstance(c, str) for c in captions):
        ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=length,
                        return_tensors="pt").input_ids
    else:
        ids = torch.tensor([_ids_row(tokenizer, c, length) for c in captions], dtype=torch.long)
    if n == 1:
        return ids
    chunks = kohya_chunks(ids, n, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    return chunks.reshape(ids.shape[0], n * CHUNK)


def final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The encoder's final LayerNorm, for nested (`text_model.final_layer_norm`, transformers < 5.6 and
    CLIPTextModelWithProjection) and flattened (transformers >= 5.6 CLIPTextModel) layouts."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def encode_text(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """Encoder hidden states for the UNet, kohya SD 1.x/2.x rule: (B, n*75+2, D), i.e. (B, 77, D) for n = 1.

    Each 77-id chunk is encoded on its own ((B*n, 77), no attention mask, like kohya).
    clip_skip None or 1: the last hidden state (after final_layer_norm). clip_skip k > 1:
    final_layer_norm(hidden_states[-k]), i.e. the output of the k-th layer from the end, normalized.
    n > 1 (kohya `SdTextEncodingStrategy.encode_tokens`, matched exactly): the chunks' states are joined as
    [first chunk's BOS state] + [positions 1..75 of every chunk] + [last chunk's position 76], so the inner
    BOS/EOS states are dropped and the result has n*75+2 positions. kohya's SD 2.x branch has an extra
    "empty chunk" fix-up that compares a token id with the EOS *string* and never fires, so SD 2.x gets
    this same concatenation (and so do we)."""
    b, length = input_ids.shape
    if length % CHUNK:
        raise ValueError(f"input_ids length {length} is not a multiple of {CHUNK}")
    n = length // CHUNK
    ids = input_ids.reshape(b * n, CHUNK).to(next(text_encoder.parameters()).device)
    if clip_skip is None or clip_skip <= 1:
        states = text_encoder(ids)[0]
    else:
        out = text_encoder(ids, output_hidden_states=True, return_dict=True)
        if clip_skip >= len(out.hidden_states):
            raise LoralabError(
                f"clip_skip={clip_skip} is too large for a text encoder with {len(out.hidden_states) - 1} layers; "
                "use 1 or 2 (SD 1.x anime models use 2)."
            )
        states = final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    return join_chunks(states, b, n)


def join_chunks(states: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """(B*n, 77, D) chunk states -> (B, n*75+2, D) (kohya): [first chunk's BOS state] + [positions 1..75
    of every chunk] + [last chunk's position 76]; n = 1 is just a reshape to (B, 77, D)."""
    states = states.reshape(b, n * CHUNK, states.shape[-1])
    if n == 1:
        return states
    parts = [states[:, :1]]
    parts += [states[:, i : i + CHUNK_BODY] for i in range(1, n * CHUNK, CHUNK)]
    parts.append(states[:, -1:])
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------- SDXL


def pooled_at_first_eos(text_encoder: torch.nn.Module, last_hidden_state: torch.Tensor, input_ids: torch.Tensor,
                        eos_token_id: int) -> torch.Tensor:
    """SDXL's pooled text embedding (kohya `SdxlTextEncodingStrategy._pool_workaround`): the final-layer-normed
    state at the *first* EOS of each row, through the encoder's `text_projection`. A row without EOS pools
    position 0 (kohya). The same as transformers' `text_embeds` whenever EOS is the row's largest id."""
    index = (input_ids == eos_token_id).int().argmax(dim=1).to(last_hidden_state.device)
    pooled = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device), index]
    projection = text_encoder.text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden_state.dtype)


def encode_text_sdxl(text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor],
                     eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDXL's text outputs (kohya `SdxlTextEncodingStrategy._get_hidden_states_sdxl`, matched exactly):
    (hidden_state1, hidden_state2, pool2), the names kohya's `_te_outputs.npz` uses.

    - hidden_state1: TE1 (CLIP-L) `hidden_states[-2]`, the penultimate layer, *without* the final layer
      norm (kohya takes `hidden_states[11]` of the 12-layer CLIP-L, the same entry); (B, T, 768).
    - hidden_state2: TE2 (OpenCLIP bigG) `hidden_states[-2]`, also without the final layer norm; (B, T, 1280).
    - pool2: TE2's pooled embedding (`pooled_at_first_eos` of its last, normed, state); (B, 1280). With
      max_token_length chunks, the first chunk's pool (kohya `pool2[::n]`).
    Each 77-id chunk is encoded on its own and the states are joined as in `join_chunks` (T = n*75+2).
    `clip_skip` does not apply to SDXL (kohya warns and ignores it). The UNet gets cat(hidden1, hidden2)
    (2048 wide) as `encoder_hidden_states` and pool2 as `text_embeds` (`unet_text_conditioning`)."""
    ids1, ids2 = input_ids
    te1, te2 = text_encoders
    b, length = ids1.shape
    n = length // CHUNK
    out1 = te1(ids1.reshape(b * n, CHUNK).to(next(te1.parameters()).device), output_hidden_states=True, return_dict=True)
    flat2 = ids2.reshape(b * n, CHUNK).to(next(te2.parameters()).device)
    out2 = te2(flat2, output_hidden_states=True, return_dict=True)
    hidden1 = join_chunks(out1.hidden_states[-2], b, n)
    hidden2 = join_chunks(out2.hidden_states[-2], b, n)
    pool2 = pooled_at_first_eos(te2, out2.last_hidden_state, flat2, eos_token_id)[::n]
    return hidden1, hidden2, pool2


# ---------------------------------------------------------------------------------------------- any family


def encode_captions(family: str, text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence[CLIPTokenizer],
                    captions: list[str], *, max_token_length: int | None = None,
                    clip_skip: int | None = None, weighted: bool = False) -> tuple[torch.Tensor, ...]:
    """The text encoders' outputs for captions, as kohya caches them: `(hidden_state,)` for SD 1.x / 2.x
    (`encode_text` with clip_skip), `(hidden_state1, hidden_state2, pool2)` for SDXL (`encode_text_sdxl`;
    the bigG tokenizer pads with id 0: formats.md §4, kohya `SdxlTokenizeStrategy`).

    `weighted` (kohya `--weighted_captions`): captions are read as A1111 attention syntax and each token's
    hidden state is scaled by its weight (`encode_weighted_captions`). Without it `(tag:1.2)` is plain text."""
    if weighted:
        return encode_weighted_captions(family, text_encoders, tokenizers, captions,
                                        max_token_length=max_token_length, clip_skip=clip_skip)
    if family == "sdxl":
        ids = [tokenize(tok, captions, max_token_length) for tok in tokenizers]
        return encode_text_sdxl(text_encoders, ids, tokenizers[1].eos_token_id)
    ids = tokenize(tokenizers[0], captions, max_token_length)
    return (encode_text(text_encoders[0], ids, clip_skip),)


def unet_text_conditioning(family: str, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(encoder_hidden_states, added_cond_kwargs) for the UNet from `encode_captions` outputs. SDXL (kohya
    `SdxlNetworkTrainer.call_unet`): cat(hidden1, hidden2) on the feature axis, and `text_embeds` = pool2
    (the caller adds the per-image `time_ids`, `models/sdxl.py`). SD 1.x / 2.x: the hidden state and {}."""
    if family == "sdxl":
        hidden1, hidden2, pool2 = outputs
        return torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=2), {"text_embeds": pool2}
    return outputs[0], {}


# ---------------------------------------------------------------------------------------------- weighted captions

ROUND_BRACKET = 1.1  # (text): attention × 1.1
SQUARE_BRACKET = 1 / 1.1  # [text]: attention × 1/1.1 (a multiplication, as in A1111 and kohya)

# The pieces of A1111's attention syntax, tried in this order: an escaped bracket or backslash, a lone backslash,
# an opening bracket, ":<number>)" (a weight that closes a round bracket), a closing bracket, a run of plain
# text, a lone ":".
_ATTENTION_PIECE = re.compile(r"""
    \\[()\[\]\\] | \\
  | \( | \[
  | :([+-]?[.\d]+)\)
  | \) | \]
  | [^\\()\[\]:]+
  | :
""", re.VERBOSE)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A caption in A1111's attention syntax as (text, weight) runs (kohya `parse_prompt_attention`, same rules).

    - `(x)` multiplies the weight of x by 1.1, `[x]` by 1/1.1, `(x:1.3)` by 1.3; nesting multiplies
      (`((x))` = 1.21, `[(x:1.5)]` = 1.5/1.1). A bracket's factor applies to everything written since it opened.
    - `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters; a lone backslash is dropped.
    - Unbalanced: a `(` or `[` never closed applies its factor (1.1 or 1/1.1) to the rest of the caption; a
      `)`, `]` or `:1.2)` with nothing open to close stays as literal text.
    - kohya stops on a malformed number such as `(x:1.2.3)` (float() raises); here `:1.2.3)` is kept as text
      (so that `(` stays open).
    - Neighbouring runs with equal weights are merged; an empty caption is `[("", 1.0)]`.
    Weights are multiplied in A1111's order, so the floats are bit-identical to kohya's."""
    runs: list[list] = []  # [text, weight]
    open_round: list[int] = []  # index into runs where each open bracket started
    open_square: list[int] = []

    def scale_since(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION_PIECE.finditer(text):
        piece, number = m.group(0), m.group(1)
        weight = _float_or_none(number) if number is not None else None
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(runs))
        elif piece == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            scale_since(open_round.pop(), weight)
        elif piece == ")" and open_round:
            scale_since(open_round.pop(), ROUND_BRACKET)
        elif piece == "]" and open_square:
            scale_since(open_square.pop(), SQUARE_BRACKET)
        else:
            runs.append([piece, 1.0])
    for start in open_round:
        scale_since(start, ROUND_BRACKET)
    for start in open_square:
        scale_since(start, SQUARE_BRACKET)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(list(run))
    return [(t, w) for t, w in merged]


def _float_or_none(number: str) -> float | None:
    try:
        return float(number)
    except ValueError:
        return None


def tokenize_weighted(tokenizer: CLIPTokenizer, captions: list[str],
                      max_token_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, n*77) as `tokenize` gives them, and each token's weight (B, n*75+2, float32) aligned with
    the joined hidden states of `encode_text`/`encode_text_sdxl` (kohya `_get_weighted_input_ids`).

    Each run of `parse_prompt_attention` is tokenized on its own (no BOS/EOS) and its tokens get its weight;
    the tokens are truncated to n*75, wrapped BOS ... EOS, padded with the tokenizer's pad id and cut into
    kohya's chunks exactly like `tokenize`. BOS, EOS and padding weigh 1.0. A caption without attention
    syntax gives the same ids as `tokenize` and weights of 1.0."""
    n = num_chunks(max_token_length)
    length = CHUNK if n == 1 else n * CHUNK_BODY + 2
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    all_ids, all_weights = [], []
    for caption in captions:
        runs = parse_prompt_attention(caption)
        pieces = [_text_ids(tokenizer, t) for t, _ in runs]
        ids = [i for piece in pieces for i in piece][: length - 2]
        weights = [w for piece, (_, w) in zip(pieces, runs) for _ in piece][: length - 2]
        fill = length - 2 - len(ids)
        all_ids.append([bos, *ids, eos] + [pad] * fill)
        all_weights.append([1.0, *weights, 1.0] + [1.0] * fill)
    ids_t = torch.tensor(all_ids, dtype=torch.long)
    weights_t = torch.tensor(all_weights, dtype=torch.float32)
    if n > 1:
        ids_t = kohya_chunks(ids_t, n, pad_id=pad, eos_id=eos).reshape(len(captions), n * CHUNK)
    return ids_t, weights_t


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's hidden state times its weight: hidden'[b, t, :] = hidden[b, t, :] * w[b, t].

    This is kohya's training rule today (`SdTextEncodingStrategy.encode_tokens_with_weights`,
    `SdxlTextEncodingStrategy.encode_tokens_with_weights`, sd-scripts v0.10+): a plain product, no rescaling.
    sd-scripts up to v0.9.1 used `get_weighted_text_embeddings` instead, which then rescaled the whole caption
    by mean(hidden) / mean(hidden') to keep its mean; kohya no longer does that in training (its SD 1.x sample
    images still do). Computed in float32, returned in the hidden state's dtype; weights of 1.0 change nothing."""
    w = weights.to(device=hidden.device, dtype=torch.float32)
    return (hidden.float() * w.unsqueeze(-1)).to(hidden.dtype)


def encode_weighted_captions(family: str, text_encoders: Sequence[torch.nn.Module],
                             tokenizers: Sequence[CLIPTokenizer], captions: list[str], *,
                             max_token_length: int | None = None,
                             clip_skip: int | None = None) -> tuple[torch.Tensor, ...]:
    """`encode_captions` for weighted captions: the same outputs with every hidden state scaled by its token's
    weight (`tokenize_weighted`, `apply_token_weights`); chunks and clip_skip as in the normal path.

    SDXL: each encoder's tokens get their weights (hidden_state1 and hidden_state2); pool2 is not weighted
    (kohya pools TE2's unweighted last state at the first EOS of the parsed, bracket-free text)."""
    if family == "sdxl":
        (ids1, w1), (ids2, w2) = (tokenize_weighted(tok, captions, max_token_length) for tok in tokenizers)
        hidden1, hidden2, pool2 = encode_text_sdxl(text_encoders, [ids1, ids2], tokenizers[1].eos_token_id)
        return apply_token_weights(hidden1, w1), apply_token_weights(hidden2, w2), pool2
    ids, weights = tokenize_weighted(tokenizers[0], captions, max_token_length)
    return (apply_token_weights(encode_text(text_encoders[0], ids, clip_skip), weights),)
