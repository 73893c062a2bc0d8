"""Pack a `train_base` output folder into the files shipped with loralab.

    python -m loralab.lab.pack out/lab_base_h100_seed0

writes `src/loralab/lab/assets/lab_model.safetensors` (the base model as an LDM-layout single-file SD 1.x
checkpoint in fp16, loaded by the same `load_base_model` as any real checkpoint), `evaluator.safetensors`
(the shape classifier) and `lab_model.json` (how it was trained and measured: the train_base report).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
MODEL_FILE = "lab_model.safetensors"
EVALUATOR_FILE = "evaluator.safetensors"
REPORT_FILE = "lab_model.json"


def lab_model_path() -> Path:
    """The shipped lab base model (LDM single file)."""
    return ASSETS / MODEL_FILE


def evaluator_path() -> Path:
    return ASSETS / EVALUATOR_FILE


def pack(train_dir: str | Path, assets: Path = ASSETS) -> Path:
    from loralab.lab.train_base import load_trained
    from loralab.models.loader import save_single_file

    train_dir = Path(train_dir)
    unet, vae, te, cfg = load_trained(train_dir)
    vae.register_to_config(scaling_factor=float(cfg["vae_scaling_factor"]))
    report = json.loads((train_dir / "report.json").read_text())
    assets.mkdir(parents=True, exist_ok=True)
    out = assets / MODEL_FILE
    save_single_file(out, unet, vae, [te], family="sd1", dtype=torch.float16,
                     metadata={"loralab.lab_model": "1", "loralab.train_command": report.get("command", "")})
    shutil.copyfile(train_dir / "evaluator.safetensors", assets / EVALUATOR_FILE)
    (assets / REPORT_FILE).write_text(json.dumps({"configs": cfg, "report": report}, indent=1))
    return out


if __name__ == "__main__":
    print(pack(sys.argv[1]))
