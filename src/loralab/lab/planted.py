"""Training runs on the lab model with one planted problem each: what `loralab doctor` must find first.

    folder = planted.run_case("overtrained", root)          # trains it; returns the run's output_dir

Cases (`CASES`), each a small LoRA run of the demo's settings (`demo.train_config`) that differs in one way:
- `overrepresented`: two concepts whose tags share the CLIP piece `vex` (`vexdef` = vex + def, `vexarcane` =
  vex + ar + cane): 12 ring images × 5 repeats against 3 heart images × 1 (20:1). The fix: balance the repeats.
- `missing_tags`: one concept (`olis`, ring) whose captions lack the activation tag on a third of the images.
  The fix: those captions.
- `overtrained`: the review's overfitting recipe on the demo's dataset (15 ring images × 10 repeats, no reg
  images, rank 16, learning rate 5e-3, 10 epochs, validation_split 0.2): the validation loss bottoms out early and climbs while the training loss falls.
  The fix: the epoch the review recommends.
- `healthy`: the demo's dataset and a short run (2 epochs): nothing to fix.
"""

from __future__ import annotations

from pathlib import Path

from loralab.lab import demo as D
from loralab.lab import world as W

CASES = ("overrepresented", "missing_tags", "overtrained", "healthy")


def write_dataset(case: str, data: Path, seed: int = 0) -> None:
    """The case's kohya dataset under `data`."""
    if case == "overrepresented":
        W.write_kohya_dataset(data, shape="ring", tag="vexdef", n=12, repeats=5, seed=seed)
        W.write_kohya_dataset(data, shape="heart", tag="vexarcane", n=3, repeats=1, seed=seed + 100)
    elif case == "missing_tags":
        folder = W.write_kohya_dataset(data, shape="ring", tag="olis", n=12, repeats=2, seed=seed)
        for cap in sorted(folder.glob("*.txt"))[::3]:  # every third caption loses its activation tag
            tags = [t.strip() for t in cap.read_text(encoding="utf-8").split(",")]
            cap.write_text(", ".join(t for t in tags if t != "olis") + "\n", encoding="utf-8")
    elif case == "overtrained":
        W.write_kohya_dataset(data, shape="ring", tag="olis", n=15, repeats=10, seed=seed)
    elif case == "healthy":
        W.write_kohya_dataset(data, shape="ring", tag="olis", n=10, repeats=2, seed=seed)
    else:
        raise ValueError(f"unknown case {case!r}; one of {CASES}")


def recipe(case: str, seed: int = 0) -> D.DemoRecipe:
    if case == "overtrained":
        return D.DemoRecipe(max_train_epochs=10, unet_lr=5e-3, network_dim=16, network_alpha=16, seed=seed,
                            extra={"validation_split": 0.2, "output_name": case})
    epochs = 2 if case in ("healthy", "overrepresented") else 1
    return D.DemoRecipe(max_train_epochs=epochs, seed=seed, extra={"output_name": case})


def run_case(case: str, root: str | Path, seed: int = 0, device: str = "cpu") -> Path:
    """Write the case's dataset under `root/data`, train it into `root/out`; returns `root/out`."""
    from loralab.recipes.lora import train

    import shutil

    root = Path(root)
    shutil.rmtree(root / "data", ignore_errors=True)  # the case's dataset only, never one left from another case
    write_dataset(case, root / "data", seed)
    train(D.train_config(recipe(case, seed), root / "data", None, root / "out", device))
    return root / "out"
