"""Memory-efficient layers for training: autograd functions around the fused LIF kernels.

- :func:`fused_lif` stores only the layer's input for backward, instead of the charged potential,
  the reset mask and the surrogate input of every step.
- :func:`fused_conv_bn_lif` runs conv -> BatchNorm -> LIF as one layer. It stores the conv input
  (spikes, kept as 1 byte by :func:`~statten.fast.storage.spike_storage`) and, unless told to
  recompute it, the conv output that BatchNorm needs; backward forms the BatchNorm output from it
  element by element inside the LIF kernels (or recomputes it where they cannot).
- :func:`max_pool` stores the argmax of every window as int32 instead of the input and int64
  indices.

All give outputs, running statistics and gradients bit-identical to the plain layers under
autograd (with a :class:`~statten.fast.spike_conv.SpikeConv2d`, the spike-driven products are
used and the results round as those of that layer do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from statten.fast.kernels import (
    batch_norm_lif_input_grad,
    batch_norm_lif_spikes,
    lif_input_grad,
    lif_spikes,
    max_pool_with_argmax,
    max_unpool,
)
from statten.fast.spike_conv import SpikeConv2d, conv2d_backward, conv2d_forward
from statten.fast.storage import mark_spikes, observing_saved_tensors

__all__ = [
    "fused_conv_bn_lif",
    "fused_lif",
    "fused_mlp",
    "max_pool",
    "record_saved_tensors",
    "use_fused_neurons",
]


def use_fused_neurons(model: nn.Module, enabled: bool) -> None:
    """Switch every neuron layer of ``model`` that has fused kernels (a ``fused`` attribute,
    :class:`statten.neurons.LIF`) to them, or back to SpikingJelly's step-by-step kernels."""
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = enabled


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


def fused_lif(
    x: torch.Tensor, v_threshold: float, tau: float, alpha: float, overwrite_input: bool = False
) -> torch.Tensor:
    """Spikes of a LIF layer fed ``x [T, ...]`` (surrogate ``alpha``), storing only ``x``.

    Outside autograd, ``overwrite_input`` lets the kernels write the spikes into ``x`` (for a
    caller that owns ``x``)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return mark_spikes(_LIF.apply(x, v_threshold, tau, alpha))
    return lif_spikes(x, v_threshold, tau, overwrite_input)


class _ConvBatchNormLIF(torch.autograd.Function):
    """conv -> BatchNorm (training) -> LIF [-> max pool] over ``[T, B, C, H, W]``.

    T and B are folded for conv, BatchNorm and pooling. Backward works from the deepest layer
    up and unpacks the conv input (saved as 1-byte spikes) only for the conv's gradients, so at
    any moment it holds as few full-size tensors as it can: the conv output is kept on ``ctx``
    and dropped once BatchNorm's gradient is done (a second backward, with ``retain_graph``,
    recomputes it). BatchNorm's affine parameters are read from the module in backward.
    """

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
        pool: nn.MaxPool2d | None,
    ) -> Any:
        out = conv2d_forward(conv, x.flatten(0, 1), conv_weight, conv_bias)
        ctx.save_for_backward(x, conv_weight, conv_bias)
        ctx.modules, ctx.neuron, ctx.steps = (conv, bn), neuron, x.shape[:2]
        ctx.conv_output = None if recompute else out
        fused = batch_norm_lif_spikes(out, x.shape[:2], bn, bn_weight, bn_bias, *neuron[:2])
        if fused is None:
            y, mean, invstd = torch.ops.aten.native_batch_norm(
                out, bn_weight, bn_bias, running_mean, running_var, True, bn.momentum, bn.eps
            )
            del out  # unless kept, free the conv output before the spikes are allocated
            spikes = lif_spikes(y.unflatten(0, x.shape[:2]), neuron[0], neuron[1])
            del y
        else:
            spikes, mean, invstd = fused
        ctx.batch_norm_stats = (mean, invstd)
        ctx.pooling = None
        if pool is None:
            return spikes
        pooled, ctx.pooling = _pool(pool, spikes.flatten(0, 1))
        return pooled.unflatten(0, x.shape[:2])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        conv, bn = ctx.modules
        v_threshold, tau, alpha = ctx.neuron
        mean, invstd = ctx.batch_norm_stats
        grad_spikes = grad_output
        if ctx.pooling is not None:
            grad_spikes = max_unpool(grad_output.flatten(0, 1), *ctx.pooling).unflatten(
                0, ctx.steps
            )
        out, ctx.conv_output = ctx.conv_output, None
        if out is None:
            x, conv_weight, conv_bias = ctx.saved_tensors
            out = conv2d_forward(conv, x.flatten(0, 1), conv_weight, conv_bias)
            del x
        grad_y = batch_norm_lif_input_grad(
            grad_spikes, out, (mean, invstd), bn.weight, bn.bias, v_threshold, tau, alpha
        )
        if grad_y is None:  # recompute BatchNorm's output, and write the gradient into it
            y = torch.ops.aten.native_batch_norm(
                out, bn.weight, bn.bias, None, None, True, 0.0, bn.eps
            )[0]
            grad_y = lif_input_grad(grad_spikes, y.unflatten(0, ctx.steps), *ctx.neuron, True)
            del y
        grad_y = _in_layout_of(grad_y, grad_spikes)
        del grad_spikes
        grad_out, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y.flatten(0, 1), out, bn.weight, None, None, mean, invstd, True, bn.eps,
            [True, *ctx.needs_input_grad[3:5]],
        )  # fmt: skip
        del grad_y, out  # free before the conv input is unpacked and its gradients allocated
        x, conv_weight, _ = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = conv2d_backward(
            conv, grad_out, x.flatten(0, 1), conv_weight, ctx.needs_input_grad[:3]
        )
        grad_x = None if grad_x is None else grad_x.unflatten(0, ctx.steps)
        return grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, *[None] * 7


def _in_layout_of(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the strides of ``like``: the memory layout the unfused layers' autograd
    gives this gradient, which decides BatchNorm backward's summation order (and so its bits)."""
    if tensor.stride() == like.stride():
        return tensor
    return torch.empty_like(like).copy_(tensor)


def _fusable(conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> bool:
    """A plain 2-D convolution, then a training BatchNorm2d with running statistics, no autocast.

    (Under autocast, e.g. bf16 on GPU, the layers run unfused: only the LIF is fused.)
    """
    return (
        not torch.is_autocast_enabled(x.device.type)
        and type(conv) in (nn.Conv2d, SpikeConv2d)
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
    pool: nn.MaxPool2d | None = None,
    pool_first: bool = False,
) -> torch.Tensor:
    """Spikes of a LIF layer fed ``bn(conv(x))`` per time step of ``x [T, B, C, H, W]``.

    ``neuron`` is ``(v_threshold, tau, alpha)``. With ``recompute`` the conv output is not stored
    but recomputed in backward: one more convolution for ``4 * numel`` fewer bytes. With
    ``pool`` the spikes are max-pooled per time step inside the layer, so that backward holds
    the gradient of the full-size spikes only while it needs it; with ``pool_first`` the LIF is
    fed ``pool(bn(conv(x)))`` instead (outside autograd only).
    """
    if pool_first or not _fusable(conv, bn, x):
        # conv's output is this layer's own temporary unless a hook sees it: the spikes may be
        # formed inside a spike-driven conv, or else overwrite its output
        hooked = (conv, bn, pool) if pool_first else (conv, bn)
        owned = not any(m._forward_hooks for m in hooked) and not _global_forward_hooks
        spikes = None
        if owned and isinstance(conv, SpikeConv2d) and isinstance(bn, nn.Identity):
            spikes = conv.lif_spikes(x.flatten(0, 1), x.shape[0], *neuron[:2], pool, pool_first)
        if spikes is None:
            y = bn(conv(x.flatten(0, 1)))
            y = max_pool(pool, y) if pool_first else y
            spikes = fused_lif(y.unflatten(0, x.shape[:2]), *neuron, overwrite_input=owned)
            spikes = spikes.flatten(0, 1)
            spikes = max_pool(pool, spikes) if pool is not None and not pool_first else spikes
        spikes = spikes.unflatten(0, x.shape[:2])
        return spikes if pool is None else mark_spikes(spikes)
    bn.num_batches_tracked.add_(1)
    spikes = _ConvBatchNormLIF.apply(
        x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
        conv, bn, neuron, recompute, pool,
    )  # fmt: skip
    return mark_spikes(spikes)


def fused_mlp(
    first: tuple[nn.Module, nn.Module, nn.Module],
    second: tuple[nn.Module, nn.Module, nn.Module],
    x: torch.Tensor,
    unfused: Callable[[], torch.Tensor],
) -> torch.Tensor | None:
    """Outside autograd, the spikes of two ``(conv, bn, lif)`` layers in a row for ``x [T, B, C,
    H, W]`` (a spiking MLP) from one spike-driven kernel that never writes the hidden spikes
    (:meth:`SpikeConv2d.mlp_spikes`: pointwise spike convolutions, BatchNorm folded, plain LIFs)
    where it measured faster than ``unfused`` and no hook would see what it skips; else None."""
    (conv, bn, lif), (conv2, bn2, lif2) = first, second
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (*first, *second))
    if (
        hooked
        or _global_forward_hooks
        or _global_forward_pre_hooks
        or not all(isinstance(c, SpikeConv2d) for c in (conv, conv2))
        or not all(isinstance(b, nn.Identity) for b in (bn, bn2))
        or lif.tau != lif2.tau
    ):
        return None
    v_thresholds = (float(lif.v_threshold), float(lif2.v_threshold))
    spikes = conv.mlp_spikes(
        conv2, x.flatten(0, 1), x.shape[0], v_thresholds, float(lif.tau),
        lambda: unfused().flatten(0, 1),
    )  # fmt: skip
    return None if spikes is None else spikes.unflatten(0, x.shape[:2])


def _pool(pool: nn.MaxPool2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """``pool(x)`` for ``x [N, C, H, W]``, and what :func:`max_unpool` needs (int32 argmaxes)."""
    out, indices = max_pool_with_argmax(x, pool)
    return out, (indices, x.shape, x.stride())


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pool: nn.MaxPool2d) -> Any:
        out, (indices, *ctx.input_layout) = _pool(pool, x)
        ctx.save_for_backward(indices)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (indices,) = ctx.saved_tensors
        return max_unpool(grad_out, indices, *ctx.input_layout), None


def max_pool(pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)`` (``x [N, C, H, W]``) storing int32 window argmaxes only, for backward."""
    if torch.is_grad_enabled() and x.requires_grad and not pool.return_indices:
        return _MaxPool.apply(x, pool)
    return pool(x)


def record_saved_tensors(
    forward: Callable[[], torch.Tensor], record: Callable[[torch.Tensor, str | None], None]
) -> torch.Tensor:
    """Run ``forward`` and pass every tensor it keeps for backward to ``record``; return its output.

    For memory accounting: ``record(tensor, None)`` for each tensor saved for backward, as kept
    (spikes as their uint8 copies), then ``record(tensor, name)`` for each tensor an autograd
    function of this module keeps on its ``ctx`` (``name``: the function).
    """
    with observing_saved_tensors(lambda tensor: record(tensor, None)):
        output = forward()
    for name, tensor in _ctx_tensors(output):
        record(tensor, name)
    return output


def _ctx_tensors(output: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """``(function name, tensor)`` for the tensors the graph of ``output`` keeps on ``ctx``."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        values = list(vars(node).values()) if hasattr(node, "__dict__") else []
        while values:
            value = values.pop()
            if isinstance(value, torch.Tensor):
                yield type(node).__name__.removesuffix("Backward"), value
            elif isinstance(value, tuple | list):
                values.extend(value)
