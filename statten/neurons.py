"""Spiking neurons of STAtten: SpikingJelly 2.x multi-step LIF and PLIF layers.

The reference builds every neuron as ``MultiStepLIFNode(tau=2.0, detach_reset=True)`` (hard
reset to 0, decay_input, sigmoid surrogate with alpha 4) or, for ``spike_mode="plif"``,
``MultiStepParametricLIFNode(init_tau=2.0, detach_reset=True)``. SpikingJelly 2.x picks its
kernel for the tensor's device by itself (on CPU a registered op that loops over the time steps
with torch operations, on GPU CUDA/Triton kernels).

Unlike SpikingJelly's nodes, these layers forget their membrane potential after every call: each
forward starts from ``V = 0``, so a model never needs ``reset_net`` between batches.

A :class:`LIF` layer with ``fused = True`` runs the fused kernels of :mod:`statten.fast` instead:
the same spikes and gradients, less memory for backward, and optionally a BatchNorm in front.
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import neuron, surrogate
from spikingjelly.activation_based.neuron import BaseNode
from torch import nn

from statten.fast.functions import fused_conv_bn_lif, fused_lif

SPIKE_MODES = ("lif", "plif")
TAU = 2.0
SURROGATE_ALPHA = 4.0


class _FreshStateMixin:
    """Resets the membrane before and after each multi-step call (no state leaks between calls)."""

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        self.reset()
        try:
            return super().multi_step_forward(x_seq)
        finally:
            self.reset()


class LIF(_FreshStateMixin, neuron.LIFNode):
    """Multi-step LIF, ``H = V + (X - V) / 2``, spike when ``H >= v_threshold``, hard reset to 0.

    ``layer(x, conv_bn=(conv, bn), pool=pool)`` gives the spikes of ``bn(conv(x))`` applied to
    every time step of ``x [T, B, C, H, W]``, max-pooled per step by ``pool`` if given (with
    ``pool_first=True``, the spikes of ``pool(bn(conv(x)))``). With
    ``fused = True`` (see :mod:`statten.fast`) the layer runs fused kernels, and conv, BatchNorm,
    neuron and pool run as one memory-efficient layer, which recomputes the conv output in
    backward instead of storing it when ``recompute=True``.
    """

    def __init__(self, v_threshold: float = 1.0) -> None:
        super().__init__(
            tau=TAU,
            v_threshold=float(v_threshold),
            surrogate_function=surrogate.Sigmoid(alpha=SURROGATE_ALPHA),
            detach_reset=True,
            step_mode="m",
        )
        self.fused = False

    def multi_step_forward(
        self,
        x_seq: torch.Tensor,
        conv_bn: tuple[nn.Module, nn.Module] | None = None,
        recompute: bool = False,
        pool: nn.MaxPool2d | None = None,
        pool_first: bool = False,
    ) -> torch.Tensor:
        neuron = (self.v_threshold, TAU, SURROGATE_ALPHA)
        if conv_bn is None:
            return fused_lif(x_seq, *neuron) if self.fused else super().multi_step_forward(x_seq)
        if self.fused:
            return fused_conv_bn_lif(*conv_bn, x_seq, neuron, recompute, pool, pool_first)
        conv, bn = conv_bn
        y = bn(conv(x_seq.flatten(0, 1)))
        pooled = pool is not None and pool_first
        spikes = super().multi_step_forward(
            (pool(y) if pooled else y).unflatten(0, x_seq.shape[:2])
        )
        if pool is None or pooled:
            return spikes
        return pool(spikes.flatten(0, 1)).unflatten(0, spikes.shape[:2])


class PLIF(_FreshStateMixin, neuron.ParametricLIFNode):
    """Multi-step parametric LIF: as :class:`LIF` with ``1 / tau = sigmoid(w)``, ``w`` learned."""

    def __init__(self, v_threshold: float = 1.0) -> None:
        super().__init__(
            init_tau=TAU,
            v_threshold=float(v_threshold),
            surrogate_function=surrogate.Sigmoid(alpha=SURROGATE_ALPHA),
            detach_reset=True,
            step_mode="m",
        )


def check_spike_mode(spike_mode: str) -> str:
    """Return ``spike_mode`` if it names a neuron type, else raise a ``ValueError``."""
    if spike_mode not in SPIKE_MODES:
        raise ValueError(f"unknown spike_mode {spike_mode!r}; expected one of {SPIKE_MODES}")
    return spike_mode


def create_neuron(spike_mode: str = "lif", v_threshold: float = 1.0) -> BaseNode:
    """Build a multi-step spiking neuron layer of the given type (``"lif"`` or ``"plif"``)."""
    cls = LIF if check_spike_mode(spike_mode) == "lif" else PLIF
    return cls(v_threshold=v_threshold)


def is_neuron(module: torch.nn.Module) -> bool:
    """True for any SpikingJelly neuron layer (the layers whose outputs are spikes)."""
    return isinstance(module, BaseNode)
