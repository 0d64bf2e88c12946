"""Cost of one STAtten versus SDT attention block at the reference recipes: the formula tables
of docs/profile.md.

For every recipe (token grid and width), T in 4, 8, 16 and every STAtten chunk size dividing T
(1 is spatial-only attention), plus SDT, prints per image and per attention block: parameters,
dense FLOPs of the token mix and of the whole block, what the token mix would cost with Q K^T
computed first, and the SOPs and energy of the token mix when Q, K and V fire at rate ``--rate``.

Every dense number is computed from the formulas of docs/profile.md and checked against a
measurement (the script fails on any difference): the counts ``statten bench --tasks attention``
takes on whole models (:func:`statten.analysis.attention_cost.count_ops`) on a real attention
block fed one sample, and SpikingJelly's ``FlopCounter`` for the STAtten products. The SOPs of
STAtten are also measured on Bernoulli(rate) spikes. ``statten bench --tasks attention`` gives
the measured whole-model table of any recipe.

    python benchmarks/attention_cost.py [--rate 0.2] [--time-steps 4 8 16]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from spikingjelly.activation_based.op_counter import DispatchCounterMode, FlopCounter
from torch import nn

from statten.analysis import EnergyModel, OpRecorder
from statten.analysis.attention_cost import (
    STATTEN,
    AttentionVariant,
    attention_variants,
    count_ops,
    is_attention_product,
)
from statten.attention import SpatioTemporalAttention
from statten.models.sdt import SpikingSelfAttention

ENERGY = EnergyModel()


@dataclass(frozen=True)
class Recipe:
    """An attention block of a reference recipe: width, heads, token grid side, event data."""

    name: str
    dim: int
    heads: int
    grid: int
    dvs: bool

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


RECIPES = (
    Recipe("CIFAR 2-512 (32 px, pooling 0011, 8x8 tokens)", 512, 8, 8, False),
    Recipe("ImageNet 8-768 (224 px, pooling 1111, 14x14 tokens)", 768, 8, 14, False),
    Recipe("DVS 2-256 (64 px, pooling 0011, 16x16 tokens)", 256, 8, 16, True),
)


@dataclass(frozen=True)
class Cost:
    """Per image and attention block. FLOPs are dense; SOPs and energy at one firing rate."""

    params: int
    mix_flops: float
    gate_flops: float
    block_flops: float
    qk_first_flops: float | None
    mix_sops: float
    mix_energy_nj: float


def analytic_cost(recipe: Recipe, T: int, mode: str, chunk: int, rate: float) -> Cost:
    """The formulas of docs/profile.md for one attention block (Q, K, V firing at ``rate``)."""
    D, d, N = recipe.dim, recipe.head_dim, recipe.tokens
    convs = 4 * T * N * D * D  # q, k, v, proj 1x1 convs: MACs
    if mode == "STAtten":
        mix_flops = 2 * (2 * T * N * D * d)  # K^T V and Q (K^T V), 2 FLOPs per MAC
        gate_flops = T * N * D if recipe.dvs else 0  # DVS: out * x_pool, outside the token mix
        sops = T * N * D * d * (rate * rate + rate)
        qk_first = 2 * (2 * T * chunk * N * N * D)
    else:
        gate_flops = 0
        mix_flops = 3 * T * N * D  # k * v, the token sum, q * kv
        kv_fires = 1 - (1 - rate * rate) ** N  # the token-sum LIF fires iff a pair coincides
        sops = T * N * D * (2 * rate * rate + rate * kv_fires)
        qk_first = None
    return Cost(
        params=4 * D * D + 9 * D,  # 4 conv weights, proj bias, 4 BatchNorms
        mix_flops=mix_flops,
        gate_flops=gate_flops,
        block_flops=2 * convs + mix_flops + gate_flops,
        qk_first_flops=qk_first,
        mix_sops=sops,
        mix_energy_nj=ENERGY.e_ac_pj * sops / 1e3,
    )


def measured_flops(
    recipe: Recipe, T: int, mode: str, chunk: int
) -> tuple[int, float, float, float | None]:
    """Measured on one sample: ``(params, FLOPs of the attention products (token mix and DVS
    gate), block FLOPs, SpikingJelly's FLOPs of the STAtten products)``."""
    attn = SpikingSelfAttention(recipe.dim, recipe.heads, mode, chunk, recipe.dvs).eval()
    x = torch.randn(T, 1, recipe.dim, recipe.grid, recipe.grid)
    counter = FlopCounter()
    with DispatchCounterMode([counter]):
        layers = count_ops(attn, x, T, samples=1)
    products = sum(layer.flops.sum().item() for layer in layers if is_attention_product(layer))
    block = sum(layer.flops.sum().item() for layer in layers)
    params = sum(p.numel() for p in attn.parameters())
    statten = counter.get_counts().get("SpikingSelfAttention.statten")
    return params, products, block, statten and sum(statten.values())


def measured_statten_sops(recipe: Recipe, T: int, chunk: int, rate: float) -> float:
    """SOPs of STAtten's products on Bernoulli(``rate``) Q, K, V spikes (one sample)."""
    generator = torch.Generator().manual_seed(0)
    shape = (T, 1, recipe.heads, recipe.tokens, recipe.head_dim)
    q, k, v = (torch.bernoulli(torch.full(shape, rate), generator=generator) for _ in range(3))
    holder = nn.ModuleDict({"statten": SpatioTemporalAttention(chunk)})
    with torch.no_grad(), OpRecorder(holder, T) as ops:
        holder["statten"](q, k, v, 1.0)
    return sum(layer.sops.sum().item() for layer in ops.layers() if layer.spike_driven)


def check(recipe: Recipe, T: int, mode: str, chunk: int, cost: Cost) -> None:
    """Raise if a measured dense count differs from the formula."""
    *measured, statten_sj = measured_flops(recipe, T, mode, chunk)
    if tuple(measured) != (cost.params, cost.mix_flops + cost.gate_flops, cost.block_flops):
        raise AssertionError(f"{recipe.name} T={T} {mode} c={chunk}: {measured} != {cost}")
    scale = (T // chunk) * recipe.heads * recipe.head_dim**2  # SpikingJelly counts the scale too
    if mode == STATTEN and statten_sj != cost.mix_flops + scale:
        raise AssertionError(f"SpikingJelly counts {statten_sj} FLOPs for the STAtten products")


def _m(value: float) -> str:
    return f"{value / 1e6:,.2f}M"


def row(recipe: Recipe, variant: AttentionVariant, rate: float) -> str:
    T, mode, chunk = variant.time_steps, variant.attention_mode, variant.chunk_size
    cost = analytic_cost(recipe, T, mode, chunk, rate)
    check(recipe, T, mode, chunk, cost)
    measured = "-"
    if mode == STATTEN:
        measured = _m(measured_statten_sops(recipe, T, chunk, rate))
    qk_first = "-" if cost.qk_first_flops is None else _m(cost.qk_first_flops)
    return (
        f"| {T} | {variant.label} | {cost.params:,} | "
        f"{_m(cost.mix_flops)} | {_m(cost.block_flops)} | {qk_first} | {_m(cost.mix_sops)} | "
        f"{measured} | {cost.mix_energy_nj:,.1f} |"
    )


COLUMNS = (
    "T",
    "attention",
    "params",
    "dense FLOPs, token mix",
    "dense FLOPs, attention block",
    "token mix with Q K^T first",
    "SOPs, token mix",
    "measured SOPs",
    "energy, token mix (nJ)",
)


def table(recipe: Recipe, time_steps: list[int], rate: float) -> list[str]:
    title = (
        f"**{recipe.name}**: D={recipe.dim}, {recipe.heads} heads (d={recipe.head_dim}), "
        f"N={recipe.tokens} tokens{', DVS mode' if recipe.dvs else ''}; Q, K, V fire at r={rate}"
    )
    if recipe.dvs:
        title += " (the attention block includes the DVS gate of STAtten, T N D FLOPs)"
    lines = [title, "", f"| {' | '.join(COLUMNS)} |", "|" + "---|" * len(COLUMNS)]
    lines += [row(recipe, variant, rate) for variant in attention_variants(time_steps, "SDT")]
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=0.2, help="firing rate of Q, K and V")
    parser.add_argument("--time-steps", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for recipe in RECIPES:
        print("\n".join(table(recipe, args.time_steps, args.rate)))


if __name__ == "__main__":
    main()
