"""Memory-efficient layers for training: autograd functions around the fused LIF kernels.

- :func:`fused_lif` stores only the layer's input for backward, instead of the charged potential,
  the reset mask and the surrogate input of every step.
- :func:`fused_conv_bn_lif` runs conv -> BatchNorm -> LIF as one layer. It stores the conv input
  (spikes, kept as 1 byte by :func:`~statten.fast.storage.spike_storage`) and, unless told to
  recompute it, the conv output that BatchNorm needs; the BatchNorm output is recomputed.
- :func:`max_pool` stores the argmax of every window as int32 instead of the input and int64
  indices.

All give outputs, running statistics and gradients bit-identical to the plain layers under
autograd.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from statten.fast.kernels import lif_input_grad, lif_spikes
from statten.fast.storage import mark_spikes

__all__ = ["fused_conv_bn_lif", "fused_lif", "max_pool"]


class _LIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, v_threshold: float, tau: float, alpha: float) -> Any:
        ctx.save_for_backward(x)
        ctx.constants = (v_threshold, tau, alpha)
        return lif_spikes(x, v_threshold, tau)

    @staticmethod
    def backward(ctx: Any, grad_spikes: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        return lif_input_grad(grad_spikes, x, *ctx.constants), None, None, None


def fused_lif(x: torch.Tensor, v_threshold: float, tau: float, alpha: float) -> torch.Tensor:
    """Spikes of a LIF layer fed ``x [T, ...]`` (surrogate ``alpha``), storing only ``x``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return mark_spikes(_LIF.apply(x, v_threshold, tau, alpha))
    return lif_spikes(x, v_threshold, tau)


class _ConvBatchNormLIF(torch.autograd.Function):
    """conv -> BatchNorm (training) -> LIF over ``[T, B, C, H, W]``, T and B folded for conv/BN."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        conv_weight: torch.Tensor,
        conv_bias: torch.Tensor | None,
        bn_weight: torch.Tensor,
        bn_bias: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        neuron: tuple[float, float, float],
        recompute: bool,
    ) -> Any:
        out = conv._conv_forward(x.flatten(0, 1), conv_weight, conv_bias)
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            out, bn_weight, bn_bias, running_mean, running_var, True, bn.momentum, bn.eps
        )
        stored = None if recompute else out
        ctx.save_for_backward(x, conv_weight, conv_bias, bn_weight, bn_bias, mean, invstd, stored)
        ctx.modules, ctx.neuron = (conv, bn), neuron
        del out, stored  # unless saved, free the conv output before the spikes are allocated
        return lif_spikes(y.unflatten(0, x.shape[:2]), neuron[0], neuron[1])

    @staticmethod
    def backward(ctx: Any, grad_spikes: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, conv_weight, conv_bias, bn_weight, bn_bias, mean, invstd, out = ctx.saved_tensors
        conv, bn = ctx.modules
        v_threshold, tau, alpha = ctx.neuron
        flat = x.flatten(0, 1)
        if out is None:
            out = conv._conv_forward(flat, conv_weight, conv_bias)
        y = torch.ops.aten.native_batch_norm(out, bn_weight, bn_bias, None, None, True, 0.0, bn.eps)
        grad_y = lif_input_grad(  # into y's memory where the kernels can
            grad_spikes, y[0].unflatten(0, x.shape[:2]), v_threshold, tau, alpha, True
        )
        del y
        grad_out, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y.flatten(0, 1), out, bn_weight, None, None, mean, invstd, True, bn.eps,
            [True, *ctx.needs_input_grad[3:5]],
        )  # fmt: skip
        del grad_y, out  # free before the conv gradients are allocated
        bias_sizes = None if conv_bias is None else list(conv_bias.shape)
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, flat, conv_weight, bias_sizes, conv.stride, conv.padding, conv.dilation,
            False, [0, 0], conv.groups, list(ctx.needs_input_grad[:3]),
        )  # fmt: skip
        grad_x = None if grad_x is None else grad_x.unflatten(0, x.shape[:2])
        return grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, *[None] * 6


def _fusable(conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> bool:
    """A plain 2-D convolution, then a training BatchNorm2d with running statistics, no autocast.

    (Under autocast, e.g. bf16 on GPU, the layers run unfused: only the LIF is fused.)
    """
    return (
        not torch.is_autocast_enabled(x.device.type)
        and type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and isinstance(bn, nn.BatchNorm2d)
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and bn.momentum is not None
        and torch.is_grad_enabled()
    )


def fused_conv_bn_lif(
    conv: nn.Module,
    bn: nn.Module,
    x: torch.Tensor,
    neuron: tuple[float, float, float],
    recompute: bool = False,
) -> torch.Tensor:
    """Spikes of a LIF layer fed ``bn(conv(x))`` per time step of ``x [T, B, C, H, W]``.

    ``neuron`` is ``(v_threshold, tau, alpha)``. With ``recompute`` the conv output is not stored
    but recomputed in backward: one more convolution for ``4 * numel`` fewer bytes.
    """
    if not _fusable(conv, bn, x):
        y = bn(conv(x.flatten(0, 1)))
        return fused_lif(y.unflatten(0, x.shape[:2]), *neuron)
    bn.num_batches_tracked.add_(1)
    spikes = _ConvBatchNormLIF.apply(
        x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
        conv, bn, neuron, recompute,
    )  # fmt: skip
    return mark_spikes(spikes)


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pool: nn.MaxPool2d) -> Any:
        out, indices = F.max_pool2d_with_indices(
            x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode
        )
        ctx.save_for_backward(indices.to(torch.int32))
        ctx.input_layout = (x.shape, x.stride())
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (indices,) = ctx.saved_tensors
        shape, stride = ctx.input_layout
        grad_x = torch.empty_strided(shape, stride, dtype=grad_out.dtype, device=grad_out.device)
        planes = grad_x.zero_().view(shape[0], shape[1], -1)
        planes.scatter_add_(2, indices.flatten(2).long(), grad_out.flatten(2))
        return grad_x, None


def max_pool(pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)`` (``x [N, C, H, W]``) storing int32 window argmaxes only, for backward."""
    if torch.is_grad_enabled() and x.requires_grad and not pool.return_indices:
        return _MaxPool.apply(x, pool)
    return pool(x)
