"""Configuration of ``statten train`` and ``statten test``: one parser, YAML recipes, validation.

The flags keep the names, destinations and meanings of the reference ``train.py`` / ``test.py``
(timm's training script plus STAtten's additions), so reference recipes and habits carry over.
What differs from the reference (SPEC section 9):

- a misspelled or unknown key, in a YAML file or on the command line, is an error that names the
  closest valid key, instead of being silently ignored;
- ``mlp-ratio`` and ``mlp_ratio`` are the same key everywhere (YAML and command line), and a file
  that sets one key twice is an error;
- booleans parse as booleans: ``--TET false`` / ``--TET 0`` mean False, a bare ``--TET`` True;
- values are checked (ranges, ``time_steps`` divisible by ``chunk_size`` for STAtten, ...);
- ``--drop-path`` defaults to 0 (the reference's 0.2 was never applied) and really applies.

Without ``-c``, the project's digits recipe (``conf/digits/default.yml``) supplies the defaults.
The recipes ship in a wheel as ``statten/conf/``, and ``-c conf/<family>/<recipe>.yml`` finds them
from any folder. If the digits recipe is missing (a broken install), the parser defaults apply
with a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import torch
import yaml
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from statten.checkpoint import stored_config
from statten.models import family_names, get_family
from statten.models.family import FamilyOption

__all__ = [
    "COMMANDS",
    "DEFAULT_CONFIG",
    "DVS_DATASETS",
    "EVAL_METRICS",
    "ConfigError",
    "StrictParser",
    "at_least",
    "build_parser",
    "config_from_dict",
    "config_to_dict",
    "model_config",
    "parse_bool",
    "parse_config",
    "parser_defaults",
    "resolve_config",
    "save_config",
    "typed_options",
]

COMMANDS = ("train", "test")
# Metrics that rank checkpoints (--eval-metric, optionally prefixed "eval_"); loss-like ones rank
# lowest first, as in timm's CheckpointSaver.
EVAL_METRICS = ("top1", "top5", "loss")
# Datasets of event frames: the reference's train.py/test.py switch the model to dvs_mode for these.
DVS_DATASETS = ("cifar10-dvs", "ncaltech101")
_PACKAGE = Path(__file__).resolve().parent
# The recipes, conf/<family>/*.yml: package data statten/conf/ in a wheel install, else the
# checkout's conf/ (source tree, editable install). See _recipe_path for -c conf/...
RECIPES_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"
DEFAULT_CONFIG = RECIPES_DIR / "digits" / "default.yml"
_logger = logging.getLogger("statten.config")
# Never read from a checkpoint's stored configuration: the machine's own settings, and what
# applies once at the start of a run (not again when it is resumed).
NOT_RESTORED = ("device", "local_rank", "start_epoch", "initial_checkpoint")
TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})
FALSE_WORDS = frozenset({"0", "false", "f", "no", "n", "off"})
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}
# Smallest allowed value of numeric settings.
MINIMUMS = {
    "lr": 0,
    "batch_size": 1,
    "val_batch_size": 1,
    "epochs": 0,
    "time_steps": 1,
    "chunk_size": 1,
    "dim": 1,
    "num_heads": 1,
    "layer": 1,
    "mlp_ratio": 1,
    "in_channels": 1,
    "num_classes": 1,
    "workers": 0,
    "momentum": 0,
    "weight_decay": 0,
    "clip_grad": 0,
    "warmup_lr": 0,
    "min_lr": 0,
    "warmup_epochs": 0,
    "cooldown_epochs": 0,
    "epoch_repeats": 0,
    "decay_epochs": 0,
    "aug_repeats": 0,
    "mixup": 0,
    "cutmix": 0,
    "recount": 0,
    "bn_eps": 0,
    "checkpoint_hist": 1,
    "recovery_interval": 0,
    "dist_timeout": 1,
    "log_interval": 1,
    "tta": 0,
}
# Probabilities and rates: from 0 to 1, and below 1 where 1 would drop or smooth away everything.
FRACTIONS = ("hflip", "vflip", "reprob", "mixup_prob", "mixup_switch_prob", "TET_lamb",
             "model_ema_decay", "bn_momentum")  # fmt: skip
BELOW_ONE = ("drop_path", "drop", "drop_block", "smoothing")
# Flags of the reference statten does not implement, with why: set to anything but their default,
# they stop the run (so no flag is parsed and then silently ignored).
UNSUPPORTED = {
    "pretrained": "no pretrained weights are published for these models; use "
    "--initial-checkpoint FILE",
    "torchscript": "the spiking neurons' autograd functions cannot be scripted; use "
    "statten.fast or torch.compile",
    "epoch_repeats": "one epoch is one pass over the data; raise --epochs instead",
    "jsd": "the JSD loss of AugMix is not implemented",
    "split_bn": "split BatchNorm for augmentation splits is not implemented",
    "bn_tf": "the models' BatchNorm settings follow the reference models",
    "bn_eps": "a checkpoint does not record it, so evaluation would differ from training",
    "tta": "test-time augmentation is not implemented",
    "log_wandb": "Weights & Biases logging is not implemented; the run folder has TensorBoard "
    "logs and summary.csv",
    "drop": "no model family has dropout (the reference models do not use it)",
    "drop_connect": "no model family uses it (--drop-path is stochastic depth)",
    "drop_block": "no model family uses drop-block",
    "patch_size": "each family's patch embedding is fixed by its architecture",
    "gp": "each family's head pools by its own rule (the token mean)",
    "use_multi_epochs_loader": "persistent loader workers would break exact resume",
    "large_valid": "the 320/288 ImageNet evaluation is not implemented; use --input-size and "
    "--crop-pct",
    "train_split_path": "training subsets by index files are not implemented",
    "save_images": "saving input batches is not implemented",
    "save_qkv": "use statten profile (firing rates) or statten.analysis.SpikeRecorder",
}


class ConfigError(ValueError):
    """An invalid configuration: unknown key, bad value, unreadable file (one-line message)."""


class StrictParser(argparse.ArgumentParser):
    """ArgumentParser that raises :class:`ConfigError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


class _StrictLoader(yaml.SafeLoader):
    """YAML SafeLoader that refuses a mapping giving the same key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} is set twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_bool(value: str | bool | int) -> bool:
    """Read a boolean: true/false, yes/no, on/off, 1/0 (any case), or a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0), got {value!r}")


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low`` (for the options of statten bench and profile)."""

    def convert(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    convert.__name__ = f"integer >= {low}"  # argparse names the type in its error
    return convert


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add(group: argparse._ActionsContainer, names: str, default: Any, help: str, **kw: Any) -> None:
    """Add an option; ``names`` is a space-separated list of its spellings."""
    group.add_argument(*names.split(), default=default, help=help, **kw)


def _flag(group: argparse._ActionsContainer, names: str, help: str) -> None:
    """A boolean option, default False: bare ``--flag`` is True, ``--flag false`` is False."""
    group.add_argument(
        *names.split(),
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help=help,
    )


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dataset and loading")
    _add(g, "--data-dir -data-dir", "", "dataset root folder")
    _add(
        g,
        "--dataset -d",
        "digits",
        "torch/cifar10, torch/cifar100, digits, cifar10-dvs, "
        "ncaltech101, or an image-folder dataset in --data-dir ('', imagenet or folder)",
    )
    _flag(g, "--dataset-download", "download a missing dataset (where supported)")
    _add(g, "--train-split", "train", "training split")
    _add(g, "--val-split", "validation", "evaluation split")
    _add(g, "--train-split-path", None, "NumPy file of training-sample indices (image folders)")
    _add(g, "--img-size", None, "input height and width (default: the model's)", type=int)
    _add(g, "--input-size", None, "C H W, overrides --img-size for the data", type=int, nargs=3)
    _add(g, "--crop-pct", None, "centre-crop fraction for evaluation", type=float)
    _add(g, "--mean", None, "per-channel normalisation mean", type=float, nargs="+")
    _add(g, "--std", None, "per-channel normalisation std", type=float, nargs="+")
    _add(g, "--interpolation", "", "resize interpolation for evaluation (bicubic, ...)")
    _add(g, "-b --batch-size", 32, "training batch size (per process)", type=int)
    _add(g, "-vb --val-batch-size --validation-batch-size", 16, "evaluation batch size", type=int)
    _add(g, "-j --workers", 2, "data-loading worker processes", type=int)
    _flag(g, "--pin-mem", "pin host memory in the data loaders")
    _flag(g, "--no-prefetcher", "disable timm's GPU prefetcher")
    _flag(g, "--use-multi-epochs-loader", "keep loader workers alive across epochs")
    _flag(g, "--large-valid", "test on ImageNet: resize to 320, centre-crop 288")
    _flag(g, "--skip-corrupt", "replace an unreadable image by the next one, with a warning")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    _add(g, "--model", "sdt", "model family", choices=family_names())
    _add(g, "--dim", 512, "embedding dimension D", type=int)
    _add(g, "--layer", 4, "number of encoder blocks", type=int)
    _add(g, "--num-heads", 8, "attention heads", type=int)
    _add(g, "--mlp-ratio", 4, "MLP hidden width as a multiple of --dim", type=int)
    _add(g, "--time-steps", 4, "time steps T", type=int)
    _add(g, "--chunk-size", 2, "STAtten block of consecutive time steps (divides T)", type=int)
    modes = sorted({mode for name in family_names() for mode in get_family(name).attention_modes})
    _add(
        g,
        "--attention-mode --attention_mode",
        None,
        "attention (default: the model's own default)",
        choices=modes,
    )
    _add(g, "--in-channels", 3, "input channels", type=int)
    _add(g, "--num-classes", 1000, "number of classes", type=int)
    _flag(g, "--TET", "temporal efficient training: per-time-step outputs and loss")
    _add(g, "--TET-means", 1.0, "TET: target phi of the MSE regulariser", type=float)
    _add(g, "--TET-lamb", 0.0, "TET: weight lambda of the MSE regulariser", type=float)
    _add(g, "--drop-path", 0.0, "stochastic depth (the reference never applied it)", type=float)
    _add(g, "--drop", 0.0, "dropout rate", type=float)
    _add(g, "--drop-connect", None, "deprecated timm name of --drop-path", type=float)
    _add(g, "--drop-block", None, "drop-block rate", type=float)
    _add(g, "--patch-size", None, "patch size", type=int)
    _add(g, "--gp", None, "global pooling")
    _flag(g, "--pretrained", "start from the model's pretrained weights")
    _add(
        g,
        "--initial-checkpoint",
        "",
        "start from this checkpoint's weights (statten or official format); parameters it lacks "
        "keep their initialisation (e.g. a kd head when fine-tuning a model trained without one)",
    )
    _add(g, "--resume", "", "train: resume from this checkpoint; test: evaluate it")
    _flag(g, "--no-resume-opt", "with --resume, do not restore the optimizer state")
    _flag(g, "--linear-prob", "freeze the patch embedding")
    _flag(g, "--torchscript", "script the model with TorchScript")
    for option in _family_options():
        names = f"--{option.key.replace('_', '-')}"
        if option.flag:
            g.add_argument(names, type=parse_bool, nargs="?", const=True, default=None,
                           metavar="BOOL", help=option.help)  # fmt: skip
        else:
            _add(g, names, None, option.help, type=option.type, choices=option.choices,
                 nargs=option.nargs)  # fmt: skip


def _family_options() -> list[FamilyOption]:
    """The configuration keys of every family, each once (unset: the model's own default).

    A key that several families use (e.g. ``variant``) accepts the values of all of them; each
    family checks its own when the configuration is validated.
    """
    by_key: dict[str, list[FamilyOption]] = {}
    for name in family_names():
        for option in get_family(name).options:
            by_key.setdefault(option.key, []).append(option)
    merged = []
    for key, options in by_key.items():
        choices = [c for o in options for c in (o.choices or ())]
        merged.append(
            dataclasses.replace(
                options[0],
                help="; ".join(o.help for o in options),
                choices=tuple(dict.fromkeys(choices)) if choices else None,
            )
        )
        assert all(o.flag == options[0].flag for o in options), key
    return merged


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer")
    _add(g, "--opt", "sgd", "timm optimizer name (sgd, adamw, lamb, ...)")
    _add(g, "--opt-eps", None, "optimizer epsilon", type=float)
    _add(g, "--opt-betas", None, "optimizer betas", type=float, nargs="+")
    _add(g, "--momentum", 0.9, "SGD momentum", type=float)
    _add(g, "--weight-decay", 1e-4, "weight decay", type=float)
    _add(g, "--clip-grad", None, "gradient clipping threshold (default: none)", type=float)
    _add(g, "--clip-mode", "norm", "gradient clipping mode", choices=("norm", "value", "agc"))


def _add_schedule_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("learning-rate schedule")
    _add(g, "--sched", "step", "timm scheduler name (step, cosine, ...)")
    _add(g, "--lr", 0.01, "peak learning rate", type=float)
    _add(g, "--lr-noise", None, "epoch fractions where lr noise is on", type=float, nargs="+")
    _add(g, "--lr-noise-pct", 0.67, "lr noise limit", type=float)
    _add(g, "--lr-noise-std", 1.0, "lr noise standard deviation", type=float)
    _add(g, "--lr-cycle-mul", 1.0, "lr cycle length multiplier", type=float)
    _add(g, "--lr-cycle-limit", 1, "number of lr cycles", type=int)
    _add(g, "--warmup-lr", 1e-4, "learning rate at the start of warmup", type=float)
    _add(g, "--min-lr", 1e-5, "learning-rate floor", type=float)
    _add(g, "--epochs", 200, "epochs of the schedule (cooldown comes on top)", type=int)
    _add(g, "--epoch-repeats", 0.0, "dataset passes per epoch (0: one)", type=float)
    _add(g, "--start-epoch", None, "first epoch (overrides the resumed one)", type=int)
    _add(g, "--decay-epochs", 30, "step scheduler interval", type=float)
    _add(g, "--warmup-epochs", 3, "warmup epochs", type=int)
    _add(g, "--cooldown-epochs", 10, "epochs at --min-lr after the schedule", type=int)
    _add(g, "--patience-epochs", 10, "plateau scheduler patience", type=int)
    _add(g, "--decay-rate --dr", 0.1, "step scheduler decay factor", type=float)


def _add_augmentation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("augmentation and regularisation")
    _flag(g, "--no-aug", "no training augmentation at all")
    _add(g, "--scale", [0.08, 1.0], "random-resized-crop area range", type=float, nargs="+")
    _add(g, "--ratio", [3 / 4, 4 / 3], "random-resized-crop aspect range", type=float, nargs="+")
    _add(g, "--hflip", 0.5, "horizontal flip probability", type=float)
    _add(g, "--vflip", 0.0, "vertical flip probability", type=float)
    _add(g, "--color-jitter", 0.4, "color jitter strength", type=float)
    _add(g, "--aa", None, "AutoAugment/RandAugment policy, e.g. rand-m9-n1-mstd0.4-inc1")
    _add(g, "--aug-splits", 0, "augmentation splits (0, or >= 2 for AugMix/JSD)", type=int)
    _add(
        g,
        "--aug-repeats",
        0,
        "repeated augmentation: each sample N times per epoch (timm's RepeatAugSampler); "
        "statten addition, the reference parser had no such flag",
        type=int,
    )
    _flag(g, "--jsd", "Jensen-Shannon divergence + CE loss (with --aug-splits)")
    _flag(g, "--bce-loss", "binary cross-entropy loss")
    _add(g, "--bce-target-thresh", None, "binarise soft BCE targets at this value", type=float)
    _add(g, "--reprob", 0.0, "random-erasing probability", type=float)
    _add(g, "--remode", "const", "random-erasing fill mode", choices=("const", "rand", "pixel"))
    _add(g, "--recount", 1, "random-erasing count", type=int)
    _flag(g, "--resplit", "no random erasing on the first augmentation split")
    _add(g, "--mixup", 0.0, "mixup alpha (on if > 0)", type=float)
    _add(g, "--cutmix", 0.0, "cutmix alpha (on if > 0)", type=float)
    _add(g, "--cutmix-minmax", None, "cutmix box-area range", type=float, nargs="+")
    _add(g, "--mixup-prob", 1.0, "probability of mixing a batch", type=float)
    _add(g, "--mixup-switch-prob", 0.5, "probability of cutmix when both are on", type=float)
    _add(
        g, "--mixup-mode", "batch", "mix per batch, pair or elem", choices=("batch", "pair", "elem")
    )
    _add(g, "--mixup-off-epoch", 0, "no mixup/cutmix from this epoch on (0: never)", type=int)
    _add(g, "--smoothing", 0.1, "label smoothing", type=float)
    _add(g, "--train-interpolation", "random", "resize interpolation for training")
    _flag(g, "--dvs-aug", "event data: Cutout with one 16x16 hole")
    _flag(g, "--dvs-trival-aug", "event data: TrivialAugment-Wide variant")


def _add_norm_and_ema_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("batch norm and weight averaging")
    _flag(g, "--bn-tf", "TensorFlow BatchNorm defaults (models that support it)")
    _add(g, "--bn-momentum", None, "BatchNorm momentum override", type=float)
    _add(g, "--bn-eps", None, "BatchNorm epsilon override", type=float)
    _flag(g, "--sync-bn", "synchronised BatchNorm across processes")
    _add(
        g,
        "--dist-bn",
        "reduce",
        "BatchNorm statistics every rank evaluates with and that are saved, after each epoch: "
        "reduce (the ranks' mean, the reference's default) or broadcast (rank 0's; also '')",
        choices=("reduce", "broadcast", ""),
    )
    _flag(g, "--split-bn", "separate BatchNorm per augmentation split")
    _flag(g, "--model-ema", "track an exponential moving average of the weights")
    _flag(g, "--model-ema-force-cpu", "keep the EMA on the CPU (no EMA validation)")
    _add(g, "--model-ema-decay", 0.9998, "EMA decay", type=float)


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    _add(
        g,
        "-c --config",
        None,
        "YAML file of defaults, overridden by flags "
        "(default: conf/digits/default.yml when present)",
    )
    _add(g, "--device", _default_device(), "torch device (default: cuda if available, else cpu)")
    _add(g, "--seed", 42, "random seed", type=int)
    _add(g, "--output", None, "output root (default: ./output/train or ./output/valid)")
    _add(g, "--experiment", "", "sub-folder of --output for this run (default: time-stamped)")
    _add(g, "--eval-metric", "top1", "metric that ranks checkpoints")
    _add(g, "--checkpoint-hist", 10, "number of best checkpoints kept", type=int)
    _add(
        g,
        "--recovery-interval",
        500,
        "optimizer steps between recovery checkpoints (0: off)",
        type=int,
    )
    _add(
        g,
        "--dist-timeout",
        1800,
        "seconds a process of a distributed run waits for the others in a collective before "
        "stopping with an error (a rank died or hangs)",
        type=int,
    )
    _add(g, "--log-interval", 100, "batches between log lines", type=int)
    _add(g, "--tta", 0, "test-time augmentation factor (0: none)", type=int)
    _flag(g, "--amp", "mixed precision (native torch autocast; CUDA only, fp32 elsewhere)")
    _add(g, "--amp-dtype", "float16", "autocast dtype of --amp", choices=("float16", "bfloat16"))
    _flag(g, "--apex-amp", "the reference's Apex mixed precision: here the same as --amp")
    _flag(g, "--native-amp", "the reference's native mixed precision: the same as --amp")
    _flag(g, "--channels-last", "channels_last memory layout")
    g.add_argument(
        "--memory-efficient",
        type=parse_bool,
        nargs="?",
        const=True,
        default=None,
        metavar="BOOL",
        help="train with fused LIF layers and 1-byte spikes for backward (docs/performance.md); "
        "bit-identical, on by default; --memory-efficient false turns it off",
    )
    _flag(
        g,
        "--spike-driven",
        "train: on CPU, convolutions fed spikes compute their output and weight gradient from "
        "the spikes where measured faster than dense; rounds differently (docs/performance.md)",
    )
    _add(
        g, "--local-rank --local_rank", 0, "process rank on this node (set by launchers)", type=int
    )
    _flag(g, "--save-images", "save input batches as images while logging")
    _flag(g, "--save-qkv", "test: save the recorded spikes of every batch")
    _flag(
        g,
        "--fast-inference",
        "test: BatchNorm folded, fused LIF, spike-driven convolutions on CPU; rounds differently "
        "(docs/performance.md)",
    )
    _flag(g, "--log-wandb", "log metrics to Weights & Biases")
    _flag(g, "--dry-run", "build model, data config and optimizer without data, then exit")
    _flag(g, "--debug", "show full tracebacks on errors")
    _add(g, "--json", None, "test: also write the metrics to this JSON file")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of ``statten train`` or ``statten test`` (the same flags for both)."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; expected one of {COMMANDS}")
    parser = StrictParser(
        prog=f"statten {command}",
        description=f"{command.capitalize()} a STAtten spiking transformer. Every flag may be "
        "spelled with '-' or '_' and may also be given as a key of the -c YAML file.",
        allow_abbrev=False,
    )
    for add in (
        _add_data_args,
        _add_model_args,
        _add_optimizer_args,
        _add_schedule_args,
        _add_augmentation_args,
        _add_norm_and_ema_args,
        _add_run_args,
    ):
        add(parser)
    for action in _actions(parser):
        if action.dest in UNSUPPORTED:
            action.help = f"{action.help}; not supported: {UNSUPPORTED[action.dest]}"
    return parser


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.dest != "help"]


def _key(name: str) -> str:
    """Canonical spelling of a key or long option name: no leading dashes, '_' for '-'."""
    return name.lstrip("-").replace("-", "_")


def _closest(name: str, candidates: Sequence[str]) -> str:
    """' (did you mean X?)' for the candidate closest to ``name`` (any case), or ''."""
    by_lower = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[match[0]]}?)" if match else ""


def _key_index(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every accepted key (dest names and long option names, canonical) -> its action."""
    index = {}
    for action in _actions(parser):
        index[action.dest] = action
        index.update({_key(o): action for o in action.option_strings if o.startswith("--")})
    return index


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    convert: Callable[[Any], Any] = action.type or str
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: expected a single value, got {value!r}")
    if isinstance(value, bool) and convert is not parse_bool:
        raise ConfigError(f"{where}: expected {TYPE_NAMES.get(convert, 'a value')}, got {value}")
    if convert is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{where}: expected an integer, got {value}")
    try:
        result = convert(value)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: invalid value {value!r} ({err})") from None
    if action.choices is not None and result not in action.choices:
        raise ConfigError(f"{where}: {result!r} is not one of {tuple(action.choices)}")
    return result


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """Convert a YAML / dict value to what the command-line flag would produce."""
    if value is None:
        return None
    if action.nargs not in ("+", "*") and not isinstance(action.nargs, int):
        return _scalar(action, value, where)
    if not isinstance(value, (list, tuple)) or (action.nargs == "+" and not value):
        raise ConfigError(f"{where}: expected a list of values, got {value!r}")
    if isinstance(action.nargs, int) and len(value) != action.nargs:
        raise ConfigError(f"{where}: expected {action.nargs} values, got {list(value)!r}")
    return [_scalar(action, item, where) for item in value]


def _values_from_mapping(
    values: Mapping[Any, Any], parser: argparse.ArgumentParser, source: str
) -> dict[str, Any]:
    """Validate keys and convert values of a YAML mapping / dict to parser defaults."""
    index = _key_index(parser)
    dests = sorted({a.dest for a in index.values()})
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for raw_key, value in values.items():
        key = str(raw_key)
        action = index.get(_key(key))
        if action is None:
            raise ConfigError(f"unknown key {key!r} in {source}{_closest(_key(key), dests)}")
        if action.dest in given_as:
            raise ConfigError(
                f"{source} sets {action.dest!r} twice (as {given_as[action.dest]!r} and {key!r})"
            )
        given_as[action.dest] = key
        out[action.dest] = _coerce(action, value, f"{source}: {key}")
    return out


def _read_yaml(path: Path) -> dict[Any, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of keys to values, not {type(data).__name__}"
        )
    return data


def _normalize_argv(argv: Sequence[str]) -> list[str]:
    """Spell every ``--long_option`` as ``--long-option`` (values after '=' are kept as given)."""
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, sep, value = token.partition("=")
            token = name.replace("_", "-") + sep + value
        out.append(token)
    return out


def _config_file(argv: Sequence[str]) -> Path | None:
    """The YAML file named by -c/--config in ``argv`` (:func:`_recipe_path`), else the digits
    recipe; None, with a warning, when that is missing (a broken install)."""
    pre = StrictParser(add_help=False, allow_abbrev=False)
    pre.add_argument("-c", "--config", default=None)
    given, _ = pre.parse_known_args(argv)
    if given.config is not None:
        return _recipe_path(given.config)
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    _logger.warning(
        "the default recipe %s is missing (a broken install?): the parser defaults apply "
        "(SGD, 200 epochs, 1000 classes); reinstall statten or give a recipe with -c",
        DEFAULT_CONFIG,
    )
    return None


def _recipe_path(name: str) -> Path:
    """The file of ``-c name``: ``name`` itself when it exists; else, for ``conf/...``, the
    recipe of that name shipped with statten (in :data:`RECIPES_DIR`), so that the README's
    ``-c conf/<family>/<recipe>.yml`` works in any folder and in a wheel install."""
    path = Path(name)
    if path.exists() or path.is_absolute() or path.parts[:1] != ("conf",):
        return path  # a missing file is reported by _read_yaml
    shipped = RECIPES_DIR.joinpath(*path.parts[1:]).resolve()
    if shipped.is_file() and shipped.is_relative_to(RECIPES_DIR.resolve()):
        return shipped
    raise ConfigError(
        f"config file {name} does not exist, neither here nor among statten's recipes "
        f"({RECIPES_DIR})"
    )


def _unknown_argument_error(extras: Sequence[str], parser: argparse.ArgumentParser) -> ConfigError:
    first = extras[0]
    if not first.startswith("-"):
        return ConfigError(f"unexpected argument {first!r} (options start with --)")
    name = first.split("=", 1)[0]
    options = [o for a in _actions(parser) for o in a.option_strings if o.startswith("--")]
    return ConfigError(f"unknown option {name}{_closest(name, options)}")


def _apply_aliases(cfg: argparse.Namespace) -> None:
    """The reference's --apex-amp and --native-amp both switch on mixed precision (torch's)."""
    cfg.amp = cfg.amp or cfg.apex_amp or cfg.native_amp


def _check_values(cfg: argparse.Namespace) -> None:
    """Raise :class:`ConfigError` for out-of-range or inconsistent settings."""
    _check_ranges(cfg)
    _check_supported(cfg)
    if cfg.dim % cfg.num_heads:
        raise ConfigError(f"dim={cfg.dim} is not divisible by num_heads={cfg.num_heads}")
    _check_device(cfg.device)
    _check_timm_names(cfg)
    for key, folder in (("output", cfg.output), ("json", cfg.json and os.path.dirname(cfg.json))):
        if folder:
            _check_writable(key, folder)
    if cfg.eval_metric.removeprefix("eval_") not in EVAL_METRICS:
        raise ConfigError(f"unknown eval_metric {cfg.eval_metric!r}; choose one of {EVAL_METRICS}")
    family = get_family(cfg.model)
    own = {option.key for option in family.options}
    foreign = [
        option.key
        for option in _family_options()
        if getattr(cfg, option.key) is not None and option.key not in own
    ]
    if foreign:
        raise ConfigError(f"{', '.join(foreign)}: not an option of model {cfg.model}")
    try:
        family.validate(model_config(cfg))
    except ValueError as err:
        raise ConfigError(f"model {cfg.model}: {err}") from None


@functools.cache
def parser_defaults() -> Mapping[str, Any]:
    """Every setting's default, in parser order (the same flags for train and test): the one
    source of defaults, built once."""
    return MappingProxyType({a.dest: a.default for a in _actions(build_parser("train"))})


def _check_ranges(cfg: argparse.Namespace) -> None:
    """Numeric settings within their ranges; optional ones (parser default None) may be None."""
    optional = {key for key, default in parser_defaults().items() if default is None}

    def check(key: str, ok: Callable[[Any], bool], allowed: str) -> None:
        value = getattr(cfg, key)
        if value is None and key in optional:
            return
        if value is None or not ok(value):
            raise ConfigError(f"{key} must be {allowed}, got {value!r}")

    for key, low in MINIMUMS.items():
        check(key, lambda v, low=low: v >= low, f">= {low}")
    for key in FRACTIONS:
        check(key, lambda v: 0 <= v <= 1, "between 0 and 1")
    for key in BELOW_ONE:
        check(key, lambda v: 0 <= v < 1, "at least 0 and below 1")
    check("aug_splits", lambda v: v == 0 or v >= 2, "0 (off) or >= 2")


def _check_supported(cfg: argparse.Namespace) -> None:
    """Refuse a reference flag statten does not implement when it is set (see UNSUPPORTED)."""
    for key, why in UNSUPPORTED.items():
        if getattr(cfg, key) != parser_defaults()[key]:
            raise ConfigError(f"--{key.replace('_', '-')} is not supported: {why}")


def _check_timm_names(cfg: argparse.Namespace) -> None:
    """``--opt`` / ``--sched`` (and their arguments) as timm understands them, tried on a probe
    parameter so that a misspelling stops the run before any data is read."""
    probe = torch.nn.Linear(1, 1)
    try:
        optimizer = create_optimizer_v2(probe, **optimizer_kwargs(cfg))
    except (AssertionError, ImportError, TypeError, ValueError) as err:
        raise ConfigError(f"--opt {cfg.opt!r}: {err}") from None
    try:
        scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(cfg), updates_per_epoch=1)
    except (AssertionError, TypeError, ValueError) as err:
        raise ConfigError(f"--sched {cfg.sched!r}: {err}") from None
    if scheduler is None:
        raise ConfigError("--sched none is not supported; use --sched constant for a fixed lr")


def _check_writable(key: str, folder: str) -> None:
    """Refuse an output location that cannot be written before any work starts: ``folder``
    (created later if missing) must be a writable folder, or the nearest existing ancestor
    must be one."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--{key} {folder}: cannot write there ({path} is not a writable folder)")


def _check_device(device: str) -> None:
    """Refuse a device string torch does not know, or CUDA on a machine without it."""
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ConfigError(f"invalid --device {device!r}: {err}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} requested, but CUDA is not available here; use cpu")


def parse_config(argv: Sequence[str] | None, command: str) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) over the -c YAML file over the parser defaults.

    Without -c the digits recipe, if present, stands in for the YAML file; ``cfg.config`` is then
    None (it only ever holds a file given with -c).
    """
    parser = build_parser(command)
    argv = _normalize_argv(sys.argv[1:] if argv is None else argv)
    path = _config_file(argv)
    if path is not None:
        parser.set_defaults(**_values_from_mapping(_read_yaml(path), parser, str(path)))
    cfg, extras = parser.parse_known_args(argv)
    if extras:
        raise _unknown_argument_error(extras, parser)
    _apply_aliases(cfg)
    _check_values(cfg)
    return cfg


def config_from_dict(values: Mapping[str, Any], command: str) -> argparse.Namespace:
    """Parser defaults overlaid with ``values`` (keys and values checked as in a YAML file)."""
    parser = build_parser(command)
    parser.set_defaults(**_values_from_mapping(values, parser, "config"))
    cfg = parser.parse_args([])
    _apply_aliases(cfg)
    _check_values(cfg)
    return cfg


def _plain(value: Any, key: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item, key) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ConfigError(f"config value {key}={value!r} ({type(value).__name__}) is not plain data")


def config_to_dict(cfg: argparse.Namespace) -> dict[str, Any]:
    """The parser's settings in ``cfg`` as plain data (YAML/pickle safe), in parser order.

    Attributes that are not flags (e.g. ones a trainer adds at run time) are left out.
    """
    settings = vars(cfg)
    return {d: _plain(settings[d], d) for d in parser_defaults() if d in settings}


def save_config(cfg: argparse.Namespace, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as YAML to ``path`` (``path/args.yaml`` if ``path`` is a folder)."""
    target = Path(path)
    if target.is_dir():
        target = target / "args.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def model_config(cfg: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``statten.create_model(cfg.model, **model_config(cfg))``.

    The model's family maps the configuration to its constructor (unset keys are left to the
    model's defaults); event datasets tell it that its input is event frames.
    """
    return get_family(cfg.model).kwargs_from_config(cfg, cfg.dataset in DVS_DATASETS)


def typed_options(argv: Sequence[str], command: str) -> dict[str, Any]:
    """The settings typed in ``argv``, found by what was typed, not by comparing values: a flag
    typed with its default value counts as typed."""
    parser = build_parser(command)
    for action in _actions(parser):
        action.default = argparse.SUPPRESS
    typed, _ = parser.parse_known_args(_normalize_argv(argv))
    return vars(typed)


def resolve_config(argv: Sequence[str] | None, command: str) -> argparse.Namespace:
    """The settings of ``statten train`` / ``statten test``.

    Normally :func:`parse_config`. With ``--resume`` of a statten checkpoint and no ``-c``, the
    configuration stored in the checkpoint takes the place of the recipe, so a resumed run
    continues the same run and a test evaluates what was trained; typed flags still override it.
    The machine's own settings and one-off starts (:data:`NOT_RESTORED`) are not taken from it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv, command)
    if not cfg.resume or cfg.config is not None:
        return cfg
    stored = stored_config(cfg.resume)
    if stored is None:
        return cfg
    run_settings = {k: v for k, v in stored.items() if k not in NOT_RESTORED}
    try:
        return config_from_dict({**run_settings, **typed_options(argv, command)}, command)
    except ConfigError as err:
        raise ConfigError(f"configuration stored in {cfg.resume}: {err}") from None
