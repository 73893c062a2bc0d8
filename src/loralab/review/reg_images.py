"""`loralab reg-images`: regularization (class) images from the base model you train on, in kohya's layout.

    loralab reg-images --model sd15.safetensors --prompt "woman" --count 200 --out reg --dataset train

The guide's recipe: the same base model as the training, DDIM, no negative prompt, fixed seeds, the class
prompt as the caption. Each prompt (class) gets its own folder ``<out>/<repeats>_<prompt>/`` holding
``NNNN.png`` and ``NNNN.txt`` (the caption = the prompt), the layout `reg_data_dir` reads.

- Seeds: image i of a class is drawn from seed ``seed + i`` (the initial noise is a CPU generator seeded with
  it), so its file name, its seed and its picture never depend on the other images: a rerun draws the same
  picture (with a deterministic sampler such as DDIM; identical pixels for the same batches, within float
  rounding of a batched UNet call otherwise).
- Resolutions: one size (``--resolution W,H``, default the model's own: 512 for SD 1.x, 1024 for SDXL, 32
  for the lab model), or with ``--dataset DIR`` the bucket resolutions of that training dataset, built by the
  training's own bucket code (`FolderDataset`) from the training resolution and bucket options.
  The rule (`spread_over_buckets`): the count is shared out over the buckets in proportion to the training
  samples of each bucket per epoch (its images × their folder's repeats, i.e. what the model sees at that
  size), rounded by largest remainders (ties: the bucket with more samples, then the smaller resolution);
  images 0.. go to the buckets in order of resolution.
- Resumable: an image is kept when its PNG decodes and its settings (prompt, seed, size, steps, CFG,
  sampler, model file, clip skip, v-prediction, precision; stored in the PNG) match the request; anything
  else is drawn again, and a missing or wrong caption is rewritten. Every file is written atomically (`loralab.io`), so a killed run leaves no half-written PNG, and
  rerunning the same command fills in what is missing.
- Batched: the images still to draw are grouped by size and drawn `batch_size` per UNet call, through
  the one sampler (`SamplingModel.draw` → `train/sampling.py`), with a progress bar.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

Size = tuple[int, int]
META_KEY = "loralab_reg"  # PNG text chunk with the settings an image was drawn with (JSON)
DETERMINISTIC = ("ddim", "euler", "k_euler", "lms", "k_lms", "pndm", "heun", "dpmsolver", "dpmsolver++",
                 "dpmsingle", "dpm_2", "k_dpm_2")


@dataclass(frozen=True)
class RegSettings:
    """How every reg image is drawn: the guide's DDIM with CFG against the empty prompt (no negative)."""

    steps: int = 30
    cfg: float = 7.5
    sampler: str = "ddim"
    batch_size: int = 4

    def check(self) -> None:
        from loralab.train.sampling import SAMPLERS

        if self.steps < 1 or self.steps > 1000:
            raise LoralabError(f"--steps {self.steps}: give 1 to 1000 sampling steps (the guide's DDIM: 30-50)")
        if not self.cfg > 0:
            raise LoralabError(f"--cfg {self.cfg}: the CFG scale must be positive (7.5 is usual)")
        if self.batch_size < 1:
            raise LoralabError(f"--batch-size {self.batch_size}: at least 1 image per UNet call")
        if self.sampler not in SAMPLERS:
            raise LoralabError(f"--sampler {self.sampler!r}: unknown; accepted: {', '.join(SAMPLERS)}")


@dataclass(frozen=True)
class RegImage:
    """One planned reg image: its file stem in `folder`, caption (= prompt), size and seed."""

    folder: Path
    index: int
    prompt: str
    width: int
    height: int
    seed: int

    @property
    def png(self) -> Path:
        return self.folder / f"{self.index:04d}.png"

    @property
    def caption_file(self) -> Path:
        return self.png.with_suffix(".txt")

    @property
    def size(self) -> Size:
        return self.width, self.height


@dataclass
class RegSummary:
    written: int = 0
    kept: int = 0
    captions_written: int = 0  # images kept whose caption file was missing or wrong
    per_size: dict[Size, int] = field(default_factory=dict)  # all planned images, per resolution
    folders: list[Path] = field(default_factory=list)
    extra: list[Path] = field(default_factory=list)  # images in the folders that the plan does not name
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = f", {self.written / self.seconds:.2f} images/s" if self.written and self.seconds > 0 else ""
        out = [f"reg images: {self.written} written, {self.kept} kept (already complete) in {self.seconds:.1f} s{rate}"]
        out += [f"  {w}x{h}: {n} images" for (w, h), n in sorted(self.per_size.items())]
        out += [f"  {f}" for f in self.folders]
        if self.extra:
            out.append(f"  note: {len(self.extra)} other images in these folders (e.g. {self.extra[0].name}) are not "
                       "part of this request; kohya trains on them too: remove them if unwanted")
        return out


# --------------------------------------------------------------------------------------------- the plan
def spread_over_buckets(count: int, weights: Mapping[Size, int]) -> dict[Size, int]:
    """Share `count` images over the resolutions in proportion to `weights` (a bucket's training samples per
    epoch): each gets floor(count · w / Σw), and the images left over go one each to the largest remainders
    (ties: the larger weight, then the smaller resolution). The counts sum to `count`; sorted by resolution."""
    total = sum(weights.values())
    if count < 0 or total <= 0:
        raise ValueError("spread_over_buckets: a count >= 0 and positive weights")
    exact = {size: count * w / total for size, w in weights.items()}
    shares = {size: int(x) for size, x in exact.items()}
    left = count - sum(shares.values())
    order = sorted(weights, key=lambda s: (-(exact[s] - shares[s]), -weights[s], s))
    for size in order[:left]:
        shares[size] += 1
    return dict(sorted(shares.items()))


def dataset_bucket_samples(dataset_dir: str | Path, *, resolution: Size, enable_bucket: bool = True,
                           min_bucket_reso: int = 256, max_bucket_reso: int = 1024, bucket_reso_steps: int = 64,
                           bucket_no_upscale: bool = False) -> dict[Size, int]:
    """Training samples per epoch (images × repeats) of each bucket resolution of a kohya folder dataset
    (`dataset_dir` = the train_data_dir, holding `<repeats>_<name>/` folders), as `loralab train` buckets it."""
    from loralab.data.dataset import FolderDataset, scan_folder_dataset

    with _quiet("loralab.data"):
        subsets = scan_folder_dataset(dataset_dir, caption_extension=".txt", key="--dataset")
        ds = FolderDataset(subsets, resolution=resolution, batch_size=1, enable_bucket=enable_bucket,
                           min_bucket_reso=min_bucket_reso, max_bucket_reso=max_bucket_reso,
                           bucket_reso_steps=bucket_reso_steps, bucket_no_upscale=bucket_no_upscale,
                           required_reso_steps=bucket_reso_steps, warn_degenerate=False)
    return {b.resolution: b.count for b in ds.buckets}


class _quiet:
    """Hold a logger at ERROR for a moment: the dataset code logs every folder and bucket, and warns about
    captions, which do not matter for the bucket sizes."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(max(self.level, logging.ERROR))

    def __exit__(self, *exc) -> None:
        self.logger.setLevel(self.level)


def check_prompt(prompt: str) -> str:
    """A class prompt is one line of plain text (it is also the caption); kohya options are not prompt text."""
    text = prompt.strip()
    if not text:
        raise LoralabError("--prompt: the class prompt is empty; give the class word, e.g. --prompt \"woman\"")
    if "\n" in text or "\r" in text:
        raise LoralabError(f"--prompt {text!r}: one line per prompt")
    if re.search(r"(^|\s)--[a-z]", text):
        raise LoralabError(f"--prompt {text!r}: reg images take no prompt options (no negative prompt, by the "
                           "guide's recipe); set --steps, --cfg, --seed, --resolution on the command line")
    return text


def class_folder_name(prompt: str, repeats: int = 1) -> str:
    """kohya's reg folder `<repeats>_<class>`: the prompt, less characters that file systems refuse."""
    name = re.sub(r'[\\/:*?"<>|\x00-\x1f]+', " ", prompt)
    name = re.sub(r"\s+", " ", name).strip(" .")[:100].rstrip(" .")
    if not name:
        raise LoralabError(f"--prompt {prompt!r}: no usable folder name in it; use words")
    return f"{repeats}_{name}"


def read_prompts_file(path: str | Path) -> list[str]:
    """One class prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise LoralabError(f"--prompts {path}: no such file (one class prompt per line)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def plan_class(out: Path, prompt: str, sizes: Mapping[Size, int], *, seed: int = 0, repeats: int = 1) -> list[RegImage]:
    """The images of one class: `sizes[(w, h)]` images at each size (in order of resolution), image i with
    seed `seed + i`, in `out/<repeats>_<prompt>/`."""
    folder = Path(out) / class_folder_name(prompt, repeats)
    images, i = [], 0
    for (w, h), n in sorted(sizes.items()):
        for _ in range(n):
            images.append(RegImage(folder, i, prompt, w, h, seed + i))
            i += 1
    return images


def check_other_repeats(out: Path, folder_name: str) -> None:
    """A `<N>_<class>` folder of the same class with other repeats would be trained as a second reg set."""
    repeats, _, name = folder_name.partition("_")
    if not out.is_dir():
        return
    for other in out.iterdir():
        head, _, rest = other.name.partition("_")
        if other.is_dir() and rest == name and head.isdigit() and head != repeats:
            raise LoralabError(f"{other} holds this class with {head} repeats; rename it to {folder_name} to reuse "
                               "its images with the new --repeats, or choose another --out")


# --------------------------------------------------------------------------------------------- files
def settings_of(img: RegImage, settings: RegSettings, model: Mapping) -> dict:
    """What an image was drawn with (`model`: the model's name and settings, `model_settings`); stored in
    its PNG, compared on resume."""
    return {"prompt": img.prompt, "seed": img.seed, "width": img.width, "height": img.height,
            "steps": settings.steps, "cfg": settings.cfg, "sampler": settings.sampler, **model}


def model_settings(sm, model_name: str = "") -> dict:
    """The parts of the SamplingModel `sm` that change the pictures: which model (file name and size),
    clip skip, v-prediction, the UNet's precision."""
    return {"model": model_name or model_identity(sm.model_path), "clip_skip": sm.clip_skip,
            "v_parameterization": bool(getattr(sm.model, "v_parameterization", False)),
            "precision": str(sm.dtype).removeprefix("torch.")}


def model_identity(model_path: str | Path) -> str:
    """The model as stored with each image: its file name and size (a folder: its name)."""
    path = Path(model_path)
    return f"{path.name} ({path.stat().st_size} bytes)" if path.is_file() else path.name


def png_is_complete(img: RegImage, expected: dict) -> bool:
    """The PNG decodes, has the requested size and was drawn with `expected` settings."""
    from PIL import Image

    if not img.png.is_file():
        return False
    try:
        with Image.open(img.png) as im:
            im.load()
            meta = im.text.get(META_KEY) if hasattr(im, "text") else None
            size = im.size
    except Exception:  # a damaged or foreign file: drawn again
        return False
    try:
        return size == img.size and meta is not None and json.loads(meta) == expected
    except ValueError:
        return False


def caption_is_right(img: RegImage) -> bool:
    try:
        return img.caption_file.read_text(encoding="utf-8").strip() == img.prompt
    except (OSError, UnicodeDecodeError):
        return False


def write_caption(img: RegImage) -> None:
    from loralab.io import atomic_write_bytes

    atomic_write_bytes(img.caption_file, (img.prompt + "\n").encode("utf-8"))


def write_png(img: RegImage, image, meta: dict) -> None:
    """The image with its settings in two text chunks: ours (JSON, read on resume) and A1111's "parameters"."""
    from PIL.PngImagePlugin import PngInfo

    from loralab.io import atomic_write

    info = PngInfo()
    info.add_text(META_KEY, json.dumps(meta, sort_keys=True))
    info.add_text("parameters", f"{meta['prompt']}\nNegative prompt: \nSteps: {meta['steps']}, Sampler: "
                                f"{meta['sampler']}, CFG scale: {meta['cfg']}, Seed: {meta['seed']}, "
                                f"Size: {meta['width']}x{meta['height']}, Model: {meta['model']}")
    atomic_write(img.png, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def extra_images(images: Sequence[RegImage]) -> list[Path]:
    """Images in the planned folders whose names the plan does not use (an earlier, larger --count)."""
    from loralab.data.images import is_image_file

    planned = {img.png for img in images}
    folders = sorted({img.folder for img in images})
    return sorted(p for f in folders if f.is_dir() for p in f.iterdir() if is_image_file(p) and p not in planned)


# --------------------------------------------------------------------------------------------- drawing
def write_reg_images(sm, images: Sequence[RegImage], settings: RegSettings = RegSettings(), *,
                     model_name: str = "", progress: bool = True, remove_extra: bool = False) -> RegSummary:
    """Draw the `images` that are not already complete with the SamplingModel `sm` (no LoRA) and write them
    with their captions; complete ones are kept. `remove_extra` deletes other images (and their captions) in
    the folders, else they are listed in the summary."""
    from tqdm.auto import tqdm

    from loralab.train.sampling import SamplePrompt

    settings.check()
    t0 = time.perf_counter()
    model = model_settings(sm, model_name)
    summary = RegSummary(folders=sorted({img.folder for img in images}))
    for img in images:
        summary.per_size[img.size] = summary.per_size.get(img.size, 0) + 1
    todo: dict[Size, list[RegImage]] = {}
    for img in images:
        if png_is_complete(img, settings_of(img, settings, model)):
            summary.kept += 1
            if not caption_is_right(img):
                write_caption(img)
                summary.captions_written += 1
        else:
            todo.setdefault(img.size, []).append(img)
    extra = extra_images(images)
    if remove_extra:
        for p in extra:
            p.unlink()
            p.with_suffix(".txt").unlink(missing_ok=True)
    else:
        summary.extra = extra
    total = sum(len(v) for v in todo.values())
    if settings.sampler not in DETERMINISTIC and total:
        log.warning("sampler %s draws random noise at each step for the whole batch: an image redrawn on resume "
                    "will not be the same picture (ddim is)", settings.sampler)
    with tqdm(total=total, desc="reg images", unit="img", disable=not progress or total == 0,
              dynamic_ncols=True) as bar:
        for (w, h), group in sorted(todo.items()):
            for start in range(0, len(group), settings.batch_size):
                batch = group[start:start + settings.batch_size]
                prompts = [SamplePrompt(img.prompt, "", w, h, img.seed, settings.steps, settings.cfg,
                                        settings.sampler) for img in batch]
                pictures = sm.draw(prompts, sampler=settings.sampler, batch_size=len(batch))
                for img, picture in zip(batch, pictures):
                    write_png(img, picture, settings_of(img, settings, model))
                    if not caption_is_right(img):
                        write_caption(img)
                summary.written += len(batch)
                bar.update(len(batch))
    summary.seconds = time.perf_counter() - t0
    return summary


@dataclass
class RegRequest:
    """What `loralab reg-images` asks for (see the module docstring)."""

    model: str
    prompts: list[str]
    out: str
    count: int
    resolution: Size | None = None  # image size; with `dataset`, the training resolution (default: the model's)
    dataset: str = ""
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    repeats: int = 1
    seed: int = 0
    settings: RegSettings = field(default_factory=RegSettings)
    device: str = ""
    precision: str = "fp32"
    clip_skip: int = 0
    v_parameterization: bool = False

    def check(self) -> list[str]:
        """Every user error before a model loads; returns the cleaned prompts."""
        from loralab.data.buckets import check_resolution

        if self.count < 1:
            raise LoralabError(f"--count {self.count}: give how many reg images to make per prompt (at least 1; "
                               "kohya uses as many reg samples per epoch as training samples)")
        if self.repeats < 1:
            raise LoralabError(f"--repeats {self.repeats}: at least 1 (the reg folder's <repeats>_ prefix)")
        if not self.model:
            raise LoralabError("--model: give the base model you train on (a .safetensors/.ckpt file or a "
                               "diffusers folder)")
        if not Path(self.model).exists():
            raise LoralabError(f"--model {self.model}: no such file or folder; give the base model you train on")
        if self.resolution is not None:
            try:
                check_resolution(self.resolution)
            except LoralabError:
                raise LoralabError(f"--resolution {self.resolution[0]},{self.resolution[1]}: width and height must "
                                   "be positive multiples of 8, e.g. 512 or 768,512") from None
        if self.dataset and not Path(self.dataset).is_dir():
            raise LoralabError(f"--dataset {self.dataset}: no such folder (give the train_data_dir, which holds "
                               "<repeats>_<name>/ folders)")
        self.settings.check()
        prompts = [check_prompt(p) for p in self.prompts]
        if not prompts:
            raise LoralabError("reg-images: give the class prompt, e.g. --prompt \"woman\" (or --prompts FILE)")
        names = [class_folder_name(p, self.repeats) for p in prompts]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise LoralabError(f"--prompt: two prompts give the same folder {dup}; give each class once")
        for name in names:
            check_other_repeats(Path(self.out), name)
        return prompts


def reg_images(req: RegRequest, *, progress: bool = True) -> RegSummary:
    """`loralab reg-images`: check the request, load the model, plan every class, draw what is missing."""
    from loralab.review.generate import SamplingModel

    prompts = req.check()
    sm = SamplingModel.load(req.model, device=req.device, precision=req.precision,
                            v_parameterization=req.v_parameterization, clip_skip=req.clip_skip)
    native = (sm.native_size, sm.native_size)
    resolution = req.resolution or native
    factor = sm.vae_factor
    if req.dataset:
        weights = dataset_bucket_samples(req.dataset, resolution=resolution, enable_bucket=req.enable_bucket,
                                         min_bucket_reso=req.min_bucket_reso, max_bucket_reso=req.max_bucket_reso,
                                         bucket_reso_steps=req.bucket_reso_steps,
                                         bucket_no_upscale=req.bucket_no_upscale)
        sizes = spread_over_buckets(req.count, weights)
        log.info("buckets of %s (training samples per epoch): %s", req.dataset,
                 ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(weights.items())))
    else:
        sizes = {resolution: req.count}
    bad = [s for s in sizes if s[0] % factor or s[1] % factor]
    if bad:
        raise LoralabError(f"resolution {bad[0][0]},{bad[0][1]}: not a multiple of this model's VAE factor {factor}")
    images = [img for p in prompts for img in plan_class(Path(req.out), p, sizes, seed=req.seed, repeats=req.repeats)]
    return write_reg_images(sm, images, req.settings, progress=progress)
