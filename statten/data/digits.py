"""``digits``: scikit-learn's 1797 real 8x8 handwritten digits, the dataset that needs no download.

Pixels (0..16) are scaled to [0, 1] and upsampled bilinearly to the model's input size once, at
construction; both splits stay in memory as tensors. The 80/20 train/eval split is stratified and
fixed by :data:`SPLIT_SEED`, whatever the training seed.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from statten.data.options import option

NUM_CLASSES = 10
SPLIT_SEED = 0
EVAL_FRACTION = 0.2
MAX_ROTATION_DEG = 10.0
MAX_TRANSLATE = 1 / 16  # fraction of the image side: 2 px at 32 px

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@lru_cache(maxsize=1)
def _raw_splits() -> dict[bool, tuple[Tensor, Tensor]]:
    """``{training: (images [N, 1, 8, 8] in [0, 1], labels [N])}`` for both splits."""
    digits = load_digits()
    train_idx, eval_idx = train_test_split(
        np.arange(len(digits.target)),
        test_size=EVAL_FRACTION,
        random_state=SPLIT_SEED,
        stratify=digits.target,
    )
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    return {
        training: (images[idx], labels[idx])
        for training, idx in ((True, train_idx), (False, eval_idx))
    }


@lru_cache(maxsize=4)
def digits_split(training: bool, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """One split: images in [0, 1] upsampled to ``size`` ``[N, 1, H, W]``, and labels ``[N]``."""
    images, labels = _raw_splits()[training]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False), labels


def digits_stats(size: tuple[int, int]) -> Stats:
    """Pixel mean and std of the train split at ``size``, as one-channel ``(mean,), (std,)``."""
    images, _ = digits_split(True, size)
    return (images.mean().item(),), (images.std().item(),)


class DigitsDataset(Dataset):
    """In-memory image/label tensors; ``transform`` is applied to each image tensor."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def digits_transform(cfg: Namespace, data_cfg: dict[str, Any], training: bool) -> Callable:
    """Normalisation; for training also a small random affine and timm random erasing."""
    augment = training and not option(cfg, "no_aug")
    steps: list[Callable[[Tensor], Tensor]] = []
    if augment:
        steps.append(
            transforms.RandomAffine(
                degrees=MAX_ROTATION_DEG,
                translate=(MAX_TRANSLATE, MAX_TRANSLATE),
                interpolation=transforms.InterpolationMode.BILINEAR,
            )
        )
    steps.append(transforms.Normalize(data_cfg["mean"], data_cfg["std"]))
    if augment and option(cfg, "reprob") > 0:
        steps.append(
            RandomErasing(
                option(cfg, "reprob"),
                mode=option(cfg, "remode"),
                max_count=option(cfg, "recount"),
                device="cpu",
            )
        )
    return transforms.Compose(steps)


def build_digits(cfg: Namespace, data_cfg: dict[str, Any], training: bool) -> DigitsDataset:
    """The train or eval split at ``data_cfg["input_size"]``, the channel repeated as needed."""
    channels, height, width = data_cfg["input_size"]
    images, labels = digits_split(training, (height, width))
    return DigitsDataset(
        images.expand(-1, channels, -1, -1), labels, digits_transform(cfg, data_cfg, training)
    )
