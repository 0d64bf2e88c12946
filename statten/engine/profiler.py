"""``statten profile``: firing rates, operation counts, energy and parameters of a model on data.

Takes the options of ``statten test`` (a model from ``-c CONFIG`` or ``--resume CHECKPOINT``, a
dataset split) plus ``--batches``, ``--e-mac``, ``--e-ac`` and ``--plot``; runs the evaluation
loop of ``statten test`` on the first ``--batches`` batches with an
:class:`~statten.analysis.ops.OpRecorder` attached, and reports per layer and per time step.
Every number is explained in ``docs/profile.md``, which also documents the JSON schema.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.utils import random_seed
from torch import nn

from statten.analysis.energy import E_AC_PJ, E_MAC_PJ, EnergyModel
from statten.analysis.ops import LayerOps, OpRecorder
from statten.checkpoint import checkpoint_source, model_config_from_checkpoint
from statten.config import ConfigError, StrictParser, at_least, model_config, resolve_config
from statten.data import create_eval_loader
from statten.engine.distributed import DistributedContext, init_distributed, leave_group_after
from statten.engine.evaluate import evaluate
from statten.engine.tester import load_checkpoint_model
from statten.engine.trainer import autocast_for, with_process_placement
from statten.factory import create_model

__all__ = ["SCHEMA", "format_report", "main", "profile_model", "profile_parser", "run"]

SCHEMA = "statten-profile/1"
DEFAULT_BATCHES = 4


def profile_parser() -> argparse.ArgumentParser:
    """The options of ``statten profile`` on top of those of ``statten test``."""
    parser = StrictParser(
        prog="statten profile",
        description="Firing rates, FLOPs/MACs, synaptic operations, energy and parameters of a "
        "model, per layer and per time step. Also takes every option of `statten test` (model: "
        "-c CONFIG or --resume CHECKPOINT; data: --dataset, --val-split, -vb, ...; --json FILE; "
        "see `statten test --help`). How each number is computed: docs/profile.md.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--batches",
        type=at_least(0),
        default=DEFAULT_BATCHES,
        help=f"evaluation batches to run (default {DEFAULT_BATCHES}; 0: the whole split)",
    )
    parser.add_argument(
        "--e-mac",
        "--e_mac",
        type=float,
        default=E_MAC_PJ,
        metavar="PJ",
        help=f"energy of a multiply-accumulate in pJ (default {E_MAC_PJ}, 45 nm)",
    )
    parser.add_argument(
        "--e-ac",
        "--e_ac",
        type=float,
        default=E_AC_PJ,
        metavar="PJ",
        help=f"energy of an accumulate (one synaptic operation) in pJ (default {E_AC_PJ}, 45 nm)",
    )
    parser.add_argument(
        "--plot", default=None, metavar="FILE.png", help="firing-rate heat map and energy bars"
    )
    return parser


def profile_model(
    model: nn.Module,
    batches: Iterable,
    ctx: DistributedContext,
    energy: EnergyModel,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, Any]:
    """Run ``statten test``'s evaluation over ``batches`` and count what every layer does.

    Returns the report (the JSON of ``statten profile`` without ``model`` and ``data``): every
    count is per image; per-step values are lists over the model's ``T`` time steps.
    """
    with OpRecorder(model, model.T) as ops:
        metrics = evaluate(model, batches, ctx, autocast, record_firing_rates=True)
    if not metrics["firing_rates"]:
        raise ConfigError("no batch to profile: the evaluation split is empty")
    layers = [layer.scaled(1 / metrics["samples"]) for layer in ops.layers()]
    return {
        "schema": SCHEMA,
        "time_steps": model.T,
        "samples": metrics["samples"],
        "params": sum(p.numel() for p in model.parameters()),
        "energy_model": {"e_mac_pj": energy.e_mac_pj, "e_ac_pj": energy.e_ac_pj},
        "metrics": {key: metrics[key] for key in ("loss", "top1", "top5")},
        "firing_rates": metrics["firing_rates"],
        "layers": [_layer_entry(layer, energy) for layer in layers],
        "totals": _totals(layers, energy),
    }


def _layer_entry(layer: LayerOps, energy: EnergyModel) -> dict[str, Any]:
    spiking = layer.spike_driven
    entry = {
        "name": layer.name,
        "kind": layer.kind,
        "params": layer.params,
        "spike_driven": spiking,
        "macs": layer.macs.tolist(),
        "flops": layer.flops.tolist(),
        "sops": layer.sops.tolist() if spiking else None,
        "input_rate": layer.input_rate.tolist() if spiking else None,
        "energy_mj": energy.layer_mj(layer).tolist(),
    }
    entry["total"] = {
        key: None if entry[key] is None else sum(entry[key])
        for key in ("macs", "flops", "sops", "energy_mj")
    }
    return entry


def _totals(layers: Sequence[LayerOps], energy: EnergyModel) -> dict[str, Any]:
    """Whole-model counts per image, overall and per time step."""
    zero = torch.zeros_like(layers[0].macs)
    spiking = [layer for layer in layers if layer.spike_driven]
    real = [layer for layer in layers if not layer.spike_driven]
    per_step = {
        "macs": sum((layer.macs for layer in layers), zero),
        "flops": sum((layer.flops for layer in layers), zero),
        "sops": sum((layer.sops for layer in spiking), zero),
        "energy_mj": energy.total_mj(layers),
    }
    totals: dict[str, Any] = {key: values.sum().item() for key, values in per_step.items()}
    totals["energy_mac_mj"] = sum((energy.layer_mj(x).sum().item() for x in real), 0.0)
    totals["energy_ac_mj"] = sum((energy.layer_mj(x).sum().item() for x in spiking), 0.0)
    totals["per_step"] = {key: values.tolist() for key, values in per_step.items()}
    return totals


def _si(value: float) -> str:
    """``value`` with a k/M/G/T suffix, 3-4 significant digits."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.4g}{suffix}"
    return f"{value:.4g}"


def _rates(values: Sequence[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def _header(report: Mapping[str, Any]) -> list[str]:
    model, data, totals = report["model"], report["data"], report["totals"]
    config = model["config"]
    attention = config.get("attention_mode", "?")
    if attention == "STAtten":
        attention += f" chunk {config.get('chunk_size', '?')}"
    energy = report["energy_model"]
    return [
        f"model {model['name']} ({attention}, T={report['time_steps']}), "
        f"{report['params']:,} parameters, weights: {model['weights']}",
        f"data {data['dataset']}/{data['split']}: {report['samples']} samples in "
        f"{data['batches']} batches of {data['batch_size']}; top1 {report['metrics']['top1']:.2f}%",
        f"energy: E_MAC {energy['e_mac_pj']} pJ per MAC (real-valued inputs), "
        f"E_AC {energy['e_ac_pj']} pJ per SOP (spike inputs)",
        f"per image: {_si(totals['macs'])} MACs, {_si(totals['flops'])} FLOPs dense; "
        f"{_si(totals['sops'])} SOPs; energy {totals['energy_mj']:.4g} mJ "
        f"(MAC {totals['energy_mac_mj']:.4g} mJ + AC {totals['energy_ac_mj']:.4g} mJ)",
    ]


def _firing_table(report: Mapping[str, Any]) -> list[str]:
    rates = report["firing_rates"]
    width = max(len(name) for name in rates)
    steps = " ".join(f"{f't{t}':>5}" for t in range(report["time_steps"]))
    lines = ["", "firing rate per time step", f"  {'layer':<{width}}  {steps}   mean"]
    for name, values in rates.items():
        mean = sum(values) / len(values)
        lines.append(f"  {name:<{width}}  {_rates(values)}  {mean:.3f}")
    return lines


def _ops_table(report: Mapping[str, Any]) -> list[str]:
    layers = report["layers"]
    total_mj = report["totals"]["energy_mj"] or 1.0
    width = max(len(layer["name"]) for layer in layers)
    lines = [
        "",
        "operations per image (SOPs and input rate per step for spike-driven layers only)",
        f"  {'layer':<{width}}  {'kind':<6} {'params':>7} {'MACs':>7} {'FLOPs':>7} {'SOPs':>7}"
        f" {'energy uJ':>10} {'share':>6}  input rate per step",
    ]
    for layer in layers:
        total = layer["total"]
        sops = "-" if total["sops"] is None else _si(total["sops"])
        rate = "real-valued input" if layer["input_rate"] is None else _rates(layer["input_rate"])
        lines.append(
            f"  {layer['name']:<{width}}  {layer['kind']:<6} {_si(layer['params']):>7}"
            f" {_si(total['macs']):>7} {_si(total['flops']):>7} {sops:>7}"
            f" {total['energy_mj'] * 1e3:>10.4g} {100 * total['energy_mj'] / total_mj:>5.1f}%"
            f"  {rate}"
        )
    per_step = report["totals"]["per_step"]["energy_mj"]
    lines.append(f"energy per time step (mJ): {' '.join(f'{e:.4g}' for e in per_step)}")
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    """The terminal table of a ``statten profile`` report."""
    return "\n".join([*_header(report), *_firing_table(report), *_ops_table(report)])


def _build_model(cfg: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``--resume`` (its stored config wins) or of the config, randomly initialised.

    Also returns the report's ``model`` entry: name, config and where the weights come from.
    """
    if cfg.resume:
        model, checkpoint = load_checkpoint_model(cfg.resume, cfg)
        with checkpoint_source(cfg.resume):
            config = model_config_from_checkpoint(checkpoint)
        name, weights = checkpoint.get("arch", "sdt"), str(cfg.resume)
    else:
        random_seed(cfg.seed)
        config = model_config(cfg)
        model = create_model(cfg.model, **config)
        name, weights = cfg.model, f"random init (seed {cfg.seed})"
    return model, {"name": name, "config": config, "weights": weights}


def _energy_model(options: argparse.Namespace) -> EnergyModel:
    """The energy model of ``--e-mac`` / ``--e-ac`` (checked, like ``--batches``)."""
    if options.batches < 0:
        raise ConfigError(f"--batches must be >= 0 (0: the whole split), got {options.batches}")
    try:
        return EnergyModel(options.e_mac, options.e_ac)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run(cfg: argparse.Namespace, batches: int, energy: EnergyModel) -> dict[str, Any]:
    """Profile the model of ``cfg`` on ``batches`` batches (0: all) of its evaluation split.

    Returns the full report (``model`` and ``data`` included).
    """
    ctx = init_distributed(cfg.device, cfg.dist_timeout)
    with leave_group_after(ctx):
        if ctx.distributed:
            raise ConfigError(
                "statten profile runs in a single process; launch it without torchrun"
            )
        model, model_entry = _build_model(cfg)
        model = model.to(ctx.device)
        loader = create_eval_loader(with_process_placement(cfg, ctx), model)
        data = itertools.islice(loader, batches) if batches else loader
        report = profile_model(model, data, ctx, energy, autocast_for(cfg, ctx.device))
    report["model"] = model_entry
    report["data"] = {
        "dataset": cfg.dataset,
        "split": cfg.val_split,
        "batch_size": loader.batch_size,
        "batches": min(batches or len(loader), len(loader)),
    }
    return report


def main(argv: Sequence[str]) -> dict[str, Any]:
    """``statten profile [options]``: print the report; write ``--json`` and ``--plot`` files."""
    options, rest = profile_parser().parse_known_args(list(argv))
    energy = _energy_model(options)
    cfg = resolve_config(rest, "test")
    report = run(cfg, options.batches, energy)
    print(format_report(report))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(report, indent=2))
    if options.plot:
        from statten.analysis.plots import plot_profile

        plot_profile(report, options.plot)
    return report
