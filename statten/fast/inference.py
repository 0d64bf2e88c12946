"""Inference fast path: BatchNorm folded into convolutions, fused LIF kernels, channels-last, and
spike-driven convolutions on CPU.

Folding rounds differently from running conv and BatchNorm apart, and a spike-driven convolution
adds its terms in another order than a dense one, so a membrane potential that lands within a
rounding error of a threshold can fire on one side and not the other: outputs match the plain
eval model up to the measured deviation documented in docs/performance.md.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from statten.fast import native
from statten.fast.functions import use_fused_neurons
from statten.fast.kernels import use_compiled_kernels

__all__ = ["SpikeConv2d", "fold_batchnorm", "optimize_for_inference"]

# Densities of ones up to which adding the weights of the spikes beats oneDNN's dense
# convolution on CPU, by kernel size (measured on 2 Zen 4 cores at batches of 4 and 64,
# benchmarks/spike_conv.py).
MAX_DENSITY = {1: 0.2, 3: 0.3}
# Timed calls of each path on a layer's first spike input (after a warm-up call), which
# picks the path the layer keeps.
TIMING_CALLS = 2


class SpikeConv2d(nn.Conv2d):
    """A convolution that, fed 0/1 spikes on CPU without autograd, adds the weights of the spikes.

    Work grows with the number of spikes instead of the number of inputs (``spike_conv.c``): a
    spiking network's layers see 3-30 % ones. Any other input (other values, more than
    ``max_density`` ones, autograd, GPU, strides, groups) runs the ordinary dense convolution.

    Whether adding spikes beats oneDNN's dense product depends on the layer's shape and on the
    CPU (on 2 Zen 4 cores it won for the 2-512 model's layers; on a Xeon with a 1.8x faster
    matmul, and for SDT v2's narrow 1x1 convolutions, it lost). So each layer times both on its
    first spike input and keeps the faster (``spike_driven_faster``; set it to force a path).
    """

    def __init__(self, *args: Any, max_density: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        default = MAX_DENSITY.get(self.kernel_size[0], min(MAX_DENSITY.values()))
        self.max_density = default if max_density is None else max_density
        self._weight_by_tap: tuple[tuple[int, int], torch.Tensor] | None = None
        self.spike_driven_faster: bool | None = None  # None: not yet timed

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> SpikeConv2d:
        """The same convolution, sharing ``conv``'s parameters, as a :class:`SpikeConv2d`."""
        spike_conv = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )  # fmt: skip
        spike_conv.weight, spike_conv.bias = conv.weight, conv.bias
        return spike_conv

    def _spike_driven(self, x: torch.Tensor) -> bool:
        padding = self.padding
        return (
            not torch.is_grad_enabled()
            and x.dim() == 4
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and isinstance(padding, tuple)
            and padding[0] == padding[1]
            and self.out_channels % 16 == 0
            and self.spike_driven_faster is not False
            and native.library() is not None
        )

    def _weight_per_tap(self) -> torch.Tensor:
        """The weight as ``[kh, kw, C_in, C_out]``, the kernel's layout, kept until it changes."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._weight_by_tap is None or self._weight_by_tap[0] != key:
            weight = self.weight.detach().permute(2, 3, 1, 0).contiguous()
            self._weight_by_tap = (key, weight)
        return self._weight_by_tap[1]

    def _add_spikes(self, x: torch.Tensor) -> torch.Tensor | None:
        """The spike-driven result, or None when ``x`` is not 0/1 or has too many ones."""
        bias = None if self.bias is None else self.bias.detach()
        return native.spike_conv2d(
            x.contiguous(memory_format=torch.channels_last),
            self._weight_per_tap(),
            bias,
            self.padding[0],
            self.max_density,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._spike_driven(x):
            if self.spike_driven_faster is None:
                return self._time_both_paths(x)
            out = self._add_spikes(x)
            if out is not None:
                return out
        return super().forward(x)

    def _time_both_paths(self, x: torch.Tensor) -> torch.Tensor:
        """Run ``x`` both ways, keep the faster path for later calls, return its output."""
        out = self._add_spikes(x)  # also warms the path up
        if out is None:  # not spikes, or too dense: decide on a later input
            return super().forward(x)
        sparse_s, _ = _fastest_of(TIMING_CALLS, lambda: self._add_spikes(x))
        dense_s, dense_out = _fastest_of(TIMING_CALLS, lambda: nn.Conv2d.forward(self, x))
        self.spike_driven_faster = sparse_s < dense_s
        return out if self.spike_driven_faster else dense_out


def _fastest_of(calls: int, run: Any) -> tuple[float, Any]:
    """The shortest time of ``calls`` runs of ``run()``, and its last result."""
    best, result = float("inf"), None
    for _ in range(calls):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


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


def spike_driven_convolutions(model: nn.Module) -> nn.Module:
    """Turn every ``nn.Conv2d`` of ``model`` (in place) into a :class:`SpikeConv2d`."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Conv2d:
                setattr(module, name, SpikeConv2d.from_conv(child))
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
    ``compile_kernels``) and,
    with ``channels_last``, weights are laid out channels-last (faster oneDNN convolutions on
    CPU, tensor cores on GPU; pass channels-last inputs too). With ``spike_driven``, convolutions
    fed spikes on CPU add the weights of the spikes instead of multiplying every input
    (:class:`SpikeConv2d`). Run it under ``torch.inference_mode()``.
    """
    fast = fold_batchnorm(copy.deepcopy(model).eval())
    use_fused_neurons(fast, True)
    if compile_kernels:
        use_compiled_kernels(True)
    if spike_driven:
        spike_driven_convolutions(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast
