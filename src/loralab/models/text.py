"""kohya's text encoding for SD 1.x / 2.x: max_token_length chunks and clip_skip.

Facts from kohya-ss sd-scripts `library/strategy_base.py` (`TokenizeStrategy._get_input_ids`) and
`library/strategy_sd.py` (`SdTextEncodingStrategy.encode_tokens`); the code is ours.
"""

from __future__ import annotations

import torch
from transformers import CLIPTokenizer

from loralab.errors import LoralabError

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


def tokenize(tokenizer: CLIPTokenizer, captions: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids (B, n*77) of captions for kohya's `--max_token_length` (n = 1, 2 or 3).

    n = 1: the usual BOS + 75 tokens + EOS, padded/truncated to 77. n > 1: the caption is tokenized to
    n*75 tokens between one BOS and one EOS, padded with the tokenizer's pad token and truncated, then cut
    into n chunks of 77, each wrapped BOS ... EOS/PAD (`kohya_chunks`). Chunk c lives at [:, 77c : 77(c+1)]."""
    n = num_chunks(max_token_length)
    length = CHUNK if n == 1 else n * CHUNK_BODY + 2
    ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids
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
    states = states.reshape(b, n * CHUNK, states.shape[-1])
    if n == 1:
        return states
    parts = [states[:, :1]]
    parts += [states[:, i : i + CHUNK_BODY] for i in range(1, n * CHUNK, CHUNK)]
    parts.append(states[:, -1:])
    return torch.cat(parts, dim=1)
