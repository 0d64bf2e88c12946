"""Checkpoint reading: this project's checkpoints and the reference's, without running pickled code.

Every file goes through ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors
and plain containers. The one class allowed besides those is ``argparse.Namespace`` (the reference
stores its command-line arguments in every checkpoint); a file carrying any other pickled object
is refused with :class:`CheckpointError` before anything in it runs.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin

import torch
from torch import nn

from statten.factory import create_model
from statten.models import get_family
from statten.models.family import ModelFamily, family_of_arch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "checkpoint_source",
    "create_model_from_checkpoint",
    "link_checkpoint",
    "load_checkpoint",
    "model_config_from_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "stored_config",
]

_logger = logging.getLogger("statten.checkpoint")
_SOURCE: ContextVar[str | None] = ContextVar("statten_checkpoint_source", default=None)

# The "format" of checkpoints statten train writes (they carry the full run configuration).
CHECKPOINT_FORMAT = "statten-1"
SAFE_GLOBALS = [argparse.Namespace]
STATE_DICT_KEYS = ("state_dict", "model", "module")

PathOrState = str | os.PathLike | Mapping[str, Any]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model."""


def stored_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The training configuration a statten checkpoint stores (None for other formats)."""
    checkpoint = read_checkpoint(path)
    return checkpoint.get("config") if checkpoint.get("format") == CHECKPOINT_FORMAT else None


def read_checkpoint(path_or_state: PathOrState) -> dict[str, Any]:
    """Load a checkpoint file (or pass a mapping through) as a dict, refusing unsafe pickles."""
    if isinstance(path_or_state, Mapping):
        return dict(path_or_state)
    path = os.fspath(path_or_state)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    _refuse_other_formats(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        match = re.search(r"GLOBAL (\S+)", str(err))
        if match is None:
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint: its bytes are neither a torch.save archive "
                "nor a pickle"
            ) from None
        raise CheckpointError(
            f"refusing to load {path}: it contains a pickled {match.group(1)}, which could run "
            "code; statten only reads tensors, plain containers and argparse.Namespace. "
            "Nothing in the file was executed."
        ) from None
    except Exception as err:  # truncated zip, foreign bytes: torch raises many kinds
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {err} (truncated or not "
            "written by torch.save)"
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict")
    return dict(checkpoint)


def _refuse_other_formats(path: str) -> None:
    """A clear :class:`CheckpointError` for files that are plainly no PyTorch checkpoint: text
    (JSON, YAML, ...) and safetensors. torch.save writes a zip archive (or, legacy, a pickle)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:
        raise CheckpointError(
            f"{path} is a safetensors file; statten reads PyTorch checkpoints (torch.save): "
            "load it with safetensors.torch.load_file and pass the dict to load_checkpoint"
        )
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return  # binary: torch.load decides, and its error is reported
    kind = "JSON" if head.lstrip().startswith((b"{", b"[")) else "text"
    raise CheckpointError(f"{path} is a {kind} file, not a PyTorch checkpoint (torch.save)")


def _state_dict_of(checkpoint: Mapping[str, Any], use_ema: bool) -> Mapping[str, torch.Tensor]:
    keys = ("state_dict_ema", "model_ema") if use_ema else STATE_DICT_KEYS
    for key in keys:
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    if not use_ema and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise CheckpointError(
        f"no {'EMA ' if use_ema else ''}weights in checkpoint: none of the keys {keys} holds a "
        f"state_dict (checkpoint keys: {sorted(checkpoint)})"
    )


def _check_fits(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool, allow_missing: bool
) -> list[str]:
    """Raise :class:`CheckpointError` for what does not fit; return the keys the checkpoint
    lacks (allowed with ``allow_missing``)."""
    expected = model.state_dict()
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    absent = sorted(set(expected) - set(state_dict))
    missing = absent if strict and not allow_missing else []
    unexpected = sorted(set(state_dict) - set(expected)) if strict else []
    problems = [
        f"{title} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
        for title, items in (
            ("shape mismatches", shapes),
            ("missing keys", missing),
            ("unexpected keys", unexpected),
        )
        if items
    ]
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(problems))
    return absent


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP and/or ``torch.compile`` wrapper."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def load_checkpoint(
    model: nn.Module,
    path_or_state: PathOrState,
    strict: bool = True,
    use_ema: bool = False,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Load weights into ``model`` from a statten or official checkpoint (file or dict).

    Accepts a nested checkpoint (``state_dict`` / ``model`` key, or ``state_dict_ema`` with
    ``use_ema``) or a bare state_dict; the model family's ``checkpoint_filter_fn`` strips
    ``module.`` / ``_orig_mod.`` prefixes and drops parameters the official code never used.
    Returns the whole checkpoint dict. Raises :class:`CheckpointError` naming the keys or shapes
    that differ; with ``allow_missing`` (and ``strict``), parameters the checkpoint lacks keep
    their values and are logged, as when fine-tuning adds a head.
    """
    checkpoint = read_checkpoint(path_or_state)
    with _naming(path_or_state):
        _load_weights(model, checkpoint, strict, use_ema, allow_missing)
    return checkpoint


def _load_weights(
    model: nn.Module,
    checkpoint: Mapping[str, Any],
    strict: bool,
    use_ema: bool,
    allow_missing: bool,
) -> None:
    """The body of :func:`load_checkpoint`, on a checkpoint already read."""
    target = _unwrapped(model)
    family = get_family(target.family_name)
    state_dict = family.checkpoint_filter_fn(_state_dict_of(checkpoint, use_ema), target)
    absent = _check_fits(target, state_dict, strict, allow_missing)
    target.load_state_dict(state_dict, strict=strict and not allow_missing)
    if allow_missing and absent:
        _logger.info("the checkpoint lacks %s: kept as initialised", ", ".join(absent))


@contextmanager
def checkpoint_source(path: str | os.PathLike) -> Iterator[None]:
    """Name ``path`` in the errors about a checkpoint that was read from it and is now passed
    around as a dict (which would otherwise be named just "checkpoint")."""
    token = _SOURCE.set(os.fspath(path))
    try:
        yield
    finally:
        _SOURCE.reset(token)


@contextmanager
def _naming(path_or_state: PathOrState) -> Iterator[None]:
    """Prefix each :class:`CheckpointError` raised inside with the file it is about
    ("checkpoint" for a dict outside :func:`checkpoint_source`), so that a message read alone
    says which checkpoint is bad."""
    if isinstance(path_or_state, Mapping):
        source = _SOURCE.get() or "checkpoint"
    else:
        source = os.fspath(path_or_state)
    try:
        yield
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None


def _args(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The official training script's ``args`` (a pickled Namespace) as a dict ({} if none)."""
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if args is None or isinstance(args, Mapping):
        return dict(args or {})
    raise CheckpointError(
        f"its official 'args' is a {type(args).__name__}, not an argparse.Namespace or a dict"
    )


def _architecture(checkpoint: Mapping[str, Any]) -> str:
    """The family a checkpoint holds, named by its ``arch``, else by the ``model`` of official
    ``args`` (a family name, or an official class name a family declares)."""
    arch = str(
        checkpoint["arch"] if "arch" in checkpoint else _args(checkpoint).get("model", "sdt")
    )
    try:
        return family_of_arch(arch).name
    except ValueError as err:
        raise CheckpointError(
            f"{err}: the checkpoint does not say which statten model it holds; build the model "
            "yourself and use load_checkpoint"
        ) from None


def model_config_from_checkpoint(path_or_state: PathOrState) -> dict[str, Any]:
    """The model keyword arguments a checkpoint (file or dict, statten or official format) was
    trained with; a :class:`CheckpointError` naming the file if they do not make a model."""
    checkpoint = read_checkpoint(path_or_state)
    with _naming(path_or_state):
        return _model_config(checkpoint, overrides={})


def _model_config(checkpoint: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's model configuration updated by ``overrides``, checked."""
    family = get_family(_architecture(checkpoint))
    config = {**_stored_model_config(family, checkpoint), **overrides}
    _check_model_config(family, config, _config_label(overrides))
    return config


def _config_label(overrides: Mapping[str, Any]) -> str:
    """How errors name the configuration: the checkpoint's, or the checkpoint's overridden."""
    return "model configuration" + (f" with the overrides {dict(overrides)}" if overrides else "")


def _stored_model_config(family: ModelFamily, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model arguments stored in the checkpoint: statten's or the official ``args``'."""
    if "model_config" in checkpoint:
        config = checkpoint["model_config"]
        if not isinstance(config, Mapping):
            raise CheckpointError(
                f"its model_config is a {type(config).__name__}, not a dict of model arguments"
            )
        return dict(config)
    if "args" in checkpoint:
        return _reference_config(family, checkpoint)
    raise CheckpointError(
        "the checkpoint carries no model configuration (neither statten's 'model_config' "
        "nor the official 'args'); build the model yourself and use load_checkpoint"
    )


def _reference_config(family: ModelFamily, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model arguments the official training script built from its stored ``args``."""
    args = _args(checkpoint)
    try:
        return family.reference_kwargs(args)
    except KeyError as err:
        raise CheckpointError(f"official {family.name} checkpoint args lack {err}") from None
    except (TypeError, ValueError) as err:
        unset = sorted(key for key, value in args.items() if value is None)
        hint = f" (args set to None: {', '.join(unset)})" if unset else ""
        raise CheckpointError(f"official {family.name} checkpoint args: {err}{hint}") from None


def _check_model_config(family: ModelFamily, config: Mapping[str, Any], label: str) -> None:
    """Refuse a model configuration the family's constructor cannot take: unknown keys, values
    of the wrong type (``img_size: None`` where an int is needed), values its checks refuse."""
    parameters = inspect.signature(family.model_class, eval_str=True).parameters
    wrong = [
        f"{name}={value!r} (expected {_type_name(parameters[name].annotation)})"
        for name, value in config.items()
        if name in parameters and not _has_annotated_type(value, parameters[name].annotation)
    ]
    if wrong:
        raise CheckpointError(f"{label}: wrong type for {', '.join(wrong)}")
    try:
        family.validate(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{label}: {err}") from None


_SCALAR_TYPES = (bool, int, float, str, NoneType)


def _has_annotated_type(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a scalar (or optional scalar) ``annotation``, an int also where a
    float is asked; other annotations (sequences, ...) are left to the family's checks."""
    optional = get_origin(annotation) in (Union, UnionType)
    types = get_args(annotation) if optional else (annotation,)
    if not all(t in _SCALAR_TYPES for t in types):
        return True
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _type_name(annotation: Any) -> str:
    """``int`` for ``int``, ``int | None`` for ``int | None``."""
    return getattr(annotation, "__name__", str(annotation))


def create_model_from_checkpoint(
    path_or_state: PathOrState, use_ema: bool = False, **overrides: Any
) -> nn.Module:
    """Build the model a checkpoint describes and load its weights (``overrides`` win).

    A configuration the model cannot be built from, or weights that do not fit it, raise
    :class:`CheckpointError` naming the file ("checkpoint" for a dict) and the problem.
    """
    checkpoint = read_checkpoint(path_or_state)
    with _naming(path_or_state):
        arch = _architecture(checkpoint)
        config = _model_config(checkpoint, overrides)
        model = _build(arch, config, _config_label(overrides))
        _load_weights(model, checkpoint, strict=True, use_ema=use_ema, allow_missing=False)
    return model


def _build(arch: str, config: dict[str, Any], label: str) -> nn.Module:
    """``create_model(arch, **config)``, its failure a :class:`CheckpointError`: the constructor
    rejects what the family's checks let through (a negative size, ...)."""
    try:
        return create_model(arch, **config)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"cannot build {arch} from its {label}: {type(err).__name__}: {err}"
        ) from None


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``checkpoint`` atomically: temporary file, fsync, rename, fsync of the directory.

    A crash or a full disk leaves either the previous file or the new one, never a truncated
    file; a failed write raises :class:`CheckpointError` naming the file and the cause.
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(dict(checkpoint), f)

    _replace_atomically(os.fspath(path), write)


def link_checkpoint(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Publish the saved checkpoint ``source`` also as ``path``, atomically, without serialising
    it again: a hard link where the file system allows one, else a copy."""

    def write(tmp: str) -> None:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    _replace_atomically(os.fspath(path), write)


def _replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write`` a temporary file beside ``path``, fsync it, rename it over ``path`` and fsync
    the folder, so that after a crash or a power loss ``path`` is the old file or the whole new
    one; on failure remove the temporary file, leave ``path`` as it was, and raise
    :class:`CheckpointError`."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        write(tmp)
        _fsync(tmp)  # the data is on disk before the name points at it
        os.replace(tmp, path)
        _fsync(directory)  # and so is the rename
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoint {path}: {err.strerror or err}; any previous {path} is intact"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync(path: str) -> None:
    """Flush the file or folder ``path`` to disk (a read-only descriptor suffices on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
