"""Training losses: timm's classification losses, optionally wrapped in the TET loss."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn


class TETLoss(nn.Module):
    """Temporal efficient training loss (Deng et al., ICLR 2022) on per-step logits ``[T, B, K]``.

    ``L = (1 - lamb) * mean_t criterion(logits[t], target) + lamb * MSE(logits, phi)``.
    """

    def __init__(self, criterion: nn.Module, lamb: float = 1e-3, phi: float = 1.0) -> None:
        super().__init__()
        self.criterion = criterion
        self.lamb = lamb
        self.phi = phi

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_step = sum(self.criterion(step, target) for step in logits) / logits.shape[0]
        if self.lamb == 0:
            return per_step
        regulariser = F.mse_loss(logits, torch.full_like(logits, self.phi))
        return (1 - self.lamb) * per_step + self.lamb * regulariser


def time_averaged(logits: torch.Tensor, per_step: bool) -> torch.Tensor:
    """Class scores ``[B, K]``: per-step outputs ``[T, B, K]`` (``per_step``, e.g. a TET model)
    are averaged over time first."""
    return logits.mean(0) if per_step else logits


def create_train_criterion(cfg: argparse.Namespace, mixup_active: bool) -> nn.Module:
    """The training loss selected by the config (timm's choices, TET on top when ``cfg.TET``)."""
    smoothing = cfg.smoothing
    if cfg.bce_loss:
        criterion = BinaryCrossEntropy(
            smoothing=0.0 if mixup_active else smoothing,
            target_threshold=cfg.bce_target_thresh,
        )
    elif mixup_active:
        criterion = SoftTargetCrossEntropy()
    elif smoothing:
        criterion = LabelSmoothingCrossEntropy(smoothing=smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    if cfg.TET:
        return TETLoss(criterion, cfg.TET_lamb, cfg.TET_means)
    return criterion
