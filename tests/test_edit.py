"""`loralab dataset edit`: tag edits keep the caption's style, dry runs change nothing, undo restores bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from loralab.analyze.edit import BACKUP_DIR, EditOp, apply_op, edit_captions, list_backups, undo_last_edit
from loralab.errors import LoralabError

CAPTIONS = {
    "10_jinx/a.txt": b"jinx, blue hair, navel, smile\n",
    "10_jinx/b.txt": b"blue hair,jinx,navel",  # no spaces, no newline
    "10_jinx/c.txt": b"\xef\xbb\xbfjinx, Navel, red eyes\r\n",  # BOM + CRLF
    "10_jinx/d.txt": "jinx, caf\u00e9, navel\nsecond line, navel\n".encode(),  # non-ASCII, two lines (wildcards)
    "3_vi/e.txt": b"vi, pink hair, navel",
    "3_vi/f.txt": b"navel",  # removing navel would empty it
}


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "train"
    for rel, data in CAPTIONS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(path.with_suffix(".png"))
        path.write_bytes(data)
    (root / "10_jinx" / "a.txt").chmod(0o644)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.txt"))
            if BACKUP_DIR not in p.parts}


@pytest.mark.parametrize("line, op, expected", [
    ("jinx, blue hair, navel", EditOp("remove", ["navel"]), "jinx, blue hair"),
    ("jinx, blue hair, navel", EditOp("remove", ["JINX"]), "blue hair, navel"),
    ("a,b,c", EditOp("remove", ["b"]), "a,c"),
    ("jinx, smile", EditOp("add", ["blue hair", "smile"]), "jinx, smile, blue hair"),
    ("jinx, smile", EditOp("add", ["blue hair"], position=1), "jinx, blue hair, smile"),
    ("jinx, smile", EditOp("add", ["new"], position=0), "new, jinx, smile"),
    ("a,b", EditOp("add", ["c"], position=1), "a,c,b"),
    ("jinx, smile", EditOp("add", ["x"], position=9), "jinx, smile, x"),
    ("jinx, navel, smile", EditOp("replace", ["navel"], new="midriff"), "jinx, midriff, smile"),
    ("jinx, navel, midriff", EditOp("replace", ["navel"], new="midriff"), "jinx, midriff"),
    ("smile, jinx, navel", EditOp("move_first", ["jinx"]), "jinx, smile, navel"),
    ("jinx, smile", EditOp("move_first", ["jinx"]), "jinx, smile"),
    ("smile, navel", EditOp("move_first", ["jinx"]), "smile, navel"),
    ("  jinx ,  smile ", EditOp("remove", ["smile"]), "  jinx "),
])
def test_apply_op(line, op, expected):
    assert apply_op(line, op) == expected


def test_dry_run_changes_nothing_and_shows_a_diff(dataset):
    before = snapshot(dataset)
    result = edit_captions(dataset, EditOp("remove", ["navel"]), dry_run=True)
    assert snapshot(dataset) == before
    assert not (dataset / BACKUP_DIR).exists()
    diff = result.diff()
    assert "--- a/10_jinx/a.txt" in diff and "-jinx, blue hair, navel, smile" in diff
    assert "+jinx, blue hair, smile" in diff
    assert [p.name for p, _ in result.skipped] == ["f.txt"]


@pytest.mark.parametrize("op", [
    EditOp("remove", ["navel"]),
    EditOp("add", ["solo"], position=1),
    EditOp("replace", ["navel"], new="midriff"),
    EditOp("move_first", ["jinx"]),
])
def test_edit_then_undo_is_byte_identical(dataset, op):
    before = snapshot(dataset)
    mode = (dataset / "10_jinx" / "a.txt").stat().st_mode
    result = edit_captions(dataset, op)
    assert result.changes and result.backup is not None
    after = snapshot(dataset)
    assert after != before
    assert (dataset / "10_jinx" / "a.txt").stat().st_mode == mode
    undo = undo_last_edit(dataset)
    assert snapshot(dataset) == before
    assert sorted(undo.restored) == sorted(c.path for c in result.changes)
    assert list_backups(dataset) == []


def test_edits_keep_style(dataset):
    edit_captions(dataset, EditOp("remove", ["navel"]))
    assert (dataset / "10_jinx" / "b.txt").read_bytes() == b"blue hair,jinx"
    assert (dataset / "10_jinx" / "c.txt").read_bytes() == b"\xef\xbb\xbfjinx, red eyes\r\n"
    assert (dataset / "10_jinx" / "d.txt").read_bytes() == "jinx, caf\u00e9\nsecond line\n".encode()
    assert (dataset / "3_vi" / "f.txt").read_bytes() == b"navel"  # never emptied
    edit_captions(dataset, EditOp("move_first", ["jinx"]))
    assert (dataset / "10_jinx" / "b.txt").read_bytes() == b"jinx,blue hair"


def test_two_edits_undo_in_reverse_order(dataset):
    original = snapshot(dataset)
    edit_captions(dataset, EditOp("remove", ["navel"]))
    middle = snapshot(dataset)
    edit_captions(dataset, EditOp("add", ["solo"], position=1), concept="jinx")
    assert (dataset / "3_vi" / "e.txt").read_bytes() == b"vi, pink hair"  # other concept untouched
    undo_last_edit(dataset)
    assert snapshot(dataset) == middle
    undo_last_edit(dataset)
    assert snapshot(dataset) == original
    with pytest.raises(LoralabError, match="no edit to undo"):
        undo_last_edit(dataset)


def test_undo_refuses_to_overwrite_later_changes(dataset):
    edit_captions(dataset, EditOp("remove", ["smile"]))
    (dataset / "10_jinx" / "a.txt").write_bytes(b"jinx, edited by hand\n")
    with pytest.raises(LoralabError, match="changed again"):
        undo_last_edit(dataset)
    undo_last_edit(dataset, force=True)
    assert (dataset / "10_jinx" / "a.txt").read_bytes() == CAPTIONS["10_jinx/a.txt"]


def test_the_backup_is_not_a_concept(dataset):
    from loralab.analyze.dataset_check import scan_dataset

    edit_captions(dataset, EditOp("remove", ["smile"]))
    assert {s.name for s in scan_dataset(dataset).subsets} == {"10_jinx", "3_vi"}


def test_cli_edit_round_trip(dataset):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    before = snapshot(dataset)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "loralab.cli", "dataset", "edit", str(dataset), *args],
                              capture_output=True, text=True, env=env, timeout=120)

    dry = run("--remove", "navel, smile", "--dry-run")
    assert dry.returncode == 0 and "+jinx, blue hair" in dry.stdout and snapshot(dataset) == before
    real = run("--add", "solo", "--after-first")
    assert real.returncode == 0, real.stderr
    assert (dataset / "3_vi" / "e.txt").read_bytes() == b"vi, solo, pink hair, navel"
    assert run("--undo").returncode == 0
    assert snapshot(dataset) == before
    bad = run("--remove", "a", "--position", "1")
    assert bad.returncode == 2 and "go with --add" in bad.stderr


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_check_lists_the_backup_and_how_to_remove_it_and_training_ignores_it(dataset):
    import shutil

    from loralab.analyze.dataset_check import check_dataset, render_report
    from loralab.data.dataset import scan_folder_dataset, tag_frequency

    result = edit_captions(dataset, EditOp("remove", ["navel"]))
    backup = dataset / BACKUP_DIR
    copies = [p for p in backup.rglob("*") if p.is_file()]
    assert len(copies) == len(result.changes) + 1 == 6  # 5 captions and the manifest
    size = sum(p.stat().st_size for p in copies)
    assert 1024 <= size < 2**20
    before = all_files(dataset.parent)
    report = check_dataset(dataset, progress=False)
    [note] = report.by_code("edit_backup")
    assert (note.level, Path(note.file)) == ("info", backup)
    command = f'rm -r "{backup.absolute()}"'
    assert note.message == (
        f"a backup left by `loralab dataset edit`: 6 files from 1 edit, {size / 1024:.1f} KiB. Training and dataset check ignore "
        f"it (folders whose name starts with a dot are skipped); `loralab dataset edit --undo` restores captions "
        f"from it. Once you no longer need that, remove it: {command}")
    assert f"info edit_backup (1)\n  {BACKUP_DIR}: a backup left by" in render_report(report)
    # neither the check nor training reads the backup's copies: the edited captions are what trains
    assert all(BACKUP_DIR not in Path(im.file).parts for im in report.images)
    subsets = scan_folder_dataset(dataset, caption_extension=".txt")
    assert {s.name for s in subsets} == {"10_jinx", "3_vi"}
    assert all(BACKUP_DIR not in e.path.parts for s in subsets for e in s.images)
    assert "navel" not in tag_frequency(subsets)["10_jinx"]
    assert all_files(dataset.parent) == before
    if shutil.which("rm"):  # the command as given removes the backup and nothing else
        subprocess.run(command, shell=True, check=True)
        assert not backup.exists()
        assert all_files(dataset.parent) == {k: v for k, v in before.items() if BACKUP_DIR not in Path(k).parts}
        assert check_dataset(dataset, progress=False).by_code("edit_backup") == []
