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

    Per-step outputs (``model.per_step_logits``, e.g. TET) are averaged over time before
    scoring. With ``record_firing_rates`` the result
    also holds ``firing_rates``: ``{layer: [rate per time step]}`` of every neuron layer, also
    over all ranks.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, samples
    recorder = SpikeRecorder(model)
    with recorder if record_firing_rates else contextlib.nullcontext():
        for images, targets in loader:
            images = images.to(ctx.device, non_blocking=True)
            targets = targets.to(ctx.device, non_blocking=True)
            with autocast or contextlib.nullcontext():
                scores = time_averaged(model(images), model.per_step_logits).float()
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
        metrics["firing_rates"] = _firing_rates_over_ranks(recorder, ctx, model.T)
    return metrics


def _firing_rates_over_ranks(
    recorder: SpikeRecorder, ctx: DistributedContext, time_steps: int
) -> dict:
    """``{layer: [rate per time step]}`` over the samples of all ranks, layers in module order.

    Spike and neuron counts are summed over the ranks before dividing, so the rates are those of
    one process evaluating the whole split. Every rank reduces the same layers in the same
    order, also a rank that saw no sample (a split smaller than the world).
    """
    spikes, neurons = recorder.spike_counts()
    names = recorder.layer_names()
    zeros = torch.zeros(time_steps, dtype=torch.float64)
    per_step = torch.stack([spikes.get(n, zeros).cpu() for n in names]).to(ctx.device)
    per_step = all_reduce_sum(per_step, ctx)
    counts = torch.tensor([neurons.get(n, 0) for n in names], dtype=torch.float64)
    counts = all_reduce_sum(counts.to(ctx.device), ctx)
    return {
        name: (spikes_per_step / count).tolist()
        for name, spikes_per_step, count in zip(names, per_step.cpu(), counts.cpu(), strict=True)
        if count > 0  # layers that never ran (none in the families' models)
    }
