"""The multi-step LIF on CPU: SpikingJelly's layer versus statten's fused kernels, three ways.

Times the forward (spikes) and the backward (input gradient from the spikes' gradient) of one LIF
layer on a ``[T, B, C, H, W]`` input (default: CIFAR-10 2-512's patch stage 2 at batch 16), for:

- ``spikingjelly``: ``statten.neurons.LIF`` as the default model runs it, under autograd;
- ``eager``: statten's fused kernels as step-by-step torch operations;
- ``compiled``: the same kernels through ``torch.compile`` (the first call compiles, untimed);
- ``c``: the C loops of ``statten/fast/lif.c`` (the CPU default of the fast paths).

    python benchmarks/lif_kernels.py [--shape 4 16 64 32 32] [--repeats 5]

Prints the best time of each and the bytes SpikingJelly's layer keeps for backward besides its
input. The default shape (patch stage 2, 16.8 MB per tensor) stays below glibc's mmap threshold:
at patch stage 3's size (67 MB) every implementation's time is dominated by the first touch of
its freshly mapped output (~18 ms on the 2-core machine of docs/performance.md).
"""

from __future__ import annotations

import argparse

import torch
from timing import best_ms

from statten.fast import use_compiled_kernels, use_native_kernels
from statten.fast.kernels import lif_input_grad, lif_spikes
from statten.neurons import LIF, SURROGATE_ALPHA, TAU

KINDS = {"eager": (False, False), "compiled": (False, True), "c": (True, False)}


def spikingjelly(x: torch.Tensor, grad: torch.Tensor, repeats: int) -> tuple[float, float, int]:
    """Forward and backward ms of the default LIF layer, and the bytes it saves for backward."""
    layer = LIF()
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() != x.untyped_storage().data_ptr():  # beyond the layer's input
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spikes = layer(x.requires_grad_())
    saved_bytes = sum(saved.values())
    forward = best_ms(lambda: layer(x), repeats)

    def backward() -> None:
        x.grad = None
        layer(x).backward(grad)

    return forward, best_ms(backward, repeats) - forward, saved_bytes if spikes.numel() else 0


def fused(kind: str, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Forward and backward ms of statten's fused kernels run as ``kind``."""
    native, compiled = KINDS[kind]
    use_native_kernels(native)
    use_compiled_kernels(compiled)
    try:
        x = x.detach()
        forward = best_ms(lambda: lif_spikes(x, 1.0, TAU), repeats)
        backward = best_ms(lambda: lif_input_grad(grad, x, 1.0, TAU, SURROGATE_ALPHA), repeats)
    finally:
        use_native_kernels(True)
        use_compiled_kernels(False)
    return forward, backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 16, 64, 32, 32])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.shape) * 2
    grad = torch.randn_like(x)
    print(f"input {list(x.shape)}, {torch.get_num_threads()} threads; best of {args.repeats}")
    forward, backward, saved = spikingjelly(x, grad, args.repeats)
    print(f"  {'spikingjelly':13s} forward {forward:7.1f} ms  backward {backward:7.1f} ms  "
          f"saves {saved / 2**20:.0f} MiB for backward")  # fmt: skip
    for kind in KINDS:
        forward, backward = fused(kind, x, grad, args.repeats)
        print(f"  {kind:13s} forward {forward:7.1f} ms  backward {backward:7.1f} ms  saves 0 MiB")


if __name__ == "__main__":
    main()
