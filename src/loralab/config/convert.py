"""`loralab config import`: a kohya config (sd-scripts TOML, kohya_ss GUI JSON) as a loralab TOML.

The file's keys go through the same path as `loralab train --config` (`build.config_values`: aliases,
kohya keys without effect, unknown keys and bad values; a GUI JSON first through `gui.gui_to_kohya`),
and the keys that differ from loralab's defaults are written as TOML, grouped as `loralab train --help`
groups them. What was mapped, dropped and refused is returned for the report (and written as comments
at the top of the file), so nothing disappears without a word. Paths are kept as written.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.config.build import _fields, _flatten, config_values
from loralab.config.fields import TrainConfig
from loralab.errors import LoralabError


@dataclass
class Imported:
    source: Path
    values: dict[str, Any]  # loralab key -> value, only keys that differ from the default
    mapped: list[str] = field(default_factory=list)  # "key: what happened" for conversions that are not 1:1
    dropped: list[str] = field(default_factory=list)  # "key: why" for keys without effect in loralab
    problems: list[str] = field(default_factory=list)  # refused and unknown keys, bad values
    prompt_text: str = ""  # a GUI config's sample prompts (text, not a file)

    def report(self) -> str:
        lines = [f"{self.source}: {len(self.values)} keys for loralab"]
        for title, items in (("mapped", self.mapped), ("dropped (no effect in loralab)", self.dropped),
                             ("not imported (fix these)", self.problems)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  - {item}" for item in items]
        return "\n".join(lines)


def read_kohya_config(path: str | Path) -> Imported:
    """A kohya config file as loralab values (see the module docstring); nothing is raised for its keys."""
    path = Path(path)
    if not path.is_file():
        raise LoralabError(f"config import: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    imported = Imported(source=path, values={})
    if path.suffix.lower() == ".json":
        from loralab.config.gui import gui_to_kohya

        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoralabError(f"{path}: not valid JSON: {e}") from None
        conversion = gui_to_kohya(doc, str(path))
        keys = conversion.keys
        imported.mapped += [f"{g} -> {k} = {v!r}" + (f" ({n})" if n else "") for g, k, v, n in conversion.mapped]
        imported.dropped += [f"{k}: {why}" for k, why in conversion.dropped]
        imported.problems += list(conversion.problems)
        imported.prompt_text = conversion.prompt_text or ""
    else:
        try:
            keys = _flatten(tomllib.loads(text), str(path))
        except tomllib.TOMLDecodeError as e:
            raise LoralabError(f"{path}: not valid TOML: {e}") from None
    notes: list[tuple[str, str, str]] = []
    known = _fields(TrainConfig)
    kwargs, problems = config_values({k: (v, str(path)) for k, v in keys.items()}, known, notes=notes)
    imported.problems += problems
    for key, _source, what in notes:
        (imported.dropped if what.startswith("no effect") else imported.mapped).append(f"{key}: {what}")
    defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    imported.values = {k: v for k, v in kwargs.items() if v != defaults[k]}
    return imported


def to_toml(imported: Imported) -> str:
    """The values as a loralab TOML, grouped; the import's mapped/dropped/refused keys as comments on top."""
    lines = [f"# imported by `loralab config import` from {imported.source}"]
    for title, items in (("mapped", imported.mapped), ("dropped", imported.dropped), ("not imported", imported.problems)):
        lines += [f"# {title}: {item}" for item in items]
    group = None
    for f in dataclasses.fields(TrainConfig):
        if f.name not in imported.values:
            continue
        if f.metadata.get("group") != group:
            group = f.metadata.get("group")
            lines += ["", f"[{group}]"]
        lines.append(f"{f.name} = {toml_value(imported.values[f.name])}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string: JSON's escapes are TOML's
