"""Inference fast path: BatchNorm folded into convolutions, fused LIF kernels, channels-last, and
on CPU spike-driven or exact-integer products of spikes, spike-driven attention and max pooling
in C.

Folding rounds differently from running conv and BatchNorm apart, and spike-driven or integer
products add their terms in another order than a dense one, so a membrane potential that lands
within a rounding error of a threshold can fire on one side and not the other: outputs match the
plain eval model up to the measured deviation documented in docs/performance.md.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from statten.fast.functions import use_fused_neurons
from statten.fast.kernels import max_pool_values, use_compiled_kernels
from statten.fast.spike_conv import integer_token_layers, spike_driven_convolutions, swap_layers

__all__ = ["InferenceMaxPool2d", "SpikeDrivenInference", "fold_batchnorm", "optimize_for_inference"]


class SpikeDrivenInference:
    """Mixin of layers with a spike-driven inference path (e.g. STAtten's attention), which
    :func:`optimize_for_inference` turns on: off by default, because its sums are added in
    another order than the reference's dense products."""

    spike_driven_inference: bool = False


class InferenceMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools channels-last CPU inputs outside autograd with the C kernel
    (values only, equal to torch's; ``pool.c``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        return max_pool_values(x, self)


def _folded(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A conv or linear layer computing ``bn(layer(x))`` with ``bn``'s running statistics."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    folded = copy.deepcopy(layer)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    folded.weight = nn.Parameter(layer.weight * scale.view(shape))
    folded.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
    return folded


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold the BatchNorms the model declares foldable (``model.batchnorm_folds()``, see
    :class:`~statten.models.base.SpikingModel`) into the layer in front of them, in place; each
    folded BatchNorm becomes an Identity.
    """
    for parent, layer_name, bn_name in model.batchnorm_folds():
        layer, bn = getattr(parent, layer_name), getattr(parent, bn_name)
        setattr(parent, layer_name, _folded(layer, bn))
        setattr(parent, bn_name, nn.Identity())
    return model


def optimize_for_inference(
    model: nn.Module,
    channels_last: bool = True,
    compile_kernels: bool = True,
    spike_driven: bool = True,
) -> nn.Module:
    """An eval-mode copy of ``model`` for fast inference; ``model`` itself is left unchanged.

    BatchNorm is folded into the convolutions, LIF layers run the fused kernels of
    :mod:`statten.fast.kernels` (C on CPU; compiled with ``torch.compile`` elsewhere when
    ``compile_kernels``), max pooling of channels-last CPU tensors runs in C
    (:class:`InferenceMaxPool2d`), layers with a spike-driven inference path
    (:class:`SpikeDrivenInference`) take it, and, with ``channels_last``, weights are laid out
    channels-last (faster oneDNN convolutions on CPU, tensor cores on GPU; pass channels-last
    inputs too). With ``spike_driven``, weight layers fed spikes or spike counts on CPU take the
    fastest of their float32 product, the spike-driven sums (convolutions:
    :class:`~statten.fast.spike_conv.SpikeConv2d`) and exact int8 sums (also ``nn.Linear`` and
    pointwise ``nn.Conv1d``). Run it under ``torch.inference_mode()``.
    """
    fast = fold_batchnorm(copy.deepcopy(model).eval())
    use_fused_neurons(fast, True)
    if compile_kernels:
        use_compiled_kernels(True)
    if spike_driven:
        spike_driven_convolutions(fast)
        integer_token_layers(fast)
        for layer in fast.modules():
            if isinstance(layer, SpikeDrivenInference):
                layer.spike_driven_inference = True
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return _inference_pools(fast)


def _inference_pools(model: nn.Module) -> nn.Module:
    """Every ``nn.MaxPool2d`` of ``model`` (in place) as an :class:`InferenceMaxPool2d`."""

    def swap(child: nn.Module) -> nn.Module | None:
        if type(child) is not nn.MaxPool2d:
            return None
        pool = InferenceMaxPool2d(
            child.kernel_size, child.stride, child.padding, child.dilation,
            child.return_indices, child.ceil_mode,
        )  # fmt: skip
        return pool.train(child.training)

    return swap_layers(model, swap)
