"""`loralab doctor`: the lab's planted cases (lab/planted.py) each put their fix first, a healthy run has nothing
to fix, the full doctor (review, probe, bleed on the lab model) keeps the order and reuses a fresh review, the
log's NaN and exploded losses, and bad input: what could not be checked is said, the rest is checked."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loralab.cli import main
from loralab.lab import planted
from loralab.review.doctor import DoctorOptions, doctor


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four planted runs, trained once (about 45 s on one thread)."""
    root = tmp_path_factory.mktemp("doctor")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {case: planted.run_case(case, root / case) for case in planted.CASES}
    finally:
        torch.set_num_threads(old)


def _report(folder: Path) -> dict:
    return json.loads((folder / "doctor" / "doctor.json").read_text(encoding="utf-8"))


def test_each_planted_case_puts_its_fix_first(runs, capsys):
    for case in ("overrepresented", "missing_tags", "overtrained"):
        assert main(["doctor", str(runs[case]), "--no-images"]) == 0
    out = capsys.readouterr().out
    over, missing, trained = (_report(runs[c]) for c in ("overrepresented", "missing_tags", "overtrained"))
    first = over["findings"][0]
    assert first["rank"] == 2 and first["title"].startswith("5_vexdef dominates 1_vexarcane")
    assert "'vex'" in first["measured"][0] and "20.0:1" in first["measured"][0]
    assert first["fix"].startswith("balance the repeats: 1_vexarcane 1 -> 4, 5_vexdef 5 -> 1")
    first = missing["findings"][0]
    assert first["rank"] == 1 and first["title"] == "captions lack the activation tag 'olis' on 4 of 12 images of 2_olis"
    assert "loralab dataset edit" in first["fix"] and "--add 'olis' --position 0" in first["fix"]
    first = trained["findings"][0]
    epoch = trained["recommended_epoch"]
    assert first["rank"] == 3 and epoch <= 10 - 2 and first["title"] == f"the run trained past its best epoch: use epoch {epoch} of 10"
    assert f"overtrained-{epoch:06d}.safetensors" in first["fix"] and "validation loss" in first["measured"][0]
    for r in (over, missing, trained):
        assert re.match(r"\d problem\(s\) to fix; the first: ", r["answer"]) and "--no-images" in r["unchecked"][0]
    assert [f["rank"] for f in trained["findings"]] == [3, 4]  # then: 10 repeats (more than 5)
    assert "1. 5_vexdef dominates" in out and "report: " in out
    md = (runs["missing_tags"] / "doctor" / "doctor.md").read_text(encoding="utf-8")
    assert md.index("### 1. captions lack") < md.index("## Checked") < md.index("## Could not check")
    assert "## Pictures" not in md  # --no-images draws nothing, and shows nothing left by an earlier run


def test_a_healthy_run_has_nothing_to_fix(runs):
    d = doctor(DoctorOptions(str(runs["healthy"]), images=False))
    assert d.findings == [] and d.answer == f"nothing to fix; epoch {d.epoch} ({Path(d.epoch_file).name})"
    assert "No problem found." in d.report.read_text(encoding="utf-8")


def test_the_full_doctor_keeps_the_order_and_reuses_the_review(runs):
    """With images on the lab model: review (run first by `loralab review`, then reused), probe of each tag,
    bleed of the pair sharing `vex`."""
    folder = runs["overrepresented"]
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["review", str(folder), "--no-lab-scores", "--max-prompts", "4", "--device", "cpu"]) == 0
        assert main(["doctor", str(folder), "--seeds", "2", "--device", "cpu", "--no-lab-scores"]) == 0
    finally:
        torch.set_num_threads(old)
    r = _report(folder)
    assert r["findings"][0]["title"].startswith("5_vexdef dominates") and r["findings"][0]["rank"] == 2
    assert (folder / "doctor" / "bleed" / "report.md").is_file()
    assert {p.name for p in (folder / "doctor" / "probe").iterdir()} == {"5_vexdef", "1_vexarcane"}
    checked = " ".join(r["checked"])
    assert re.search(r"probe: (vexdef|vexarcane): (new|known); (vexdef|vexarcane): (new|known)\)", checked)
    assert "bleed on overrepresented" in checked and "the epochs (the review in review/review.json)" in checked
    assert r["unchecked"] == [] and r["bleed"]["shared_pieces"][0]["piece"] == "vex"
    assert [f["rank"] for f in r["findings"]] == sorted(f["rank"] for f in r["findings"])
    md = (folder / "doctor" / "doctor.md").read_text(encoding="utf-8")
    for link in ("../review/grid.png", "bleed/grid.png", "probe/5_vexdef/probe.png"):
        assert f"]({link})" in md and (folder / "doctor" / link).is_file()


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("doctor", "review"))
    return dst


def test_nan_and_exploded_losses_come_first(runs, tmp_path):
    from loralab.train.logs import TrainLog

    folder = _copy_run(runs["healthy"], tmp_path / "nan")
    log = TrainLog(folder)
    log.event("nan", step=7, epoch=2)
    log.close()
    first = doctor(DoctorOptions(str(folder), images=False)).findings[0]
    assert first.rank == 0 and first.title == "the loss became NaN at step 7 (epoch 2)" and "bf16" in first.fix
    folder = _copy_run(runs["healthy"], tmp_path / "exploded")
    log = TrainLog(folder)
    log.step(13, 3, 1.5)
    log.epoch(3, step=13)
    log.close()
    first = doctor(DoctorOptions(str(folder), images=False)).findings[0]
    assert first.rank == 0 and first.title == "the loss exploded" and "epoch 3" in first.measured[0]


def test_a_folder_without_log_or_config_says_what_it_could_not_check(runs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    d = doctor(DoctorOptions(str(bare)))
    said = " ".join(d.unchecked)
    assert "has no train_log.jsonl" in said and "no config" in said and "the dataset" in said
    assert d.answer == "nothing to fix; no epoch file to recommend" and "## Could not check" in d.report.read_text()
    # a config but no log: the settings and the dataset are checked, the training is not
    data = runs["missing_tags"].parent / "data"
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.toml").write_text(
        f'train_data_dir = "{data}"\noptimizer_type = "Prodigy"\nlearning_rate = 1e-4\n', encoding="utf-8")
    d = doctor(DoctorOptions(str(tmp_path / "cfg")))
    titles = [f.title for f in d.findings]
    assert titles[0].startswith("captions lack the activation tag 'olis'") and any("Prodigy" in t for t in titles)
    assert "has no train_log.jsonl" in " ".join(d.unchecked) and any("dataset" in c for c in d.checked)


def test_bad_folder_is_a_message_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "doctor", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "is not a folder" in r.stderr and "Traceback" not in r.stderr
