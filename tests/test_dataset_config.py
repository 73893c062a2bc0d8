"""sd-scripts' dataset_config: keys, precedence, problems, several datasets (multi-resolution) and training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from loralab.config import TrainConfig, build_config
from loralab.data.dataset_config import dataset_config_problems, read_dataset_config, scan_dataset_config
from loralab.data.dataset_group import DatasetGroup, configured_datasets
from loralab.errors import LoralabError
from loralab.recipes.lora import train
from test_train import base_cfg


def make_folder(d: Path, n: int, size=(64, 64), caption: str | None = "tag{i}, red", seed=0) -> Path:
    """`n` random images (and captions, `{i}` = index; None: no caption files) directly in `d`."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"img{i}.png")
        if caption is not None:
            (d / f"img{i}.txt").write_text(caption.format(i=i))
    return d


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def defaults(**kw) -> dict:
    """The training config's values, as the trainer passes them (`dataclasses.asdict(cfg)`)."""
    return dataclasses.asdict(TrainConfig(**kw))


# ----------------------------------------------------------------------------------------- parsing


PRECEDENCE = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = [96, 64]
keep_tokens = 2
caption_prefix = "ds1"

  [[datasets.subsets]]
  image_dir = "{a}"
  class_tokens = "hoge girl"

  [[datasets.subsets]]
  image_dir = "{b}"
  keep_tokens = 3
  num_repeats = 5
  flip_aug = false
  caption_extension = ".caption"

  [[datasets.subsets]]
  image_dir = "{reg}"
  is_reg = true
  class_tokens = "girl"
  keep_tokens_separator = "|||"

[[datasets]]
batch_size = 3
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
validation_split = 0.5

  [[datasets.subsets]]
  image_dir = "{a}"
  caption_suffix = "sfx"
"""


def test_precedence_subset_dataset_general_training_config(tmp_path):
    a, b, reg = (make_folder(tmp_path / n, 2) for n in ("10_a", "b", "reg"))
    toml = write(tmp_path / "ds.toml", PRECEDENCE.format(a=a, b=b, reg=reg))
    # the training config: the fallback after [general]
    dc = read_dataset_config(toml, defaults(train_batch_size=2, resolution="64,64", caption_tag_dropout_rate=0.25,
                                            secondary_separator=";;;"))
    keys = ("num_repeats", "keep_tokens", "shuffle_caption", "flip_aug", "caption_extension", "class_tokens", "is_reg",
            "caption_prefix", "caption_suffix", "keep_tokens_separator", "caption_tag_dropout_rate", "secondary_separator")
    table = [tuple(s.values[k] for k in keys) for d in dc.datasets for s in d.subsets]
    assert table == [
        # repeats keep  shuffle flip   ext         class tokens reg    prefix sfx    kts    tag dropout 2nd sep
        (1,      2,    True,   True,  ".txt",     "hoge girl", False, "ds1", "",    "",    0.25,       ";;;"),
        (5,      3,    True,   False, ".caption", None,        False, "ds1", "",    "",    0.25,       ";;;"),
        (1,      2,    True,   True,  ".txt",     "girl",      True,  "ds1", "",    "|||", 0.25,       ";;;"),
        (1,      1,    True,   True,  ".txt",     None,        False, "",    "sfx", "",    0.25,       ";;;"),
    ]
    ds_keys = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
               "validation_split")
    assert [tuple(d.values[k] for k in ds_keys) for d in dc.datasets] == [
        ((96, 64), 2, False, 256, 1024, 64, 0.0),  # batch size and resolution from the training config
        ((64, 64), 3, True, 32, 128, 32, 0.5),
    ]
    # each subset carries its own caption options
    first, second = dc.datasets[0].subsets[0].caption_options(), dc.datasets[0].subsets[1].caption_options()
    assert (first.keep_tokens, first.caption_prefix, first.shuffle_caption) == (2, "ds1", True)
    assert (second.keep_tokens, second.secondary_separator, second.caption_tag_dropout_rate) == (3, ";;;", 0.25)
    # the folder name "10_a" is not a repeat count here; class_tokens replaces the folder-name caption
    subsets = scan_dataset_config(dc)
    s = subsets[0][0]
    assert (s.name, s.num_repeats, s.class_tokens, s.flip_aug) == ("10_a", 1, "hoge girl", True)
    assert [e.caption for e in s.images] == ["tag0, red", "tag1, red"]
    assert [e.caption for e in subsets[0][1].images] == ["", ""]  # .caption files absent, no class_tokens: ""


# kohya_ss (bmaltais/kohya_ss, Apache License 2.0): test/config/dataset.toml and test/config/dataset-multires.toml,
# copied unchanged except the image_dir paths, which point at a folder this test makes.
KOHYA_SS_DATASET = """[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 1
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 1024
bucket_reso_steps = 64
bucket_no_upscale = true

  [[datasets.subsets]]
  image_dir = '{img}'
  num_repeats = 10
  class_tokens = 'darius kawasaki person'
  caption_extension = '.txt'"""

KOHYA_SS_MULTIRES = """[general]
# define common settings here
flip_aug = true
color_aug = false
keep_tokens_separator= "|||"
shuffle_caption = false
caption_tag_dropout_rate = 0
caption_extension = ".txt"
min_bucket_reso = 64
max_bucket_reso = 2048

[[datasets]]
# define the first resolution here
batch_size = 1
enable_bucket = true
resolution = [1024, 1024]

  [[datasets.subsets]]
  image_dir = "{img}"
  num_repeats = 10

[[datasets]]
# define the second resolution here
batch_size = 1
enable_bucket = true
resolution = [768, 768]

  [[datasets.subsets]]
  image_dir = "{img}"
  num_repeats = 10

[[datasets]]
# define the third resolution here
batch_size = 1
enable_bucket = true
resolution = [512, 512]

  [[datasets.subsets]]
  image_dir = "{img}"
  num_repeats = 10"""


def test_kohya_ss_dataset_configs_resolve(tmp_path):
    img = make_folder(tmp_path / "img" / "10_darius kawasaki person", 2, size=(64, 96))
    dc = read_dataset_config(write(tmp_path / "dataset.toml", KOHYA_SS_DATASET.format(img=img)), defaults())
    (d,) = dc.datasets
    assert d.bucket_options() == dict(resolution=(512, 512), batch_size=4, enable_bucket=True, min_bucket_reso=64,
                                      max_bucket_reso=1024, bucket_reso_steps=64, bucket_no_upscale=True)
    (s,) = d.subsets
    assert (s.image_dir, s.values["num_repeats"], s.values["class_tokens"], s.values["caption_extension"],
            s.values["keep_tokens"], s.values["flip_aug"]) == (img, 10, "darius kawasaki person", ".txt", 1, False)

    as_json = {"datasets": [{"resolution": 512, "batch_size": 4, "keep_tokens": 1, "enable_bucket": True,
                             "min_bucket_reso": 64, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
                             "bucket_no_upscale": True, "subsets": [{"image_dir": str(img), "num_repeats": 10,
                                                                     "class_tokens": "darius kawasaki person",
                                                                     "caption_extension": ".txt"}]}]}
    from_json = read_dataset_config(write(tmp_path / "dataset.json", json.dumps(as_json)), defaults())
    assert from_json.datasets[0].values == d.values and from_json.datasets[0].subsets[0].values == s.values

    dc = read_dataset_config(write(tmp_path / "multires.toml", KOHYA_SS_MULTIRES.format(img=img)), defaults())
    assert [d.values["resolution"] for d in dc.datasets] == [(1024, 1024), (768, 768), (512, 512)]
    for d in dc.datasets:
        assert (d.values["batch_size"], d.values["enable_bucket"], d.values["min_bucket_reso"],
                d.values["max_bucket_reso"], d.values["bucket_reso_steps"]) == (1, True, 64, 2048, 64)
        (s,) = d.subsets
        assert (s.values["num_repeats"], s.values["flip_aug"], s.values["keep_tokens_separator"],
                s.values["shuffle_caption"], s.values["caption_extension"]) == (10, True, "|||", False, ".txt")
    group, val = configured_datasets(dc, seed=1)
    assert val == [] and [d.resolution for d in group.datasets] == [(1024, 1024), (768, 768), (512, 512)]
    assert group.num_train_images == 3 * 2 * 10 and group.num_batches_per_epoch == 60


# ----------------------------------------------------------------------------------------- epochs


def test_an_epoch_holds_every_datasets_batches_interleaved(tmp_path):
    a, b = make_folder(tmp_path / "a", 3), make_folder(tmp_path / "b", 2, size=(96, 96))
    toml = write(tmp_path / "ds.toml", f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 3
[[datasets]]
resolution = 96
batch_size = 1
  [[datasets.subsets]]
  image_dir = "{b}"
  num_repeats = 2
""")
    group, _ = configured_datasets(read_dataset_config(toml, defaults()), seed=5)
    assert group.num_batches_per_epoch == 5 + 4  # ceil(9 / 2) + 4 / 1
    epoch0 = group.batches_for_epoch(0, seed=5)
    assert len(epoch0) == 9
    sizes = [{s.choice.bucket for s in batch} for batch in epoch0]
    assert all(len(s) == 1 for s in sizes)  # a batch never mixes datasets (resolutions)
    order = [next(iter(s)) for s in sizes]
    assert order.count((64, 64)) == 5 and order.count((96, 96)) == 4
    assert order != sorted(order) and order != sorted(order, reverse=True)  # interleaved
    # a function of (seed, epoch): rebuilt the same on resume; another epoch is another order
    assert [[x.entry.path for x in b] for b in group.batches_for_epoch(0, seed=5)] == \
           [[x.entry.path for x in b] for b in epoch0]
    assert [[x.entry.path for x in b] for b in group.batches_for_epoch(1, seed=5)] != \
           [[x.entry.path for x in b] for b in epoch0]


def test_validation_split_per_dataset(tmp_path):
    a, b = make_folder(tmp_path / "a", 4), make_folder(tmp_path / "b", 4, seed=1)
    toml = write(tmp_path / "ds.toml", f"""
[[datasets]]
resolution = 64
validation_split = 0.5
validation_seed = 3
  [[datasets.subsets]]
  image_dir = "{a}"
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{b}"
""")
    group, val = configured_datasets(read_dataset_config(toml, defaults(caption_extension=".txt")), seed=1)
    assert [s.img_count for s in group.subsets] == [2, 4]
    (held,) = val
    assert [s.dir for s in held.subsets] == [a] and held.subsets[0].img_count == 2
    assert not {e.path for e in held.subsets[0].images} & {e.path for e in group.subsets[0].images}
    assert isinstance(DatasetGroup(val).samples, list)


# ----------------------------------------------------------------------------------------- problems


def test_several_problems_in_one_message_with_places(tmp_path):
    a = make_folder(tmp_path / "a", 1)
    toml = write(tmp_path / "ds.toml", f"""
[general]
caption_extention = ".txt"
[[datasets]]
resolution = 64
batch_size = 0
num_repeat = 2
  [[datasets.subsets]]
  image_dir = "{a}"
  flipaug = true
  resolution = 128
  color_aug = true
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'nowhere'}"
  caption_dropout_rate = "half"
  [[datasets.subsets]]
  class_tokens = "x"
""")
    problems = dataset_config_problems(toml, defaults())
    assert all(p.startswith(f"dataset_config: {toml}: ") for p in problems)
    text = "\n".join(problems)
    for part in ("[general]: unknown key 'caption_extention'; the dataset_config name is caption_extension",
                 "[[datasets]] #1: batch_size = 0: must be at least 1",
                 "[[datasets]] #1: unknown key 'num_repeat'; did you mean num_repeats?",
                 "[[datasets]] #1 subset #1: unknown key 'flipaug'; did you mean flip_aug?",
                 "[[datasets]] #1 subset #1: resolution is a dataset key",
                 f"[[datasets]] #1 subset #2: image_dir: the folder {tmp_path / 'nowhere'} does not exist",
                 "[[datasets]] #1 subset #2: caption_dropout_rate = 'half': expected a number",
                 "[[datasets]] #1 subset #3: image_dir: missing"):
        assert part in text, part
    assert len(problems) == 8  # color_aug = true is fine (without cache_latents)
    with pytest.raises(LoralabError, match="^8 problems in the dataset_config:"):
        read_dataset_config(toml, defaults())
    # a name far from every key gets no suggestion
    write(toml, f'[[datasets]]\nzzz = 1\n  [[datasets.subsets]]\n  image_dir = "{a}"\n')
    assert dataset_config_problems(toml, defaults()) == [f"dataset_config: {toml}: [[datasets]] #1: unknown key 'zzz'"]


def test_cached_text_encoder_outputs_refuse_a_subset_whose_caption_changes(tmp_path):
    a = make_folder(tmp_path / "a", 1)
    toml = write(tmp_path / "ds.toml", f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{a}"\n'
                                       '  shuffle_caption = true\n  caption_dropout_rate = 0.1\n')
    assert dataset_config_problems(toml, defaults()) == []
    (problem,) = dataset_config_problems(toml, defaults(cache_text_encoder_outputs=True, network_train_unet_only=True))
    assert "[[datasets]] #1 subset #1: shuffle_caption: the caption changes every step" in problem


@pytest.mark.parametrize("case, subset, expected", [
    ("unknown subset key", 'image_dir = "{a}"\n  num_repeets = 3', "unknown key 'num_repeets'; did you mean num_repeats?"),
    ("missing folder", 'image_dir = "{a}_missing"', "_missing does not exist"),
    ("fine-tuning subset", 'image_dir = "{a}"\n  metadata_file = "meta.json"',
     "fine-tuning subsets (metadata_file) are not supported: put each caption in a .txt file"),
    ("masks without masked_loss", 'image_dir = "{a}"\n  conditioning_data_dir = "{a}"',
     "conditioning_data_dir: mask images are used only with masked_loss = true"),
])
def test_bad_dataset_config_is_one_message_and_trains_nothing(tmp_path, tiny_sd1_checkpoint, case, subset, expected):
    a = make_folder(tmp_path / "a", 1)
    toml = write(tmp_path / "ds.toml", f"[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  {subset.format(a=a)}\n")
    out = tmp_path / "out"
    with pytest.raises(LoralabError) as e:
        train(build_config(None, base_cfg(tiny_sd1_checkpoint, tmp_path, out, dataset_config=toml, max_train_steps=1)))
    message = str(e.value)
    assert message.startswith(f"dataset_config: {toml}: [[datasets]] #1 subset #1: ") and expected in message
    assert "\n" not in message  # one problem, one line
    assert not out.exists() or not any(out.iterdir())


# ----------------------------------------------------------------------------------------- training


MULTIRES = """
[general]
caption_extension = ".txt"
flip_aug = true
[[datasets]]
resolution = 64
batch_size = 2
caption_prefix = "small"
  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 2
  class_tokens = "alpha"
  [[datasets.subsets]]
  image_dir = "{reg}"
  is_reg = true
  flip_aug = false
[[datasets]]
resolution = 96
batch_size = 1
  [[datasets.subsets]]
  image_dir = "{a}"
  caption_prefix = "big"
  keep_tokens = 1
  shuffle_caption = true
"""


def test_multiresolution_training_with_per_subset_options(tmp_path, tiny_sd1_checkpoint, monkeypatch):
    import loralab.train.step as step
    import loralab.train.validation  # noqa: F401  (it imports step's functions: before they are patched here)

    a = make_folder(tmp_path / "10_alpha", 2, caption="alpha, tag{i}, red, blue")
    reg = make_folder(tmp_path / "reg", 2, caption=None, seed=3)
    toml = write(tmp_path / "ds.toml", MULTIRES.format(a=a, reg=reg))
    seen: list[tuple] = []  # (bucket, latent size, flip, caption) of every trained sample
    latents_of, conditioning_of = step.batch_latents, step.text_conditioning
    pending: dict = {}

    def record_latents(run, batch, flips, *augments):
        latents = latents_of(run, batch, flips, *augments)
        pending["rows"] = [(s.choice.bucket, tuple(latents.shape[-2:]), f, s.entry.subset.is_reg)
                           for s, f in zip(batch, flips)]
        return latents

    def record_captions(run, captions, cached=True):
        seen.extend(row + (c,) for row, c in zip(pending.pop("rows"), captions))
        return conditioning_of(run, captions, cached)

    monkeypatch.setattr(step, "batch_latents", record_latents)
    monkeypatch.setattr(step, "text_conditioning", record_captions)
    cfg = build_config(None, base_cfg(tiny_sd1_checkpoint, tmp_path, tmp_path / "out", dataset_config=toml,
                                      max_train_epochs=1, train_batch_size=4))
    result = train(cfg)
    # dataset 1: 2 images x 2 repeats + 4 balanced reg samples = 8 samples, batch 2 -> 4 batches;
    # dataset 2: 2 images x 1, batch 1 -> 2 batches; 6 batches an epoch
    assert result.global_step == 6 and len(seen) == 8 + 2
    latent_sizes = {bucket: size for bucket, size, *_ in seen}
    assert set(latent_sizes) == {(64, 64), (96, 96)}
    assert latent_sizes[(96, 96)][0] * 64 == latent_sizes[(64, 64)][0] * 96  # two resolutions trained
    small = [c for bucket, _, _, reg_, c in seen if bucket == (64, 64) and not reg_]
    big = [c for bucket, *_, c in seen if bucket == (96, 96)]
    assert all(c.startswith("small alpha, tag") for c in small)  # dataset 1's prefix, no shuffle
    # the subset's prefix; keep_tokens = 1 keeps "big alpha" first and shuffles the rest
    assert all(c.startswith("big alpha, ") and sorted(c.split(", ")[1:]) in (["blue", "red", "tag0"],
                                                                             ["blue", "red", "tag1"]) for c in big), big
    assert any(not c.endswith("red, blue") for c in big)
    assert {c.strip() for _, _, _, reg_, c in seen if reg_} == {"small"}  # no caption file nor class_tokens: prefix
    assert not any(f for *_, f, reg_, _ in seen if reg_)  # the reg subset's flip_aug = false
    assert any(f for *_, f, reg_, _ in seen if not reg_)  # [general] flip_aug = true elsewhere
    with safe_open(str(result.final_file), "pt") as f:
        md = f.metadata()
    assert md["ss_num_train_images"] == str(2 * 2 + 2) and md["ss_num_batches_per_epoch"] == "6"
    assert "ss_resolution" not in md and "ss_batch_size_per_device" not in md and "ss_reg_dataset_dirs" not in md
    assert json.loads(md["ss_dataset_dirs"]) == {"10_alpha": {"n_repeats": 2, "img_count": 2},
                                                "10_alpha (2)": {"n_repeats": 1, "img_count": 2}}
    freq = json.loads(md["ss_tag_frequency"])
    assert freq["10_alpha"]["alpha"] == 2 and freq["reg"] == {}
    datasets = json.loads(md["ss_datasets"])
    assert [(d["resolution"], d["batch_size_per_device"], d["num_train_images"], d["num_reg_images"])
            for d in datasets] == [([64, 64], 2, 4, 2), ([96, 96], 1, 2, 0)]
    assert [(s["image_dir"], s["num_repeats"], s["is_reg"], s["class_tokens"], s["flip_aug"], s["caption_prefix"])
            for d in datasets for s in d["subsets"]] == [("10_alpha", 2, False, "alpha", True, "small"),
                                                         ("reg", 1, True, None, False, "small"),
                                                         ("10_alpha", 1, False, None, True, "big")]
    assert datasets[0]["enable_bucket"] is False and datasets[0]["bucket_info"] is None


def test_dataset_config_with_cached_latents_and_validation(tmp_path, tiny_sd1_checkpoint):
    a = make_folder(tmp_path / "a", 4)
    b = make_folder(tmp_path / "b", 2, size=(96, 96), seed=2)
    toml = write(tmp_path / "ds.toml", f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
validation_split = 0.25
  [[datasets.subsets]]
  image_dir = "{a}"
  flip_aug = true
[[datasets]]
resolution = 96
  [[datasets.subsets]]
  image_dir = "{b}"
""")
    result = train(build_config(None, base_cfg(tiny_sd1_checkpoint, tmp_path, tmp_path / "out", dataset_config=toml,
                                               max_train_epochs=1, cache_latents="true")))
    records = [json.loads(line) for line in result.log_file.read_text().splitlines()]
    assert result.global_step == 3  # ceil(3 / 2) + ceil(2 / 2)
    assert any("loss/validation/epoch_average" in r for r in records)


def test_dataset_check_reads_a_dataset_config(tmp_path):
    from loralab.analyze.dataset_check import check_dataset_config

    a = make_folder(tmp_path / "a", 3, caption="alpha, tag{i}")
    b = make_folder(tmp_path / "b", 2, size=(128, 64), caption=None, seed=1)
    toml = write(tmp_path / "ds.toml", f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = "{b}"
  caption_extension = ".caption"
  class_tokens = "beta"
[[datasets]]
resolution = 96
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 32
  [[datasets.subsets]]
  image_dir = "{b}"
""")
    first, second = check_dataset_config(toml, defaults=defaults(), progress=False)
    assert (first.settings.resolution, first.settings.batch_size, first.settings.enable_bucket) == ((64, 64), 2, False)
    assert [(c.name, c.repeats, c.images) for c in first.concepts] == [("a", 3, 3), ("b", 1, 2)]
    missing = first.by_code("missing_caption")
    assert len(missing) == 2 and all(".caption caption file" in p.message and "'beta'" in p.message for p in missing)
    assert first.num_train_samples == 3 * 3 + 2 and first.steps_per_epoch == 6  # ceil(9 / 2) + ceil(2 / 2)
    assert second.settings.resolution == (96, 96) and second.settings.enable_bucket
    assert [b.resolution for b in second.buckets] == [(128, 64)]  # buckets as that dataset makes them


def test_cli_dataset_check_and_dry_run_take_a_dataset_config(tmp_path, tiny_sd1_checkpoint):
    import subprocess
    import sys

    from test_train import make_dataset

    img, _ = make_dataset(tmp_path, reg=False)
    ds = tmp_path / "ds.toml"
    ds.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = "{img}/3_alpha"\n'
                  f'  num_repeats = 3\n[[datasets]]\nresolution = 96\n  [[datasets.subsets]]\n'
                  f'  image_dir = "{img}/2_beta"\n  num_repeats = 2\n')
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "dataset", "check", "--dataset-config", str(ds),
                        "--min-bucket-reso", "64"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[[datasets]] #1\n" in r.stdout and "resolution 64x64, batch size 2" in r.stdout
    assert "[[datasets]] #2\n" in r.stdout and "resolution 96x96, batch size 1" in r.stdout
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--dry-run", "--pretrained_model_name_or_path",
                        str(tiny_sd1_checkpoint), "--dataset_config", str(ds), "--max_train_epochs", "2",
                        "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "  bucket 64x64: 3 images, 9 samples per epoch\n  bucket 96x96: 2 images, 4 samples per epoch\n" in r.stdout
    assert "  9 batches per epoch, 9 steps per epoch, 2 epochs, 18 steps" in r.stdout
    assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "dataset", "tags", "--dataset-config", str(ds)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3_alpha (train, 3 images, activation tag 'alpha')" in r.stdout and "2_beta (train, 2 images" in r.stdout
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "tokens", "--dataset-config", str(ds)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3_alpha  alpha           alpha</w>  8624       3        3    69%" in r.stdout


def test_vae_check_takes_a_dataset_config_each_dataset_at_its_resolution(tmp_path, tiny_sd1_checkpoint):
    import subprocess
    import sys

    from test_train import make_dataset

    img, _ = make_dataset(tmp_path, reg=False)
    ds = tmp_path / "cfg" / "ds.toml"
    ds.parent.mkdir()
    ds.write_text(f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{img}/3_alpha"\n'
                  f'[[datasets]]\nresolution = 96\n  [[datasets.subsets]]\n  image_dir = "{img}/2_beta"\n')
    r = subprocess.run([sys.executable, "-m", "loralab.cli", "vae-check", "--dataset-config", str(ds), "--model",
                        str(tiny_sd1_checkpoint), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    first, second = r.stdout.split("\n\n[[datasets]] #2\n")
    assert first.startswith("[[datasets]] #1\n") and "3 images" in first and "  64x64  " in first
    assert "2 images" in second and "  96x96  " in second
    out = tmp_path / "cfg" / "ds_vae_check"
    assert (out / "datasets_1" / "vae_report.json").is_file() and (out / "datasets_2" / "vae_report.json").is_file()


# sd-scripts' own documentation examples (kohya-ss/sd-scripts docs/config_README-en.md at 48d368fa, Apache-2.0),
# with only the Windows paths replaced by folders of generated images.
SD_SCRIPTS_DOC_EXAMPLE_1 = """\
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{fuga}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'human'
  keep_tokens = 1
"""
SD_SCRIPTS_DOC_FINETUNE = """\
# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{piyo}'
  metadata_file = '{piyo}/piyo_md.json'
"""
SD_SCRIPTS_DOC_EXAMPLE_3 = """\
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;"
enable_wildcard = true

  [[datasets.subsets]]
  image_dir = "{hoge}"
  num_repeats = 1
  caption_prefix = "1girl, hatsune miku, vocaloid |||"
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
"""


def test_sd_scripts_documentation_examples_resolve_as_documented(tmp_path):
    dirs = {k: make_folder(tmp_path / k, 2) for k in ("hoge", "fuga", "reg", "piyo")}
    one = read_dataset_config(write(tmp_path / "one.toml", SD_SCRIPTS_DOC_EXAMPLE_1.format(**dirs)), defaults())
    ds = one.datasets[0]
    assert (ds.values["resolution"], ds.values["batch_size"]) == ((512, 512), 4)
    assert [(s.values["keep_tokens"], s.values["shuffle_caption"], s.values["class_tokens"], s.values["is_reg"])
            for s in ds.subsets] == [(2, True, "hoge girl", False), (3, True, "fuga boy", False), (1, True, "human", True)]
    with pytest.raises(LoralabError, match="metadata_file"):  # the fine-tuning half of the same example
        read_dataset_config(write(tmp_path / "ft.toml", SD_SCRIPTS_DOC_FINETUNE.format(**dirs)), defaults())
    three = read_dataset_config(write(tmp_path / "three.toml", SD_SCRIPTS_DOC_EXAMPLE_3.format(**dirs)), defaults())
    ds = three.datasets[0]
    assert (ds.values["resolution"], ds.values["batch_size"], ds.values["bucket_no_upscale"]) == ((1024, 1024), 6, True)
    v = ds.subsets[0].values
    assert (v["flip_aug"], v["keep_tokens_separator"], v["secondary_separator"], v["enable_wildcard"],
            v["caption_tag_dropout_rate"], v["caption_prefix"]) == (True, "|||", ";;;", True, 0.1,
                                                                   "1girl, hatsune miku, vocaloid |||")
