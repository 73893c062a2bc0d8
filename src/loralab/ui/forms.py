"""The config form of `loralab ui`: generated from the key table `loralab train --help` prints
(`config.fields.TrainConfig`: group, default, meaning, choices), checked by the same functions as
`loralab train` (`config.build.config_values` and `config_problems`), so each field shows the CLI's message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.config.build import config_problems, config_values
from loralab.config.convert import read_kohya_config, toml_value
from loralab.config.fields import TrainConfig
from loralab.errors import LoralabError

SOURCE = "form"  # where a value came from, as the CLI's messages say "(command line)"; left out of the form's


@dataclass
class Field:
    name: str
    group: str
    help: str
    kind: str  # bool, choice, text
    default: str
    choices: tuple = ()


@dataclass
class FormState:
    """What the form shows: a value per key (text, as typed), messages per key, messages for the page."""

    values: dict[str, str]
    errors: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what an import mapped or dropped
    general: list[str] = field(default_factory=list)  # problems that name no key of the form
    diff: list[tuple[str, str, str]] = field(default_factory=list)  # (key, default, value) of a checked config
    cfg: TrainConfig | None = None  # the checked config when there was no problem


def as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def form_fields() -> list[Field]:
    out = []
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        choices = f.metadata.get("choices") or ()
        kind = "bool" if isinstance(default, bool) else "choice" if choices else "text"
        out.append(Field(f.name, f.metadata.get("group") or "other", f.metadata.get("help", ""), kind,
                         as_text(default), tuple(as_text(c) for c in choices)))
    return out


def groups() -> list[tuple[str, list[Field]]]:
    """The fields by group, in the order of `loralab train --help`."""
    out: dict[str, list[Field]] = {}
    for f in form_fields():
        out.setdefault(f.group, []).append(f)
    return list(out.items())


def defaults() -> dict[str, str]:
    return {f.name: f.default for f in form_fields()}


def from_form(form: dict[str, str]) -> dict[str, str]:
    """The submitted form as {key: text}; a checkbox that is not sent is false."""
    values = {}
    for f in form_fields():
        if f.kind == "bool":
            values[f.name] = "true" if form.get(f.name) in ("true", "on", "1") else "false"
        else:
            values[f.name] = str(form.get(f.name, f.default)).strip()
    return values


def message_key(message: str) -> str:
    """The key a config message is about: its first word (`network_dim: must be ...`,
    `foo (file.toml): bad value ...`)."""
    return message.split(":", 1)[0].split(" (", 1)[0].strip()


def check(values: dict[str, str], workdir: Path | None = None) -> FormState:
    """Check the form's values as `loralab train` checks a config; every problem goes to its key's field.
    Only keys whose text differs from the default's are read (as command-line overrides are)."""
    state = FormState(values=dict(values))
    dflt = defaults()
    changed = {k: (v, SOURCE) for k, v in values.items() if k in dflt and v != dflt[k]}
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    kwargs, problems = config_values(changed, known)
    reported = {message_key(m) for m in problems}
    try:
        cfg = TrainConfig(**kwargs)
        problems += [m for m in config_problems(cfg) if message_key(m) not in reported]
    except LoralabError as e:
        cfg = None
        problems.append(str(e))
    for m in problems:
        key = message_key(m)
        m = m.replace(f" ({SOURCE})", "", 1)  # the CLI says where a value came from; next to its field, it is clear
        if key in values:
            state.errors.setdefault(key, []).append(m)
        else:
            state.general.append(m)
    if not problems and cfg is not None:
        state.cfg = cfg
        defaults_cfg = TrainConfig()
        state.diff = [(k, as_text(getattr(defaults_cfg, k)), as_text(getattr(cfg, k))) for k in known
                      if getattr(cfg, k) != getattr(defaults_cfg, k)]
    return state


def load_file(path: str) -> FormState:
    """A loralab TOML, sd-scripts TOML or kohya_ss GUI JSON into the form (`config.convert.read_kohya_config`,
    the reader of `loralab config import`). The file's problems (unknown keys, bad values) go next to the file
    field under the key `load_path`, as `loralab config import` lists them."""
    values = defaults()
    state = FormState(values=values)
    try:
        imported = read_kohya_config(Path(path).expanduser())
    except LoralabError as e:
        state.errors["load_path"] = [str(e)]
        return state
    for key, value in imported.values.items():
        values[key] = as_text(value)
    state.errors["load_path"] = list(imported.problems)
    state.notes = imported.mapped + imported.dropped
    if imported.prompt_text:
        state.notes.append("the config's sample prompts are text, not a file: save them in a file and set "
                           "sample_prompts to it")
    return state


def to_toml(cfg: TrainConfig, title: str = "") -> str:
    """The keys of `cfg` that differ from the defaults, as a loralab TOML grouped as `loralab train --help`."""
    base = TrainConfig()
    lines = [f"# {title}"] if title else []
    group = None
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value == getattr(base, f.name):
            continue
        if f.metadata.get("group") != group:
            group = f.metadata.get("group")
            lines += ["", f"[{group}]"]
        lines.append(f"{f.name} = {toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


PATH_KEYS = ("pretrained_model_name_or_path", "vae", "train_data_dir", "reg_data_dir", "validation_data_dir",
             "dataset_config", "network_weights", "sample_prompts", "resume", "output_dir", "logging_dir")


def absolute(cfg: TrainConfig) -> TrainConfig:
    """The config's paths made absolute from the app's current folder (where the form's checks looked for
    them), so a queued job finds the same files whatever folder it runs in."""
    for key in PATH_KEYS:
        value = getattr(cfg, key, "")
        if value and not Path(value).expanduser().is_absolute():
            setattr(cfg, key, str(Path(value).expanduser().resolve()))
    return cfg
