"""What STAtten costs against a family's native attention, per image, from measured counts.

The STAtten paper claims that its attention costs the same as spatial-only attention (STAtten
with ``chunk_size = 1``) whatever the chunk size. :func:`attention_variants` lists what makes that
checkable at a number of time steps ``T``: STAtten at every chunk size dividing ``T`` and the
family's native attention; :func:`attention_cost` reads one variant's operation counts
(:func:`count_ops`, an :class:`~statten.analysis.OpRecorder` pass) and :func:`compare` sets each
row against spatial-only STAtten and the native attention at the same ``T``. ``statten bench
--tasks attention`` builds the models (this package never imports a model family) and prints
:func:`format_table`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from statten.analysis.energy import EnergyModel
from statten.analysis.ops import LayerOps, OpRecorder

__all__ = [
    "STATTEN",
    "AttentionCost",
    "AttentionVariant",
    "attention_cost",
    "attention_variants",
    "chunk_sizes",
    "compare",
    "count_ops",
    "format_table",
    "is_attention_product",
    "same_cost_as_spatial",
]

STATTEN = "STAtten"
# Kinds of the rows OpRecorder counts on weight layers; every other row is an attention product.
WEIGHTED_KINDS = ("conv", "linear")


@dataclass(frozen=True)
class AttentionVariant:
    """One model to measure: ``T`` time steps, an attention mode and (STAtten) its chunk size."""

    time_steps: int
    attention_mode: str
    chunk_size: int = 1

    @property
    def label(self) -> str:
        """``"STAtten c=2"``, ``"STAtten c=1 (spatial-only)"``, or the native mode's name."""
        if self.attention_mode != STATTEN:
            return self.attention_mode
        return f"STAtten c={self.chunk_size}" + (" (spatial-only)" if self.chunk_size == 1 else "")


def chunk_sizes(time_steps: int) -> list[int]:
    """Every STAtten chunk size that divides ``time_steps`` (1, ..., T)."""
    return [c for c in range(1, time_steps + 1) if time_steps % c == 0]


def attention_variants(time_steps: Sequence[int], native_mode: str) -> list[AttentionVariant]:
    """For every ``T``: STAtten at each chunk size (spatial-only first), then the native mode."""
    return [
        variant
        for T in time_steps
        for variant in (
            *(AttentionVariant(T, STATTEN, c) for c in chunk_sizes(T)),
            AttentionVariant(T, native_mode),
        )
    ]


def is_attention_product(layer: LayerOps) -> bool:
    """A row of an attention block's products (token mix, or a gate such as sdt's DVS
    ``out * x_pool``), as opposed to a convolution or linear layer."""
    return layer.kind not in WEIGHTED_KINDS


@torch.no_grad()
def count_ops(model: nn.Module, inputs: Tensor, time_steps: int, samples: int) -> list[LayerOps]:
    """Per-sample operation counts of one forward pass of ``model`` on ``inputs``, which hold
    ``samples`` samples."""
    with OpRecorder(model, time_steps) as recorder:
        model(inputs)
    return [layer.scaled(1 / samples) for layer in recorder.layers()]


def _flops(layers: Sequence[LayerOps]) -> float:
    return sum(layer.flops.sum().item() for layer in layers)


def _sops(layers: Sequence[LayerOps]) -> float:
    """SOPs of the spike-driven rows (a real-valued row's SOPs mean nothing)."""
    return sum(layer.sops.sum().item() for layer in layers if layer.spike_driven)


@dataclass
class AttentionCost:
    """Per image: the attention products (``token_mix_*``) and the whole forward pass of one
    variant. SOPs at the firing rates of the measured pass; ``seconds_per_image`` if timed.
    The ratios (filled by :func:`compare`) are against the same ``T``."""

    time_steps: int
    attention: str
    chunk_size: int
    label: str
    params: int
    token_mix_flops: float
    token_mix_sops: float
    forward_flops: float
    forward_sops: float
    forward_energy_mj: float
    seconds_per_image: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)


def attention_cost(
    variant: AttentionVariant,
    layers: Sequence[LayerOps],
    params: int,
    energy: EnergyModel | None = None,
    seconds_per_image: float | None = None,
) -> AttentionCost:
    """The cost of ``variant`` from its per-image counts ``layers`` (:func:`count_ops`)."""
    products = [layer for layer in layers if is_attention_product(layer)]
    energy = energy or EnergyModel()
    return AttentionCost(
        time_steps=variant.time_steps,
        attention=variant.attention_mode,
        chunk_size=variant.chunk_size,
        label=variant.label,
        params=params,
        token_mix_flops=_flops(products),
        token_mix_sops=_sops(products),
        forward_flops=_flops(layers),
        forward_sops=_sops(layers),
        forward_energy_mj=energy.total_mj(layers).sum().item(),
        seconds_per_image=seconds_per_image,
    )


def _is_spatial(cost: AttentionCost) -> bool:
    return cost.attention == STATTEN and cost.chunk_size == 1


def compare(costs: Sequence[AttentionCost]) -> None:
    """Fill every row's ``ratios``: token-mix FLOPs against spatial-only STAtten, token-mix and
    forward FLOPs against the native attention, at the same ``T``."""
    for cost in costs:
        same_t = [c for c in costs if c.time_steps == cost.time_steps]
        spatial = next(c for c in same_t if _is_spatial(c))
        native = next(c for c in same_t if c.attention != STATTEN)
        cost.ratios = {
            "token_mix_flops_vs_spatial": cost.token_mix_flops / spatial.token_mix_flops,
            "token_mix_flops_vs_native": cost.token_mix_flops / native.token_mix_flops,
            "forward_flops_vs_native": cost.forward_flops / native.forward_flops,
        }


def same_cost_as_spatial(costs: Sequence[AttentionCost]) -> bool:
    """The paper's claim, measured: every STAtten chunk size's token-mix FLOPs equal those of
    spatial-only STAtten at the same ``T``."""
    return all(
        c.ratios["token_mix_flops_vs_spatial"] == 1.0 for c in costs if c.attention == STATTEN
    )


def _m(value: float) -> str:
    return f"{value / 1e6:,.3f}M"


def _row(cost: AttentionCost) -> str:
    ratios = cost.ratios
    seconds = "-" if cost.seconds_per_image is None else f"{cost.seconds_per_image:.4f}"
    return (
        f"{cost.time_steps:>3} {cost.label:26} {_m(cost.token_mix_flops):>12} "
        f"{ratios['token_mix_flops_vs_spatial']:>7.2f} {ratios['token_mix_flops_vs_native']:>9.2f} "
        f"{_m(cost.token_mix_sops):>10} {_m(cost.forward_flops):>13} "
        f"{ratios['forward_flops_vs_native']:>9.3f} {_m(cost.forward_sops):>11} "
        f"{cost.forward_energy_mj:>9.4f} {seconds:>8}"
    )


def format_table(costs: Sequence[AttentionCost]) -> str:
    """The rows of :func:`compare`d costs as a text table, with the verdict on the claim."""
    header = (
        f"{'T':>3} {'attention':26} {'mix FLOPs':>12} {'/ c=1':>7} {'/ native':>9} "
        f"{'mix SOPs':>10} {'fwd FLOPs':>13} {'/ native':>9} {'fwd SOPs':>11} "
        f"{'fwd mJ':>9} {'s/img':>8}"
    )
    verdict = "yes" if same_cost_as_spatial(costs) else "NO"
    return "\n".join(
        [
            header,
            *(_row(cost) for cost in costs),
            "STAtten token-mix FLOPs equal spatial-only (c=1) at every T and chunk size: "
            + verdict,
        ]
    )
