"""The model-family seam: everything the rest of statten needs to know about a family, in one
registered :class:`ModelFamily` declared at the bottom of the family's own file.

Configuration, checkpoints, training, profiling, fast paths and benchmarks read a family only
through this declaration (and the :class:`~statten.models.base.SpikingModel` interface of its
models), so a new family touches its own file, its recipes and its tests, and nothing else.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "COMMON_OPTIONS",
    "FamilyOption",
    "ModelFamily",
    "family_names",
    "get_family",
    "register_family",
]

# Configuration keys every family takes -> the constructor argument each one sets.
COMMON_OPTIONS = {
    "img_size": "img_size",
    "in_channels": "in_channels",
    "num_classes": "num_classes",
    "dim": "embed_dims",
    "num_heads": "num_heads",
    "layer": "depths",
    "mlp_ratio": "mlp_ratio",
    "time_steps": "T",
    "chunk_size": "chunk_size",
    "attention_mode": "attention_mode",
    "drop_path": "drop_path_rate",
}


@dataclass(frozen=True)
class FamilyOption:
    """A configuration key of one family (``--<key>`` and the YAML key ``<key>``).

    Unset (None), the constructor's default applies. ``kwarg`` is the constructor argument it
    sets (default: the key itself).
    """

    key: str
    help: str
    type: Callable[[Any], Any] = str
    choices: tuple[Any, ...] | None = None
    kwarg: str | None = None

    @property
    def argument(self) -> str:
        return self.kwarg or self.key


StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ModelFamily:
    """What statten knows about a model family.

    - ``name``: the registry name (``statten.create_model(name, ...)``, ``--model name``).
    - ``model_class``: the model (a :class:`~statten.models.base.SpikingModel`); its
      constructor's keyword arguments are the family's model configuration.
    - ``factory``: the timm-registered constructor.
    - ``attention_modes``: accepted ``attention_mode`` values.
    - ``check_config(args)``: raises ``ValueError`` for constructor arguments (all of them, with
      defaults) that do not make a model; the constructor runs the same check, and
      :meth:`validate` runs it on a configuration before any work starts.
    - ``options``: the family's own configuration keys beyond :data:`COMMON_OPTIONS`.
    - ``derived_kwargs(cfg, event_data)``: constructor arguments that follow from the rest of
      the configuration (``event_data``: the dataset yields event frames); may raise
      ``ValueError`` for settings the family cannot honour.
    - ``reference_kwargs(args)``: constructor arguments equivalent to what the official training
      script built from the ``args`` stored in its checkpoints.
    - ``checkpoint_filter_fn(state_dict, model)``: adapts an official (or DDP / compiled) state
      dict to statten's module names, dropping parameters the official code never uses.
    - ``linear_probe_frozen``: submodules that ``--linear-prob`` freezes.
    """

    name: str
    model_class: type[nn.Module]
    factory: Callable[..., nn.Module]
    attention_modes: tuple[str, ...]
    check_config: Callable[[Mapping[str, Any]], None]
    reference_kwargs: Callable[[Mapping[str, Any]], dict[str, Any]]
    checkpoint_filter_fn: Callable[[StateDict, nn.Module | None], dict[str, torch.Tensor]]
    options: tuple[FamilyOption, ...] = ()
    derived_kwargs: Callable[[Any, bool], dict[str, Any]] = field(default=lambda cfg, ev: {})
    linear_probe_frozen: tuple[str, ...] = ("patch_embed",)

    def validate(self, kwargs: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if ``kwargs`` (constructor arguments) do not make a model."""
        params = inspect.signature(self.model_class).parameters
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"{self.name} models take no argument {', '.join(unknown)}")
        args = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        self.check_config({**args, **kwargs})

    def kwargs_from_config(self, cfg: Any, event_data: bool) -> dict[str, Any]:
        """Constructor arguments from a ``statten train`` configuration (unset keys left out)."""
        kwargs = {arg: getattr(cfg, key) for key, arg in COMMON_OPTIONS.items()}
        kwargs.update({o.argument: getattr(cfg, o.key) for o in self.options})
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.update(self.derived_kwargs(cfg, event_data))
        return kwargs


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry (each name once) and return it."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def family_names() -> list[str]:
    """Names of the registered families."""
    return sorted(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name``; a ``ValueError`` naming the known ones otherwise."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; statten provides {family_names()}") from None
