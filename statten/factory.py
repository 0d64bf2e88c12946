"""``statten.create_model``: build a registered statten model by name (through timm's registry)."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from statten.models import MODEL_FACTORIES


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(MODEL_FACTORIES)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model ``name`` (e.g. ``"sdt"``) with keyword arguments of the model class.

    The same models are reachable as ``timm.create_model(name, ...)`` once statten is imported.
    """
    if name not in MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; statten provides {list_models()}")
    return timm.create_model(name, **kwargs)
