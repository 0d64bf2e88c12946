"""CIFAR10-DVS and N-Caltech101 for ``statten train`` / ``statten test``, read by SpikingJelly.

``--data-dir`` is the dataset root (e.g. ``data/CIFAR10-DVS``) prepared by ``statten data
prepare``. Samples are SpikingJelly's ``frames_number=T, split_by='number'`` frames (T =
``time_steps``) resized to ``img_size``, as float ``[T, 2, H, W]`` event counts without
normalisation; a loader batch is ``[B, T, 2, H, W]``. The train/eval split is the reference's
per-class split over recordings sorted by name (``EventDataset.train_count``), so it is the same
on every machine.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset
from torchvision.transforms import Compose

from statten.config import ConfigError
from statten.data.errors import DatasetNotFoundError
from statten.data.event_cache import check_frames, check_spikingjelly_layout, frames_stage_name
from statten.data.event_sources import EVENT_DATASETS, EventDataset
from statten.data.event_transforms import (
    Cutout,
    EventTrivialAugment,
    HorizontalFlip,
    Resize,
    RollRotateShear,
    ToFrames,
)
from statten.data.options import option

POLARITIES = 2
CUTOUT_LENGTH = 16


# Settings read here that the generic data defaults (statten.data.options) do not cover.
def event_transform(
    dataset: EventDataset, cfg: Namespace, size: tuple[int, int], training: bool
) -> Compose:
    """Resize, then in training (unless ``no_aug``) the enabled augmentations.

    N-Caltech101's roll/rotate/shear is always on in training, as in the reference.
    """
    steps: list[Callable[[Any], Any]] = [ToFrames(), Resize(size, dataset.interpolation)]
    if training and not option(cfg, "no_aug"):
        if dataset.name == "ncaltech101":
            steps.append(RollRotateShear())
        if option(cfg, "hflip") > 0:
            steps.append(HorizontalFlip(option(cfg, "hflip")))
        if option(cfg, "dvs_aug"):
            steps.append(Cutout(CUTOUT_LENGTH))
        if option(cfg, "dvs_trival_aug"):
            steps.append(EventTrivialAugment())
    return Compose(steps)


def split_indices(
    targets: Sequence[int], train_count: Callable[[int], int], training: bool
) -> list[int]:
    """Per class, the first ``train_count(n)`` of its ``n`` samples (in dataset order) for
    training, the rest for evaluation."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    chosen = []
    for indices in by_class.values():
        cut = train_count(len(indices))
        chosen.extend(indices[:cut] if training else indices[cut:])
    return chosen


def _check_samples(frames: Any, folder: Path, manifest: dict[str, Any]) -> None:
    """SpikingJelly must see exactly the files the manifest vouches for."""
    seen = {Path(path).relative_to(folder).as_posix() for path, _ in frames.samples}
    if seen != set(manifest["files"]):
        raise DatasetNotFoundError(
            f"{folder} holds files its manifest does not list (or lacks listed ones); run "
            "`statten data prepare` on this root again"
        )


def _check_shape(cfg: Namespace, dataset: EventDataset, classes: int, channels: int) -> None:
    if channels != POLARITIES:
        raise ConfigError(
            f"{dataset.name} frames have {POLARITIES} channels (polarities), but the input is "
            f"configured with {channels}: set in_channels: 2 (as the conf/ recipes do)"
        )
    configured = option(cfg, "num_classes")
    if configured and classes > configured:
        raise ConfigError(f"{dataset.name} has {classes} classes but num_classes is {configured}")


def build_event_dataset(
    name: str, cfg: Namespace, data_cfg: dict[str, Any], training: bool
) -> Dataset:
    """The train or eval split of event dataset ``name``, transforms attached.

    Raises :class:`DatasetNotFoundError` (saying to run ``statten data prepare``) unless the
    frames cache for ``time_steps`` is complete and intact.
    """
    dataset = EVENT_DATASETS[name]
    if not option(cfg, "data_dir"):
        raise DatasetNotFoundError(
            f"{name} needs --data-dir, the dataset root (e.g. data/{dataset.folder}) prepared "
            f"by `statten data prepare {name} --root data/{dataset.folder}`"
        )
    root = Path(option(cfg, "data_dir"))
    frames_number = option(cfg, "time_steps")
    channels, height, width = data_cfg["input_size"]
    manifest = check_frames(dataset, root, frames_number)
    check_spikingjelly_layout(dataset, root, frames_number)
    frames = dataset.sj_class(
        str(root),
        data_type="frame",
        frames_number=frames_number,
        split_by="number",
        transform=event_transform(dataset, cfg, (height, width), training),
    )
    _check_samples(frames, root / frames_stage_name(frames_number), manifest)
    _check_shape(cfg, dataset, len(frames.classes), channels)
    return Subset(frames, split_indices(frames.targets, dataset.train_count, training))
