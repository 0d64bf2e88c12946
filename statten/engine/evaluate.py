"""Evaluation loop shared by training (per-epoch validation) and ``statten test``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from statten.analysis.recorder import SpikeRecorder
from statten.engine.distributed import DistributedContext, all_reduce_sum
from statten.engine.losses import time_averaged


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    ctx: DistributedContext,
    autocast: contextlib.AbstractContextManager | None = None,
    record_firing_rates: bool = False,
) -> dict:
    """Loss (cross-entropy), top-1 and top-5 in percent over ``loader``, reduced over ranks.

    TET outputs are averaged over time before scoring. With ``record_firing_rates`` the result
    also holds ``firing_rates``: ``{layer: [rate per time step]}`` of every neuron layer.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, samples
    recorder = SpikeRecorder(model)
    with recorder if record_firing_rates else contextlib.nullcontext():
        for images, targets in loader:
            images = images.to(ctx.device, non_blocking=True)
            targets = targets.to(ctx.device, non_blocking=True)
            with autocast or contextlib.nullcontext():
                scores = time_averaged(model(images)).float()
            top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
            hits = top5 == targets[:, None]
            totals += torch.tensor(
                [
                    F.cross_entropy(scores, targets, reduction="sum").item(),
                    hits[:, 0].sum().item(),
                    hits.any(dim=1).sum().item(),
                    targets.numel(),
                ],
                dtype=torch.float64,
            )
    loss, top1, top5, count = all_reduce_sum(totals.to(ctx.device), ctx).tolist()
    count = max(count, 1)
    metrics = {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}
    metrics["samples"] = int(count)
    if record_firing_rates:
        metrics["firing_rates"] = {k: v.tolist() for k, v in recorder.firing_rates().items()}
    return metrics
