"""Per-sample transforms of event frames ``[T, 2, H, W]`` (float counts, never normalised).

Every random transform draws its parameters once per sample from torch's RNG and applies them to
all T frames, as the reference does. Order in training: resize, the N-Caltech101 augmentation,
horizontal flip, Cutout (``--dvs-aug``), the TrivialAugment-Wide variant (``--dvs-trival-aug``).

Difference from the reference: it applied Cutout to a whole batch with one hole shared by all
its samples; here each sample gets its own hole.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

NEAREST = InterpolationMode.NEAREST


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())


def _randint(low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, (1,)).item())


class ToFrames:
    """SpikingJelly's float32 frames (NumPy) as a tensor."""

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(frames, dtype=torch.float32)


class Resize:
    """Resize every frame to ``size`` as the reference's torchvision ``Resize`` did on tensors:
    ``F.interpolate`` without antialiasing (newer torchvision antialiases by default), bilinear
    with ``align_corners=False`` (CIFAR10-DVS) or nearest (N-Caltech101)."""

    def __init__(self, size: tuple[int, int], mode: str) -> None:
        self.size = tuple(size)
        self.mode = mode

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        return F.interpolate(frames, size=self.size, mode=self.mode, antialias=False)


class RollRotateShear:
    """N-Caltech101 training augmentation: one of, uniformly, a roll by up to 3 px on each axis,
    a rotation by up to 15 degrees, or a horizontal shear by up to 15 degrees (nearest, zero
    fill)."""

    max_roll = 3
    max_degrees = 15.0

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        choice = _randint(0, 2)
        if choice == 0:
            shifts = tuple(_randint(-self.max_roll, self.max_roll) for _ in range(2))
            return torch.roll(frames, shifts=shifts, dims=(-2, -1))
        angle = _uniform(-self.max_degrees, self.max_degrees)
        if choice == 1:
            return TF.rotate(frames, angle, interpolation=NEAREST)
        return TF.affine(
            frames,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=[angle, 0.0],
            interpolation=NEAREST,
        )


class HorizontalFlip:
    """Mirror all frames left-right with probability ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.flip(-1) if torch.rand(1).item() < self.p else frames


class Cutout:
    """Zero one square of side ``length`` centred on a uniform random pixel (clipped at the
    borders), in every frame and channel."""

    def __init__(self, length: int = 16) -> None:
        self.length = length

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        height, width = frames.shape[-2:]
        y, x = _randint(0, height - 1), _randint(0, width - 1)
        half = self.length // 2
        out = frames.clone()
        out[..., max(y - half, 0) : y + half, max(x - half, 0) : x + half] = 0
        return out


class EventTrivialAugment:
    """The reference's TrivialAugment-Wide for event frames (``SNNAugmentWide``).

    One op, uniformly: Identity, ShearX, TranslateX, TranslateY or Rotate; its magnitude one of
    31 evenly spaced bins of ``[-M, M]`` (M: 0.3 shear, 5 px translation, 30 degrees rotation),
    negated with probability 1/2; nearest interpolation, zero fill.
    """

    num_bins = 31
    ranges: ClassVar[dict[str, float]] = {
        "ShearX": 0.3,
        "TranslateX": 5.0,
        "TranslateY": 5.0,
        "Rotate": 30.0,
    }
    ops = ("Identity", *ranges)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        op = self.ops[_randint(0, len(self.ops) - 1)]
        if op == "Identity":
            return frames
        bins = torch.linspace(-self.ranges[op], self.ranges[op], self.num_bins)
        magnitude = float(bins[_randint(0, self.num_bins - 1)].item())
        if _randint(0, 1):
            magnitude = -magnitude
        if op == "Rotate":
            return TF.rotate(frames, magnitude, interpolation=NEAREST)
        shear = [math.degrees(magnitude), 0.0] if op == "ShearX" else [0.0, 0.0]
        translate = {"TranslateX": [int(magnitude), 0], "TranslateY": [0, int(magnitude)]}
        return TF.affine(
            frames,
            angle=0.0,
            translate=translate.get(op, [0, 0]),
            scale=1.0,
            shear=shear,
            interpolation=NEAREST,
        )
