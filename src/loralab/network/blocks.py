"""Block-wise training: kohya's UNet block numbering, per-block dims / alphas and learning-rate weights.

kohya-ss sd-scripts' `networks.lora` rules (`get_block_index`, `get_block_lr_weight`,
`get_block_dims_and_alphas`, `remove_block_dims_and_alphas`, `prepare_optimizer_params`; research/kohya.md
§4.4), written anew.

Numbering (`block_index`, from a module's kohya name):

* SD 1.x / 2.x, 25 blocks (diffusers names): `down_blocks_i_{resnets|attentions}_j` -> 1 + 3i + j,
  `down_blocks_i_downsamplers_0` -> 3i + 3; `mid_block` -> 12; `up_blocks_i_{resnets|attentions}_j` ->
  13 + 3i + j, `up_blocks_i_upsamplers_0` -> 13 + 3i + 2. Block k < 12 is IN{k:02}, 12 is MID, 13 + k is OUT{k:02}
  (A1111's numbering); IN00 (conv_in) never has a LoRA.
* SDXL, 23 blocks (LDM names): 0 time / label embedding, `input_blocks_n` -> 1 + n, `middle_block_n` -> 10 + n,
  `output_blocks_n` -> 13 + n, 22 `out`. networks.lora puts no LoRA in 0, 1 (input_blocks.0 = conv_in) or 22.

network_args (kohya's names and rules):

* `down_lr_weight` / `up_lr_weight`: 12 values (SDXL 9), or a preset `cosine`, `sine`, `linear`,
  `reverse_linear`, `zeros`, each with an optional `+base` added (`sine+.5`). `mid_lr_weight`: 1 value (SDXL 3).
  A side not given is 1.0 everywhere; an empty list entry is 0. kohya pads short lists with 1.0 and cuts long
  ones; loralab refuses a list of the wrong length (an SD 1.x list on SDXL would otherwise be cut silently).
* `block_lr_zero_threshold` (0): a weight <= it becomes 0. A block at weight 0 gets no modules at all (not
  trained, not saved). Block lr = lr x weight, one optimizer group per block ("unet_block<k>"), SDXL's
  extra blocks 0 and 22 at 1.0.
* `block_dims` / `block_alphas` (25 or 23 values; default network_dim / network_alpha) for the Linear and
  1x1 conv modules of each block; `conv_block_dims` / `conv_block_alphas` (default conv_dim / conv_alpha, or
  1 without conv_alpha) for the 3x3 convs, which are trained only when conv_block_dims or conv_dim is given.
  A dim of 0 leaves that block's modules out. These apply only when `block_dims` or an lr weight is given
  (kohya's rule): block_alphas / conv_block_* alone do nothing (a warning says so).
* The text encoders are untouched (network_dim / network_alpha, their own lr).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
BLOCK_KEYS = LR_WEIGHT_KEYS + ("block_lr_zero_threshold",) + DIM_KEYS
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
# family kind -> (values per down/up side, mid values, blocks in all)
COUNTS = {"sd": (12, 1, 25), "sdxl": (9, 3, 23)}
_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")

NUMBERING_HELP = """\
block-wise training (network_args, kohya's numbering; lists are comma-separated):
  SD 1.x / 2.x, 25 blocks: 0-11 IN00-IN11 (down_blocks: resnets/attentions j of level i -> IN(1+3i+j),
    its downsampler -> IN(3i+3); IN00 = conv_in has no LoRA), 12 MID (mid_block), 13-24 OUT00-OUT11
    (up_blocks level i, j -> OUT(3i+j), its upsampler -> OUT(3i+2))
    down_lr_weight 12 values, mid_lr_weight 1, up_lr_weight 12; block_dims / block_alphas /
    conv_block_dims / conv_block_alphas 25
  SDXL, 23 blocks: 0 time/label embedding, 1-9 input_blocks.0-8 (IN00-IN08), 10-12 middle_block.0-2,
    13-21 output_blocks.0-8 (OUT00-OUT08), 22 out (0, 1 and 22 have no LoRA)
    down_lr_weight 9 values, mid_lr_weight 3, up_lr_weight 9; block_dims etc. 23
  down_lr_weight / up_lr_weight presets: cosine, sine, linear, reverse_linear, zeros, plus an optional
    +base (e.g. up_lr_weight=cosine+.5); block_lr_zero_threshold (0): weights <= it become 0; a block at
    weight 0 is neither trained nor saved; block lr = unet lr x weight"""


def family_kind(family: str) -> str:
    """"sdxl" for SDXL, "sd" for SD 1.x / 2.x (which share the 25-block numbering)."""
    return "sdxl" if family == "sdxl" else "sd"


def block_names(family: str) -> list[str]:
    """The label of each block index: IN00.. MID.. OUT.. (SDXL: plus "emb" at 0 and "out" at 22)."""
    side, mid, _ = COUNTS[family_kind(family)]
    mids = ["MID"] if mid == 1 else [f"MID{i:02d}" for i in range(mid)]
    names = [f"IN{i:02d}" for i in range(side)] + mids + [f"OUT{i:02d}" for i in range(side)]
    return ["emb"] + names + ["out"] if family == "sdxl" else names


def block_index(lora_name: str, family: str) -> int:
    """kohya's `get_block_index`: the block of a UNet module from its kohya name; -1 when none applies
    (text-encoder modules, LyCORIS's extra top-level modules on SD 1.x / 2.x)."""
    if family == "sdxl":
        if not lora_name.startswith("lora_unet_"):
            return -1
        name = lora_name[len("lora_unet_"):]
        for prefix, base in (("time_embed_", 0), ("label_emb_", 0), ("out_", 22)):
            if name.startswith(prefix):
                return base
        for prefix, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
            if name.startswith(prefix):
                return base + int(name.split("_")[2])
        return -1
    m = _RE_UPDOWN.search(lora_name)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if side == "down" else 13 + idx
    return 12 if "mid_block_" in lora_name else -1


# ---------------------------------------------------------------------------------------- parsing


def _text(value: object) -> str:
    return str(value).strip().strip('"').strip("'").strip()


def _numbers(key: str, value: object, kind: type, empty_is_zero: bool = False) -> list:
    """A comma list of numbers; the error names the key and the entry."""
    out = []
    for entry in _text(value).split(","):
        entry = entry.strip()
        if not entry and empty_is_zero:
            out.append(kind(0))
            continue
        try:
            number = float(entry)
            if not math.isfinite(number) or (kind is int and number != int(number)):
                raise ValueError
        except ValueError:
            what = "whole numbers (ranks)" if kind is int else "numbers"
            raise LoralabError(f"network_args {key}: {entry!r} is not a number; give {what} separated by commas, "
                               f"e.g. {key}={'4,4,8' if kind is int else '1,0.5,0'}") from None
        if number < 0 and key in DIM_KEYS[::2]:  # block_dims, conv_block_dims
            raise LoralabError(f"network_args {key}: {entry} is negative; a rank is 0 (no module) or more")
        out.append(kind(number))
    return out


def lr_preset(key: str, text: str, n: int) -> list[float]:
    """kohya's presets for down/up_lr_weight over `n` blocks (i = 0..n-1, shallow to deep for down):
    sine sin(π/2 · i/(n-1)), cosine the same reversed, linear i/(n-1), reverse_linear reversed, zeros 0;
    `name+base` adds base to each."""
    name, _, base_text = text.partition("+")
    try:
        base = float(base_text) if base_text else 0.0
    except ValueError:
        raise LoralabError(f"network_args {key}={text}: {base_text!r} after '+' is not a number "
                           "(e.g. sine+.5)") from None
    ramp = [i / (n - 1) for i in range(n)]
    values = {"sine": [math.sin(math.pi * r / 2) for r in ramp], "linear": ramp, "zeros": [0.0] * n}
    values["cosine"] = values["sine"][::-1]
    values["reverse_linear"] = ramp[::-1]
    if name not in values:
        raise LoralabError(f"network_args {key}={text}: unknown preset {name!r}; use {', '.join(LR_PRESETS)} "
                           "(optionally +base, e.g. sine+.5) or a list of numbers separated by commas")
    return [v + base for v in values[name]]


def _counts_text(key: str, kinds: list[str]) -> str:
    return " or ".join(f"{_expected(key, k)} ({'SDXL' if k == 'sdxl' else 'SD 1.x/2.x'})" for k in kinds)


def _expected(key: str, kind: str) -> int:
    side, mid, total = COUNTS[kind]
    return {"down_lr_weight": side, "up_lr_weight": side, "mid_lr_weight": mid}.get(key, total)


def _parsed(key: str, value: object, kind: str | None) -> list:
    """One block key's values, with its length checked against `kind` ("sd", "sdxl"; None: either)."""
    text = _text(value)
    kinds = [kind] if kind else list(COUNTS)
    if key in ("down_lr_weight", "up_lr_weight") and "," not in text and text.split("+")[0] in LR_PRESETS:
        return lr_preset(key, text, _expected(key, kind or "sd"))
    if key in ("down_lr_weight", "up_lr_weight") and "," not in text and not _is_number(text):
        lr_preset(key, text, 2)  # raises: an unknown preset
    values = _numbers(key, text, int if key in ("block_dims", "conv_block_dims") else float,
                      empty_is_zero=key in LR_WEIGHT_KEYS)
    if len(values) not in [_expected(key, k) for k in kinds]:
        raise LoralabError(f"network_args {key}: {len(values)} values, but this needs {_counts_text(key, kinds)}, "
                           "one per block (see `loralab train --help` for the numbering; kohya would pad or cut "
                           "the list)")
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def block_args(network_args: Mapping[str, object]) -> dict[str, str]:
    """The block keys among `network_args` (a dict), as given."""
    return {k: _text(v) for k, v in network_args.items() if k in BLOCK_KEYS}


def block_problems(args: Mapping[str, object], family: str | None = None) -> list[str]:
    """Every problem of the block keys in `args`, each naming its key; lengths are checked against the
    family when known (before the model loads, from its key names), else against SD 1.x/2.x or SDXL."""
    kind = family_kind(family) if family else None
    problems = []
    for key, value in args.items():
        if key not in BLOCK_KEYS:
            continue
        try:
            if key == "block_lr_zero_threshold":
                if not _is_number(_text(value)) or not math.isfinite(float(_text(value))):
                    raise LoralabError(f"network_args block_lr_zero_threshold: {_text(value)!r} is not a number "
                                       "(weights <= it become 0, e.g. 0.1)")
            else:
                _parsed(key, value, kind)
        except LoralabError as e:
            problems.append(str(e))
    if kind is None and not problems:
        fits = [_fits(k, v) for k, v in args.items() if k in BLOCK_KEYS and k != "block_lr_zero_threshold"]
        if fits and not set.intersection(*fits):
            problems.append("network_args " + ", ".join(k for k in args if k in BLOCK_KEYS and k != "block_lr_zero_threshold")
                            + ": their lengths are for different model families (SD 1.x/2.x: 12/1/12 lr weights, "
                              "25 dims; SDXL: 9/3/9, 23); see `loralab train --help`")
    return problems


def _fits(key: str, value: object) -> set[str]:
    """The family kinds whose length `value` has (a preset fits both)."""
    out = set()
    for kind in COUNTS:
        try:
            _parsed(key, value, kind)
        except LoralabError:
            continue
        out.add(kind)
    return out


# ---------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class BlockPlan:
    """Per block index: lr weights (None: kohya's block lr is off), (dim, alpha) of Linear / 1x1 modules and of
    3x3 convs (conv None: 3x3 convs not trained)."""

    family: str
    lr_weight: tuple[float, ...] | None
    dims: tuple[int, ...]
    alphas: tuple[float | None, ...]
    conv_dims: tuple[int, ...] | None
    conv_alphas: tuple[float | None, ...] | None

    def dim_alpha(self, lora_name: str, conv3x3: bool) -> tuple[int | None, float | None]:
        """(dim, alpha) of a UNet module (dim 0 or None: not created)."""
        idx = block_index(lora_name, self.family)
        if idx < 0:
            raise LoralabError(f"block-wise network_args: UNet module {lora_name} has no kohya block number; block "
                               "keys work with networks.lora's targets only")
        if conv3x3:
            return (self.conv_dims[idx], self.conv_alphas[idx]) if self.conv_dims is not None else (None, None)
        return self.dims[idx], self.alphas[idx]

    def weight(self, idx: int) -> float:
        return 1.0 if self.lr_weight is None or idx < 0 else self.lr_weight[idx]

    def describe(self) -> list[str]:
        """One line per block: its name, dims and lr weight (for logs and --dry-run)."""
        out = []
        for i, name in enumerate(block_names(self.family)):
            conv = f", conv dim {self.conv_dims[i]}" if self.conv_dims is not None else ""
            alpha = self.alphas[i]
            out.append(f"{i:2d} {name:<6} dim {self.dims[i]}, alpha {'dim' if alpha is None else f'{alpha:g}'}{conv}, "
                       f"lr x {self.weight(i):g}")
        return out


def lr_weights(args: Mapping[str, str], family: str) -> list[float] | None:
    """kohya's `get_block_lr_weight`: one weight per block, or None when no lr weight key is given."""
    if not any(k in args for k in LR_WEIGHT_KEYS):
        return None
    kind = family_kind(family)
    threshold = float(args.get("block_lr_zero_threshold", 0) or 0)
    parts = []
    for key in LR_WEIGHT_KEYS:
        values = _parsed(key, args[key], kind) if key in args else [1.0] * _expected(key, kind)
        parts += [w if key not in args or w > threshold else 0.0 for w in values]
    return [1.0] + parts + [1.0] if kind == "sdxl" else parts


def block_plan(args: Mapping[str, str], family: str, dim: int, alpha: float | None, conv_dim: int | None,
               conv_alpha: float | None) -> BlockPlan | None:
    """kohya's create_network block logic for `family`; None when neither block_dims nor an lr weight is given."""
    for problem in block_problems(args, family):
        raise LoralabError(problem)
    weights = lr_weights(args, family)
    if weights is None and "block_dims" not in args:
        ignored = [k for k in DIM_KEYS if k in args]
        if ignored:
            log.warning("network_args %s: used only together with block_dims or an lr weight (kohya's rule); "
                        "without them they have no effect", ", ".join(ignored))
        return None
    kind = family_kind(family)
    n = COUNTS[kind][2]
    dims = _parsed("block_dims", args["block_dims"], kind) if "block_dims" in args else [dim] * n
    alphas = _parsed("block_alphas", args["block_alphas"], kind) if "block_alphas" in args else [alpha] * n
    conv_dims = conv_alphas = None
    if "conv_block_dims" in args:
        conv_dims = _parsed("conv_block_dims", args["conv_block_dims"], kind)
        conv_alphas = (_parsed("conv_block_alphas", args["conv_block_alphas"], kind) if "conv_block_alphas" in args
                       else [1.0 if conv_alpha is None else conv_alpha] * n)
    elif conv_dim:
        conv_dims, conv_alphas = [conv_dim] * n, [conv_alpha] * n
    if weights is not None:  # kohya's remove_block_dims_and_alphas: blocks at weight 0 get no modules
        dims = [0 if w == 0 else d for d, w in zip(dims, weights)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, weights)]
    return BlockPlan(family, None if weights is None else tuple(weights), tuple(dims), tuple(alphas),
                     None if conv_dims is None else tuple(conv_dims),
                     None if conv_alphas is None else tuple(conv_alphas))
