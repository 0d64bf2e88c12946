"""Data loaders: seeded, epoch-reproducible sampling, worker seeding and timm mixup/cutmix.

Plain :class:`torch.utils.data.DataLoader` s (no CUDA prefetcher), so they work on CPU and GPU
alike; the datasets already return normalised float tensors.

Reproducibility: the train order of epoch ``k`` depends only on ``(cfg.seed, k)``, so a run
resumed at epoch ``k`` (after :func:`set_epoch`) sees the same batches as an uninterrupted one;
resumed in the middle of it, the sampler starts after the batches done, which are not loaded.
Augmentation draws from the global RNGs with ``workers=0`` (seed them per epoch for bit-exact
resumes) and from per-worker RNGs seeded by torch otherwise; persistent workers keep their RNG
across epochs, so bit-exact resume equivalence needs ``workers=0`` and deterministic settings.
"""

from __future__ import annotations

import itertools
from argparse import Namespace
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from statten.data.datasets import build_dataset, create_datasets, num_classes
from statten.data.errors import DatasetNotFoundError
from statten.data.options import option


class _AdvancingEpoch:
    """Sampler mixin: each pass uses ``self.epoch``, then moves on to the next epoch.

    A training loop that never calls ``set_epoch`` still gets a new order every epoch, and
    ``set_epoch(k)`` on a fresh sampler reproduces epoch ``k`` of an uninterrupted run;
    ``start_at(n)`` then leaves out its first ``n`` samples, which are never loaded.
    """

    epoch: int
    start: int = 0

    def start_at(self, position: int) -> None:
        """Begin the next pass at ``position`` of its order (a mid-epoch resume)."""
        self.start = position

    def __iter__(self) -> Iterator[int]:
        indices = super().__iter__()  # type: ignore[misc]  # computed eagerly from self.epoch
        self.epoch += 1
        start, self.start = self.start, 0
        return itertools.islice(indices, start, None)


class EpochShuffleSampler(_AdvancingEpoch, DistributedSampler):
    """Shuffle from ``(seed, epoch)`` over this rank's share (the whole dataset on one process)."""


class EpochRepeatAugSampler(_AdvancingEpoch, RepeatAugSampler):
    """timm's repeated-augmentation sampler (its order depends on the epoch only, not the seed)."""


def _replicas(cfg: Namespace) -> tuple[int, int]:
    """``(world_size, rank)``; ``(1, 0)`` when not distributed."""
    if option(cfg, "distributed"):
        return option(cfg, "world_size"), option(cfg, "rank")
    return 1, 0


def train_sampler(cfg: Namespace, dataset: Dataset) -> Sampler[int]:
    """Epoch-seeded shuffling sampler, with repeated augmentation when ``aug_repeats`` is set."""
    world_size, rank = _replicas(cfg)
    repeats = option(cfg, "aug_repeats")
    if repeats:
        return EpochRepeatAugSampler(
            dataset, num_replicas=world_size, rank=rank, num_repeats=repeats
        )
    return EpochShuffleSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=option(cfg, "seed")
    )


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s contiguous share of ``range(size)``: every index once over all ranks.

    Unlike timm's ``OrderedDistributedSampler``, no rank is padded with wrapped-around samples,
    so metrics and firing rates summed over ranks count every sample exactly once (shares
    differ by at most one sample).
    """

    def __init__(self, size: int, world_size: int, rank: int) -> None:
        self.start = size * rank // world_size
        self.stop = size * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def eval_sampler(cfg: Namespace, dataset: Dataset) -> Sampler[int] | None:
    """None (sequential) on one process, else this rank's contiguous share of the split."""
    world_size, rank = _replicas(cfg)
    if world_size == 1:
        return None
    return ShardSampler(len(dataset), world_size, rank)


def seed_worker(worker_id: int) -> None:
    """Seed numpy in a worker from its torch seed (torch and ``random`` are seeded by torch)."""
    np.random.seed(torch.initial_seed() % 2**32)


def collate_splits(batch: Sequence[tuple[Any, Any]]) -> tuple[Tensor, Tensor]:
    """Collate timm AugMix samples ``((x_0, ..., x_s), y)`` into split-major ``[s*B, ...]``."""
    splits, targets = default_collate(batch)
    return torch.cat(splits), targets.repeat(len(splits))


def check_full_batch(cfg: Namespace, sampler: Sampler[int], batch_size: int) -> None:
    """Training drops the last partial batch: a split (per process) smaller than one batch would
    train on nothing, every epoch, without a word."""
    if len(sampler) < batch_size:
        share = " per process" if _replicas(cfg)[0] > 1 else ""
        raise DatasetNotFoundError(
            f"the training split has {len(sampler)} samples{share}, fewer than --batch-size "
            f"{batch_size}: no full batch to train on (the partial one is dropped); lower "
            "--batch-size or add data"
        )


def _loader(cfg: Namespace, dataset: Dataset, training: bool) -> DataLoader:
    """A train (sampled, drop_last) or eval (ordered) loader over ``dataset``."""
    workers = option(cfg, "workers")
    batch_size = option(cfg, "batch_size")
    if not training:
        batch_size = (
            option(cfg, "validation_batch_size") or option(cfg, "val_batch_size") or batch_size
        )
    sampler = train_sampler(cfg, dataset) if training else eval_sampler(cfg, dataset)
    if training:
        check_full_batch(cfg, sampler, batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_splits if training and option(cfg, "aug_splits") else None,
        pin_memory=option(cfg, "pin_mem") and torch.cuda.is_available(),
        drop_last=training,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(option(cfg, "seed")),
        persistent_workers=workers > 0,
    )


def create_mixup(cfg: Namespace) -> Mixup | None:
    """timm ``Mixup`` (label smoothing included) if mixup, cutmix or cutmix_minmax is on."""
    cutmix_minmax = option(cfg, "cutmix_minmax")
    if option(cfg, "mixup") <= 0 and option(cfg, "cutmix") <= 0 and cutmix_minmax is None:
        return None
    classes = num_classes(cfg)
    if classes is None:
        raise ValueError("mixup/cutmix need the number of classes: set num_classes")
    return Mixup(
        mixup_alpha=option(cfg, "mixup"),
        cutmix_alpha=option(cfg, "cutmix"),
        cutmix_minmax=cutmix_minmax,
        prob=option(cfg, "mixup_prob"),
        switch_prob=option(cfg, "mixup_switch_prob"),
        mode=option(cfg, "mixup_mode"),
        label_smoothing=option(cfg, "smoothing"),
        num_classes=classes,
    )


def create_loaders(
    cfg: Namespace, model: nn.Module | None = None
) -> tuple[DataLoader, DataLoader, Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None]:
    """``(train_loader, eval_loader, mixup_fn or None)`` for ``cfg.dataset``.

    Apply ``mixup_fn(images, targets)`` to each train batch; it returns soft targets.
    """
    train, evaluation = create_datasets(cfg, model)
    return _loader(cfg, train, True), _loader(cfg, evaluation, False), create_mixup(cfg)


def create_eval_loader(cfg: Namespace, model: nn.Module | None = None) -> DataLoader:
    """The eval loader alone (``statten test`` needs no train split)."""
    return _loader(cfg, build_dataset(cfg, False, model), False)


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Make the next pass over ``loader`` draw the order of ``epoch`` (call before each epoch),
    without its first ``skip_batches`` batches (a mid-epoch resume: they are never loaded)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if skip_batches:
        loader.sampler.start_at(skip_batches * loader.batch_size)
