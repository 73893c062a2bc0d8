"""New tokens for the text encoders: textual-inversion vectors that a prompt calls by a word.

Used by pivotal tuning (`recipes/pivotal.py`: new tokens trained together with a LoRA) and by
`loralab generate` (an embedding file, or the `bundle_emb.*` embeddings inside a LoRA file).

How a new word works here (the result is A1111's: the word is replaced by its vectors):
- each text encoder's token-embedding module is wrapped once in `ExtendedEmbedding`: the base table is
  untouched and frozen; the new words' vectors are extra rows after it (ids 49408, 49409, ... for CLIP), one
  `nn.Parameter` [n_vectors, dim] per word, so only they train and nothing has to be restored after a step;
- the tokenizer is not changed either: `models/text.py` `tokenize` finds the registered words in a caption
  (whole words, any case) and puts their ids in place of the word (`caption_ids`); the rest of the caption
  is tokenized as before, so a caption without a new word gives exactly the ids it gave before;
- `clear_new_tokens` takes every new word off again (the base table comes back as it was).
kohya's `train_textual_inversion.py` adds `token_string`, `token_string1`, ... to the tokenizer and expands
the caption to them; the vectors that reach the text encoder are the same.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from loralab.errors import LoralabError

WORD = re.compile(r"[^\W_][\w]*")  # a token string: one word (letters, digits, "_"; not starting with "_")

# tokenizer -> {word (lower case): [ids]}; weak, so a tokenizer that is dropped takes its words with it
_REGISTRY: "weakref.WeakKeyDictionary[object, dict[str, list[int]]]" = weakref.WeakKeyDictionary()


class ExtendedEmbedding(nn.Module):
    """A token-embedding table with extra rows: ids below the base table's size read the base table, the
    ids after it read the new words' vectors (in the order the words were added)."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.words: list[str] = []
        self.vectors = nn.ParameterList()

    @property
    def num_base(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def num_embeddings(self) -> int:
        return self.num_base + sum(v.shape[0] for v in self.vectors)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table (base rows, then the new ones), for code that reads the embedding weights."""
        if not len(self.vectors):
            return self.base.weight
        return torch.cat([self.base.weight, *[v.to(self.base.weight.dtype) for v in self.vectors]])

    def add(self, word: str, vectors: torch.Tensor) -> list[int]:
        """Append `vectors` [n, dim] (fp32, trainable) for `word`; returns their ids."""
        if vectors.dim() != 2 or vectors.shape[1] != self.embedding_dim:
            raise LoralabError(f"embedding {word!r}: vectors of shape {tuple(vectors.shape)} do not fit a text "
                               f"encoder of width {self.embedding_dim}; the embedding was made for another model")
        start = self.num_embeddings
        param = nn.Parameter(vectors.detach().to(self.base.weight.device, torch.float32).clone())
        self.vectors.append(param)
        self.words.append(word)
        return list(range(start, start + vectors.shape[0]))

    def vectors_of(self, word: str) -> nn.Parameter:
        return self.vectors[self.words.index(word)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.num_base
        out = self.base(ids.clamp(max=n - 1))
        if not len(self.vectors):
            return out
        table = torch.cat(list(self.vectors)).to(out.dtype)
        rows = table[(ids - n).clamp(min=0, max=table.shape[0] - 1)]
        return torch.where((ids >= n).unsqueeze(-1), rows, out)


def _embeddings_owner(text_encoder: nn.Module) -> nn.Module:
    """The module that holds `token_embedding` (nested `text_model.embeddings` or flattened layouts)."""
    return getattr(text_encoder, "text_model", text_encoder).embeddings


def extended_embedding(text_encoder: nn.Module) -> ExtendedEmbedding:
    """The encoder's token embedding as an `ExtendedEmbedding` (wrapped on first use)."""
    owner = _embeddings_owner(text_encoder)
    if not isinstance(owner.token_embedding, ExtendedEmbedding):
        owner.token_embedding = ExtendedEmbedding(owner.token_embedding)
    return owner.token_embedding


def new_tokens(tokenizer) -> dict[str, list[int]]:
    """The new words of a tokenizer and their ids ({} when none)."""
    return _REGISTRY.get(tokenizer, {})


def token_pieces(tokenizer, text: str) -> list[str]:
    """How the base tokenizer reads `text` (e.g. "vexdef" -> ["vex", "def</w>"]), new words ignored."""
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)


def check_word(word: str, where: str = "token_string") -> str:
    """A new token must be one word; returned in lower case (CLIP reads prompts in lower case)."""
    if not WORD.fullmatch(word or ""):
        raise LoralabError(f"{where}: {word!r} is not one word; a new token is letters and digits without spaces "
                           "or punctuation (e.g. \"vexdef\")")
    return word.lower()


def add_new_token(tokenizers: Sequence, text_encoders: Sequence[nn.Module], word: str,
                  vectors: Sequence[torch.Tensor]) -> list[nn.Parameter]:
    """Add `word` with one [n, dim] tensor per text encoder (the same n); returns the new parameters.
    Every tokenizer gets the word with the same ids (SDXL's two tokenizers share CLIP's vocabulary size)."""
    word = check_word(word)
    if len(vectors) != len(text_encoders):
        raise LoralabError(f"embedding {word!r} has vectors for {len(vectors)} text encoder(s); the model has "
                           f"{len(text_encoders)}")
    if len({v.shape[0] for v in vectors}) != 1:
        raise LoralabError(f"embedding {word!r}: its text encoders' parts have different vector counts "
                           f"({', '.join(str(v.shape[0]) for v in vectors)})")
    if any(word in new_tokens(tok) for tok in tokenizers):
        raise LoralabError(f"the new token {word!r} is already loaded; give each embedding once")
    ids = None
    params = []
    for te, v in zip(text_encoders, vectors):
        emb = extended_embedding(te)
        got = emb.add(word, v)
        if ids is not None and got != ids:
            raise LoralabError(f"embedding {word!r}: the text encoders give it different ids ({ids} and {got}); "
                               "load embeddings through add_new_token only")
        ids = got
        params.append(emb.vectors_of(word))
    for tok in tokenizers:
        _REGISTRY.setdefault(tok, {})[word] = list(ids)
    return params


def clear_new_tokens(tokenizers: Sequence, text_encoders: Sequence[nn.Module]) -> None:
    """Take every new word off the tokenizers and encoders (the base embedding module comes back)."""
    for tok in tokenizers:
        _REGISTRY.pop(tok, None)
    for te in text_encoders:
        owner = _embeddings_owner(te)
        if isinstance(owner.token_embedding, ExtendedEmbedding):
            owner.token_embedding = owner.token_embedding.base


def caption_ids(tokenizer, caption: str) -> list[int] | None:
    """The ids (no BOS/EOS) of a caption that holds registered new words, each word replaced by its ids and
    the text around it tokenized as usual; None when the caption holds none (tokenize it as text)."""
    words = new_tokens(tokenizer)
    if not words:
        return None
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
                         + r")(?!\w)", re.IGNORECASE)
    parts = pattern.split(caption)
    if len(parts) == 1:
        return None
    ids: list[int] = []
    for i, part in enumerate(parts):
        if i % 2:
            ids += words[part.lower()]
        elif part.strip():
            ids += tokenizer(part, add_special_tokens=False).input_ids
    return ids


def text_ids(tokenizer, text: str) -> list[int]:
    """The content ids (no BOS/EOS) of `text` as the training and sampling path reads it: a registered new
    word is its own id(s) (`caption_ids`), the rest is tokenized as usual. The judging commands (attention
    maps, bleed, probe) place words with this, so a pivotal token is one position per vector, not its pieces."""
    ids = caption_ids(tokenizer, text)
    return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids) if ids is None else ids


def id_names(tokenizer, ids) -> list[str]:
    """`convert_ids_to_tokens` that also names the new words' ids: the word itself (one vector) or
    `word#0`, `word#1`, ... (several vectors)."""
    names = {}
    for word, w_ids in new_tokens(tokenizer).items():
        for i, t in enumerate(w_ids):
            names[t] = word if len(w_ids) == 1 else f"{word}#{i}"
    ids = list(ids)
    base = tokenizer.convert_ids_to_tokens([t for t in ids if t not in names])
    it = iter(base)
    return [names[t] if t in names else next(it) for t in ids]


def is_new_id(tokenizer, token_id: int) -> bool:
    """True when `token_id` belongs to a registered new word."""
    return any(token_id in w_ids for w_ids in new_tokens(tokenizer).values())


def init_vectors(tokenizer, table: torch.Tensor, init_word: str, n: int, *, token: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The starting vectors [n, dim] of a new token: the init word's token embeddings, cycled when the init
    word has fewer tokens than n (kohya `train_textual_inversion.py`); no init word: random normal rows
    scaled to the table's standard deviation (diffusers' advanced script). An init word with more tokens
    than n is an error that names its pieces."""
    if not init_word.strip():
        rnd = torch.randn(n, table.shape[1], generator=generator)
        return rnd * table.float().std().cpu()
    ids = init_word_ids(tokenizer, init_word, n, token=token)
    return torch.stack([table[ids[i % len(ids)]].detach().float().cpu() for i in range(n)])


def init_word_ids(tokenizer, init_word: str, n: int, *, token: str) -> list[int]:
    """The init word's token ids; a LoralabError naming its pieces when they are more than `n` vectors."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise LoralabError(f"init_word {init_word!r} for {token!r} has no tokens; give a word such as \"shape\"")
    if len(ids) > n:
        pieces = " + ".join(tokenizer.convert_ids_to_tokens(ids))
        raise LoralabError(f"init_word {init_word!r} for {token!r} is {len(ids)} tokens ({pieces}) but "
                           f"num_vectors_per_token = {n}: give a shorter init word, or num_vectors_per_token = "
                           f"{len(ids)} or more")
    return ids
