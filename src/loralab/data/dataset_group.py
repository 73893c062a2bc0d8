"""Several datasets trained together (kohya `DatasetGroup`): the `[[datasets]]` of a dataset_config, each with
its own resolution, batch size and buckets (multi-resolution training).

An epoch holds every dataset's batches: each dataset makes its batches as `FolderDataset` does (its buckets
and their contents shuffled with `random.Random(seed + epoch)`, the same seed for all datasets as in kohya),
then the concatenated list is shuffled, as kohya's DataLoader shuffles the concatenated datasets: batches of
different datasets interleave, and a batch never mixes datasets (nor buckets).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from loralab.data.dataset import FolderDataset, Sample, Subset, split_validation, tag_frequency
from loralab.data.dataset_config import DatasetConfig, scan_dataset_config
from loralab.errors import LoralabError


class DatasetGroup:
    """`FolderDataset`s as one dataset: the same attributes the training reads from a `FolderDataset`
    (samples, counts, batches of an epoch), summed or concatenated in dataset order."""

    def __init__(self, datasets: Sequence[FolderDataset]) -> None:
        if not datasets:
            raise LoralabError("a dataset group needs at least one dataset")
        self.datasets = list(datasets)
        self.samples: list[Sample] = [s for d in self.datasets for s in d.samples]
        self.subsets: list[Subset] = [s for d in self.datasets for s in d.subsets]
        self.num_train_images = sum(d.num_train_images for d in self.datasets)
        self.num_reg_images = sum(d.num_reg_images for d in self.datasets)
        self.num_reg_samples = sum(d.num_reg_samples for d in self.datasets)
        self.enable_bucket = any(d.enable_bucket for d in self.datasets)

    @property
    def num_batches_per_epoch(self) -> int:
        return sum(d.num_batches_per_epoch for d in self.datasets)

    @property
    def num_samples_per_epoch(self) -> int:
        return sum(d.num_samples_per_epoch for d in self.datasets)

    @property
    def buckets(self) -> list:
        return [b for d in self.datasets for b in d.buckets]

    def bucket_info(self) -> None:
        """None: with a dataset_config kohya writes each dataset's bucket_info into ss_datasets instead."""
        return None

    def batches_for_epoch(self, epoch: int, seed: int) -> list[list[Sample]]:
        """Every dataset's batches of the epoch, interleaved (see the module docstring); a function of
        (seed, epoch) only, so a resumed run rebuilds the same epoch."""
        batches = [b for d in self.datasets for b in d.batches_for_epoch(epoch, seed)]
        random.Random(seed * 1_000_003 + epoch * 7_919 + 104_729).shuffle(batches)
        return batches


def configured_datasets(dc: DatasetConfig, *, seed: int, required_reso_steps: int = 64
                        ) -> tuple[DatasetGroup, list[FolderDataset]]:
    """The training group and the validation datasets of a read dataset_config.

    Per [[datasets]]: its subsets scanned (`scan_dataset_config`), then its `validation_split` of each
    training subset held out with its `validation_seed` (0: `seed`) (`split_validation`, kohya
    `split_train_val`); the rest is one `FolderDataset` with the dataset's resolution, batch size and buckets,
    the held-out images another (validation datasets only where validation_split > 0, as in kohya).
    An error of one dataset (buckets, sizes) names its place in the file."""
    train, val = [], []
    for spec, subsets in zip(dc.datasets, scan_dataset_config(dc)):
        split, split_seed = spec.values["validation_split"], spec.values["validation_seed"] or seed
        kept, held = split_validation(subsets, split, split_seed)
        try:
            train.append(FolderDataset(kept, required_reso_steps=required_reso_steps, **spec.bucket_options()))
            if held:
                val.append(FolderDataset(held, required_reso_steps=required_reso_steps, **spec.bucket_options()))
        except LoralabError as e:
            raise LoralabError(f"dataset_config: {dc.path}: {spec.where}: {e}") from None
    return DatasetGroup(train), val


# ----------------------------------------------------------------------------------------- metadata


def datasets_metadata(group: DatasetGroup) -> tuple[list[dict[str, Any]], dict, dict]:
    """kohya's dataset_config metadata (train_network.py): (`ss_datasets`, `ss_tag_frequency`, `ss_dataset_dirs`).

    - ss_datasets: per dataset its batch size, image counts (x repeats), resolution, buckets, tag frequency
      (reg folders included) and bucket_info (None without buckets), and per subset its repeats, caption and
      augmentation settings, image_dir (basename), class_tokens and is_reg.
    - ss_tag_frequency: the datasets' tag frequencies merged; a folder name already there is not counted again.
    - ss_dataset_dirs: {basename: {"n_repeats", "img_count"}} of the training (not reg) subsets of every
      dataset; a name already there gets " (2)", " (3)"...
    """
    entries: list[dict[str, Any]] = []
    freq: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for d in group.datasets:
        steps = d.bucket_reso_steps or 1
        lo = d.min_bucket_reso - d.min_bucket_reso % steps
        hi = d.max_bucket_reso + (steps - d.max_bucket_reso % steps) % steps
        d_freq = tag_frequency(d.subsets)
        subsets = []
        for s in d.subsets:
            o = s.caption_options
            subsets.append({
                "img_count": s.img_count, "num_repeats": s.num_repeats, "color_aug": bool(s.color_aug),
                "flip_aug": bool(s.flip_aug), "random_crop": bool(s.random_crop),
                "shuffle_caption": o.shuffle_caption if o else False,
                "keep_tokens": o.keep_tokens if o else 0, "keep_tokens_separator": o.keep_tokens_separator if o else "",
                "secondary_separator": o.secondary_separator if o else None,
                "enable_wildcard": o.enable_wildcard if o else False, "caption_prefix": o.caption_prefix if o else None,
                "caption_suffix": o.caption_suffix if o else None, "resize_interpolation": None, "image_dir": s.name,
                "class_tokens": s.class_tokens or None, "is_reg": s.is_reg})
            if not s.is_reg:
                name, n = s.name, 2
                while name in dirs:
                    name, n = f"{s.name} ({n})", n + 1
                dirs[name] = {"n_repeats": s.num_repeats, "img_count": s.img_count}
        entries.append({
            "is_dreambooth": True, "batch_size_per_device": d.batch_size, "num_train_images": d.num_train_images,
            "num_reg_images": d.num_reg_images, "resolution": list(d.resolution), "enable_bucket": d.enable_bucket,
            "min_bucket_reso": lo if d.enable_bucket else None, "max_bucket_reso": hi if d.enable_bucket else None,
            "tag_frequency": d_freq, "bucket_info": d.bucket_info(), "resize_interpolation": None, "subsets": subsets})
        for name, counts in d_freq.items():
            freq.setdefault(name, counts)
    return entries, freq, dirs
