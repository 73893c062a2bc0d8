"""`loralab demo`: the whole LoRA workflow on the shipped lab model, end to end, in minutes on a CPU.

    run_demo(Path("loralab_demo"), device="cpu")      # what `loralab demo` runs; returns report.md

The recipe, top to bottom (`run_demo`):

1. dataset: 15 images of ``ring`` (the shape the lab model never saw) in kohya layout,
   ``dataset/10_olis/NNNN.png`` + ``.txt``, captions with the activation tag first
   (``"olis, red, blue background, small"``), colours, backgrounds and sizes spread evenly, the three
   aspect ratios (32×32, 48×32, 32×48).
2. regularization images for the class, as the guide recommends: the same base model, the same image
   sizes, DDIM, fixed seeds, the class prompt without the activation tag, written to
   ``reg/1_shape/NNNN.png`` + ``.txt`` by the code of `loralab reg-images` (`loralab.review.reg_images`;
   a rerun keeps the complete ones). The class prompt: a ring is "a shape", and what the model knows
   of shapes is its six trained shapes, so the reg prompts are base captions of the six shapes
   (``"red circle, blue background, small"``) over the (shape, colour, background) triples the base was
   trained on. The held-out triples, on which prior preservation is measured, are never among them.
3. training through `loralab.recipes.lora.train` (the code path of a real checkpoint), saving every epoch:
   once with the reg images (the recommended recipe, `DemoRecipe`) and once without them.
4. evaluation of every saved epoch (each LoRA file loaded back with `LoRANetwork.from_weights`), with the
   lab evaluator (`loralab.lab.evaluator`), DDIM + CFG on fixed seeds, drawn by the one sampler of
   `loralab.train.sampling` (`loralab.lab.model.LabModel.generate`; the reg images of step 2 through
   `SamplingModel.draw`):
   * concept rate: the share of prompts *with* the activation tag (colour/background pairs the dataset
     does not have) whose sample the evaluator reads as a ring; and how many follow the prompt's colour;
   * prior preservation: held-out base prompts *without* the tag, scored for shape, colour and
     background with the LoRA loaded, divided by the base model's own accuracy on the same prompts and
     seeds. Retention = the smallest of the three ratios.
5. files: ``grid_reg.png`` / ``grid_noreg.png`` (rows = epochs, row 0 = base model; columns = prompts),
   ``loss_reg.png`` / ``loss_noreg.png``, ``report.md`` and ``results.json``.

Speed (most of the time is scoring epochs): each epoch's LoRA is merged into the weights while its
images are drawn (`merged_lora`), the tag and base prompts go through the sampler together, one batch
per image size, each image from its own seed (`generate_both`), the base model is scored once for both
runs, and on a multi-core CPU the run without reg images runs in a second process (`demo_workers`).

Recommended epoch (`recommend_epoch`): the earliest epoch whose concept rate >= 80 % and whose
retention >= 90 %; when no epoch meets both, the epoch with the best trade-off, i.e. the largest
min(concept / 80 %, retention / 90 %) (the epoch closest to meeting both bars; ties: the earlier).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loralab.lab import world as W
from loralab.lab.model import LabModel, evaluator_path, lab_model_path
from loralab.review.generate import choose_threads

log = logging.getLogger(__name__)

TAG = "olis"
CLASS_NAME = "shape"
CONCEPT_BAR = 0.80
RETENTION_BAR = 0.90
RETENTION_KEYS = ("shape", "colour", "background")


# --------------------------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class DemoRecipe:
    """The dataset and training settings of the demo (kohya config keys where they are ones)."""

    n_images: int = 15
    repeats: int = 10
    n_reg: int = 150
    max_train_epochs: int = 8
    train_batch_size: int = 4
    network_dim: int = 8
    network_alpha: float = 8.0
    unet_lr: float = 1e-3
    text_encoder_lr: float = 0.0  # 0 = UNet only
    min_snr_gamma: float = 5.0
    prior_loss_weight: float = 1.0
    lr_scheduler: str = "constant"
    seed: int = 0
    extra: dict = field(default_factory=dict)  # further kohya keys, for experiments


@dataclass(frozen=True)
class DemoEval:
    """How each epoch is scored."""

    n_tag_prompts: int = 24
    n_base_prompts: int = 52
    ddim_steps: int = 20
    cfg: float = 7.5
    seed: int = 0
    grid_tag_columns: int = 6
    grid_base_columns: int = 4


QUICK_RECIPE = DemoRecipe(n_images=10, repeats=4, n_reg=40, max_train_epochs=2)
QUICK_EVAL = DemoEval(n_tag_prompts=8, n_base_prompts=8, ddim_steps=10, grid_tag_columns=4, grid_base_columns=2)


# --------------------------------------------------------------------------------------------- prompts
def tag_prompts(n: int, dataset_pairs: set[tuple[str, str]], tag: str = TAG) -> list[W.WorldItem]:
    """`n` prompts with the activation tag, on (colour, background) pairs the dataset does not have
    (so a ring there is the concept, not a copy of a training image); sizes and image sizes alternate."""
    pairs = [(c, b) for c in W.COLOURS for b in W.BACKGROUNDS if c != b and (c, b) not in dataset_pairs]
    step = max(1, len(pairs) // max(1, n))
    pick = (pairs[::step] + [p for i, p in enumerate(pairs) if i % step])[:n]
    sizes = list(W.SIZES)
    return [W.WorldItem(W.HELD_OUT_SHAPE, c, b, sizes[j % 2], *W.DEFAULT_IMAGE_SIZES[j % 3], seed=7919 * j)
            for j, (c, b) in enumerate(pick)]


def base_prompts(n: int) -> list[W.WorldItem]:
    """`n` base prompts without the tag, on the held-out triples (never in the base model's training nor
    in the reg images): all 26 × both sizes for n = 52, image sizes cycling."""
    items = W.held_out_prompts()
    if n < len(items):
        step = len(items) / n
        items = [items[int(i * step)] for i in range(n)]
    return [replace(it, seed=104_729 * j) for j, it in enumerate(items)]


def class_prompts(n: int, seed: int = 0) -> list[W.WorldItem]:
    """The reg prompts: base captions of the six trained shapes on training triples (held-out triples
    excluded), sizes and image sizes spread evenly, one fixed seed each."""
    import numpy as np

    rng = np.random.default_rng(seed + 17)
    triples = W.training_triples()
    order = list(rng.permutation(len(triples)))
    while len(order) < n:
        order += list(rng.permutation(len(triples)))
    sizes = list(W.SIZES)
    return [W.WorldItem(*triples[order[j]], sizes[j % 2], *W.DEFAULT_IMAGE_SIZES[j % 3], seed=31 * j + 1)
            for j in range(n)]


def dataset_pairs(folder: Path) -> set[tuple[str, str]]:
    """(colour, background) pairs of a dataset written by `write_kohya_dataset` (read from captions)."""
    out = set()
    for txt in folder.glob("*.txt"):
        parts = [p.strip() for p in txt.read_text(encoding="utf-8").split(",")]
        if len(parts) >= 3 and parts[2].endswith(" background"):
            out.add((parts[1], parts[2].removesuffix(" background")))
    return out


# --------------------------------------------------------------------------------------------- reg images
def write_reg_images(root: Path, model: LabModel, items: Sequence[W.WorldItem], ev: DemoEval,
                     class_name: str = CLASS_NAME) -> Path:
    """Reg images from the base model itself (same model, same image sizes, DDIM, fixed seeds) in kohya
    layout ``root/1_<class_name>/NNNN.png`` + ``.txt`` (the caption is the prompt), through the code of
    `loralab reg-images` (`loralab.review.reg_images`): image i is ``items[i]`` drawn from seed
    ``ev.seed + items[i].seed + i``; complete images of an earlier run with the same settings are kept,
    other images in the folder are removed. The lab model is drawn on `model`'s device."""
    from loralab.review.generate import SamplingModel
    from loralab.review.reg_images import RegImage, RegSettings
    from loralab.review.reg_images import write_reg_images as draw_reg_images

    folder = root / f"1_{class_name}"
    images = [RegImage(folder, i, it.caption(), it.width, it.height, ev.seed + it.seed + i)
              for i, it in enumerate(items)]
    sm = SamplingModel.load(lab_model_path(), device=str(model.device))
    summary = draw_reg_images(sm, images, RegSettings(steps=ev.ddim_steps, cfg=ev.cfg, sampler="ddim", batch_size=64),
                              progress=False, remove_extra=True)
    log.info("%s", "; ".join(summary.lines()[:1]))
    return folder


# --------------------------------------------------------------------------------------------- training
def train_config(recipe: DemoRecipe, data_dir: Path, reg_dir: Path | None, out: Path, device: str):
    """The kohya-style config of one demo run."""
    from loralab.config import build_config

    keys = {
        "pretrained_model_name_or_path": str(lab_model_path()),
        "train_data_dir": str(data_dir),
        "reg_data_dir": str(reg_dir) if reg_dir else "",
        "output_dir": str(out),
        "output_name": "olis",
        "overwrite": True,  # the demo owns its output folder: a second `loralab demo` starts over
        # 40 px of area: buckets 32×32, 48×32 and 32×48, exactly the lab's image sizes (no crop)
        "resolution": "40",
        "enable_bucket": True,
        "min_bucket_reso": 32,
        "max_bucket_reso": 64,
        "bucket_reso_steps": 16,
        "cache_latents": True,
        "vae_batch_size": 32,
        "network_dim": recipe.network_dim,
        "network_alpha": recipe.network_alpha,
        "learning_rate": recipe.unet_lr,
        "unet_lr": recipe.unet_lr,
        "text_encoder_lr": recipe.text_encoder_lr,
        "network_train_unet_only": recipe.text_encoder_lr == 0,
        "max_train_epochs": recipe.max_train_epochs,
        "save_every_n_epochs": 1,
        "train_batch_size": recipe.train_batch_size,
        "min_snr_gamma": recipe.min_snr_gamma,
        "prior_loss_weight": recipe.prior_loss_weight,
        "lr_scheduler": recipe.lr_scheduler,
        "optimizer_type": "AdamW",
        "save_precision": "fp16",
        "seed": recipe.seed,
        "device": device,
    }
    keys.update(recipe.extra)
    return build_config(None, keys)


def epoch_files(out: Path, name: str, epochs: int) -> list[Path]:
    """The LoRA file of each epoch: ``<name>-NNNNNN.safetensors``, the last one ``<name>.safetensors``."""
    return [out / (f"{name}-{e:06d}.safetensors" if e < epochs else f"{name}.safetensors") for e in range(1, epochs + 1)]


# --------------------------------------------------------------------------------------------- scoring
@dataclass
class EpochScore:
    epoch: int
    concept: float  # share of tag prompts read as the new shape
    tag_colour: float  # share of tag prompts whose colour follows the prompt
    base: dict  # accuracy per attribute on the base prompts (without tag)
    retention: dict  # base[k] / base model's base[k]; "min" = the smallest over RETENTION_KEYS
    base_as_concept: float  # share of base prompts that came out as the new shape (leak)
    loss: float | None = None
    steps: int | None = None


def score_images(evaluator, tag_items, tag_imgs, base_items, base_imgs, reference: dict | None, epoch: int):
    from loralab.lab.evaluator import accuracy

    tp = evaluator.predict(tag_imgs)
    bp = evaluator.predict(base_imgs)
    concept = sum(p.get("shape") == W.HELD_OUT_SHAPE for p in tp) / len(tp)
    tag_colour = sum(p.get("colour") == it.colour for p, it in zip(tp, tag_items)) / len(tp)
    base = accuracy(bp, [{k: it.attributes[k] for k in RETENTION_KEYS + ("size",)} for it in base_items])
    ref = reference or base
    retention = {k: (base[k] / ref[k] if ref[k] > 0 else 1.0) for k in RETENTION_KEYS}
    retention["min"] = min(retention[k] for k in RETENTION_KEYS)
    leak = sum(p.get("shape") == W.HELD_OUT_SHAPE for p in bp) / len(bp)
    return EpochScore(epoch, concept, tag_colour, base, retention, leak), tp, bp


def recommend_epoch(scores: Sequence[EpochScore], concept_bar: float = CONCEPT_BAR,
                    retention_bar: float = RETENTION_BAR) -> tuple[EpochScore, str]:
    """The earliest epoch with concept rate >= `concept_bar` and retention >= `retention_bar`; else the
    best trade-off: the largest min(concept / concept_bar, retention / retention_bar) (ties: earlier).
    Returns the epoch's score and a sentence saying why."""
    trained = [s for s in scores if s.epoch > 0]
    for s in trained:
        if s.concept >= concept_bar and s.retention["min"] >= retention_bar:
            return s, (f"epoch {s.epoch} is the earliest epoch whose concept rate ({s.concept:.0%}) is at least "
                       f"{concept_bar:.0%} and whose base-prompt retention ({s.retention['min']:.0%}) is at least "
                       f"{retention_bar:.0%}")
    best = max(trained, key=lambda s: (min(s.concept / concept_bar, s.retention["min"] / retention_bar), -s.epoch))
    return best, (f"no epoch reaches both bars ({concept_bar:.0%} concept, {retention_bar:.0%} retention); epoch "
                  f"{best.epoch} comes closest (concept {best.concept:.0%}, retention {best.retention['min']:.0%})")


@dataclass
class RunResult:
    name: str  # "reg" / "noreg"
    with_reg: bool
    out: Path
    scores: list[EpochScore]  # epoch 0 = the base model
    images: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]  # epoch -> (tag images, base images)
    preds: dict[int, tuple[list[dict], list[dict]]]
    train_seconds: float
    eval_seconds: float
    steps_per_epoch: int
    log_file: Path
    review: object = None  # review.ReviewResult of `loralab review` on this run (never sees the evaluator)
    review_seconds: float = 0.0


@contextmanager
def merged_lora(model: LabModel, lora_file: Path):
    """`lora_file` merged into the lab model's weights (W + multiplier · ΔW of each module, `delta_weight`)
    for the duration of the block, then every weight copied back exactly. Drawing with merged weights
    skips the LoRA's extra layers on every UNet call (about a third of an epoch's scoring time on a CPU);
    the images equal those of the hooked network up to float rounding (a pixel off by one here and there)."""
    from loralab.network.lora import LoRANetwork

    net = LoRANetwork.from_weights(str(lora_file), model.unet, [model.te], "sd1")
    net.to(model.device, dtype=torch.float32)
    net.eval()
    saved = []
    try:
        with torch.no_grad():
            for m in net.loras:
                w = m.org_module.weight
                saved.append((w, w.detach().clone()))
                w.add_((m.delta_weight() * m.multiplier).to(w.dtype))
        yield net
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)


def generate_both(model: LabModel, tag_items, base_items, ev: DemoEval, tag: str = TAG):
    """The tag prompts' and the base prompts' images in one `LabModel.generate` call (one UNet batch per
    image size instead of two). Each image keeps the noise of its own list: `generate` seeds image i with
    ``ev.seed + items[i].seed + i``, so the base items, placed after the tag items, get their seed lowered
    by ``len(tag_items)``; base image j is drawn from ``ev.seed + base_items[j].seed + j`` as before."""
    n = len(tag_items)
    items = list(tag_items) + [replace(it, seed=it.seed - n) for it in base_items]
    prompts = [it.caption(tag=tag) for it in tag_items] + [it.caption() for it in base_items]
    if not items:
        return [], []
    imgs = model.generate(items, prompts, steps=ev.ddim_steps, cfg=ev.cfg, seed=ev.seed)
    return imgs[:n], imgs[n:]


def evaluate_lora(model: LabModel, lora_file: Path | None, tag_items, base_items, ev: DemoEval, tag: str = TAG):
    """Tag and base images with `lora_file` merged into the model (None: the base model), drawn together
    (`generate_both`); the model's weights are restored afterwards."""
    if lora_file is None:
        return generate_both(model, tag_items, base_items, ev, tag)
    with merged_lora(model, lora_file):
        return generate_both(model, tag_items, base_items, ev, tag)


def train_and_score(name: str, recipe: DemoRecipe, ev: DemoEval, data_dir: Path, reg_dir: Path | None, out: Path,
                    device: str, model: LabModel, evaluator, tag_items, base_items, base_result) -> RunResult:
    """One training run through `train()`, then every saved epoch scored; `base_result` = the epoch-0
    (base model) score, images and predictions, shared by both runs, or a function that returns them
    (called after the training: the base model's scores may still be on their way from another process)."""
    from loralab.train.logs import read_train_log
    from loralab.recipes.lora import train

    cfg = train_config(recipe, data_dir, reg_dir, out, device)
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0
    records = read_train_log(result.log_file)
    epoch_loss = {r["epoch"]: (r.get("loss/epoch_average"), r.get("step")) for r in records if r.get("kind") == "epoch"}
    base_score, base_imgs, base_preds = base_result() if callable(base_result) else base_result
    scores, images, preds = [base_score], {0: base_imgs}, {0: base_preds}
    t0 = time.perf_counter()
    for e, f in enumerate(epoch_files(out, cfg.output_name, result.epochs), start=1):
        tag_imgs, b_imgs = evaluate_lora(model, f, tag_items, base_items, ev)
        s, tp, bp = score_images(evaluator, tag_items, tag_imgs, base_items, b_imgs, base_score.base, e)
        s.loss, s.steps = epoch_loss.get(e, (None, None))
        scores.append(s)
        images[e], preds[e] = (tag_imgs, b_imgs), (tp, bp)
        log.info("[%s] epoch %d: concept %.0f%%, tag colour %.0f%%, base shape/colour/bg %.0f/%.0f/%.0f%%, "
                 "retention %.0f%%", name, e, 100 * s.concept, 100 * s.tag_colour, 100 * s.base["shape"],
                 100 * s.base["colour"], 100 * s.base["background"], 100 * s.retention["min"])
    eval_s = time.perf_counter() - t0
    return RunResult(name, reg_dir is not None, out, scores, images, preds, train_s, eval_s,
                     result.global_step // max(1, result.epochs), result.log_file)


def _clear(folder: Path, patterns: Sequence[str]) -> None:
    """Remove files the demo writes (from an earlier run), so a smaller rerun does not train on stale ones."""
    if folder.is_dir():
        for pattern in patterns:
            for f in folder.glob(pattern):
                if f.is_file():
                    f.unlink()


def score_base_model(model: LabModel, evaluator, tag_items, base_items, ev: DemoEval):
    """(score, images, predictions) of the base model itself: epoch 0 of both runs."""
    ti, bi = evaluate_lora(model, None, tag_items, base_items, ev)
    base_score, tp, bp = score_images(evaluator, tag_items, ti, base_items, bi, None, 0)
    return base_score, (ti, bi), (tp, bp)


def write_dataset(data_dir: Path, recipe: DemoRecipe) -> Path:
    """The demo's ring dataset in `data_dir` (stale tag folders of an earlier run emptied first)."""
    for stale in data_dir.glob(f"*_{TAG}"):
        _clear(stale, ("*.png", "*.txt"))
        if stale.is_dir() and not any(stale.iterdir()):
            stale.rmdir()
    return W.write_kohya_dataset(data_dir, shape=W.HELD_OUT_SHAPE, tag=TAG, n=recipe.n_images,
                                 repeats=recipe.repeats, seed=recipe.seed)


def demo_workers(workers: int | None, device: str) -> int:
    """Processes for the two training runs: None = automatic: 2 on a CPU with at least 2 cores (the run
    without reg images and the base model's scores go to a second process, one torch thread each), else 1.
    Why processes rather than threads: this model's kernels are too small for torch's threads (2 threads
    are ~1.6× faster than 1 on idle cores and many times slower on busy ones, see `choose_threads`); two
    one-thread processes keep both cores busy and draw each image exactly as one process does."""
    import os

    if workers is not None:
        return max(1, int(workers))
    return 2 if torch.device(device).type == "cpu" and (os.cpu_count() or 1) >= 2 else 1


# The second process's state between its two tasks (one worker process, tasks run in order): the lab
# model and evaluator it loaded, and the base model's result that its run without reg images scores against.
_WORKER: dict = {}


def _worker_init(threads: int, log_level: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s [2nd process]: %(message)s")


def _worker_models(device: str):
    if "models" not in _WORKER:
        from loralab.lab.evaluator import Evaluator

        _WORKER["models"] = (LabModel.load(device), Evaluator.load(evaluator_path(), device=device))
    return _WORKER["models"]


def _base_task(device: str, tag_items, base_items, ev: DemoEval):
    """(base result, seconds) in the second process, kept there for `_run_task`."""
    t = time.perf_counter()
    model, evaluator = _worker_models(device)
    _WORKER["base"] = score_base_model(model, evaluator, tag_items, base_items, ev)
    return _WORKER["base"], time.perf_counter() - t


def _run_task(name: str, recipe: DemoRecipe, ev: DemoEval, data_dir: Path, reg_dir: Path | None, out: Path,
              device: str, tag_items, base_items, base_result=None, models=None) -> RunResult:
    """One run trained, scored and reviewed with `models` (model, evaluator) against `base_result` (see
    `train_and_score`); without them (in the second process): its own models and the base result it keeps."""
    if models is None:
        models = _worker_models(device)
        base_result = _WORKER["base"]
    model, evaluator = models
    _clear(out, ("train_log.jsonl", f"{TAG}*.safetensors"))
    run = train_and_score(name, recipe, ev, data_dir, reg_dir, out, device, model, evaluator, tag_items,
                          base_items, base_result)
    review_run_of(run, tag_items, base_items, ev, device)
    return run


def _start_second_process(device: str, tag_items, base_items, ev: DemoEval, noreg_args: tuple):
    """A one-process pool (spawn, this process's torch threads and log level) given the base model's scores and
    then the run without reg images; returns the pool and the two tasks' results to wait for."""
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(
        1, _worker_init, (torch.get_num_threads(), logging.getLogger().getEffectiveLevel()))
    base = pool.apply_async(_base_task, (device, tag_items, base_items, ev))
    return pool, base, pool.apply_async(_run_task, noreg_args)


def write_pictures(out_dir: Path, runs: list, tag_items, base_items, ev: DemoEval) -> dict[str, str]:
    """Each run's sample grid (`grid_<run>.png`) and loss plot (`loss_<run>.png`): their file names by key."""
    from loralab.lab.demo_report import write_grid
    from loralab.train.logs import plot_loss, read_train_log

    files: dict[str, str] = {}
    for r in runs:
        files[f"grid_{r.name}"] = write_grid(out_dir / f"grid_{r.name}.png", r, tag_items, base_items, ev).name
        title = f"training loss, {'with' if r.with_reg else 'without'} reg images"
        files[f"loss_{r.name}"] = plot_loss(read_train_log(r.log_file), out_dir / f"loss_{r.name}.png",
                                            title=title).name
    return files


def run_demo(out_dir: Path, device: str = "cpu", *, quick: bool = False, threads: int | None = None,
             recipe: DemoRecipe | None = None, ev: DemoEval | None = None, workers: int | None = None) -> Path:
    """Run the whole demo into `out_dir` and return the path of its ``report.md`` (see the module docstring).

    quick: a much smaller version (10 images, 2 epochs, 8 + 8 evaluation prompts) for tests.
    threads: torch CPU threads per process (None: 1 with two processes, else `choose_threads`).
    workers: processes (`demo_workers`; None: 2 on a multi-core CPU). With 2, the base model's scores and
    the run without reg images (training, scoring, review) run in a second process while this one draws
    the reg images and trains, scores and reviews the run with them; the figures are the same either way.
    `recipe` / `ev` override the settings.

    The recommended epoch: the earliest epoch whose concept rate (tag prompts drawn as the new shape) is
    at least 80 % and whose retention (base prompts' shape/colour/background accuracy with the LoRA, over
    the base model's, the smallest of the three) is at least 90 %; if none, the epoch with the largest
    min(concept / 80 %, retention / 90 %).
    """
    from loralab.lab.demo_report import write_report
    from loralab.lab.evaluator import Evaluator

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = recipe or (QUICK_RECIPE if quick else DemoRecipe())
    ev = ev or (QUICK_EVAL if quick else DemoEval())
    n_workers = demo_workers(workers, device)
    old_threads = torch.get_num_threads()
    n_threads = choose_threads(threads, device) if n_workers == 1 else (threads or 1)
    if n_threads:
        torch.set_num_threads(n_threads)
    log.info("demo: %s, %d process(es), torch threads %d each", out_dir, n_workers, torch.get_num_threads())
    pool = None
    try:
        timings: dict[str, float] = {}
        # 1. dataset
        t = time.perf_counter()
        data_dir = out_dir / "dataset"
        folder = write_dataset(data_dir, recipe)
        tag_items = tag_prompts(ev.n_tag_prompts, dataset_pairs(folder))
        base_items = base_prompts(ev.n_base_prompts)
        reg_dir = out_dir / "reg"
        noreg_args = ("noreg", recipe, ev, data_dir, None, out_dir / "train_noreg", device, tag_items, base_items)
        if n_workers > 1:  # the base model's scores, then the run without reg images, in a second process
            pool, base_future, noreg_future = _start_second_process(device, tag_items, base_items, ev, noreg_args)
        model = LabModel.load(device)
        evaluator = Evaluator.load(evaluator_path(), device=device)
        timings["dataset and model load"] = time.perf_counter() - t

        # 2. reg images from the base model
        t = time.perf_counter()
        write_reg_images(reg_dir, model, class_prompts(recipe.n_reg, recipe.seed), ev)
        timings["reg images"] = time.perf_counter() - t

        # 3.-4. train, score (against the base model's scores: epoch 0 of both runs) and review
        reg_args = ("reg", recipe, ev, data_dir, reg_dir, out_dir / "train_reg", device, tag_items, base_items)
        if pool is None:
            t = time.perf_counter()
            base_result = score_base_model(model, evaluator, tag_items, base_items, ev)
            timings["base model scores"] = time.perf_counter() - t
            runs = [_run_task(*args, base_result=base_result, models=(model, evaluator))
                    for args in (reg_args, noreg_args)]
        else:  # the reg run trains first and waits for the base model's scores only to score its epochs
            runs = [_run_task(*reg_args, base_result=lambda: base_future.get()[0], models=(model, evaluator)),
                    noreg_future.get()]
            timings["base model scores"] = base_future.get()[1]
        for r in runs:
            timings[f"train ({r.name})"] = r.train_seconds
            timings[f"score epochs ({r.name})"] = r.eval_seconds
            timings[f"loralab review ({r.name})"] = r.review_seconds

        # 5. files
        t = time.perf_counter()
        picks = {r.name: recommend_epoch(r.scores) for r in runs}
        files = write_pictures(out_dir, runs, tag_items, base_items, ev)
        timings["grids and plots"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        report = write_report(out_dir, runs, picks, recipe, ev, timings, files, quick=quick,
                              threads=torch.get_num_threads(), device=device, tag_items=tag_items,
                              base_items=base_items, workers=n_workers)
        log.info("demo done in %.0f s: %s", timings["total"], report)
        return report
    finally:
        if pool is not None:  # done, or stopped (an error, Ctrl-C): the second process ends with this one
            pool.terminate()
            pool.join()
        torch.set_num_threads(old_threads)


def review_prompts(tag_items, base_items, ev: DemoEval) -> list:
    """The prompts `loralab review` draws in the demo: the grid's tag prompts and base prompts, at their
    image sizes, DDIM steps and CFG of the evaluation, seeds 1000 + i (not the evaluator's seeds)."""
    from loralab.train.sampling import SamplePrompt

    items = [(it, it.caption(tag=TAG)) for it in tag_items[:ev.grid_tag_columns]]
    items += [(it, it.caption()) for it in base_items[:ev.grid_base_columns]]
    return [SamplePrompt(text, width=it.width, height=it.height, seed=1000 + i, steps=ev.ddim_steps, scale=ev.cfg,
                         sampler="ddim") for i, (it, text) in enumerate(items)]


def review_run_of(run: RunResult, tag_items, base_items, ev: DemoEval, device: str) -> None:
    """`loralab review` on a demo run, through the same code; the evaluator's scores (already measured)
    are its ground truth, never an input of its recommendation."""
    from loralab.lab.judge import stored_judge
    from loralab.review.review import ReviewOptions, review_run

    t = time.perf_counter()
    opts = ReviewOptions(model=str(lab_model_path()), device=device, batch_size=16)
    run.review = review_run(run.out, opts, prompts=review_prompts(tag_items, base_items, ev),
                            judge=stored_judge(run.scores))
    run.review_seconds = time.perf_counter() - t
