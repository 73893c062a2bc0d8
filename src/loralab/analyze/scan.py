"""The shared scan of a kohya-layout dataset for the analysis commands (`dataset check/tags/tokens/edit`,
`vae-check`): every image file and its caption, broken ones included.

The folders are walked the way `loralab train` walks them (`loralab.data.dataset.scan_root`: the
`<repeats>_<name>/` folders; `list_images`; `read_caption`); image sizes come from the file headers
(`read_image_size`). Unlike `scan_folder_dataset`, a broken image or caption is recorded instead of
stopping the scan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from loralab.analyze.activation import activation_tag
from loralab.data.captions import split_tags
from loralab.data.dataset import (
    ImageEntry,
    Subset,
    list_images,
    caption_path,
    read_caption,
    scan_root,
    unusable_links,
)
from loralab.data.images import IMAGE_EXTENSIONS, read_image_size
from loralab.errors import LoralabError

# Where `loralab dataset edit` keeps copies of the captions it changed, in the dataset root. Its name starts
# with a dot, so `scan_root` (training and every analysis) never takes it for a concept folder.
BACKUP_DIR = ".loralab_backup"
MANIFEST = "manifest.json"  # one per edit, in BACKUP_DIR/<timestamp>/


@dataclass
class EditBackup:
    """One `BACKUP_DIR` folder found in a dataset root: how many files, edits and bytes it holds."""

    path: Path
    files: int
    edits: int
    size: int  # bytes


def edit_backups(roots: list[Path]) -> list[EditBackup]:
    """The `BACKUP_DIR` folder of each root that has one (symlinks inside are counted, not followed)."""
    found = []
    for root in roots:
        base = root / BACKUP_DIR
        if not base.is_dir():
            continue
        files = size = 0
        for dirpath, _dirs, names in os.walk(base):
            for name in names:
                try:
                    size += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
                files += 1
        try:
            edits = sum(1 for d in base.iterdir() if (d / MANIFEST).is_file())
        except OSError:  # unreadable: still listed, so it can be looked at
            edits = 0
        found.append(EditBackup(base, files, edits, size))
    return found


@dataclass(eq=False)
class ScannedImage:
    """One image file of a concept folder, whatever state it is in."""

    path: Path
    subset: Subset
    caption: str | None  # the caption file's text as training reads it; None: no caption file
    caption_error: str | None = None  # set when the caption file exists but cannot be read
    size: tuple[int, int] | None = None  # None: the header cannot be read
    header_error: str | None = None

    @property
    def tags(self) -> list[str]:
        """The caption's tags as kohya counts them (`split_tags`); [] without a caption."""
        return split_tags(self.caption) if self.caption else []


@dataclass(eq=False)
class ScannedDataset:
    """A kohya-layout dataset as `loralab train` sees it (`subsets`, readable images with the folder-name
    fallback caption) plus every image file with its raw caption (`images`)."""

    train_dir: Path
    reg_dir: Path | None
    caption_extension: str
    subsets: list[Subset]
    images: list[ScannedImage]
    empty_folders: list[Path] = field(default_factory=list)
    links: list[tuple[Path, str, str]] = field(default_factory=list)  # `unusable_links`: (path, code, words)
    backups: list[EditBackup] = field(default_factory=list)  # `edit_backups` of the roots
    caption_extensions: dict[int, str] = field(default_factory=dict)  # id(subset) -> its own (dataset_config)

    def images_of(self, subset: Subset) -> list[ScannedImage]:
        return [im for im in self.images if im.subset is subset]

    def extension_of(self, subset: Subset) -> str:
        """The caption extension of a subset: its own in a dataset_config, else the dataset's."""
        return self.caption_extensions.get(id(subset), self.caption_extension)

    @property
    def train_subsets(self) -> list[Subset]:
        return [s for s in self.subsets if not s.is_reg]

    @property
    def reg_subsets(self) -> list[Subset]:
        return [s for s in self.subsets if s.is_reg]

    def find_subset(self, name: str) -> Subset:
        """A train concept by folder name (`10_jinx`), class tokens (`jinx`) or activation tag."""
        wanted = name.strip().lower()
        for subset in self.train_subsets:
            if wanted in (subset.name.lower(), subset.class_tokens.lower()):
                return subset
        for subset in self.train_subsets:
            if activation_tag(self.images_of(subset), subset.class_tokens).tag == wanted:
                return subset
        names = ", ".join(s.name for s in self.train_subsets)
        raise LoralabError(f"{self.train_dir}: no concept folder named {name!r}; the concepts are: {names}")


def _normalise_extension(caption_extension: str) -> str:
    if caption_extension and not caption_extension.startswith("."):
        return "." + caption_extension
    return caption_extension


def scan_image(path: Path, subset: Subset, caption_extension: str) -> ScannedImage:
    """One image file: its caption (`read_caption`) and header size (`read_image_size`), each error recorded.
    A readable image also joins `subset.images`, captioned as training captions it (a missing or empty
    caption trains as the folder's class tokens)."""
    scanned = ScannedImage(path=path, subset=subset, caption=None)
    try:
        scanned.caption = read_caption(path, caption_extension)
    except LoralabError as err:  # the report puts the path in front: not twice
        scanned.caption_error = str(err).removeprefix(f"{caption_path(path, caption_extension)}: ")
    try:
        scanned.size = read_image_size(path)
    except LoralabError as err:
        scanned.header_error = str(err).removeprefix(f"{path}: ")
    if scanned.size is not None:
        caption = scanned.caption or subset.class_tokens
        subset.images.append(ImageEntry(path=path, caption=caption, size=scanned.size, subset=subset))
    return scanned


def scan_dataset(
    train_dir: str | Path, reg_dir: str | Path | None = None, *, caption_extension: str = ".txt"
) -> ScannedDataset:
    """Scan the `<repeats>_<name>/` folders of `train_dir` (and `reg_dir`) like `scan_folder_dataset`,
    but keep going past broken files: an image whose header cannot be read is left out of the subsets
    (training would stop on it) and recorded with its error; an unreadable caption is recorded too.

    Captions as training reads them (`read_caption`: the first line, stripped); a missing or empty caption
    trains as the folder's class tokens, and so does it in `subsets`.
    Also recorded: the symlinks that cannot be followed (`unusable_links`: in the roots, and the image and
    caption names of the concept folders) and the `loralab dataset edit` backups of the roots (`edit_backups`).
    """
    caption_extension = _normalise_extension(caption_extension)
    roots = [(Path(train_dir), "train_data_dir", False)]
    if reg_dir:
        roots.append((Path(reg_dir), "reg_data_dir", True))
    subsets: list[Subset] = []
    images: list[ScannedImage] = []
    empty: list[Path] = []
    links: list[tuple[Path, str, str]] = []
    for root, key, is_reg in roots:
        subsets_of_root = scan_root(root, key, is_reg)
        links += unusable_links(root)
        for subset in subsets_of_root:
            _scan_folder(subset, caption_extension, subsets, images, empty, links)
    if not any(not s.is_reg for s in subsets):
        raise LoralabError(
            f"train_data_dir: no images in the concept folders of {train_dir}; put .png/.jpg/.jpeg/.webp/.bmp files "
            f"in its <repeats>_<name>/ folders"
        )
    reg_path = Path(reg_dir) if reg_dir else None
    return ScannedDataset(Path(train_dir), reg_path, caption_extension, subsets, images, empty, links,
                          edit_backups([root for root, _key, _reg in roots]))


def _scan_folder(subset: Subset, caption_extension: str, subsets: list[Subset], images: list[ScannedImage],
                 empty: list[Path], links: list[tuple[Path, str, str]]) -> None:
    """One concept folder: its unusable links, its images (`scan_image`); an empty folder is noted instead."""
    links.extend(unusable_links(subset.dir, IMAGE_EXTENSIONS + (caption_extension.lower(),)))
    paths = list_images(subset.dir)
    if not paths:
        empty.append(subset.dir)
        return
    images.extend(scan_image(path, subset, caption_extension) for path in paths)
    subsets.append(subset)


def scan_subsets(folders: list[tuple[Subset, str]], root: Path) -> ScannedDataset:
    """Scan given image folders, each with its caption extension, as `scan_dataset` scans the folders of a
    root: the [[datasets.subsets]] of one [[datasets]] of a dataset_config (`data.dataset_config.
    dataset_config_subsets`). `root` names the dataset in reports (paths are shown relative to it)."""
    subsets: list[Subset] = []
    images: list[ScannedImage] = []
    empty: list[Path] = []
    links: list[tuple[Path, str, str]] = []
    extensions: dict[int, str] = {}
    for subset, caption_extension in folders:
        extensions[id(subset)] = _normalise_extension(caption_extension)
        _scan_folder(subset, extensions[id(subset)], subsets, images, empty, links)
    if not any(not s.is_reg for s in subsets):
        raise LoralabError(f"{root}: no images in the training subsets ({', '.join(str(s.dir) for s, _ in folders)}); "
                           "put .png/.jpg/.jpeg/.webp/.bmp files in them")
    first = extensions[id(folders[0][0])]
    return ScannedDataset(root, None, first, subsets, images, empty, links, [], extensions)


def scan_dataset_config(path: str | Path, caption_extension: str = ".txt") -> ScannedDataset:
    """All image folders of a dataset_config as one dataset, for the commands that look at captions and
    concepts (`dataset tags`, `tokens --dataset-config`): each folder once, even when several [[datasets]]
    train it (multi-resolution), with its own caption extension and repeats. `caption_extension` stands for
    the training config's (the fallback of subsets that give none)."""
    from loralab.data.dataset_config import dataset_config_subsets

    folders, seen = [], set()
    for _spec, subsets in dataset_config_subsets(path, {"caption_extension": caption_extension}):
        for subset, extension in subsets:
            if subset.dir.resolve() not in seen:
                seen.add(subset.dir.resolve())
                folders.append((subset, extension))
    if not folders:
        raise LoralabError(f"dataset_config: {path} has no image folders to look at")
    return scan_subsets(folders, Path(path).parent)

