"""Pack a `train_base.py` output folder into the files shipped with loralab.

    python tools/lab/pack.py out/lab                  # -> src/loralab/lab/assets/
    python tools/lab/pack.py out/lab /tmp/assets      # somewhere else

writes `lab_model.safetensors` (the base model as an LDM-layout single-file SD 1.x checkpoint in fp16,
loaded by the same `load_base_model` as any real checkpoint), `evaluator.safetensors` (the shape
classifier) and `lab_model.json` (how it was trained and measured: the train_base report). The file
names and the assets folder are `loralab.lab.model`'s, where the package finds them at run time.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from base_model import load_trained
from loralab.lab.model import ASSETS, EVALUATOR_FILE, MODEL_FILE, REPORT_FILE


def pack(train_dir: str | Path, assets: Path = ASSETS) -> Path:
    from loralab.models.loader import save_single_file

    train_dir = Path(train_dir)
    unet, vae, te, cfg = load_trained(train_dir)
    vae.register_to_config(scaling_factor=float(cfg["vae_scaling_factor"]))
    report = json.loads((train_dir / "report.json").read_text())
    assets = Path(assets)
    assets.mkdir(parents=True, exist_ok=True)
    out = assets / MODEL_FILE
    save_single_file(out, unet, vae, [te], family="sd1", dtype=torch.float16,
                     metadata={"loralab.lab_model": "1", "loralab.train_command": report.get("command", "")})
    shutil.copyfile(train_dir / "evaluator.safetensors", assets / EVALUATOR_FILE)
    (assets / REPORT_FILE).write_text(json.dumps({"configs": cfg, "report": report}, indent=1))
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python tools/lab/pack.py TRAIN_DIR [ASSETS_DIR]")
    print(pack(*sys.argv[1:]))
