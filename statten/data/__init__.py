"""Datasets and loaders for statten, driven by a timm-style ``argparse.Namespace`` config.

``create_loaders(cfg, model)`` returns ``(train_loader, eval_loader, mixup_fn or None)`` whose
batches are normalised ``[B, C, H, W]`` float tensors; ``set_epoch(train_loader, epoch)`` before
each epoch makes the train order a function of ``(cfg.seed, epoch)`` only.
"""

from statten.data.datasets import (
    DATASETS,
    DatasetSpec,
    build_dataset,
    create_datasets,
    data_config,
    num_classes,
)
from statten.data.digits import DigitsDataset
from statten.data.errors import CorruptSampleError, DatasetNotFoundError
from statten.data.loaders import (
    EpochRepeatAugSampler,
    EpochShuffleSampler,
    create_eval_loader,
    create_loaders,
    create_mixup,
    set_epoch,
)

__all__ = [
    "DATASETS",
    "CorruptSampleError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "DigitsDataset",
    "EpochRepeatAugSampler",
    "EpochShuffleSampler",
    "build_dataset",
    "create_datasets",
    "create_eval_loader",
    "create_loaders",
    "create_mixup",
    "data_config",
    "num_classes",
    "set_epoch",
]
