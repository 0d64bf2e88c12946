"""Fast paths of statten (measured in docs/performance.md, benchmarked by ``statten bench``).

- Memory-efficient training, bit-identical to the plain model and the default of every family:
  ``create_model(..., memory_efficient=True|False)`` or
  ``model.memory_efficient = ...``. LIF layers run fused kernels and store only their input;
  conv -> BatchNorm -> LIF runs as one layer that recomputes instead of storing; spikes are
  stored for backward as 1-byte tensors.
- Fused LIF kernels, bit-identical to the step-by-step ones: on CPU C loops built on first use
  with the system C compiler (:func:`use_native_kernels`, on by default); elsewhere, after
  :func:`use_compiled_kernels`, ``torch.compile``d functions (Triton on CUDA).
- :func:`optimize_for_training`: all of the above plus, on GPU, channels-last weights (tensor
  cores; changes rounding).
- :func:`optimize_for_inference`: BatchNorm folded into convolutions, fused kernels, channels-last
  (outputs match the plain eval model within a documented tolerance).
- After each memory-efficient training forward pass on CPU, the C heap's free pages go back to
  the operating system (:func:`use_heap_release`, on by default; glibc only): a lower peak
  resident size for ~10 ms.
- Spike-driven convolutions (:mod:`statten.fast.spike_conv`), opt-in for training
  (``model.spike_driven = True``) and part of fast inference: on CPU, the output and the weight
  gradient of a convolution fed spikes are computed from the spikes where measured faster
  (rounds differently; measured deviation in docs/performance.md).
- Exact-integer products (:mod:`statten.fast.integer_conv`), part of fast inference: weight
  layers fed spikes or spike counts sum them in int8 on oneDNN's kernels where measured faster.
"""

from __future__ import annotations

import torch
from torch import nn

from statten.fast.host_memory import use_heap_release
from statten.fast.inference import fold_batchnorm, optimize_for_inference
from statten.fast.kernels import (
    compiled_kernels_enabled,
    use_compiled_kernels,
    use_native_kernels,
)
from statten.fast.storage import mark_spikes, spike_storage

__all__ = [
    "compiled_kernels_enabled",
    "fold_batchnorm",
    "mark_spikes",
    "optimize_for_inference",
    "optimize_for_training",
    "spike_storage",
    "use_compiled_kernels",
    "use_heap_release",
    "use_native_kernels",
]


def optimize_for_training(
    model: nn.Module, channels_last: bool | None = None, compile_kernels: bool = True
) -> nn.Module:
    """Switch ``model`` (in place) to memory-efficient training, fused kernels, and on GPU
    channels-last.

    ``compile_kernels`` compiles the LIF kernels with ``torch.compile`` where the C kernels do not
    run (GPU tensors, or no C compiler). ``channels_last`` defaults to whether the model is on a
    GPU: on CPU the memory-efficient layers form BatchNorm's output inside the LIF kernels only
    for NCHW tensors, and a channels-last training step measured 7 % slower there
    (docs/performance.md). With ``channels_last``, feed channels-last inputs
    (``images.contiguous(memory_format=torch.channels_last)``).
    """
    model.memory_efficient = True
    if compile_kernels:
        use_compiled_kernels(True)
    if channels_last is None:
        channels_last = any(parameter.is_cuda for parameter in model.parameters())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
