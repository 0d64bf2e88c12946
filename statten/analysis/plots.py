"""Figures of a ``statten profile`` report (matplotlib's Agg canvas; no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["plot_profile"]

SPIKE_COLOR = "tab:blue"
REAL_COLOR = "tab:orange"
INCHES_PER_ROW = 0.22


def _firing_heat_map(fig: Figure, ax: Axes, report: Mapping[str, Any]) -> None:
    names = list(report["firing_rates"])
    rates = np.array([report["firing_rates"][name] for name in names])
    image = ax.imshow(rates, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(rates.max(), 1e-6))
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xticks(range(rates.shape[1]), [f"t{t}" for t in range(rates.shape[1])], fontsize=7)
    ax.set_xlabel("time step")
    ax.set_title("firing rate per neuron layer")
    fig.colorbar(image, ax=ax, label="firing rate")


def _energy_bars(ax: Axes, report: Mapping[str, Any]) -> None:
    layers = report["layers"]
    energy_uj = [1e3 * layer["total"]["energy_mj"] for layer in layers]
    colors = [SPIKE_COLOR if layer["spike_driven"] else REAL_COLOR for layer in layers]
    ax.barh(range(len(layers)), energy_uj, color=colors)
    ax.set_yticks(range(len(layers)), [layer["name"] for layer in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("energy per image (uJ)")
    total = report["totals"]["energy_mj"]
    ax.set_title(
        f"energy per layer: {total:.4g} mJ per image\n"
        "(blue: spike-driven, E_AC x SOPs; orange: real-valued, E_MAC x MACs)",
        fontsize=9,
    )


def plot_profile(report: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a PNG: firing-rate heat map (layers x time steps) and energy per layer bars."""
    rows = max(len(report["firing_rates"]), len(report["layers"]))
    fig = Figure(figsize=(14, max(4.0, INCHES_PER_ROW * rows + 1.5)), layout="constrained")
    heat_ax, bar_ax = fig.subplots(1, 2, width_ratios=(1.0, 1.3))
    _firing_heat_map(fig, heat_ax, report)
    _energy_bars(bar_ax, report)
    fig.savefig(path, dpi=110)
