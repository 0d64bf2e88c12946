"""Config attributes read by the data package, defaulting to the ``statten train`` parser's.

The config is an ``argparse.Namespace`` with timm ``train.py`` attribute names. Library callers
may pass a partial one: attributes it lacks take the parser's defaults (the one source of
defaults), except for the few that are not flags (below).
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from statten.config import parser_defaults

# Defaults a partial config gets instead of the parser's: settings that are not flags (the
# process's place, set by the engine; timm's Python-only names), and the ones it leaves to the
# dataset (its class count and channels) or to --batch-size (the evaluation batch).
NOT_FLAGS: dict[str, Any] = {
    "distributed": False,
    "world_size": 1,
    "rank": 0,
    "class_map": "",
    "validation_batch_size": None,
    "num_classes": None,
    "in_channels": None,
    "val_batch_size": None,
}


def option(cfg: Namespace, name: str) -> Any:
    """``cfg.<name>``, or its default when ``cfg`` lacks it."""
    if hasattr(cfg, name):
        return getattr(cfg, name)
    return NOT_FLAGS[name] if name in NOT_FLAGS else parser_defaults()[name]
