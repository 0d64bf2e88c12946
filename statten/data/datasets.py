"""Dataset registry: dataset name -> :class:`DatasetSpec`, and the entry points built on it.

Static image datasets other than ``digits`` go through timm: ``create_dataset`` opens CIFAR,
image folders are found by timm's ImageFolder rules (labels from the training split's classes in
both splits) and read by :class:`ImageFolderDataset`, and ``create_transform`` attaches the
reference augmentation (RandAugment, random erasing, ...) ending in normalisation, since the
models do not normalise their input. The event datasets (``cifar10-dvs``, ``ncaltech101``) are
read by SpikingJelly: see :mod:`statten.data.events`.
"""

from __future__ import annotations

import os
import warnings
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image
from timm.data import AugMixDataset, create_dataset, create_transform, resolve_data_config
from timm.data.readers.class_map import load_class_map
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader_image_folder import find_images_and_targets
from timm.utils.misc import natural_key
from torch import nn
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100

from statten.config import ConfigError
from statten.data.digits import NUM_CLASSES as DIGITS_CLASSES
from statten.data.digits import Stats, build_digits, digits_stats
from statten.data.errors import CorruptSampleError, DatasetNotFoundError
from statten.data.options import option

CIFAR10_STATS: Stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS: Stats = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
EVAL_SPLIT_NAMES = ("validation", "val")
# Names of the two halves of a dataset with a fixed train/eval split (digits, CIFAR, the event
# datasets): timm's names; timm itself would read any unknown name as the test set.
FIXED_SPLIT_NAMES = {
    True: ("train", "training"),
    False: ("validation", "val", "valid", "eval", "evaluation", "test"),
}
FOLDER_LAYOUT = (
    "expected DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG (or DIR/validation/...), "
    "DIR being --data-dir and the split names --train-split/--val-split; for ImageNet-1k "
    "download it from https://image-net.org and unpack one folder per class, "
    "or train on the built-in --dataset digits"
)

# What PIL raises for a file it cannot read or decode.
UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Class names an error or a warning lists before "and N more".
NAMED_CLASSES = 5

Builder = Callable[[Namespace, dict[str, Any], bool], Dataset]
# An image folder split: its path and its images as (file, class name) pairs.
ImageSplit = tuple[str, list[tuple[str, str]]]


@dataclass(frozen=True)
class DatasetSpec:
    """How to build a dataset, and its defaults where neither the config nor the model sets one.

    ``build(cfg, data_cfg, training)`` returns the train or the eval split with its transform.
    ``stats(size)`` gives the normalisation ``(mean, std)`` for input size ``(H, W)``.
    ``fixed_splits``: the dataset has a train and an eval half, named by
    :data:`FIXED_SPLIT_NAMES` (otherwise the split names are folders of ``--data-dir``).
    """

    build: Builder
    num_classes: int | None = None
    in_channels: int = 3
    img_size: int | None = None
    stats: Callable[[tuple[int, int]], Stats] | None = None
    fixed_splits: bool = True


def _fixed(stats: Stats) -> Callable[[tuple[int, int]], Stats]:
    return lambda _size: stats


def timm_transform(cfg: Namespace, data_cfg: dict[str, Any], training: bool) -> Any:
    """timm's train (reference augmentation) or eval (resize + centre crop) transform."""
    common = {key: data_cfg[key] for key in ("input_size", "mean", "std")}
    if not training:
        return create_transform(
            **common,
            interpolation=data_cfg["interpolation"],
            crop_pct=data_cfg["crop_pct"],
            crop_mode=data_cfg["crop_mode"],
        )
    no_aug = option(cfg, "no_aug")
    interpolation = option(cfg, "train_interpolation")
    if no_aug or not interpolation:
        interpolation = data_cfg["interpolation"]
    splits = option(cfg, "aug_splits")
    return create_transform(
        **common,
        is_training=True,
        no_aug=no_aug,
        scale=option(cfg, "scale"),
        ratio=option(cfg, "ratio"),
        hflip=option(cfg, "hflip"),
        vflip=option(cfg, "vflip"),
        color_jitter=option(cfg, "color_jitter"),
        auto_augment=option(cfg, "aa"),
        interpolation=interpolation,
        re_prob=option(cfg, "reprob"),
        re_mode=option(cfg, "remode"),
        re_count=option(cfg, "recount"),
        re_num_splits=(splits or 2) if option(cfg, "resplit") else 0,
        separate=splits > 0,
    )


def _timm_pipeline(open_split: Builder) -> Builder:
    """Builder that opens a split with ``open_split`` and attaches :func:`timm_transform`."""

    def build(cfg: Namespace, data_cfg: dict[str, Any], training: bool) -> Dataset:
        splits = option(cfg, "aug_splits")
        if splits == 1 or splits < 0:
            raise ValueError(f"aug_splits must be 0 or at least 2, got {splits}")
        dataset = open_split(cfg, data_cfg, training)
        _check_normalisation(data_cfg)
        if training and splits:
            dataset = AugMixDataset(dataset, num_splits=splits)
        dataset.transform = timm_transform(cfg, data_cfg, training)
        return dataset

    return build


def _check_normalisation(data_cfg: dict[str, Any]) -> None:
    """Refuse input channels that ``mean``/``std`` cannot normalise (timm would open the images
    in that many channels and fail inside the transform); one value serves every channel."""
    channels, mean = data_cfg["input_size"][0], data_cfg["mean"]
    if not {len(mean), len(data_cfg["std"])} <= {1, channels}:
        raise ConfigError(
            f"in_channels is {channels} but the normalisation has {len(mean)} channels "
            f"(mean {mean}); set --in-channels {len(mean)}, or --mean and --std with "
            f"{channels} values each"
        )


def _open_cifar(name: str, torchvision_class: type[CIFAR10]) -> Builder:
    """Opener of torchvision's CIFAR through timm; it downloads only with ``dataset_download``."""

    def open_split(cfg: Namespace, data_cfg: dict[str, Any], training: bool) -> Dataset:
        root = option(cfg, "data_dir")
        download = option(cfg, "dataset_download")
        folder = os.path.join(root, torchvision_class.base_folder)
        how = (
            f"expected torchvision's layout DIR/{torchvision_class.base_folder}/ with DIR given by "
            "--data-dir; pass --dataset-download to fetch it into DIR, or copy torchvision's "
            "CIFAR files there"
        )
        if not root:
            raise DatasetNotFoundError(f"{name} needs --data-dir: {how}")
        if not download and not os.path.isdir(folder):
            raise DatasetNotFoundError(f"{name} not found: no directory {folder!r}; {how}")
        split = option(cfg, "train_split" if training else "val_split")
        try:
            return create_dataset(name, root=root, split=split, download=download)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted."
            raise DatasetNotFoundError(f"{name} in {folder!r}: {error}; {how}") from error

    return open_split


def _split_dir(root: str, split: str) -> str:
    """``root/split``; an eval split named ``validation`` or ``val`` falls back to the other."""
    names = [split, *(n for n in EVAL_SPLIT_NAMES if split in EVAL_SPLIT_NAMES and n != split)]
    paths = [os.path.join(root or "<--data-dir>", name) for name in names]
    for path in paths:
        if root and os.path.isdir(path):
            return path
    raise DatasetNotFoundError(
        f"image folder not found: no {' or '.join(map(repr, paths))}; {FOLDER_LAYOUT}"
    )


def read_image(path: str, mode: str) -> Image.Image:
    """The decoded image at ``path`` in PIL ``mode``; PIL's errors for an unreadable file pass."""
    with Image.open(path) as image:
        return image.convert(mode)


class ImageFolderDataset(Dataset):
    """Labelled image files decoded into PIL ``mode``; ``transform`` applies to each image.

    A file PIL cannot read is a :class:`CorruptSampleError` naming it. With ``skip_corrupt`` it
    is replaced by the next readable sample, so that batches keep their size, and a warning names
    it with the number of files skipped so far by this process (each loader worker counts its own).
    """

    def __init__(self, samples: list[tuple[str, int]], mode: str, skip_corrupt: bool) -> None:
        self.samples = samples
        self.mode = mode
        self.skip_corrupt = skip_corrupt
        self.skipped: set[str] = set()
        self.transform: Callable[[Image.Image], Any] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = read_image(path, self.mode)
            except UNREADABLE_IMAGE as error:
                problem = f"unreadable image {path!r} ({' '.join(str(error).split())})"
                if not self.skip_corrupt:
                    raise CorruptSampleError(
                        f"{problem}; replace or delete it, or pass --skip-corrupt to skip "
                        "unreadable images"
                    ) from error
                self._warn_skipped(path, problem)
                continue
            return (image if self.transform is None else self.transform(image)), target
        raise CorruptSampleError(f"none of the {len(self.samples)} images of the split is readable")

    def _warn_skipped(self, path: str, problem: str) -> None:
        """Warn once per file, with the running count of this process."""
        if path not in self.skipped:
            self.skipped.add(path)
            warnings.warn(
                f"--skip-corrupt: skipped {problem}, using the next image instead "
                f"({len(self.skipped)} unreadable file(s) skipped by this process so far)",
                stacklevel=2,
            )


def _find_images(path: str) -> list[tuple[str, str]]:
    """``(file, class name)`` of every image under ``path``, the class being its folder's name
    (timm's ImageFolder rule), in timm's sorted order."""
    samples, class_to_idx = find_images_and_targets(path)
    names = {index: name for name, index in class_to_idx.items()}
    return [(file, names[index]) for file, index in samples]


def _training_split(cfg: Namespace) -> ImageSplit | None:
    """The training split, or None if it has no folder or no images (``statten test`` may run
    on a copy of the evaluation split alone)."""
    try:
        path = _split_dir(option(cfg, "data_dir"), option(cfg, "train_split"))
    except DatasetNotFoundError:
        return None
    images = _find_images(path)
    return (path, images) if images else None


def _class_list(cfg: Namespace, reference: ImageSplit, which: str) -> tuple[dict[str, int], str]:
    """``(class name -> label, where the list comes from)``: ``class_map`` if set, else the
    classes of the ``reference`` split (``which`` says which split it is), sorted as timm does."""
    class_map = option(cfg, "class_map")
    if class_map:
        return load_class_map(class_map, option(cfg, "data_dir")), f"the class map {class_map!r}"
    path, images = reference
    names = sorted({name for _, name in images}, key=natural_key)
    return {name: label for label, name in enumerate(names)}, f"the {which} split {path!r}"


def _listed(names: set[str]) -> str:
    """Up to :data:`NAMED_CLASSES` names, sorted and quoted, then how many more."""
    ordered = sorted(names, key=natural_key)
    more = len(ordered) - NAMED_CLASSES
    return ", ".join(map(repr, ordered[:NAMED_CLASSES])) + (f" and {more} more" if more > 0 else "")


def _labelled(split: ImageSplit, classes: dict[str, int], source: str) -> list[tuple[str, int]]:
    """``(file, label)`` of the split's images, labelled by ``classes`` (from ``source``).

    A class ``classes`` lacks is an error; a class without images here only a warning, since
    the labels of the others do not depend on it.
    """
    path, images = split
    found = {name for _, name in images}
    if unknown := found - classes.keys():
        raise DatasetNotFoundError(
            f"{path!r} has images of classes that {source} lacks: {_listed(unknown)}; both "
            f"splits need the same class folders, since the labels come from {source}"
        )
    if missing := classes.keys() - found:
        warnings.warn(
            f"{path!r} has no images of {len(missing)} of the {len(classes)} classes of "
            f"{source}: {_listed(missing)}",
            stacklevel=2,
        )
    return [(file, classes[name]) for file, name in images]


def check_num_classes(cfg: Namespace, found: int, source: str) -> None:
    """A configured ``num_classes`` must be the data's class count: otherwise the model has
    outputs no label uses, or labels it cannot output."""
    configured = option(cfg, "num_classes")
    if configured and configured != found:
        raise ConfigError(
            f"num_classes is {configured} but {source} has {found} classes: "
            f"set --num-classes {found} (num_classes: {found} in a recipe)"
        )


def _open_folder(cfg: Namespace, data_cfg: dict[str, Any], training: bool) -> Dataset:
    """Opener of an ImageFolder split ``data_dir/<split>/<class>/<image>``.

    Both splits take their labels from the training split's classes (see :func:`_class_list`),
    so that a class folder missing or empty in one split cannot shift the labels of the others.
    """
    split = option(cfg, "train_split" if training else "val_split")
    path = _split_dir(option(cfg, "data_dir"), split)
    images = _find_images(path)
    if not images:
        raise DatasetNotFoundError(
            f"no images in {path!r} (image files end in {', '.join(get_img_extensions())}); "
            f"{FOLDER_LAYOUT}"
        )
    reference = None if training else _training_split(cfg)
    which = "training" if training or reference else "evaluation"
    classes, source = _class_list(cfg, reference or (path, images), which)
    check_num_classes(cfg, len(classes), source)
    samples = _labelled((path, images), classes, source)
    mode = "L" if data_cfg["input_size"][0] == 1 else "RGB"
    return ImageFolderDataset(samples, mode, option(cfg, "skip_corrupt"))


def _event_dataset(cfg: Namespace, data_cfg: dict[str, Any], training: bool) -> Dataset:
    """Builder of the event datasets (see :mod:`statten.data.events`).

    Imported on use: that module loads SpikingJelly's dataset machinery.
    """
    from statten.data.events import build_event_dataset

    return build_event_dataset(option(cfg, "dataset"), cfg, data_cfg, training)


_FOLDER = DatasetSpec(_timm_pipeline(_open_folder), img_size=224, fixed_splits=False)

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        build_digits, num_classes=DIGITS_CLASSES, in_channels=1, img_size=32, stats=digits_stats
    ),
    "torch/cifar10": DatasetSpec(
        _timm_pipeline(_open_cifar("torch/cifar10", CIFAR10)),
        num_classes=10,
        img_size=32,
        stats=_fixed(CIFAR10_STATS),
    ),
    "torch/cifar100": DatasetSpec(
        _timm_pipeline(_open_cifar("torch/cifar100", CIFAR100)),
        num_classes=100,
        img_size=32,
        stats=_fixed(CIFAR100_STATS),
    ),
    "": _FOLDER,
    "folder": _FOLDER,
    "imagenet": DatasetSpec(_FOLDER.build, num_classes=1000, img_size=224, fixed_splits=False),
    "cifar10-dvs": DatasetSpec(_event_dataset, num_classes=10, in_channels=2, img_size=64),
    "ncaltech101": DatasetSpec(_event_dataset, num_classes=101, in_channels=2, img_size=64),
}


def dataset_spec(cfg: Namespace) -> DatasetSpec:
    """The registry entry of ``cfg.dataset``."""
    name = option(cfg, "dataset")
    if name not in DATASETS:
        raise DatasetNotFoundError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def num_classes(cfg: Namespace) -> int | None:
    """``cfg.num_classes``, else the dataset's class count (None for a generic ImageFolder)."""
    return option(cfg, "num_classes") or dataset_spec(cfg).num_classes


def data_config(cfg: Namespace, model: nn.Module | None = None) -> dict[str, Any]:
    """timm ``resolve_data_config``: input_size, interpolation, mean, std, crop_pct, crop_mode.

    Each value comes from the config if set there, else from the dataset (input size, channels,
    normalisation statistics), else from the model's pretrained_cfg, else from timm's defaults.
    """
    spec = dataset_spec(cfg)
    args = {name: option(cfg, name) for name in ("input_size", "crop_pct", "interpolation")}
    args["img_size"] = option(cfg, "img_size") or spec.img_size
    args["in_chans"] = option(cfg, "in_channels") or spec.in_channels
    args["mean"], args["std"] = option(cfg, "mean"), option(cfg, "std")
    size = args["input_size"][1:] if args["input_size"] else (args["img_size"],) * 2
    if spec.stats is not None and None not in size:
        mean, std = spec.stats(tuple(size))
        args["mean"] = mean if args["mean"] is None else args["mean"]
        args["std"] = std if args["std"] is None else args["std"]
    return resolve_data_config(args, model=model)


def check_split_name(cfg: Namespace, training: bool) -> None:
    """Refuse a ``--train-split`` / ``--val-split`` that names no half of a fixed-split dataset
    (a typo would otherwise select another split silently)."""
    key = "train_split" if training else "val_split"
    split, valid = option(cfg, key), FIXED_SPLIT_NAMES[training]
    if split not in valid:
        raise DatasetNotFoundError(
            f"--{key.replace('_', '-')} {split!r}: {option(cfg, 'dataset')} has a fixed "
            f"{'train' if training else 'evaluation'} split, named one of {', '.join(valid)}"
        )


def build_dataset(cfg: Namespace, training: bool, model: nn.Module | None = None) -> Dataset:
    """The train or eval dataset of ``cfg.dataset``, transforms attached, outputs normalised."""
    spec = dataset_spec(cfg)
    name = option(cfg, "dataset")
    if spec.fixed_splits:  # both names, so that a typo stops the run before any data is read
        check_split_name(cfg, True)
        check_split_name(cfg, False)
        if spec.num_classes:
            check_num_classes(cfg, spec.num_classes, f"dataset {name!r}")
    dataset = spec.build(cfg, data_config(cfg, model), training)
    if len(dataset) == 0:
        raise DatasetNotFoundError(
            f"the {'training' if training else 'evaluation'} split of dataset {name!r} is empty "
            f"(--data-dir {option(cfg, 'data_dir')!r})"
        )
    return dataset


def create_datasets(cfg: Namespace, model: nn.Module | None = None) -> tuple[Dataset, Dataset]:
    """``(train, eval)`` datasets of ``cfg.dataset``, transforms attached, outputs normalised."""
    return build_dataset(cfg, True, model), build_dataset(cfg, False, model)
