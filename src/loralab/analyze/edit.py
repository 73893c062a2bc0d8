"""`loralab dataset edit`: change tags in every caption file of a dataset, safely.

Safety rules:
- `dry_run` changes nothing and returns the unified diff of what would change.
- A real run first copies every file it is about to change into
  `DIR/.loralab_backup/<timestamp>/files/<same relative path>` and writes `manifest.json` there (each file's
  sha256 before and after), then replaces each caption atomically (`loralab.io`: temp file + os.replace),
  keeping its permissions.
- `undo_last_edit` restores the files of the newest edit not yet undone, byte for byte, and refuses to
  overwrite a caption that was changed again since that edit (unless `force`).
- An edit that would leave a caption with no tag is not made (the file is listed as skipped).
- Only the tags an operation touches change: the separator style (", " or ","), the other tags, their
  spacing, the line endings, a UTF-8 BOM and any further lines (wildcard captions, each edited alike) stay
  as they were. Tags match case-insensitively on their stripped text.

The backup folder starts with a dot, so the dataset scan (`loralab train`, `loralab dataset check`) skips it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from loralab.analyze.dataset_check import scan_dataset
from loralab.analyze.scan import BACKUP_DIR, MANIFEST
from loralab.errors import LoralabError
from loralab.io import atomic_write

log = logging.getLogger(__name__)

BOM = b"\xef\xbb\xbf"


# ----------------------------------------------------------------------------------------- operations


@dataclass
class EditOp:
    """One edit. kind: "remove" (tags), "add" (tags at `position`: that many tags stay before them; None = at
    the end), "replace" (tags[0] becomes `new`), "move_first" (tags[0] goes first)."""

    kind: str
    tags: list[str]
    position: int | None = None
    new: str | None = None

    def describe(self) -> str:
        if self.kind == "add":
            where = "at the end" if self.position is None else f"at position {self.position}"
            return f"add {', '.join(self.tags)} {where}"
        if self.kind == "replace":
            return f"replace {self.tags[0]} with {self.new}"
        if self.kind == "move_first":
            return f"move {self.tags[0]} first"
        return f"remove {', '.join(self.tags)}"

    def validate(self) -> None:
        kinds = ("remove", "add", "replace", "move_first")
        if self.kind not in kinds:
            raise LoralabError(f"dataset edit: unknown operation {self.kind!r}; use one of {', '.join(kinds)}")
        clean = [t.strip() for t in self.tags]
        if not clean or any(not t or "," in t for t in clean):
            raise LoralabError(f"dataset edit: {self.kind} needs tags without commas, got {self.tags!r}")
        if self.kind == "replace" and (not self.new or not self.new.strip() or "," in self.new):
            raise LoralabError("dataset edit: --replace needs a new tag without commas: --replace OLD NEW")
        if self.position is not None and self.position < 0:
            raise LoralabError(f"dataset edit: --position {self.position} must be 0 (first) or more")


@dataclass
class _Item:
    lead: str
    tag: str
    trail: str

    def key(self) -> str:
        return self.tag.lower()


def _parse(line: str) -> list[_Item]:
    items = []
    for piece in line.split(","):
        tag = piece.strip()
        if tag:
            start = piece.index(tag)
            items.append(_Item(piece[:start], tag, piece[start + len(tag):]))
        else:
            items.append(_Item(piece, "", ""))
    return items


def _join(items: list[_Item]) -> str:
    return ",".join(i.lead + i.tag + i.trail for i in items)


def _separator_space(items: list[_Item]) -> str:
    """The spacing the caption puts after its commas (", " usually; "," when written without spaces)."""
    leads = Counter(i.lead for i in items[1:] if i.tag)
    return leads.most_common(1)[0][0] if leads else " "


def _tag_indices(items: list[_Item]) -> list[int]:
    return [k for k, i in enumerate(items) if i.tag]


def _remove_at(items: list[_Item], k: int) -> None:
    if k == 0 and len(items) > 1:
        items[1].lead = items[0].lead
    del items[k]


def _insert_at(items: list[_Item], position: int, tag: str, space: str) -> None:
    """Insert `tag` so that `position` tags stay before it."""
    idx = _tag_indices(items)
    if position <= 0 or not idx:
        if items:
            new = _Item(items[0].lead, tag, "")
            items[0].lead = space
            items.insert(0, new)
        else:
            items.append(_Item("", tag, ""))
        return
    after = idx[min(position, len(idx)) - 1]
    items.insert(after + 1, _Item(space, tag, ""))


def apply_op(line: str, op: EditOp) -> str:
    """The caption line after the edit (the same string when nothing applies)."""
    items = _parse(line)
    if not any(i.tag for i in items):
        return line
    space = _separator_space(items)
    wanted = [t.strip() for t in op.tags]
    keys = {t.lower() for t in wanted}
    if op.kind == "remove":
        for k in reversed(range(len(items))):
            if items[k].tag and items[k].key() in keys:
                _remove_at(items, k)
    elif op.kind == "add":
        present = {i.key() for i in items if i.tag}
        pos = len(_tag_indices(items)) if op.position is None else op.position
        for tag in wanted:
            if tag.lower() in present:
                continue
            _insert_at(items, pos, tag, space)
            present.add(tag.lower())
            pos += 1
    elif op.kind == "replace":
        old, new = wanted[0].lower(), (op.new or "").strip()
        for k in reversed(range(len(items))):
            if items[k].tag and items[k].key() == old:
                others = {i.key() for j, i in enumerate(items) if i.tag and j != k}
                if new.lower() in others:
                    _remove_at(items, k)  # the new tag is already there: keep one
                else:
                    items[k].tag = new
    elif op.kind == "move_first":
        key = wanted[0].lower()
        idx = _tag_indices(items)
        hits = [k for k in idx if items[k].key() == key]
        if hits and hits[0] != idx[0]:
            tag = items[hits[0]].tag
            _remove_at(items, hits[0])
            _insert_at(items, 0, tag, space)
    return _join(items)


def _split_ending(line: str) -> tuple[str, str]:
    for ending in ("\r\n", "\n", "\r"):
        if line.endswith(ending):
            return line[: -len(ending)], ending
    return line, ""


def edit_caption_bytes(data: bytes, op: EditOp) -> bytes:
    """Apply `op` to every non-empty line of a caption file's bytes (UTF-8, optional BOM)."""
    bom = data.startswith(BOM)
    text = data[len(BOM):].decode("utf-8") if bom else data.decode("utf-8")
    out = []
    for line in text.splitlines(keepends=True):
        content, ending = _split_ending(line)
        out.append((apply_op(content, op) if content.strip() else content) + ending)
    if not text:
        return data
    return (BOM if bom else b"") + "".join(out).encode("utf-8")


# ----------------------------------------------------------------------------------------- files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` atomically (`loralab.io.atomic_write`), with the permissions `mode` when given (the
    replaced file's, so an edit or an undo keeps them)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)

    atomic_write(path, write)


@dataclass
class FileChange:
    path: Path
    before: bytes
    after: bytes


@dataclass
class EditResult:
    op: EditOp
    root: Path
    changes: list[FileChange]
    unchanged: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    backup: Path | None = None
    dry_run: bool = False

    def diff(self) -> str:
        """Unified diff of every change, paths relative to the dataset folder."""
        out = []
        for ch in self.changes:
            rel = ch.path.relative_to(self.root) if ch.path.is_relative_to(self.root) else ch.path
            out += difflib.unified_diff(
                ch.before.decode("utf-8", "replace").splitlines(keepends=True),
                ch.after.decode("utf-8", "replace").splitlines(keepends=True),
                fromfile=f"a/{rel}", tofile=f"b/{rel}",
            )
        return "".join(line if line.endswith("\n") else line + "\n" for line in out)

    def summary(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        lines = [f"{self.op.describe()}: {verb} {len(self.changes)} caption files, {self.unchanged} unchanged"]
        for path, why in self.skipped:
            lines.append(f"  skipped {path}: {why}")
        if self.backup:
            lines.append(f"backup: {self.backup} (undo with: loralab dataset edit {self.root} --undo)")
        return "\n".join(lines)


def caption_files(
    root: str | Path, *, caption_extension: str = ".txt", concept: str | None = None
) -> tuple[list[Path], list[Path]]:
    """(caption files, images without one) of the train concept folders of `root` (the kohya layout),
    optionally of one concept. Edits never create caption files."""
    ds = scan_dataset(root, caption_extension=caption_extension)
    subsets = [ds.find_subset(concept)] if concept else ds.train_subsets
    seen: dict[Path, None] = {}
    missing: list[Path] = []
    for im in ds.images:
        if im.subset in subsets:
            cap = im.path.with_name(im.path.stem + ds.caption_extension)
            if cap.is_file():
                seen.setdefault(cap, None)
            else:
                missing.append(im.path)
    return list(seen), missing


def edit_captions(
    root: str | Path,
    op: EditOp,
    *,
    dry_run: bool = False,
    caption_extension: str = ".txt",
    concept: str | None = None,
    files: Sequence[Path] | None = None,
) -> EditResult:
    """Apply `op` to every caption file of the dataset (or to `files`); see the module docstring."""
    op.validate()
    root = Path(root)
    missing: list[Path] = []
    if files is not None:
        targets = list(files)
    else:
        targets, missing = caption_files(root, caption_extension=caption_extension, concept=concept)
    changes: list[FileChange] = []
    skipped: list[tuple[Path, str]] = [(p, f"no {caption_extension} caption file (not created)") for p in missing]
    unchanged = 0
    for path in targets:
        before = path.read_bytes()
        try:
            after = edit_caption_bytes(before, op)
        except UnicodeDecodeError:
            skipped.append((path, "not UTF-8 text; re-save it as UTF-8"))
            continue
        if after == before:
            unchanged += 1
            continue
        if not after.replace(BOM, b"").replace(b",", b"").strip():
            skipped.append((path, "the edit would leave the caption without tags"))
            continue
        changes.append(FileChange(path, before, after))
    result = EditResult(op, root, changes, unchanged, skipped, dry_run=dry_run)
    if dry_run or not changes:
        return result
    result.backup = _write_backup(root, op, changes)
    for ch in changes:
        write_file(ch.path, ch.after, mode=ch.path.stat().st_mode & 0o7777)
    _update_manifest(result.backup, state="done")
    log.info("%s: %d files changed, backup in %s", op.describe(), len(changes), result.backup)
    return result


def _write_backup(root: Path, op: EditOp, changes: list[FileChange]) -> Path:
    base = root / BACKUP_DIR
    base.mkdir(exist_ok=True)
    while True:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        backup = base / stamp
        try:
            backup.mkdir()
            break
        except FileExistsError:
            continue
    entries = []
    for ch in changes:
        rel = ch.path.relative_to(root)
        write_file(backup / "files" / rel, ch.before)
        entries.append({"path": rel.as_posix(), "sha256_before": _sha256(ch.before), "sha256_after": _sha256(ch.after)})
    manifest = {"version": 1, "created": datetime.now().isoformat(timespec="seconds"), "operation": op.describe(),
                "state": "writing", "files": entries}
    write_file(backup / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"))
    return backup


def _read_manifest(backup: Path) -> dict:
    try:
        return json.loads((backup / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LoralabError(f"{backup / MANIFEST}: the edit backup's manifest cannot be read ({err})") from err


def _update_manifest(backup: Path, **values) -> None:
    manifest = _read_manifest(backup)
    manifest.update(values)
    write_file(backup / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"))


def list_backups(root: str | Path) -> list[Path]:
    """Backups of edits not yet undone, newest first."""
    base = Path(root) / BACKUP_DIR
    if not base.is_dir():
        return []
    out = []
    for d in sorted((p for p in base.iterdir() if (p / MANIFEST).is_file()), key=lambda p: p.name, reverse=True):
        if _read_manifest(d).get("state") != "undone":
            out.append(d)
    return out


@dataclass
class UndoResult:
    backup: Path
    operation: str
    restored: list[Path]

    def summary(self) -> str:
        return f"undid {self.operation!r}: restored {len(self.restored)} caption files from {self.backup}"


def undo_last_edit(root: str | Path, *, force: bool = False) -> UndoResult:
    """Restore every file of the newest edit not yet undone, byte for byte (see the module docstring)."""
    root = Path(root)
    backups = list_backups(root)
    if not backups:
        raise LoralabError(f"{root}: no edit to undo (no backup in {root / BACKUP_DIR} that is not undone yet)")
    backup = backups[0]
    manifest = _read_manifest(backup)
    plan: list[tuple[Path, bytes]] = []
    conflicts = []
    for entry in manifest["files"]:
        target = root / entry["path"]
        saved_path = backup / "files" / entry["path"]
        if not saved_path.is_file():
            raise LoralabError(f"{saved_path}: the backup copy is missing; restore {target} by hand")
        saved = saved_path.read_bytes()
        if _sha256(saved) != entry["sha256_before"]:
            raise LoralabError(f"{saved_path}: the backup copy was modified; restore {target} by hand")
        current = target.read_bytes() if target.is_file() else None
        if current is not None and _sha256(current) not in (entry["sha256_after"], entry["sha256_before"]):
            conflicts.append(target)
        plan.append((target, saved))
    if conflicts and not force:
        shown = ", ".join(str(p) for p in conflicts[:5])
        raise LoralabError(
            f"{len(conflicts)} caption files changed again after the edit {manifest.get('operation')!r} ({shown}); "
            f"undo would overwrite those changes. Pass --force to restore them anyway"
        )
    for target, saved in plan:
        mode = target.stat().st_mode & 0o7777 if target.exists() else None
        write_file(target, saved, mode=mode)
    _update_manifest(backup, state="undone", undone=datetime.now().isoformat(timespec="seconds"))
    return UndoResult(backup, manifest.get("operation", "?"), [t for t, _ in plan])
