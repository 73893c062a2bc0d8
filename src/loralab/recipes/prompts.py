"""The slider / LECO prompt file (`prompts_file`): what a LoRA trained from prompts alone is trained on.

A TOML file of `[[prompts]]` tables (kohya_ss's LECO tab takes a TOML file), or LECO's YAML list (a
top-level list, or a `prompts:` list); JSON works as YAML does. Keys of an entry (p1atdev/LECO's
`PromptSettings`, with the sliders' names beside them):

    target         the prompt the LoRA is trained on (its prediction, LoRA on)      required
    positive       the concept erased or enhanced                                    default: target
    negative       the other end of a slider; LECO calls it `unconditional`         default: ""
    neutral        the base point of the target                                      default: negative
    action         "erase" (target → neutral − η·(positive − negative)) or
                   "enhance" (target → neutral + η·(positive − negative))           default: "erase"
    guidance_scale η                                                                  default: 1.0
    multiplier     the LoRA weight the entry is trained at                           default: 1.0
    bidirectional  also train at −multiplier towards the mirror target (ostris' slider: +w one end,
                   −w the other)                                                     default: false
    resolution     the side (or [width, height]) of the latents' image               default: the config's
    batch_size     latents per step                                                  default: 1

Top-level keys beside the entries (loralab's; TOML keys before the first `[[prompts]]`, or a YAML mapping
with a `prompts:` list):

    method           "train" (LECO / sliders: the LoRA is trained for max_train_steps) or "uce" (a LECO
                     erase written in closed form, no training steps: Unified Concept Editing, Gandikota
                     et al. 2023, `recipes/slider.py` uce_erase_weights; erase entries and anchors only)
                                                                                     default: "train"
    preserve_weight  "uce": λ, the weight of the kept texts (anchors, neutral prompts, "") against the
                     erased ones                                                     default: 1.0

A concept slider is `action = "enhance"`, `positive` / `negative` the two ends around `target` (=
`neutral`), `bidirectional = true`. An entry with `guidance_scale = 0` is pulled to ε(neutral): with
`neutral` = its own target it keeps its prompt as the base model has it, a preservation anchor beside an
erase (without `neutral`, LECO's default, the empty prompt, would pull it towards ε("") instead).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError

ACTIONS = ("erase", "enhance")
KEYS = ("target", "positive", "negative", "unconditional", "neutral", "action", "guidance_scale", "multiplier",
        "bidirectional", "resolution", "batch_size", "dynamic_resolution", "dynamic_crops")
EXAMPLE_LINE = ('target = "red circle", positive = "red circle, large", negative = "red circle, small", '
                'action = "enhance", bidirectional = true')


METHODS = ("train", "uce")
OPTION_KEYS = ("method", "preserve_weight")


@dataclass(frozen=True)
class PromptOptions:
    """The prompt file's top-level keys (see the module docstring)."""

    method: str = "train"
    preserve_weight: float = 1.0


@dataclass(frozen=True)
class SliderPrompt:
    """One entry of the prompt file, its defaults filled in."""

    target: str
    positive: str
    negative: str = ""
    neutral: str = ""
    action: str = "erase"
    guidance_scale: float = 1.0
    multiplier: float = 1.0
    bidirectional: bool = False
    resolution: tuple[int, int] | None = None
    batch_size: int = 1

    @property
    def sign(self) -> float:
        """+1 for enhance, −1 for erase: the target is neutral + sign·η·(positive − negative)."""
        return 1.0 if self.action == "enhance" else -1.0

    def directions(self) -> list[tuple[float, float]]:
        """(LoRA multiplier, sign of the target) of each pass of a step: one, or two when bidirectional."""
        first = (self.multiplier, self.sign)
        return [first, (-self.multiplier, -self.sign)] if self.bidirectional else [first]

    def texts(self) -> list[str]:
        return [self.target, self.positive, self.negative, self.neutral]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["resolution"] = list(self.resolution) if self.resolution else None
        return d


def read_prompts(path: str | Path) -> list[SliderPrompt]:
    """The entries of a prompt file; a `LoralabError` naming the file and the entry for every problem."""
    p = Path(path)
    where = f"prompts_file: {p}"
    if not p.is_file():
        raise LoralabError(f"{where} does not exist or is not a file")
    entries, _ = _load(p, where)
    if not entries:
        raise LoralabError(f"{where} holds no prompts; a slider / LECO run trains from them alone. Add [[prompts]] "
                           f"tables, e.g. {EXAMPLE_LINE}")
    return [_entry(e, f"{where}: prompt {i}") for i, e in enumerate(entries, 1)]


def read_prompt_options(path: str | Path) -> PromptOptions:
    """The prompt file's top-level keys, checked (read_prompts has checked the file itself)."""
    where = f"prompts_file: {path}"
    opts = _load(Path(path), where)[1]
    method = opts.get("method", "train")
    if method not in METHODS:
        raise LoralabError(f"{where}: method {method!r} is not accepted; use train or uce")
    weight = opts.get("preserve_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise LoralabError(f"{where}: preserve_weight must be a number above 0, got {weight!r}")
    return PromptOptions(method, float(weight))


def _load(p: Path, where: str) -> tuple[list, dict]:
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            doc: Any = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            doc = json.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            raise LoralabError(f"{where}: give a .toml ([[prompts]] tables), .yaml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as e:
        raise LoralabError(f"{where}: cannot be read: {e}") from None
    except Exception as e:  # yaml.YAMLError (yaml is imported only for YAML files)
        if type(e).__module__.startswith("yaml"):
            raise LoralabError(f"{where}: not valid YAML: {e}") from None
        raise
    if doc is None:
        return [], {}
    options = {}
    if isinstance(doc, dict):
        unknown = [k for k in doc if k != "prompts" and k not in OPTION_KEYS]
        if unknown:
            raise LoralabError(f"{where}: unknown top-level key {unknown[0]!r}; put each entry in a [[prompts]] table "
                               f"(top-level keys: {', '.join(OPTION_KEYS)})")
        options = {k: doc[k] for k in OPTION_KEYS if k in doc}
        doc = doc.get("prompts", [])
    if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
        raise LoralabError(f"{where}: expected a list of prompt entries (TOML [[prompts]] tables)")
    return doc, options


def _entry(e: dict, where: str) -> SliderPrompt:
    unknown = [k for k in e if k not in KEYS]
    if unknown:
        raise LoralabError(f"{where}: unknown key {unknown[0]!r}; accepted: {', '.join(KEYS)}")
    texts = {k: e.get(k) for k in ("target", "positive", "negative", "unconditional", "neutral")}
    for k, v in texts.items():
        if v is not None and not isinstance(v, str):
            raise LoralabError(f"{where}: {k} must be a text, got {v!r}")
    if not (texts["target"] or "").strip():
        raise LoralabError(f"{where}: target missing; give the prompt the LoRA is trained on")
    if texts["negative"] is not None and texts["unconditional"] is not None and texts["negative"] != texts["unconditional"]:
        raise LoralabError(f"{where}: negative and unconditional are the same key (LECO's name and the sliders'); "
                           "give one")
    negative = texts["negative"] if texts["negative"] is not None else texts["unconditional"] or ""
    action = e.get("action", "erase")
    if action not in ACTIONS:
        raise LoralabError(f"{where}: action {action!r} is not accepted; use erase or enhance")
    if e.get("dynamic_resolution") or e.get("dynamic_crops"):
        raise LoralabError(f"{where}: dynamic_resolution / dynamic_crops are not supported; give a fixed resolution")
    return SliderPrompt(
        target=texts["target"], positive=texts["positive"] if texts["positive"] is not None else texts["target"],
        negative=negative, neutral=texts["neutral"] if texts["neutral"] is not None else negative, action=action,
        guidance_scale=_number(e, "guidance_scale", 1.0, where), multiplier=_number(e, "multiplier", 1.0, where),
        bidirectional=_flag(e, "bidirectional", where), resolution=_resolution(e.get("resolution"), where),
        batch_size=_batch_size(e.get("batch_size", 1), where))


def _number(e: dict, key: str, default: float, where: str) -> float:
    v = e.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise LoralabError(f"{where}: {key} must be a number, got {v!r}")
    if key == "multiplier" and v == 0:
        raise LoralabError(f"{where}: multiplier 0 trains nothing (the LoRA is off); use e.g. 1.0")
    if key == "guidance_scale" and v < 0:
        raise LoralabError(f"{where}: guidance_scale must be 0 or more (action says the direction), got {v}")
    return float(v)


def _flag(e: dict, key: str, where: str) -> bool:
    v = e.get(key, False)
    if not isinstance(v, bool):
        raise LoralabError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def _resolution(v: Any, where: str) -> tuple[int, int] | None:
    if v is None:
        return None
    wh = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, list) else ()
    if len(wh) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 and x % 8 == 0 for x in wh):
        raise LoralabError(f"{where}: resolution must be a side or [width, height], positive multiples of 8, got {v!r}")
    return wh  # type: ignore[return-value]


def _batch_size(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise LoralabError(f"{where}: batch_size must be an integer of at least 1, got {v!r}")
    return v
