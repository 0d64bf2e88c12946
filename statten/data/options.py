"""Config attributes read by the data package, with the defaults of the reference train.py.

The config is an ``argparse.Namespace`` with timm ``train.py`` attribute names; attributes it
lacks fall back to these defaults, so a small Namespace is enough in tests.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "data_dir": "",
    "train_split": "train",
    "val_split": "validation",
    "dataset_download": False,
    "class_map": "",
    "img_size": None,
    "in_channels": None,
    "input_size": None,
    "crop_pct": None,
    "mean": None,
    "std": None,
    "interpolation": "",
    "train_interpolation": "random",
    "batch_size": 32,
    "validation_batch_size": None,
    "val_batch_size": None,  # the reference's name for validation_batch_size
    "workers": 0,
    "pin_mem": False,
    "no_aug": False,
    "aa": None,
    "reprob": 0.0,
    "remode": "const",
    "recount": 1,
    "resplit": False,
    "scale": (0.08, 1.0),
    "ratio": (3.0 / 4.0, 4.0 / 3.0),
    "hflip": 0.5,
    "vflip": 0.0,
    "color_jitter": 0.4,
    "aug_repeats": 0,
    "aug_splits": 0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "cutmix_minmax": None,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "mixup_mode": "batch",
    "smoothing": 0.1,
    "num_classes": None,
    "seed": 42,
    "distributed": False,
    "world_size": 1,
    "rank": 0,
    "time_steps": 4,
    "dvs_aug": False,
    "dvs_trival_aug": False,
}


def option(cfg: Namespace, name: str) -> Any:
    """``cfg.<name>``, or the reference default when ``cfg`` lacks it."""
    return getattr(cfg, name, DEFAULTS[name])
