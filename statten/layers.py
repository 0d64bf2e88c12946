"""Building blocks shared by every model family: per-step layers, conv/linear + BN + LIF,
attention heads, drop path.

Activations are time-first, ``[T, B, ...]``. Stateless layers (convolutions, linear maps,
BatchNorm, pooling) see time and batch folded into one axis, time-major, as in the reference code
of every family, so that BatchNorm statistics pool time, batch and space per channel.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from spikingjelly.activation_based.functional import seq_to_ann_forward
from timm.layers import drop_path, trunc_normal_
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from statten.fast.functions import fused_mlp
from statten.fast.storage import storing_spikes

__all__ = [
    "ATTENTION_V_THRESHOLD",
    "conv_bn_lif",
    "conv_bn_pool_lif",
    "drop_path_per_sample",
    "init_linear_trunc_normal",
    "merge_heads",
    "mlp_conv_bn_lif",
    "per_step",
    "split_heads",
]

# The neuron after the attention product (``attn_lif``) fires at half the usual threshold in
# every family that has one (SDT v1 with STAtten, Spikformer, QKFormer).
ATTENTION_V_THRESHOLD = 0.5


def per_step(modules: nn.Module | Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply stateless layers to every time step of ``[T, B, ...]`` at once (T and B folded)."""
    return seq_to_ann_forward(x, modules if isinstance(modules, nn.Module) else list(modules))


def conv_bn_lif(
    conv: nn.Module,
    bn: nn.Module,
    lif: nn.Module,
    x: torch.Tensor,
    recompute: bool = False,
    pool: nn.MaxPool2d | None = None,
) -> torch.Tensor:
    """``lif(bn(conv(x)))`` with conv and BN per time step, then ``pool`` per step if given.

    ``conv`` is any per-step weight layer (Conv1d/2d, or Linear on the last axis). A fused LIF
    runs them as one layer where it can (Conv2d + BatchNorm2d), and pools inside that layer,
    which then never holds the full-size spikes, where nothing else needs them: in a
    memory-efficient training forward (the LIF's forward hooks then see the pooled spikes), and
    outside autograd when no forward hook would see them.
    """
    if not getattr(lif, "fused", False):
        spikes = lif(per_step((conv, bn), x))
    elif pool is not None and _pools_inside(lif):
        return lif(x, conv_bn=(conv, bn), recompute=recompute, pool=pool)
    else:
        spikes = lif(x, conv_bn=(conv, bn), recompute=recompute)
    return spikes if pool is None else per_step(pool, spikes)


def mlp_conv_bn_lif(
    first: tuple[nn.Module, nn.Module, nn.Module],
    second: tuple[nn.Module, nn.Module, nn.Module],
    x: torch.Tensor,
    recompute: bool = False,
) -> torch.Tensor:
    """Two :func:`conv_bn_lif` layers in a row, ``first`` and ``second`` each ``(conv, bn,
    lif)``: a spiking MLP. Outside autograd, with fused LIFs, fast inference may run both as one
    spike-driven kernel that never writes the hidden spikes (:func:`~statten.fast.functions.
    fused_mlp`)."""

    def unfused() -> torch.Tensor:
        return conv_bn_lif(*second, conv_bn_lif(*first, x, recompute), recompute)

    fused = all(getattr(layer[2], "fused", False) for layer in (first, second))
    if fused and not torch.is_grad_enabled():
        spikes = fused_mlp(first, second, x, unfused)
        if spikes is not None:
            return spikes
    return unfused()


def conv_bn_pool_lif(
    conv: nn.Module, bn: nn.Module, pool: nn.MaxPool2d, lif: nn.Module, x: torch.Tensor
) -> torch.Tensor:
    """``lif(pool(bn(conv(x))))`` with conv, BN and pool per time step (QKFormer's pooled units).

    Outside autograd a fused LIF runs them as one layer (which a spike-driven convolution forms
    in its kernel, see :meth:`~statten.fast.spike_conv.SpikeConv2d.lif_spikes`).
    """
    if getattr(lif, "fused", False) and not torch.is_grad_enabled():
        return lif(x, conv_bn=(conv, bn), pool=pool, pool_first=True)
    return lif(per_step((conv, bn, pool), x))


def _pools_inside(lif: nn.Module) -> bool:
    """Whether a fused ``lif`` pools its spikes inside its layer (see :func:`conv_bn_lif`)."""
    if storing_spikes():
        return True
    return not torch.is_grad_enabled() and not lif._forward_hooks and not _global_forward_hooks


def drop_path_per_sample(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a time-first tensor: drops whole samples (axis 1), all time steps."""
    if prob == 0.0 or not training:
        return x
    return drop_path(x.transpose(0, 1), prob, training).transpose(0, 1)


def init_linear_trunc_normal(module: nn.Module) -> None:
    """The Linear initialisation of the Spikformer, QKFormer and SDT v2 reference code (for
    ``model.apply``): weights trunc-normal(0.02) (cut at +-2), biases 0; other layers keep
    PyTorch's defaults."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Channel-first tokens ``[T, B, C, N]`` -> ``[T, B, heads, N, C / heads]``.

    Channel ``c`` goes to head ``c // d``, position ``c % d`` (``d = C / heads``), as in every
    family's reference code.
    """
    T, B, C, N = x.shape
    return x.view(T, B, num_heads, C // num_heads, N).transpose(-1, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[T, B, heads, N, d]`` -> channel-first tokens ``[T, B, heads * d, N]``."""
    T, B, _, N, _ = x.shape
    return x.transpose(-1, -2).reshape(T, B, -1, N)
