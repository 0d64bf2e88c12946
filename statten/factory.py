"""``statten.create_model``: build a registered statten model by name (through timm's registry)."""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from statten.models import family_names, get_family


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return family_names()


def create_model(name: str, spike_driven: bool = False, **kwargs: Any) -> nn.Module:
    """Build model ``name`` (e.g. ``"sdt"``, ``"spikformer"``) with its keyword arguments.

    ``spike_driven=True`` sets ``model.spike_driven`` (spike-driven convolutions, opt-in, see
    :class:`~statten.models.base.SpikingModel`). The same models are reachable as
    ``timm.create_model(name, ...)`` once statten is imported.
    """
    get_family(name)  # a clear error for an unknown name
    model = timm.create_model(name, **kwargs)
    if spike_driven:
        model.spike_driven = True
    return model
