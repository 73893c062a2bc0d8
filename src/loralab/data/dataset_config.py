"""sd-scripts' `dataset_config`: a TOML (or JSON) file of `[general]`, `[[datasets]]` and `[[datasets.subsets]]`.

    [general]                      # keys for every dataset and subset
    caption_extension = ".txt"
    [[datasets]]                   # one resolution, batch size and bucket setting
    resolution = 512
    batch_size = 4
      [[datasets.subsets]]         # one image folder (the images directly in it)
      image_dir = "/data/chara"
      num_repeats = 10             # the folder name does not count: "10_chara" is not 10 repeats here
      class_tokens = "sks girl"    # the caption of an image without a caption file
      [[datasets.subsets]]
      image_dir = "/data/reg"
      is_reg = true

Keys and precedence are sd-scripts' (`library/config_util.py`): a subset's value is the first one set among
the subset, its dataset, `[general]`, the training config (`train_batch_size` for `batch_size`), kohya's
default; a dataset's value the first among the dataset, `[general]`, the training config, the default.
Where each key may be written (kohya's schema):
- `DATASET_KEYS`: in `[[datasets]]` or `[general]` (resolution, batch size, buckets, validation split);
- `SUBSET_KEYS`: anywhere (repeats, captions, augmentation);
- `SUBSET_ONLY_KEYS`: in `[[datasets.subsets]]` only (image_dir, is_reg, alpha_mask, conditioning_data_dir).
Relative `image_dir` (and `conditioning_data_dir`) paths are read from the current folder, as sd-scripts reads them.
Loss masks (`data/masks.py`): `alpha_mask = true` (the subset's own, else the training config's), or
`conditioning_data_dir = "<folder of masks named like the images>"`, which needs masked_loss = true in the
training config (sd-scripts' rule); masked_loss with no subset giving masks is refused.

Differences from sd-scripts: every problem of the file (unknown keys, with the close key names; values of
the wrong type or range; a missing folder; keys loralab does not implement) is collected and reported in
one message, each with its place (`[[datasets]] #2 subset #1`: numbers count from 1 in file order).
Fine-tuning subsets (`metadata_file`) are refused with what to use instead; a `conditioning_data_dir`
subset is a DreamBooth subset with masks (sd-scripts' ControlNet subset, without its limits: is_reg and
mixing with other subsets are allowed). `cache_info` and `custom_attributes` are accepted without effect (the scan reads only
image headers; only custom sd-scripts dataset code reads custom attributes). No torch here: `dataset check`
reads a dataset_config the way training does.
"""

from __future__ import annotations

import difflib
import json
import logging
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.data.augment import cache_conflict
from loralab.data.captions import CaptionOptions
from loralab.data.dataset import Subset, scan_subset
from loralab.data.masks import NO_SUBSET_MASKS, attach_masks
from loralab.errors import LoralabError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- key tables


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise ValueError("expected true or false")


def _int(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise ValueError("expected a whole number")


def _number(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise ValueError("expected a number")


def _str(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise ValueError("expected a string in quotes")


def _resolution(v: Any) -> tuple[int, int]:
    """kohya: one size (512) or [width, height]."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return v[0], v[1]
    raise ValueError("expected a size such as 512 or [width, height] such as [768, 512]")


def _pair(v: Any) -> tuple[float, float]:
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return float(v[0]), float(v[1])
    raise ValueError("expected two numbers such as [2.0, 4.0]")


def _table(v: Any) -> dict:
    if isinstance(v, dict):
        return v
    raise ValueError("expected a table")


Kind = Callable[[Any], Any]

# [[datasets]] or [general] (kohya DATASET_ASCENDABLE_SCHEMA)
DATASET_KEYS: dict[str, Kind] = {
    "batch_size": _int, "resolution": _resolution, "enable_bucket": _bool, "min_bucket_reso": _int,
    "max_bucket_reso": _int, "bucket_reso_steps": _int, "bucket_no_upscale": _bool, "validation_seed": _int,
    "validation_split": _number, "network_multiplier": _number, "resize_interpolation": _str,
}
# anywhere (kohya SUBSET_ASCENDABLE + DreamBooth + caption-dropout schemas)
SUBSET_KEYS: dict[str, Kind] = {
    "num_repeats": _int, "shuffle_caption": _bool, "caption_separator": _str, "keep_tokens": _int,
    "keep_tokens_separator": _str, "secondary_separator": _str, "enable_wildcard": _bool, "color_aug": _bool,
    "flip_aug": _bool, "face_crop_aug_range": _pair, "random_crop": _bool, "caption_prefix": _str,
    "caption_suffix": _str, "token_warmup_min": _int, "token_warmup_step": _number, "custom_attributes": _table,
    "resize_interpolation": _str, "caption_dropout_rate": _number, "caption_dropout_every_n_epochs": _int,
    "caption_tag_dropout_rate": _number, "caption_extension": _str, "class_tokens": _str, "cache_info": _bool,
}
# [[datasets.subsets]] only (kohya DB_SUBSET_DISTINCT_SCHEMA)
SUBSET_ONLY_KEYS: dict[str, Kind] = {"image_dir": _str, "is_reg": _bool, "alpha_mask": _bool,
                                     "conditioning_data_dir": _str}  # kohya CN_SUBSET_DISTINCT_SCHEMA

# kohya's defaults (its *Params dataclasses and argparse), for keys the training config does not have
KOHYA_DEFAULTS: dict[str, Any] = {
    "batch_size": 1, "resolution": (512, 512), "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
    "bucket_reso_steps": 64, "bucket_no_upscale": False, "validation_seed": 0, "validation_split": 0.0,
    "network_multiplier": 1.0, "resize_interpolation": None,
    "num_repeats": 1, "shuffle_caption": False, "caption_separator": ",", "keep_tokens": 0,
    "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False, "color_aug": False,
    "flip_aug": False, "face_crop_aug_range": None, "random_crop": False, "caption_prefix": None, "caption_suffix": None,
    "token_warmup_min": 1, "token_warmup_step": 0.0, "custom_attributes": None, "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0, "caption_extension": ".caption",
    "class_tokens": None, "cache_info": False, "image_dir": None, "is_reg": False, "alpha_mask": False,
    "conditioning_data_dir": None,
}
# the training config's name of a dataset_config key, where it differs (kohya ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME)
TRAINING_NAMES = {"batch_size": "train_batch_size"}
# what a user means by a training-config name written in a dataset_config
RENAMED = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats", "train_data_dir": "image_dir",
           "reg_data_dir": "image_dir with is_reg = true", "caption_extention": "caption_extension"}

NOT_IMPLEMENTED = "not implemented in loralab yet"
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {  # key: (is the value a request?, what to say)
    "network_multiplier": (lambda v: v != 1.0, f"{NOT_IMPLEMENTED}; remove it or set it to 1.0"),
    "face_crop_aug_range": (lambda v: True, "face_crop_aug_range is not supported; remove the key"),
    "resize_interpolation": (lambda v: True, "only kohya's default (area down, lanczos up) is supported; remove the key"),
}
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": (lambda v: v >= 1, "must be at least 1"),
    "min_bucket_reso": (lambda v: v >= 1, "must be at least 1"),
    "max_bucket_reso": (lambda v: v >= 1, "must be at least 1"),
    "bucket_reso_steps": (lambda v: v >= 1, "must be at least 1"),
    "resolution": (lambda v: min(v) > 0 and v[0] % 8 == 0 and v[1] % 8 == 0, "must be positive multiples of 8"),
    "validation_split": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "keep_tokens": (lambda v: v >= 0, "must be 0 or more"),
    "caption_dropout_rate": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "caption_tag_dropout_rate": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "caption_dropout_every_n_epochs": (lambda v: v >= 0, "must be 0 or more"),
    "token_warmup_min": (lambda v: v >= 0, "must be 0 or more"),
    "token_warmup_step": (lambda v: v >= 0, "must be 0 or more"),
    "caption_extension": (lambda v: v != "", "must not be empty (e.g. \".txt\")"),
}
_OTHER_SUBSETS = {
    "metadata_file": "fine-tuning subsets (metadata_file) are not supported: put each caption in a .txt file next "
                     "to its image (sd-scripts' finetune/ scripts wrote them into the metadata file), remove "
                     "metadata_file and set caption_extension = \".txt\"",
}


# ----------------------------------------------------------------------------------------- resolved config


@dataclass
class SubsetSpec:
    """One `[[datasets.subsets]]` with every subset key resolved (kohya's names, `SUBSET_KEYS` and
    `SUBSET_ONLY_KEYS`)."""

    dataset: int  # place in the file, from 1
    index: int
    values: dict[str, Any]

    @property
    def where(self) -> str:
        return f"[[datasets]] #{self.dataset} subset #{self.index}"

    @property
    def image_dir(self) -> Path:
        return Path(self.values["image_dir"])

    def caption_options(self) -> CaptionOptions:
        """The subset's caption pipeline options (data/captions.py)."""
        v = self.values
        return CaptionOptions(
            shuffle_caption=v["shuffle_caption"], caption_separator=v["caption_separator"], keep_tokens=v["keep_tokens"],
            keep_tokens_separator=v["keep_tokens_separator"] or "", secondary_separator=v["secondary_separator"] or None,
            enable_wildcard=v["enable_wildcard"], caption_prefix=v["caption_prefix"] or None,
            caption_suffix=v["caption_suffix"] or None, caption_dropout_rate=v["caption_dropout_rate"],
            caption_dropout_every_n_epochs=v["caption_dropout_every_n_epochs"],
            caption_tag_dropout_rate=v["caption_tag_dropout_rate"], token_warmup_min=v["token_warmup_min"],
            token_warmup_step=v["token_warmup_step"])

    def subset(self) -> Subset:
        """An unscanned `Subset` of this folder: its name is the folder's basename (kohya's key of
        ss_dataset_dirs and ss_tag_frequency); class_tokens "" when not set."""
        v = self.values
        name = self.image_dir.name or self.image_dir.resolve().name
        return Subset(dir=self.image_dir, name=name, num_repeats=v["num_repeats"], class_tokens=v["class_tokens"] or "",
                      is_reg=v["is_reg"], caption_options=self.caption_options(), flip_aug=v["flip_aug"],
                      color_aug=v["color_aug"], random_crop=v["random_crop"], alpha_mask=bool(v["alpha_mask"]),
                      conditioning_data_dir=Path(v["conditioning_data_dir"]) if v["conditioning_data_dir"] else None)


@dataclass
class DatasetSpec:
    """One `[[datasets]]` with its keys resolved (`DATASET_KEYS`) and its subsets."""

    index: int  # place in the file, from 1
    values: dict[str, Any]
    subsets: list[SubsetSpec] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"[[datasets]] #{self.index}"

    def bucket_options(self) -> dict[str, Any]:
        """The keyword arguments of data/dataset.py FolderDataset for this dataset (resolution, batch size, buckets)."""
        v = self.values
        return dict(resolution=v["resolution"], batch_size=v["batch_size"], enable_bucket=v["enable_bucket"],
                    min_bucket_reso=v["min_bucket_reso"], max_bucket_reso=v["max_bucket_reso"],
                    bucket_reso_steps=v["bucket_reso_steps"], bucket_no_upscale=v["bucket_no_upscale"])


@dataclass
class DatasetConfig:
    path: Path
    datasets: list[DatasetSpec]


# ----------------------------------------------------------------------------------------- reading


def load_dataset_config_file(path: str | Path) -> dict:
    """The file's tables: TOML (.toml) or JSON (.json), as sd-scripts reads them."""
    p = Path(path)
    what = "dataset_config"
    if not p.is_file():
        raise LoralabError(f"{what}: {p} does not exist" if not p.exists() else f"{what}: {p} is not a file")
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise LoralabError(f"{what}: {p} is neither .toml nor .json; give a dataset TOML file")
    try:
        text = p.read_text(encoding="utf-8")
        doc = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoralabError(f"{what}: {p} is not valid {suffix[1:].upper()}: {e}") from None
    except OSError as e:
        raise LoralabError(f"{what}: {p} cannot be read: {e}") from None
    if not isinstance(doc, dict):
        raise LoralabError(f"{what}: {p} must hold [general] and [[datasets]] tables")
    return doc


def read_dataset_config(path: str | Path, defaults: Mapping[str, Any] | None = None) -> DatasetConfig:
    """The file read and resolved (see the module docstring); every problem of it in one LoralabError.
    `defaults`: the training config's values by key (`dataclasses.asdict(cfg)`), the fallback after [general]."""
    dc, problems = _resolve(path, defaults or {})
    if problems:
        raise LoralabError(problems_message(problems))
    return dc


def dataset_config_problems(path: str | Path, defaults: Mapping[str, Any] | None = None) -> list[str]:
    """Every problem of the dataset_config file, each a message starting with "dataset_config:" (for the
    config check, which reports them with the training config's own). Reads no image."""
    return _resolve(path, defaults or {})[1]


def problems_message(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the dataset_config:\n" + "\n".join(f"  - {m}" for m in problems)


def _resolve(path: str | Path, defaults: Mapping[str, Any]) -> tuple[DatasetConfig, list[str]]:
    p = Path(path)
    try:
        doc = load_dataset_config_file(p)
    except LoralabError as e:
        return DatasetConfig(p, []), [str(e)]
    problems: list[str] = []

    def bad(where: str, text: str) -> None:
        problems.append(f"dataset_config: {p}: {where}: {text}")

    for key in doc:
        if key not in ("general", "datasets"):
            bad("top level", _unknown(key, ("general", "datasets"), "top"))
    general = _table_keys(doc.get("general", {}), "[general]", "general", bad)
    raw_datasets = doc.get("datasets", [])
    if not isinstance(raw_datasets, list) or not all(isinstance(d, dict) for d in raw_datasets):
        bad("datasets", "write each dataset as a [[datasets]] table (an array of tables)")
        raw_datasets = None
    if raw_datasets == []:
        bad("datasets", "no [[datasets]] table: add one with its [[datasets.subsets]] (image_dir = ...)")
    raw_datasets = raw_datasets or []
    datasets = [_dataset(i, raw, general, defaults, p, bad) for i, raw in enumerate(raw_datasets, 1)]
    if defaults.get("cache_text_encoder_outputs") or defaults.get("cache_text_encoder_outputs_to_disk"):
        for s in (s for d in datasets for s in d.subsets):
            varying = [k for k in ("shuffle_caption", "caption_tag_dropout_rate", "enable_wildcard", "token_warmup_step")
                       if s.values[k]]
            if varying:
                bad(s.where, f"{', '.join(varying)}: the caption changes every step, so one cached text-encoder "
                             "output per image would be wrong; turn it off or set cache_text_encoder_outputs = false")
    if defaults.get("cache_latents") or defaults.get("cache_latents_to_disk"):
        for s in (s for d in datasets for s in d.subsets):
            for key in (k for k in ("color_aug", "random_crop") if s.values[k]):
                bad(s.where, cache_conflict(key))
    _check_masks(datasets, defaults, bad)
    return DatasetConfig(p, datasets), problems


def _dataset(i: int, raw: dict, general: dict, defaults: Mapping[str, Any], config_path: Path, bad) -> DatasetSpec:
    where = f"[[datasets]] #{i}"
    own = _table_keys({k: v for k, v in raw.items() if k != "subsets"}, where, "dataset", bad)
    spec = DatasetSpec(i, {k: _first(k, (own, general), defaults) for k in DATASET_KEYS})
    _check_buckets(spec, bad)
    raw_subsets = raw.get("subsets", [])
    if not isinstance(raw_subsets, list) or not all(isinstance(s, dict) for s in raw_subsets):
        bad(where, "write each subset as a [[datasets.subsets]] table (an array of tables)")
        raw_subsets = []
    if not raw_subsets:
        bad(where, "no [[datasets.subsets]]: add one with image_dir = \"<the folder of its images>\"")
    for j, raw_subset in enumerate(raw_subsets, 1):
        sub_where = f"{where} subset #{j}"
        other = [k for k in _OTHER_SUBSETS if k in raw_subset]
        if other:
            bad(sub_where, _OTHER_SUBSETS[other[0]])
            continue
        values = _table_keys(raw_subset, sub_where, "subset", bad)
        resolved = {k: _first(k, (values, own, general), defaults) for k in (*SUBSET_KEYS, *SUBSET_ONLY_KEYS)}
        subset = SubsetSpec(i, j, resolved)
        if "image_dir" not in raw_subset:
            bad(sub_where, "image_dir: missing; give the folder that holds this subset's images")
        elif "image_dir" in values:
            _check_image_dir(subset, config_path, bad)
        spec.subsets.append(subset)
    if spec.subsets and all(s.values["is_reg"] for s in spec.subsets):
        bad(where, "only regularization subsets (is_reg = true); add a subset of training images")
    return spec


def _table_keys(table: Any, where: str, level: str, bad) -> dict[str, Any]:
    """The table's valid keys with their converted values; each unknown or misplaced key, bad value and
    unsupported setting is reported (and left out)."""
    if not isinstance(table, dict):
        bad(where, "must be a table")
        return {}
    allowed = {**DATASET_KEYS, **SUBSET_KEYS} if level != "subset" else {**SUBSET_KEYS, **SUBSET_ONLY_KEYS}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            bad(where, _unknown(key, allowed, level))
            continue
        try:
            value = allowed[key](value)
        except ValueError as e:
            bad(where, f"{key} = {value!r}: {e}")
            continue
        if key in _RANGES and not _RANGES[key][0](value):
            bad(where, f"{key} = {value!r}: {_RANGES[key][1]}")
            continue
        if key in _UNSUPPORTED and _UNSUPPORTED[key][0](value):
            bad(where, f"{key}: {_UNSUPPORTED[key][1]}")
            continue
        out[key] = value
    return out


def _unknown(key: str, allowed, level: str) -> str:
    """The message for a key that is not allowed here: misplaced, a training-config name, or unknown
    (with close names only when there are close ones)."""
    if level == "subset" and key in DATASET_KEYS:
        return f"{key} is a dataset key: move it to its [[datasets]] table (or [general])"
    if level != "subset" and key in SUBSET_ONLY_KEYS:
        return f"{key} belongs in each [[datasets.subsets]] table"
    if level != "top" and key in RENAMED:
        return f"unknown key {key!r}; the dataset_config name is {RENAMED[key]}"
    if level != "top" and key in ("subsets", "datasets", "general"):
        return f"{key!r} cannot be nested here"
    close = difflib.get_close_matches(key, list(allowed), n=3, cutoff=0.75)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown key {key!r}{hint}"


def _first(key: str, tables: tuple[dict, ...], defaults: Mapping[str, Any]) -> Any:
    """kohya's precedence: the first table that sets the key, then the training config, then kohya's default."""
    for table in tables:
        if key in table:
            return table[key]
    name = TRAINING_NAMES.get(key, key)
    if name in defaults and key in KOHYA_DEFAULTS:
        value = defaults[name]
        if key == "resolution":
            return _resolution_text(value)
        return value
    return KOHYA_DEFAULTS[key]


def _resolution_text(value: Any) -> tuple[int, int]:
    """The training config's resolution ("512", "768,512" or a pair) as (W, H)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    parts = [int(x) for x in str(value).replace("x", ",").split(",") if x.strip()]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def _check_buckets(spec: DatasetSpec, bad) -> None:
    """kohya's assertions on a dataset with buckets: after flooring min and ceiling max to the step,
    min_bucket_reso <= the smaller side of resolution <= the larger side <= max_bucket_reso."""
    v = spec.values
    if not v["enable_bucket"] or v["bucket_no_upscale"]:
        return
    step, (w, h) = max(1, v["bucket_reso_steps"]), v["resolution"]
    lo, hi = v["min_bucket_reso"] - v["min_bucket_reso"] % step, v["max_bucket_reso"]
    hi += (step - hi % step) % step
    if lo > min(w, h):
        bad(spec.where, f"min_bucket_reso = {v['min_bucket_reso']} is larger than the smaller side of resolution "
                        f"{w},{h}; lower min_bucket_reso or raise resolution")
    if hi < max(w, h):
        bad(spec.where, f"max_bucket_reso = {v['max_bucket_reso']} is smaller than the larger side of resolution "
                        f"{w},{h}; raise max_bucket_reso or lower resolution")


def _check_masks(datasets: list[DatasetSpec], defaults: Mapping[str, Any], bad) -> None:
    """The loss-mask keys (`data/masks.py`): conditioning_data_dir needs masked_loss (sd-scripts accepts it
    only then), is a folder, and is not combined with alpha_mask in one subset; masked_loss needs a subset
    with masks. The mask files themselves are checked when the images are scanned. The masked_loss rules
    need the training config (`defaults` with masked_loss); the analysis commands have none."""
    training, masked_loss = "masked_loss" in defaults, bool(defaults.get("masked_loss"))
    subsets = [s for d in datasets for s in d.subsets]
    for s in subsets:
        folder = s.values["conditioning_data_dir"]
        if folder is None:
            continue
        if training and not masked_loss:
            bad(s.where, "conditioning_data_dir: mask images are used only with masked_loss = true (sd-scripts "
                         "refuses the key without it); set masked_loss = true, or remove conditioning_data_dir")
        if s.values["alpha_mask"]:
            bad(s.where, "conditioning_data_dir and alpha_mask: a subset's masks come from one of them; remove one")
        if not Path(folder).is_dir():
            what = "is a file, not a folder" if Path(folder).exists() else "does not exist"
            bad(s.where, f"conditioning_data_dir: {folder} {what}; give the folder of this subset's mask images "
                         f"(named like the images)")
    if masked_loss and subsets and not any(s.values["conditioning_data_dir"] or s.values["alpha_mask"] for s in subsets):
        bad("masked_loss", NO_SUBSET_MASKS)


def _check_image_dir(subset: SubsetSpec, config_path: Path, bad) -> None:
    d = subset.image_dir
    if d.is_dir():
        return
    if d.exists():
        bad(subset.where, f"image_dir: {d} is a file, not a folder; give the folder that holds the images")
        return
    hint = ""
    if not d.is_absolute():
        beside = config_path.parent / d
        hint = (f" (a relative image_dir starts from the current folder {Path.cwd()}, as in sd-scripts"
                + (f"; {beside} exists: run from {config_path.parent} or give the full path)" if beside.is_dir() else ")"))
    bad(subset.where, f"image_dir: the folder {d} does not exist{hint}")


# ----------------------------------------------------------------------------------------- scanning


def scan_dataset_config(dc: DatasetConfig) -> list[list[Subset]]:
    """The scanned subsets of each dataset, in file order (kohya `DreamBoothDataset`): each image folder
    read as `scan_subset` reads one (captions `<stem><caption_extension>`, falling back to class_tokens,
    else "" with a warning), with the subset's own caption options, flip_aug, color_aug and random_crop.
    Skipped with a warning (as kohya does): num_repeats < 1, a folder already in the same dataset (the
    first one counts; the same folder in another dataset is fine: multi-resolution training), a folder
    without images. A dataset left without training images is an error, and so is a mask missing or of
    another size than its image (`data/masks.py` attach_masks, for alpha_mask / conditioning_data_dir)."""
    out = []
    for ds in dc.datasets:
        subsets: list[Subset] = []
        seen: set[Path] = set()
        for spec in ds.subsets:
            v = spec.values
            if v["num_repeats"] < 1:
                log.warning("%s: %s: num_repeats = %d: the subset is not used", dc.path, spec.where, v["num_repeats"])
                continue
            if spec.image_dir.resolve() in seen:
                log.warning("%s: %s: %s is already a subset of this dataset; only the first one is used",
                            dc.path, spec.where, spec.image_dir)
                continue
            seen.add(spec.image_dir.resolve())
            ext = v["caption_extension"]
            if not ext.startswith("."):
                log.warning("%s: %s: caption_extension %r has no leading dot: using %r", dc.path, spec.where, ext,
                            "." + ext)
                ext = "." + ext
            subset = spec.subset()
            scan_subset(subset, ext, v["enable_wildcard"], class_tokens_fallback=True)
            if not subset.images:
                nested = [p.name for p in spec.image_dir.iterdir() if p.is_dir()][:3]
                hint = (f" (it holds folders {', '.join(nested)}: image_dir names the folder of the images "
                        "itself, not its parent)") if nested else ""
                log.warning("%s: %s: %s has no images; the subset is not used%s", dc.path, spec.where,
                            spec.image_dir, hint)
                continue
            log.info("%s: %d images x %d repeats%s", subset.dir, subset.img_count, subset.num_repeats,
                     " (regularization)" if subset.is_reg else "")
            subsets.append(subset)
        if not any(not s.is_reg for s in subsets):
            raise LoralabError(f"dataset_config: {dc.path}: {ds.where}: no training images in its subsets "
                               f"({', '.join(str(s.image_dir) for s in ds.subsets)}); put .png/.jpg/.webp files in them")
        out.append(subsets)
    try:
        attach_masks([s for subsets in out for s in subsets])  # mask files by stem, their sizes; images without alpha
    except LoralabError as e:
        raise LoralabError(f"dataset_config: {dc.path}: {e}") from None
    return out


def dataset_config_subsets(path: str | Path, defaults: Mapping[str, Any] | None = None
                           ) -> list[tuple[DatasetSpec, list[tuple[Subset, str]]]]:
    """For the analysis commands (`dataset check --dataset-config`): each [[datasets]] with its subsets as
    unscanned `Subset`s (folder, basename, repeats, class tokens, is_reg, caption options), each with its
    caption extension; the ones training skips (num_repeats < 1, a folder twice in one dataset) left out."""
    out = []
    for ds in read_dataset_config(path, defaults).datasets:
        folders, seen = [], set()
        for s in ds.subsets:
            if s.values["num_repeats"] >= 1 and s.image_dir.resolve() not in seen:
                seen.add(s.image_dir.resolve())
                folders.append((s.subset(), s.values["caption_extension"]))
        out.append((ds, folders))
    return out
