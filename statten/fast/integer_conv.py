"""Convolutions of spikes and spike counts on oneDNN's int8 kernels (AMX or VNNI): exact sums.

A convolution fed 0/1 spikes only adds weights, and one fed spike counts (small non-negative
integers, such as the residual streams of Spikformer and QKFormer) adds whole multiples of them,
so the sums can be taken in integers. Each output channel's float32 weights are written as
``2^e * (d0 + 255 d1 + 255^2 d2)``: one power of two per channel and three int8 digits in
[-127, 127], 23 bits of fixed point under the channel's largest weight, whose rounding (at most
an ulp of that weight, per weight) is the only approximation. The input goes to bytes; oneDNN
sums each digit's product exactly in int32 and scales it by ``2^e * 255^k`` into the float32
output, where the products are added. On the layers of CIFAR-10 2-512 the result lies 2-4e-7 (of
the largest output) from the exact sum of the float32 weights, closer than oneDNN's float32
convolution (7e-7 to 2e-6: its rounding errors grow with the terms), but not bit-equal to it.
Like the spike-driven sums it serves inference, where
:class:`~statten.fast.spike_conv.SpikeConv2d` times it against the float32 convolution and keeps
the faster (``benchmarks/spike_conv.py --product integer``): on the 2-core Sapphire Rapids Xeon
of docs/performance.md, 18 versus 56 ms for the rpe convolution of CIFAR-10 2-512 at T x B = 64.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["IntegerWeights", "Product", "available", "conv2d", "digits", "pack"]

RADIX = 255  # balanced digits in [-127, 127]; 255 * spike still fits a byte
# The largest |q| the three digits reach: 127 * (1 + 255 + 255^2).
LARGEST = 127 * (1 + RADIX + RADIX**2)
SMALLEST_EXPONENT = -126  # keeps every scale a normal float32
# Terms per output (C_in * kh * kw) whose int32 sums of byte inputs times digits cannot overflow.
MAX_TERMS = (2**31 - 1) // (255 * 128)


@dataclass(frozen=True)
class Product:
    """One int8 product of :func:`conv2d`: oneDNN-packed digits, their per-output-channel scale,
    and whether they take the input doubled, ``[x | 255 x]`` over twice the channels."""

    digits: torch.Tensor
    scale: torch.Tensor
    doubled: bool


@dataclass(frozen=True)
class IntegerWeights:
    """A convolution's weights as int8 products (the top digit's first) summed into one output.

    Spike counts take one product per digit. Spikes take the same for a 1x1 convolution (oneDNN's
    int8 matrix product sums into its output in place), but a larger convolution, whose sum into
    the output copies it, takes two: the top digit, then the lower two side by side (``[d0 | d1]``
    fed ``[x | 255 x]``: the int32 sums of ``x (d0 + 255 d1)`` stay exact for 0/1 inputs)."""

    for_spikes: tuple[Product, ...]
    for_counts: tuple[Product, ...]
    zero_points: torch.Tensor
    padding: int
    pointwise: bool


def digits(weight: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """int8 digits ``d0, d1, d2`` (each shaped as ``weight``) and per-output-channel powers of two
    ``s`` with ``weight ~= s * (d0 + 255 d1 + 255^2 d2)``, off by at most ``s / 2`` per weight."""
    w = weight.detach().double().flatten(1)
    exponent = torch.ceil(torch.log2(w.abs().amax(1) / LARGEST)).clamp(min=SMALLEST_EXPONENT)
    scale = torch.exp2(exponent)
    q = torch.round(w / scale[:, None]).long()
    planes = []
    for _ in range(3):
        digit = torch.remainder(q + RADIX // 2, RADIX) - RADIX // 2
        planes.append(digit.to(torch.int8).view_as(weight))
        q = (q - digit) // RADIX
    return planes, scale.float()


def pack(weight: torch.Tensor, padding: int) -> IntegerWeights | None:
    """``weight [C_out, C_in, kh, kw]`` (float32, stride 1, zero ``padding``) packed for
    :func:`conv2d`; None when it holds a value that is not finite or has too many terms per
    output for exact int32 sums."""
    if weight[0].numel() > MAX_TERMS or not torch.isfinite(weight).all():
        return None
    (d0, d1, d2), scale = digits(weight)
    pointwise = weight.shape[2:] == (1, 1) and padding == 0

    def product(plane: torch.Tensor, factor: int, doubled: bool = False) -> Product:
        if pointwise:
            packed = torch.ops.onednn.qlinear_prepack(plane.flatten(1), None)
        else:
            plane = plane.contiguous(memory_format=torch.channels_last)
            geometry = ([1, 1], [padding] * 2, [1, 1], 1, None)
            packed = torch.ops.onednn.qconv_prepack(plane, scale, 1.0, 0, *geometry)
        return Product(packed, scale * float(factor), doubled)

    top = product(d2, RADIX**2)
    for_counts = (top, product(d1, RADIX), product(d0, 1))
    for_spikes = for_counts if pointwise else (top, product(torch.cat([d0, d1], dim=1), 1, True))
    zero_points = torch.zeros(weight.shape[0], dtype=torch.int64)
    return IntegerWeights(for_spikes, for_counts, zero_points, padding, pointwise)


# oneDNN's arguments after the bias: output scale and zero point, output dtype; then, for the
# sum into the output, its scale and zero point, the binary post-op and its alpha; no unary one.
_FLOAT_OUTPUT = (1.0, 0, torch.float32)
_SUM_INTO_OUTPUT = (1.0, 0, "sum", 1.0, "none", [], "")


def conv2d(
    values: torch.Tensor, weights: IntegerWeights, bias: torch.Tensor | None, spikes: bool = False
) -> torch.Tensor:
    """``conv2d(values, weight, bias)`` for ``values [N, C, H, W]`` of bytes (uint8; only 0 and 1
    when ``spikes``), as a channels-last float32 tensor."""
    products = weights.for_spikes if spikes else weights.for_counts
    if not weights.pointwise:
        geometry = ([1, 1], [weights.padding] * 2, [1, 1], 1)
        qconv = torch.ops.onednn.qconv2d_pointwise
        return _summed(qconv, geometry, values, products, weights.zero_points, bias)
    n, channels, h, w = values.shape
    rows = values.permute(0, 2, 3, 1).reshape(-1, channels)
    qlinear = torch.ops.onednn.qlinear_pointwise
    out = _summed(qlinear, (), rows, products, weights.zero_points, bias)
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def _summed(
    op: torch._ops.OpOverloadPacket,
    geometry: tuple,
    values: torch.Tensor,
    products: tuple[Product, ...],
    zero_points: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``products`` by ``op`` (oneDNN's int8 convolution or matrix product, channels on axis 1),
    each after the first summed into the first's output."""
    out = None
    for product in products:
        x = torch.cat([values, values * RADIX], dim=1) if product.doubled else values
        operands = (x, 1.0, 0, product.digits, product.scale, zero_points)
        if out is None:
            out = op(*operands, bias, *geometry, *_FLOAT_OUTPUT, "none", [], "")
        else:
            out = op.binary(*operands, out, None, *geometry, *_FLOAT_OUTPUT, *_SUM_INTO_OUTPUT)
    return out


@functools.cache
def available() -> bool:
    """Whether this torch build runs oneDNN's int8 convolutions here, checked once on small
    layers, fed spikes and counts, against the exact result: random ones, and the largest
    values with the largest digits (CPUs without int8 dot products sum byte pairs in int16,
    which those overflow)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_prepack")):
        return False
    generator = torch.Generator().manual_seed(0)
    random_weight = torch.randn(16, 8, 3, 3, generator=generator)
    largest_digits = torch.full((16, 8, 3, 3), float(LARGEST))  # every digit 127
    probes = [
        (values, w, padding, largest == 1)
        for largest in (1, 255)
        for values in (
            torch.randint(0, largest + 1, (2, 8, 5, 5), generator=generator),
            torch.full((2, 8, 5, 5), largest),
        )
        for weight in (random_weight, largest_digits)
        for w, padding in ((weight, 1), (weight[:, :, :1, :1].contiguous(), 0))
    ]
    try:
        results = [
            conv2d(values.to(torch.uint8), pack(w, padding), None, spikes)
            for values, w, padding, spikes in probes
        ]
    except RuntimeError:
        return False
    expected = [
        F.conv2d(values.double(), w.double(), padding=padding) for values, w, padding, _ in probes
    ]
    return all(
        (out - e).abs().max() <= 1e-5 * e.abs().max()
        for out, e in zip(results, expected, strict=True)
    )
