"""``statten test``: evaluate a checkpoint (statten or reference format) on a validation split."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from statten.checkpoint import checkpoint_source, create_model_from_checkpoint, read_checkpoint
from statten.config import ConfigError
from statten.data import create_eval_loader
from statten.engine.distributed import init_distributed, leave_group_after
from statten.engine.evaluate import evaluate
from statten.engine.trainer import autocast_for, with_process_placement
from statten.fast import optimize_for_inference

_logger = logging.getLogger("statten.test")


def load_checkpoint_model(path: str, cfg: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """The model the checkpoint file ``path`` describes (with its EMA weights when
    ``--model-ema`` asks for them), and the checkpoint; errors name the file."""
    checkpoint = read_checkpoint(path)
    use_ema = bool(cfg.model_ema) and "state_dict_ema" in checkpoint
    with checkpoint_source(path):
        return create_model_from_checkpoint(checkpoint, use_ema=use_ema), checkpoint


def test(cfg: argparse.Namespace) -> dict[str, Any]:
    """Loss, top-1, top-5 and per-layer per-step firing rates of ``cfg.resume`` on the val split.

    The model is rebuilt from the configuration stored in the checkpoint (statten's
    ``model_config`` or the reference's ``args``), so evaluation matches training exactly;
    ``--fast-inference`` evaluates :func:`~statten.fast.optimize_for_inference`'s copy instead.
    """
    if not cfg.resume:
        raise ConfigError("statten test needs a checkpoint: pass --resume CHECKPOINT")
    ctx = init_distributed(cfg.device, cfg.dist_timeout)
    with leave_group_after(ctx):
        model = load_checkpoint_model(cfg.resume, cfg)[0].to(ctx.device)
        if cfg.fast_inference:
            model = optimize_for_inference(model)
        eval_loader = create_eval_loader(with_process_placement(cfg, ctx), model)
        metrics = evaluate(model, eval_loader, ctx, autocast_for(cfg, ctx.device), True)
        metrics["checkpoint"] = str(cfg.resume)
        if ctx.is_primary:
            _report(metrics)
            if cfg.json:
                Path(cfg.json).write_text(json.dumps(metrics, indent=2))
        return metrics


def _report(metrics: dict[str, Any]) -> None:
    print(
        f"{metrics['checkpoint']}: loss {metrics['loss']:.4f}  top1 {metrics['top1']:.2f}%  "
        f"top5 {metrics['top5']:.2f}%  ({metrics['samples']} samples)"
    )
    print("firing rate per time step:")
    width = max(len(name) for name in metrics["firing_rates"])
    for name, rates in metrics["firing_rates"].items():
        print(f"  {name:<{width}}  " + " ".join(f"{r:.3f}" for r in rates))


__all__ = ["load_checkpoint_model", "test"]
