"""Dataset registry: dataset name -> :class:`DatasetSpec`, and the entry points built on it.

Static image datasets other than ``digits`` go through timm: ``create_dataset`` opens the split
and ``create_transform`` attaches the reference augmentation (RandAugment, random erasing, ...)
ending in normalisation, since the models do not normalise their input. The event datasets
(``cifar10-dvs``, ``ncaltech101``) are read by SpikingJelly: see :mod:`statten.data.events`.
"""

from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from timm.data import AugMixDataset, create_dataset, create_transform, resolve_data_config
from torch import nn
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100

from statten.data.digits import NUM_CLASSES as DIGITS_CLASSES
from statten.data.digits import Stats, build_digits, digits_stats
from statten.data.errors import DatasetNotFoundError
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

Builder = Callable[[Namespace, dict[str, Any], bool], Dataset]


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
        if training and splits:
            dataset = AugMixDataset(dataset, num_splits=splits)
        dataset.transform = timm_transform(cfg, data_cfg, training)
        return dataset

    return build


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


def _open_folder(cfg: Namespace, data_cfg: dict[str, Any], training: bool) -> Dataset:
    """Opener of an ImageFolder split ``data_dir/<split>/<class>/<image>`` through timm."""
    split = option(cfg, "train_split" if training else "val_split")
    path = _split_dir(option(cfg, "data_dir"), split)
    try:
        return create_dataset(
            "",
            root=path,
            search_split=False,
            class_map=option(cfg, "class_map"),
            input_img_mode="L" if data_cfg["input_size"][0] == 1 else "RGB",
        )
    except RuntimeError as error:  # timm: "Found 0 images in subfolders of ..."
        raise DatasetNotFoundError(f"no images in {path!r}: {error}; {FOLDER_LAYOUT}") from error


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
    if spec.fixed_splits:  # both names, so that a typo stops the run before any data is read
        check_split_name(cfg, True)
        check_split_name(cfg, False)
    return spec.build(cfg, data_config(cfg, model), training)


def create_datasets(cfg: Namespace, model: nn.Module | None = None) -> tuple[Dataset, Dataset]:
    """``(train, eval)`` datasets of ``cfg.dataset``, transforms attached, outputs normalised."""
    return build_dataset(cfg, True, model), build_dataset(cfg, False, model)
