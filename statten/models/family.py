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
from timm.models import build_model_with_cfg
from torch import nn

from statten.naming import clean_module_name

__all__ = [
    "COMMON_OPTIONS",
    "FamilyOption",
    "ModelFamily",
    "build_model",
    "check_common_config",
    "default_cfg",
    "family_names",
    "family_of_arch",
    "filter_state_dict",
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
    sets (default: the key itself). A ``flag`` is a boolean (``--key``, ``--key false``);
    ``nargs`` makes it a list of that many values.
    """

    key: str
    help: str
    type: Callable[[Any], Any] = str
    choices: tuple[Any, ...] | None = None
    kwarg: str | None = None
    flag: bool = False
    nargs: int | None = None

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
    - ``attention_modes``: accepted ``attention_mode`` values.
    - ``check_config(args)``: raises ``ValueError`` for constructor arguments (all of them, with
      defaults) that do not make a model; the constructor runs the same check, and
      :meth:`validate` runs it on a configuration before any work starts.
    - ``common_options``: the keys of :data:`COMMON_OPTIONS` the family takes (all by default).
    - ``options``: the family's own configuration keys.
    - ``derived_kwargs(cfg, event_data)``: constructor arguments that follow from the rest of
      the configuration (``event_data``: the dataset yields event frames); may raise
      ``ValueError`` for settings the family cannot honour.
    - ``reference_kwargs(args)``: constructor arguments equivalent to what the official training
      script built from the ``args`` stored in its checkpoints.
    - ``checkpoint_filter_fn(state_dict, model)``: adapts an official (or DDP / compiled) state
      dict to statten's module names, dropping parameters the official code never uses.
    - ``linear_probe_frozen``: prefixes of the parameter names that ``--linear-prob`` freezes.
    - ``reference_archs``: other names the official checkpoints give the architecture (their
      ``arch`` entry, or ``args.model``) besides ``name``.
    """

    name: str
    model_class: type[nn.Module]
    attention_modes: tuple[str, ...]
    check_config: Callable[[Mapping[str, Any]], None]
    reference_kwargs: Callable[[Mapping[str, Any]], dict[str, Any]]
    checkpoint_filter_fn: Callable[[StateDict, nn.Module | None], dict[str, torch.Tensor]]
    common_options: tuple[str, ...] = tuple(COMMON_OPTIONS)
    options: tuple[FamilyOption, ...] = ()
    derived_kwargs: Callable[[Any, bool], dict[str, Any]] = field(default=lambda cfg, ev: {})
    linear_probe_frozen: tuple[str, ...] = ("patch_embed",)
    reference_archs: tuple[str, ...] = ()

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
        kwargs = {COMMON_OPTIONS[key]: getattr(cfg, key) for key in self.common_options}
        kwargs.update({o.argument: getattr(cfg, o.key) for o in self.options})
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.update(self.derived_kwargs(cfg, event_data))
        if cfg.TET and "TET" not in inspect.signature(self.model_class).parameters:
            raise ValueError(
                f"{self.name} returns one logit vector per sample; TET needs per-step ones"
            )
        return kwargs


def check_common_config(
    args: Mapping[str, Any], attention_modes: tuple[str, ...], family: str
) -> None:
    """The checks every family's ``check_config`` starts with: a known ``attention_mode``, a
    positive ``T``, ``num_heads`` dividing ``embed_dims``, STAtten's ``chunk_size`` dividing T."""
    attention_mode, T, chunk_size = args["attention_mode"], args["T"], args["chunk_size"]
    if attention_mode not in attention_modes:
        raise ValueError(
            f"unknown attention_mode {attention_mode!r} for {family}; "
            f"expected one of {attention_modes}"
        )
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    embed_dims, num_heads = args["embed_dims"], args["num_heads"]
    if num_heads < 1 or embed_dims % num_heads:
        raise ValueError(f"embed_dims={embed_dims} is not divisible by num_heads={num_heads}")
    if attention_mode == "STAtten" and (
        not isinstance(chunk_size, int) or chunk_size < 1 or T % chunk_size
    ):
        raise ValueError(
            f"T={T} is not divisible by chunk_size={chunk_size}: STAtten attends within blocks "
            "of chunk_size consecutive time steps"
        )


def filter_state_dict(
    state_dict: StateDict, unused_suffixes: tuple[str, ...], unused_keys: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """``state_dict`` without DDP / ``torch.compile`` prefixes and without the parameters an
    official model file creates but never uses (keys ending in ``unused_suffixes``, or equal to
    one of ``unused_keys``): the body of a family's ``checkpoint_filter_fn``."""
    out = {}
    for key, value in state_dict.items():
        key = clean_module_name(key)
        if not key.endswith(unused_suffixes) and key not in unused_keys:
            out[key] = value
    return out


def default_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm's pretrained_cfg of an untrained statten model (32 px, 3 channels, 10 classes)."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "first_conv": "patch_embed.proj_conv",
        "classifier": "head",
        **kwargs,
    }


def build_model(
    model_cls: Callable[..., nn.Module],
    name: str,
    pretrained: bool,
    checkpoint_filter_fn: Callable[..., dict[str, torch.Tensor]],
    **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` for a family's registered factory ``name``.

    timm's generic ``in_chans`` (which timm also injects with a default) is the models'
    ``in_channels``.
    """
    if "in_chans" in kwargs:
        kwargs.setdefault("in_channels", kwargs.pop("in_chans"))
    return build_model_with_cfg(
        model_cls,
        name,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        kwargs_filter=("in_chans",),
        **kwargs,
    )


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


def family_of_arch(arch: str) -> ModelFamily:
    """The family of a checkpoint whose architecture is named ``arch``: a family name, or one of
    a family's ``reference_archs``; a ``ValueError`` naming the known ones otherwise."""
    for family in _FAMILIES.values():
        if arch in family.reference_archs:
            return family
    return get_family(arch)
