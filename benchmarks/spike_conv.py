"""Spike-driven versus dense convolution products on CPU, by layer shape and density of ones.

Times the C kernels of ``statten.fast.native`` against oneDNN on the convolutions of the CIFAR-10
2-512 recipe at batch 16 x T 4, for densities around those the layers see: the output
(``spike_conv2d``, adding the weights of the inputs that spiked, versus ``nn.Conv2d``) and, with
``--product weight_grad``, the weight gradient (``spike_conv2d_weight_grad`` versus
``convolution_backward``) or, with ``--product integer``, the output as exact int8 sums on
oneDNN (``statten.fast.integer_conv``, the spikes' conversion to bytes included), which eval-mode
layers weigh against the float32 product. Tensors are laid out as in training (contiguous) or, with
``--channels-last``, as in fast inference. Each ``SpikeConv2d`` measures its own crossover on its
first spike input (statten/fast/spike_conv.py); this table shows where they fall.

    python benchmarks/spike_conv.py [--product output|weight_grad|integer] [--channels-last]
        [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
from timing import best_ms

from statten.fast import integer_conv, native

# name, input channels, output channels, spatial size, kernel: CIFAR-10 2-512 at T x B = 64
LAYERS = [
    ("patch stage 2", 64, 128, 32, 3),
    ("patch stage 3", 128, 256, 32, 3),
    ("patch stage 4", 256, 512, 16, 3),
    ("rpe", 512, 512, 8, 3),
    ("q/k/v/proj", 512, 512, 8, 1),
    ("mlp fc1", 512, 2048, 8, 1),
    ("mlp fc2", 2048, 512, 8, 1),
]
DENSITIES = (0.03, 0.05, 0.1, 0.2, 0.3)


@torch.inference_mode()
def compare(
    conv: torch.nn.Conv2d, x: torch.Tensor, product: str, repeats: int
) -> tuple[float, float]:
    """Milliseconds of the dense and of the spike-driven (or integer) ``product`` of ``conv``
    fed ``x``."""
    padding = conv.padding[0]
    if product == "integer":
        packed = integer_conv.pack(conv.weight, padding)
        dense = best_ms(lambda: conv(x), repeats)

        def integer() -> torch.Tensor:
            values, spikes = native.small_integer_bytes(x)
            return integer_conv.conv2d(values, packed, conv.bias, spikes)

        integer_ms = best_ms(integer, repeats)
        return dense, integer_ms
    if product == "output":
        taps = conv.weight.permute(2, 3, 1, 0).contiguous()
        dense = best_ms(lambda: conv(x), repeats)
        spike = best_ms(lambda: native.spike_conv2d(x, taps, conv.bias, padding, 1.0), repeats)
        return dense, spike
    grad_out = torch.randn_like(conv(x))
    dense = best_ms(lambda: torch.ops.aten.convolution_backward(
        grad_out, x, conv.weight, None, [1, 1], [padding] * 2, [1, 1], False, [0, 0], 1,
        [False, True, False],
    ), repeats)  # fmt: skip
    spike = best_ms(
        lambda: native.spike_conv2d_weight_grad(x, grad_out, conv.kernel_size, padding, 1.0),
        repeats,
    )
    return dense, spike


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="T x B images per call")
    parser.add_argument("--product", choices=("output", "weight_grad", "integer"), default="output")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    print(
        f"{torch.get_num_threads()} threads, {args.product}, {layout}; "
        f"ms per call, dense / {'integer' if args.product == 'integer' else 'spike-driven'}"
    )
    print(f"{'layer':14s} " + " ".join(f"{f'density {d}':>22s}" for d in DENSITIES))
    for name, cin, cout, size, kernel in LAYERS:
        conv = torch.nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        conv = conv.to(memory_format=layout).requires_grad_(False)
        cells = []
        for density in DENSITIES:
            x = (torch.rand(args.batch, cin, size, size) < density).float()
            x = x.contiguous(memory_format=layout)
            dense, spike = compare(conv, x, args.product, args.repeats)
            cells.append(f"{dense:7.1f} / {spike:6.1f} x{dense / spike:4.2f}")
        print(f"{name:14s} " + " ".join(f"{cell:>22s}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
