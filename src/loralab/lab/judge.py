"""The lab evaluator as `loralab review`'s ground truth: per-epoch scores of a run trained on the lab model.

Score of an epoch = concept rate × retention, as `loralab demo` measures them (`demo.score_images`):
the share of prompts with the activation tag drawn as the new shape, times the smallest ratio of the
base prompts' shape / colour / background accuracy with the LoRA to the base model's. The activation
tag is the run's trigger word (`review.prompts.trigger_words`), the tag prompts avoid the dataset's
colour/background pairs, and the new shape is the one the lab model never saw (ring).
"""

from __future__ import annotations

from pathlib import Path

from loralab.errors import LoralabError
from loralab.review.review import Judge

COLUMNS = (("concept", "lab: concept"), ("retention", "lab: retention"), ("score", "lab: concept × retention"))


def lab_judge(folder: str | Path, name: str = "", *, device: str = "cpu", ev=None) -> Judge:
    from loralab.lab import demo as D
    from loralab.lab.evaluator import Evaluator
    from loralab.lab.model import LabModel, evaluator_path
    from loralab.review.prompts import trigger_words
    from loralab.review.runlog import read_run

    run = read_run(folder, name)
    triggers = trigger_words(run.epochs[-1].metadata)
    if not triggers:
        raise LoralabError(f"{folder}: no trigger word found in the run's captions, so the lab evaluator cannot "
                           "score it (a lab run's captions start with an activation tag, e.g. `olis, red, ...`)")
    tag = triggers[0]
    ev = ev or D.DemoEval()
    data = Path(run.config.get("train_data_dir") or "")
    pairs = set()
    for folder_ in (data.iterdir() if data.is_dir() else []):
        if folder_.is_dir():
            pairs |= D.dataset_pairs(folder_)
    tag_items = D.tag_prompts(ev.n_tag_prompts, pairs, tag)
    base_items = D.base_prompts(ev.n_base_prompts)

    def score(files: dict) -> dict[int, dict[str, float]]:
        model = LabModel.load(device)
        evaluator = Evaluator.load(evaluator_path(), device=device)
        out: dict[int, dict[str, float]] = {}
        reference = None
        for e in sorted(files):
            ti, bi = D.evaluate_lora(model, files[e], tag_items, base_items, ev, tag=tag)
            s, _, _ = D.score_images(evaluator, tag_items, ti, base_items, bi, reference, e)
            if e == 0:
                reference = s.base
            out[e] = {"concept": s.concept, "retention": s.retention["min"], "score": s.concept * s.retention["min"]}
        return out

    return Judge("the lab evaluator", score, COLUMNS)


def stored_judge(scores) -> Judge:
    """A judge that returns scores already measured (the demo scores every epoch before its review)."""
    table = {s.epoch: {"concept": s.concept, "retention": s.retention["min"], "score": s.concept * s.retention["min"]}
             for s in scores}
    return Judge("the lab evaluator", lambda files: {e: table[e] for e in files if e in table}, COLUMNS)


def shape_reader(device: str = "cpu"):
    """The lab evaluator as an image judge for `loralab bleed`: images -> the shape each shows (None when the
    evaluator finds no object)."""
    from loralab.lab.evaluator import Evaluator
    from loralab.lab.model import evaluator_path

    ev = Evaluator.load(evaluator_path(), device=device)

    def read(images) -> list:
        return [p["shape"] for p in ev.predict([im.convert("RGB") for im in images])]

    return read
