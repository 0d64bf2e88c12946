"""``statten train``: the training loop, crash-safe checkpoints and exact resume."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, distribute_bn, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from statten.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_source,
    link_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from statten.config import config_to_dict, model_config, save_config
from statten.data import create_loaders, data_config, set_epoch
from statten.engine.distributed import (
    DistributedContext,
    init_distributed,
    leave_group_after,
    lost_contact,
)
from statten.engine.evaluate import evaluate
from statten.engine.losses import create_train_criterion
from statten.engine.stopping import StopSignals, TrainingStopped
from statten.factory import create_model
from statten.models import get_family

_logger = logging.getLogger("statten.train")

LAST = "last.pth.tar"
BEST = "model_best.pth.tar"
RECOVERY = "recovery.pth.tar"
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became non-finite)."""


@dataclass
class Progress:
    """Where training stands: completed epochs, optimizer steps, batches done in this epoch."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    best: list[tuple[float, int]] = field(default_factory=list)  # (metric, epoch), best first


def capture_rng_state() -> dict[str, Any]:
    """All random generators that training draws from, as plain Python values.

    Plain values keep checkpoints loadable with ``weights_only=True`` and can be gathered
    across ranks with ``all_gather_object``.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def with_process_placement(cfg: argparse.Namespace, ctx: DistributedContext) -> argparse.Namespace:
    """``cfg`` plus this process's place (distributed, world_size, rank) for the data samplers."""
    return argparse.Namespace(
        **{
            **vars(cfg),
            "distributed": ctx.distributed,
            "world_size": ctx.world_size,
            "rank": ctx.rank,
        }
    )


def autocast_for(
    cfg: argparse.Namespace, device: torch.device
) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA when ``--amp`` is set; fp32 everywhere else."""
    if cfg.amp and device.type == "cuda":
        dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


class Trainer:
    """Owns the model, optimizer, scheduler, loaders and checkpoints of one training run."""

    def __init__(self, cfg: argparse.Namespace, ctx: DistributedContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        random_seed(cfg.seed, ctx.rank)
        self.model_config = model_config(cfg)
        model = create_model(cfg.model, spike_driven=cfg.spike_driven, **self.model_config)
        self.model = model.to(ctx.device)
        if cfg.memory_efficient is not None:  # else the model's default
            self.model.memory_efficient = cfg.memory_efficient
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if ctx.distributed and cfg.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if cfg.bn_momentum is not None:  # as timm's create_model(bn_momentum=...)
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = cfg.bn_momentum
        if cfg.initial_checkpoint:  # as timm's and the official scripts do
            load_checkpoint(self.model, cfg.initial_checkpoint, allow_missing=True)
        if cfg.linear_prob:  # the reference's --linear-prob
            frozen = get_family(cfg.model).linear_probe_frozen
            for name, parameter in self.model.named_parameters():
                if name.startswith(frozen):
                    parameter.requires_grad_(False)
        self.optimizer = create_optimizer_v2(self.model, **optimizer_kwargs(cfg))
        if cfg.amp and ctx.device.type != "cuda":
            _logger.warning("--amp applies on CUDA only: training on %s in fp32", ctx.device)
        use_fp16 = cfg.amp and ctx.device.type == "cuda"
        use_fp16 = use_fp16 and cfg.amp_dtype != "bfloat16"
        self.scaler = NativeScaler(device=ctx.device.type) if use_fp16 else None
        self.autocast = autocast_for(cfg, ctx.device)
        self.ema = None
        if cfg.model_ema:
            ema_device = "cpu" if cfg.model_ema_force_cpu else None
            self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay, device=ema_device)
        self.progress = Progress()
        self.output_dir: Path | None = None
        self.stop_signals = StopSignals()

    # -- setup ---------------------------------------------------------------------------------
    def build_data(self) -> None:
        self.train_loader, self.eval_loader, self.mixup_fn = create_loaders(
            with_process_placement(self.cfg, self.ctx), self.model
        )
        self.criterion = create_train_criterion(self.cfg, self.mixup_fn is not None)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer,
            **scheduler_kwargs(self.cfg),
            updates_per_epoch=len(self.train_loader),
        )
        if self.ctx.distributed:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.train_model: nn.Module = DistributedDataParallel(self.model, device_ids=device_ids)
        else:
            self.train_model = self.model

    def resume(self, checkpoint: dict[str, Any], path: str) -> None:
        """Restore a checkpoint read from ``path``; with ``--no-resume-opt`` only the weights."""
        with checkpoint_source(path):
            load_checkpoint(self.model, checkpoint)
        if not continues_run(self.cfg, checkpoint):
            _logger.info("loaded weights from %s (optimizer state not restored)", path)
            return
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and "scaler" in checkpoint:
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None and "state_dict_ema" in checkpoint:
            self.ema.module.load_state_dict(checkpoint["state_dict_ema"])
        p = checkpoint["progress"]
        self.progress = Progress(
            p["epoch"], p["step"], p["batch_in_epoch"], [tuple(b) for b in p["best"]]
        )
        restore_rng_state(checkpoint["rng"][min(self.ctx.rank, len(checkpoint["rng"]) - 1)])
        _logger.info(
            "resumed from %s at epoch %d, batch %d (step %d)",
            path, self.progress.epoch, self.progress.batch_in_epoch, self.progress.step,
        )  # fmt: skip

    def start_at(self, epoch: int) -> None:
        """``--start-epoch``: begin (or resume) at ``epoch``, with the learning-rate schedule
        moved there, as timm's training script does."""
        self.progress.epoch, self.progress.batch_in_epoch = epoch, 0
        self.progress.step = epoch * len(self.train_loader)
        self.scheduler.step(epoch)
        _logger.info("starting at epoch %d (--start-epoch)", epoch)

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self, metric: float | None) -> dict[str, Any]:
        rng_states = [capture_rng_state()]
        if self.ctx.distributed:
            rng_states = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(rng_states, capture_rng_state())
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "arch": self.cfg.model,
            "model_config": self.model_config,
            "config": config_to_dict(self.cfg),
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "progress": {
                "epoch": self.progress.epoch,
                "step": self.progress.step,
                "batch_in_epoch": self.progress.batch_in_epoch,
                "best": [list(b) for b in self.progress.best],
            },
            "metric": metric,
            "rng": rng_states,
        }
        if self.scaler is not None:
            checkpoint["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            checkpoint["state_dict_ema"] = self.ema.module.state_dict()
        return checkpoint

    def save_recovery(self) -> None:
        checkpoint = self._checkpoint(metric=None)  # every rank joins the RNG gather
        if self.ctx.is_primary:
            save_checkpoint(checkpoint, self.output_dir / RECOVERY)

    def save_epoch(self, metric: float) -> None:
        """last, the best ``checkpoint_hist`` by the eval metric, model_best; drop recovery."""
        epoch = self.progress.epoch - 1  # the epoch just finished, as in summary.csv
        keep = self.cfg.checkpoint_hist
        lower_is_better = self._metric_name() == "loss"
        ranking = sorted(
            [*self.progress.best, (metric, epoch)], key=lambda b: b[0] if lower_is_better else -b[0]
        )
        self.progress.best = ranking[:keep]
        checkpoint = self._checkpoint(metric)
        if not self.ctx.is_primary:
            return
        save_checkpoint(checkpoint, self.output_dir / LAST)  # serialised once, then linked
        if (metric, epoch) in self.progress.best:
            link_checkpoint(self.output_dir / LAST, self.output_dir / f"checkpoint-{epoch}.pth.tar")
            if ranking[0][1] == epoch:
                link_checkpoint(self.output_dir / LAST, self.output_dir / BEST)
        for _, dropped in ranking[keep:]:
            (self.output_dir / f"checkpoint-{dropped}.pth.tar").unlink(missing_ok=True)
        (self.output_dir / RECOVERY).unlink(missing_ok=True)

    # -- loop ----------------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> float:
        self.train_model.train()
        self.switch_mixup(epoch)
        skip = self.progress.batch_in_epoch  # resuming mid-epoch: the sampler skips these
        set_epoch(self.train_loader, epoch, skip)
        total = len(self.train_loader)
        bar = _progress_bar(self.ctx, total, skip, epoch, self.cfg.log_interval)
        loss_sum, seen, start = 0.0, 0, time.time()
        recovery_every = self.cfg.recovery_interval
        for images, targets in self.train_loader:
            loss = self.train_step(images, targets)
            self.progress.batch_in_epoch += 1
            self.progress.step += 1
            loss_sum, seen = loss_sum + loss * len(images), seen + len(images)
            self.scheduler.step_update(num_updates=self.progress.step)
            bar.update(self.progress.batch_in_epoch, loss, self._lr(), seen / (time.time() - start))
            self._stop_if_signalled()
            if recovery_every and self.progress.step % recovery_every == 0:
                self.save_recovery()
        bar.close()
        return loss_sum / max(seen, 1)

    def switch_mixup(self, epoch: int) -> None:
        """``--mixup-off-epoch N``: no mixing from epoch N on (targets stay label-smoothed), as
        the reference scripts do through timm's ``mixup_enabled``."""
        off_epoch = self.cfg.mixup_off_epoch
        if self.mixup_fn is not None and off_epoch:
            self.mixup_fn.mixup_enabled = epoch < off_epoch

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        images = images.to(self.ctx.device, non_blocking=True)
        targets = targets.to(self.ctx.device, non_blocking=True)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        with self.autocast:
            loss = self.model.loss(self.train_model(images), targets, self.criterion)
        self._check_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.clip_grad
        clip_mode = self.cfg.clip_mode
        if self.scaler is not None:
            self.scaler(loss, self.optimizer, clip_grad=clip, clip_mode=clip_mode,
                        parameters=self.model.parameters())  # fmt: skip
        else:
            loss.backward()
            if clip is not None:
                dispatch_clip_grad(self.model.parameters(), value=clip, mode=clip_mode)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.step)
        return loss.item()

    def _stop_if_signalled(self) -> None:
        """After SIGTERM/SIGINT at any rank: a recovery checkpoint, then :class:`TrainingStopped`
        (every rank stops at the same step, as they all join the save)."""
        signum = self._agreed_stop_signal()
        if signum:
            self.save_recovery()
            raise TrainingStopped(
                signum,
                self.progress.epoch,
                self.progress.batch_in_epoch,
                (self.output_dir / RECOVERY).resolve(),
                self.ctx.is_primary,
            )

    def _agreed_stop_signal(self) -> int:
        """The stop signal received by this rank or, when distributed, by any rank (0: none)."""
        if not self.ctx.distributed:
            return self.stop_signals.received
        received = torch.tensor(self.stop_signals.received, device=self.ctx.device)
        torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
        return int(received.item())

    def _check_finite(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).float()
        if self.ctx.distributed:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1:
            last = self.output_dir / LAST if self.output_dir else None
            kept = last if last and last.exists() else "none yet"
            raise TrainingError(
                f"loss became non-finite ({loss.item()}) at epoch {self.progress.epoch}, "
                f"step {self.progress.step}; stopping. Last good checkpoint: {kept}. "
                "Try a lower --lr or --clip-grad."
            )

    def _metric_name(self) -> str:
        """The metric that ranks checkpoints (``--eval-metric`` without an ``eval_`` prefix)."""
        return self.cfg.eval_metric.removeprefix("eval_")

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def fit(self) -> dict[str, float]:
        """Train until ``num_epochs``, validating and checkpointing after every epoch; SIGTERM
        and SIGINT stop it at the next step with a recovery checkpoint."""
        writer = _tensorboard(self.output_dir) if self.ctx.is_primary else None
        try:
            with self.stop_signals:
                return self._run_epochs(writer)
        finally:
            if writer is not None:
                writer.close()

    def _run_epochs(self, writer: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        eval_model = self.ema.module if self.ema is not None else self.model
        for epoch in range(self.progress.epoch, self.num_epochs):
            train_loss = self.train_one_epoch(epoch)
            if self.ctx.distributed:  # every rank evaluates the statistics that are saved
                distribute_bn(self.model, self.ctx.world_size, self.cfg.dist_bn == "reduce")
            metrics = evaluate(eval_model, self.eval_loader, self.ctx, self.autocast)
            self.progress.epoch, self.progress.batch_in_epoch = epoch + 1, 0
            self.scheduler.step(epoch + 1, metrics[self._metric_name()])
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "eval_loss": metrics["loss"],
                "eval_top1": metrics["top1"],
                "eval_top5": metrics["top5"],
                "lr": self._lr(),
            }
            if self.ctx.is_primary:
                _append_summary(self.output_dir / "summary.csv", row)
                for key, value in row.items():
                    if key != "epoch":
                        writer.add_scalar(key, value, epoch)
                writer.flush()
                _logger.info(
                    "epoch %d: train_loss %.4f eval_loss %.4f top1 %.2f top5 %.2f lr %.3g",
                    *row.values(),
                )
            self.save_epoch(metrics[self._metric_name()])
            if epoch + 1 < self.num_epochs:
                self._stop_if_signalled()  # a signal during evaluation
        return metrics


class _progress_bar:
    """tqdm bar on the primary rank when attached to a terminal; periodic log lines otherwise."""

    def __init__(
        self, ctx: DistributedContext, total: int, initial: int, epoch: int, interval: int
    ) -> None:
        self.enabled = ctx.is_primary
        self.total = total
        self.epoch = epoch
        self.bar = None
        self.interval = interval
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", leave=False)

    def update(self, done: int, loss: float, lr: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.0f}")
            self.bar.update(done - self.bar.n)
        elif self.enabled and (done % self.interval == 0 or done == self.total):
            _logger.info(
                "epoch %d [%d/%d] loss %.4f lr %.3g %.0f img/s",
                self.epoch, done, self.total, loss, lr, images_per_s,
            )  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tensorboard(output_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


def _append_summary(path: Path, row: dict[str, float]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def continues_run(cfg: argparse.Namespace, checkpoint: dict[str, Any] | None) -> bool:
    """True when resuming a statten run (optimizer, schedule, RNG), not just loading weights."""
    return (
        checkpoint is not None
        and checkpoint.get("format") == CHECKPOINT_FORMAT
        and not cfg.no_resume_opt
    )


def _output_dir(cfg: argparse.Namespace, checkpoint: dict[str, Any] | None) -> Path:
    """The run directory: the resumed run's own directory, or a new one under ``--output``."""
    if continues_run(cfg, checkpoint):
        return Path(cfg.resume).resolve().parent
    name = cfg.experiment or "-".join(
        [time.strftime("%Y%m%d-%H%M%S"), cfg.model, str(cfg.dataset).replace("/", "_") or "folder"]
    )
    return Path(cfg.output or "./output") / "train" / name


def _setup_logging(output_dir: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if output_dir is not None:
        handlers.append(logging.FileHandler(output_dir / "log.txt"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers,
                        force=True)  # fmt: skip


def dry_run(cfg: argparse.Namespace) -> dict[str, Any]:
    """Build model, data config and optimizer without touching data; return a summary."""
    ctx = DistributedContext(0, 1, 0, torch.device("meta"))  # shapes only, no memory
    with ctx.device:
        trainer = Trainer(cfg, ctx)
    summary = {
        "model": cfg.model,
        "model_config": trainer.model_config,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "data_config": data_config(cfg, trainer.model),
        "optimizer": type(trainer.optimizer).__name__,
    }
    print(json.dumps(summary, indent=2, default=str))
    return summary


def run_training(cfg: argparse.Namespace) -> Trainer:
    """Run training as configured and return the finished :class:`Trainer`."""
    ctx = init_distributed(cfg.device, cfg.dist_timeout)
    try:
        with leave_group_after(ctx):
            return _train(cfg, ctx)
    except RuntimeError as error:
        cause = lost_contact(error) if ctx.distributed else None
        if cause is None:
            raise
        raise TrainingError(
            f"rank {ctx.rank}: lost contact with the other processes ({cause}): one of them died "
            f"or did not answer within --dist-timeout {cfg.dist_timeout} s (its own output says "
            "why); the run resumes from its last checkpoint with --resume"
        ) from error


def _train(cfg: argparse.Namespace, ctx: DistributedContext) -> Trainer:
    """Build, resume and fit the trainer of ``cfg`` in this process."""
    trainer = Trainer(cfg, ctx)
    trainer.build_data()
    checkpoint = read_checkpoint(cfg.resume) if cfg.resume else None
    trainer.output_dir = _output_dir(cfg, checkpoint)
    if ctx.is_primary:
        trainer.output_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(trainer.output_dir)
    _setup_logging(trainer.output_dir if ctx.is_primary else None)
    if checkpoint is not None:
        trainer.resume(checkpoint, cfg.resume)
    if cfg.start_epoch is not None:
        trainer.start_at(cfg.start_epoch)
    if ctx.is_primary:
        save_config(cfg, trainer.output_dir / "args.yaml")
        _logger.info("training %s on %s; outputs in %s", cfg.model, cfg.dataset, trainer.output_dir)
    metrics = trainer.fit()
    if ctx.is_primary:
        _logger.info(
            "done: eval top1 %.2f%%; checkpoints, summary.csv, args.yaml, log.txt and "
            "tensorboard/ are in %s", metrics.get("top1", math.nan), trainer.output_dir,
        )  # fmt: skip
    return trainer


def train(cfg: argparse.Namespace) -> Path | None:
    """``statten train``: returns the run directory (None for ``--dry-run``)."""
    if cfg.dry_run:
        dry_run(cfg)
        return None
    return run_training(cfg).output_dir


def _remove_stale_temporaries(output_dir: Path) -> None:
    """Drop half-written checkpoint files left by a process killed while saving."""
    for stale in output_dir.glob("*.pth.tar.tmp-*"):
        stale.unlink(missing_ok=True)


__all__ = [
    "Trainer",
    "TrainingError",
    "autocast_for",
    "dry_run",
    "run_training",
    "train",
]
