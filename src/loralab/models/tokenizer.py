"""The CLIP tokenizer, built offline from the vendored BPE vocabulary.

Stable Diffusion's text encoders (CLIP-L for SD 1.x and SDXL TE1, OpenCLIP-H for SD 2.x, OpenCLIP-bigG
for SDXL TE2) all use OpenAI CLIP's byte-pair vocabulary of 49,408 tokens. transformers ships no vocabulary
file, so we vendor `bpe_simple_vocab_16e6.txt.gz` (MIT, see `assets/CLIP_LICENSE.txt`) and build
`vocab.json`/`merges.txt` from it exactly as OpenAI's `SimpleTokenizer.__init__` does. Nothing is fetched.

Padding differs by encoder family: CLIP-L pads with `<|endoftext|>` (49407); OpenCLIP-trained encoders
(SD 2.x, SDXL TE2) pad with id 0, which is the token `"!"` (open_clip pads with zeros; the HF repos write
`"pad_token": "!"`; kohya sets `pad_token_id = 0` for SDXL TE2).
"""

from __future__ import annotations

import gzip
import logging
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MODEL_MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
PAD_CLIP_L = EOS  # SD 1.x, SDXL TE1
PAD_OPENCLIP = "!"  # SD 2.x, SDXL TE2: id 0
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges: 256 bytes + 256 "</w>" bytes + merges + 2 specials = 49,408


def vendored_vocab_path() -> Path:
    """Path of the vendored `bpe_simple_vocab_16e6.txt.gz` inside the installed package."""
    return Path(str(resources.files("loralab.models").joinpath("assets", VOCAB_FILE)))


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map: printable Latin-1 bytes map to themselves, the other
    bytes to chr(256 + n) in byte order. Token ids 0..255 are these characters in that order ("!" is 0)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_bpe_merges(path: Path) -> list[tuple[str, str]]:
    """The first 48,894 merges of the gz file (line 0 is a version header), as in OpenAI's SimpleTokenizer."""
    if not path.is_file():
        raise LoralabError(
            f"The CLIP vocabulary file is missing: {path}. It ships inside the loralab package "
            f"(src/loralab/models/assets/{VOCAB_FILE}); reinstall loralab (`pip install --force-reinstall loralab`, "
            "or `pip install -e .` in a checkout) to restore it."
        )
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise LoralabError(f"The CLIP vocabulary file {path} is unreadable ({e}); reinstall loralab to restore it.") from e
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES:
        raise LoralabError(f"The CLIP vocabulary file {path} is truncated ({len(merges)} merges); reinstall loralab.")
    return [tuple(m.split()) for m in merges]  # type: ignore[misc]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """token -> id: 256 byte characters, the same with "</w>", one token per merge, then BOS and EOS."""
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab)}


def clip_tokenizer(pad_token: str = PAD_CLIP_L, *, vocab_path: str | Path | None = None) -> CLIPTokenizer:
    """CLIP tokenizer built offline from the vendored BPE file (model_max_length 77).

    `pad_token`: `"<|endoftext|>"` for CLIP-L (SD 1.x, SDXL TE1), `"!"` (id 0) for OpenCLIP (SD 2.x, SDXL TE2).
    `vocab_path` overrides the vendored gz file (tests use it)."""
    merges = read_bpe_merges(Path(vocab_path) if vocab_path is not None else vendored_vocab_path())
    return CLIPTokenizer(
        vocab=clip_vocab(merges),
        merges=merges,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )


def has_tokenizer(folder: str | Path) -> bool:
    """Whether `folder` holds a saved tokenizer: tokenizer.json, or vocab.json + merges.txt."""
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A diffusers folder's own tokenizer: `folder/tokenizer/` (or `folder` itself when it holds one).

    model_max_length is set to 77 when the folder leaves it at transformers' default (1e30)."""
    folder = Path(folder)
    tok_dir = folder if has_tokenizer(folder) else folder / "tokenizer"
    if not has_tokenizer(tok_dir):
        raise LoralabError(
            f"No tokenizer in {folder}: expected tokenizer.json, or vocab.json and merges.txt, in {tok_dir}. "
            "Use clip_tokenizer() for the built-in CLIP vocabulary, or copy the model's tokenizer folder there."
        )
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    if tok.model_max_length > 10_000:
        tok.model_max_length = MODEL_MAX_LENGTH
    log.debug("tokenizer from %s (pad id %s)", tok_dir, tok.pad_token_id)
    return tok
