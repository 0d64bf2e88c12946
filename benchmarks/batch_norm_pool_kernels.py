"""BatchNorm -> LIF and max pooling on CPU: torch's kernels versus statten's C kernels.

The memory-efficient conv -> BatchNorm -> LIF [-> max pool] layer on CPU collects BatchNorm's
statistics with a C kernel and forms BatchNorm's output inside the LIF loops (forward and
backward) instead of running ``native_batch_norm`` and keeping its output; it pools with
``pool.c``. All bit-identical to torch. Times, best of ``--repeats``, at CIFAR-10 2-512's patch
stage 3 at batch 16 by default (conv output ``[T * B, 256, 32, 32]``, T = 4):

- BatchNorm (training) + LIF spikes: ``native_batch_norm`` then the C LIF kernel, versus
  ``batch_norm_lif_spikes``;
- the LIF's input gradient in backward: ``native_batch_norm`` recomputed then the C kernel,
  versus ``batch_norm_lif_input_grad``;
- 3x3 / stride 2 / padding 1 max pooling of spikes, with int32 argmaxes, and its gradient:
  ``max_pool2d_with_indices`` and ``scatter_add_`` versus ``pool.c``;
- the same pooling of channels-last spikes in inference, values only: ``max_pool2d`` versus
  ``pool.c`` (``max_pool_values``).

    python benchmarks/batch_norm_pool_kernels.py [--shape 64 256 32 32] [--repeats 7]
"""

from __future__ import annotations

import argparse

import torch
from timing import best_ms

from statten.fast.kernels import (
    batch_norm_lif_input_grad,
    batch_norm_lif_spikes,
    lif_input_grad,
    lif_spikes,
    max_pool_values,
    max_pool_with_argmax,
    max_unpool,
)

T = 4


def batch_norm_rows(shape: tuple[int, ...], repeats: int) -> list[tuple[str, float, float]]:
    """(what, torch ms, statten ms) for BatchNorm -> LIF, forward and backward."""
    conv_out = torch.randn(shape).mul_(2)
    bn = torch.nn.BatchNorm2d(shape[1])
    steps = (T, shape[0] // T)
    grad = torch.randn(*steps, *shape[1:])
    _, mean, invstd = torch.ops.aten.native_batch_norm(
        conv_out, bn.weight, bn.bias, None, None, True, 0.1, bn.eps
    )

    def fused_forward() -> tuple | None:
        return batch_norm_lif_spikes(conv_out, steps, bn, bn.weight, bn.bias, 1.0, 2.0)

    if fused_forward() is None:
        raise SystemExit("the fused BatchNorm kernels do not run here (no C compiler?)")

    def torch_forward() -> None:
        out = torch.ops.aten.native_batch_norm(
            conv_out, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, 0.1, bn.eps
        )[0]
        lif_spikes(out.unflatten(0, steps), 1.0, 2.0)

    def torch_backward() -> None:
        out = torch.ops.aten.native_batch_norm(
            conv_out, bn.weight, bn.bias, None, None, True, 0.0, bn.eps
        )[0]
        lif_input_grad(grad, out.unflatten(0, steps), 1.0, 2.0, 4.0, True)

    with torch.no_grad():
        return [
            (
                "BatchNorm + LIF spikes",
                best_ms(torch_forward, repeats),
                best_ms(fused_forward, repeats),
            ),
            (
                "LIF input gradient through BatchNorm",
                best_ms(torch_backward, repeats),
                best_ms(
                    lambda: batch_norm_lif_input_grad(
                        grad, conv_out, (mean, invstd), bn.weight, bn.bias, 1.0, 2.0, 4.0
                    ),
                    repeats,
                ),
            ),
        ]


def pooling_rows(shape: tuple[int, ...], repeats: int) -> list[tuple[str, float, float]]:
    """(what, torch ms, statten ms) for max pooling of spikes and its gradient."""
    spikes = (torch.rand(shape) < 0.25).float()
    pool = torch.nn.MaxPool2d(3, 2, 1)
    out, indices = max_pool_with_argmax(spikes, pool)
    grad = torch.randn(out.shape)
    long_indices = indices.long()
    channels_last = spikes.contiguous(memory_format=torch.channels_last)

    def torch_unpool() -> None:
        planes = torch.zeros_like(spikes).view(*shape[:2], -1)
        planes.scatter_add_(2, long_indices.flatten(2), grad.flatten(2))

    return [
        (
            "max pool 3x3/2 of spikes",
            best_ms(lambda: torch.nn.functional.max_pool2d_with_indices(spikes, 3, 2, 1), repeats),
            best_ms(lambda: max_pool_with_argmax(spikes, pool), repeats),
        ),
        (
            "its gradient",
            best_ms(torch_unpool, repeats),
            best_ms(lambda: max_unpool(grad, indices, spikes.shape, spikes.stride()), repeats),
        ),
        (
            "channels-last inference pool (values)",
            best_ms(lambda: torch.nn.functional.max_pool2d(channels_last, 3, 2, 1), repeats),
            best_ms(lambda: max_pool_values(channels_last, pool), repeats),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 256, 32, 32])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    shape = tuple(args.shape)
    if shape[0] % T:
        parser.error(f"--shape: the first size is T * B, a multiple of T = {T}")
    rows = batch_norm_rows(shape, args.repeats) + pooling_rows(shape, args.repeats)
    print(f"shape {list(shape)}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'':<38} {'torch ms':>9} {'statten ms':>11} {'speed-up':>9}")
    for what, torch_ms, statten_ms in rows:
        print(f"{what:<38} {torch_ms:>9.1f} {statten_ms:>11.1f} {torch_ms / statten_ms:>8.1f}x")


if __name__ == "__main__":
    main()
