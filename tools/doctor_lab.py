"""`loralab doctor` on the lab's planted cases (`lab/planted.py`): does each case's fix come first?

    python tools/doctor_lab.py --out /tmp/doctor_lab [--cases overtrained,healthy] [--no-images]

Trains each case (1 torch thread), runs the doctor on it through the CLI's code (with the lab evaluator as
judge, as `loralab doctor` does on a lab-model run), prints per case: the answer, the first finding, the
recommended epoch, and the seconds for training and for the doctor; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loralab.lab import planted  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/doctor_lab")
    p.add_argument("--cases", default=",".join(planted.CASES))
    p.add_argument("--no-images", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from loralab.cli import main as cli

    rows = []
    for case in a.cases.split(","):
        root = Path(a.out) / case
        t = time.perf_counter()
        folder = planted.run_case(case, root, seed=a.seed)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        assert cli(["doctor", str(folder), *(["--no-images"] if a.no_images else [])]) == 0
        doctor_s = time.perf_counter() - t
        d = json.loads((folder / "doctor" / "doctor.json").read_text())
        first = d["findings"][0] if d["findings"] else None
        rows.append({"case": case, "answer": d["answer"], "first": first and first["title"],
                     "first_fix": first and first["fix"], "epoch": d["recommended_epoch"],
                     "train_s": round(train_s, 1), "doctor_s": round(doctor_s, 1),
                     "titles": [f["title"] for f in d["findings"]]})
        print(json.dumps(rows[-1], indent=1), flush=True)
    (Path(a.out) / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
