"""Inference fast path: BatchNorm folded into convolutions, fused LIF kernels, channels-last.

Folding rounds differently from running conv and BatchNorm apart, so a membrane potential that
lands within a rounding error of a threshold can fire on one side and not the other: outputs
match the plain eval model up to the measured deviation documented in docs/performance.md.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from statten.fast.kernels import use_compiled_kernels
from statten.neurons import LIF

__all__ = ["fold_batchnorm", "optimize_for_inference"]


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv computing ``bn(conv(x))`` with ``bn``'s running statistics."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1))
    folded.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
    return folded


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Children ``<a>conv<b>`` with a BatchNorm2d sibling ``<a>bn<b>`` (the model's names)."""
    children = dict(module.named_children())
    pairs = []
    for name, child in children.items():
        bn_name = name.replace("conv", "bn", 1)
        if isinstance(child, nn.Conv2d) and isinstance(children.get(bn_name), nn.BatchNorm2d):
            pairs.append((name, bn_name))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d into the conv in front of it (in place); the BN becomes Identity."""
    for module in list(model.modules()):
        for conv_name, bn_name in _conv_bn_pairs(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            setattr(module, conv_name, _folded(conv, bn))
            setattr(module, bn_name, nn.Identity())
    return model


def optimize_for_inference(
    model: nn.Module, channels_last: bool = True, compile_kernels: bool = True
) -> nn.Module:
    """An eval-mode copy of ``model`` for fast inference; ``model`` itself is left unchanged.

    BatchNorm is folded into the convolutions, LIF layers run the fused kernels of
    :mod:`statten.fast.kernels` (C on CPU; compiled with ``torch.compile`` elsewhere when
    ``compile_kernels``) and,
    with ``channels_last``, weights are laid out channels-last (faster oneDNN convolutions on
    CPU, tensor cores on GPU; pass channels-last inputs too). Run it under
    ``torch.inference_mode()``.
    """
    fast = fold_batchnorm(copy.deepcopy(model).eval())
    for module in fast.modules():
        if isinstance(module, LIF):
            module.fused = True
    if compile_kernels:
        use_compiled_kernels(True)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast
