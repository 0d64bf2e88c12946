"""statten.fast.integer_conv: convolutions of spikes and spike counts as exact int8 sums come as
close to the exact result as float32 ones, and SpikeConv2d uses them in eval mode where they
measured faster."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_c_compiler

from statten.fast import integer_conv, native
from statten.fast.spike_conv import SpikeConv1d, SpikeConv2d, SpikeLinear, integer_token_layers

needs_int8_kernels = pytest.mark.skipif(
    not integer_conv.available(), reason="this torch build runs no oneDNN int8 convolution here"
)
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _spikes(shape: tuple[int, ...], density: float, layout: str = "contiguous") -> torch.Tensor:
    x = (torch.rand(shape) < density).float()
    return x.contiguous(memory_format=LAYOUTS[layout])


def test_int8_kernels_are_used_where_the_cpu_has_int8_dot_products() -> None:
    """oneDNN runs int8 convolutions on every x86 CPU, exactly where the CPU has VNNI or AMX, so
    a failed check there means a broken path (which would otherwise only skip the tests)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if torch.backends.mkldnn.is_available() and flags & {"avx512_vnni", "amx_int8"}:
        assert integer_conv.available()


def test_digits_rebuild_each_weight_to_within_half_a_step_of_its_channel() -> None:
    torch.manual_seed(0)
    weight = (
        torch.randn(6, 5, 3, 3)
        * torch.tensor([1e-3, 1.0, 3e4, 1e-30, 0.0, 2.0])[:, None, None, None]
    )
    weight[5, 0, 0, 0] = 1e-9  # far below its channel's step: rounds to 0
    planes, scale = integer_conv.digits(weight)
    assert all(p.dtype == torch.int8 and p.abs().max() <= 127 for p in planes)
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two
    q = sum(p.double() * integer_conv.RADIX**k for k, p in enumerate(planes))
    error = (q * scale.double()[:, None, None, None] - weight.double()).abs()
    assert (error <= scale.double()[:, None, None, None] / 2).all()
    largest = weight.double().flatten(1).abs().amax(1)
    assert (scale.double()[:3] <= largest[:3] * 2.0**-22).all()  # 22+ bits under the largest


@needs_c_compiler
def test_small_integer_bytes_keep_spikes_and_counts_and_decline_other_values() -> None:
    torch.manual_seed(0)
    for layout in LAYOUTS:
        x = _spikes((3, 7, 111, 97), 0.2, layout)  # not a whole number of the kernel's chunks
        x[0, 0, 0, 0] = -0.0
        values, spikes = native.small_integer_bytes(x)
        assert spikes and values.dtype == torch.uint8
        assert torch.equal(values, x.to(torch.uint8))
        assert values.is_contiguous(memory_format=LAYOUTS[layout])
    counts = x * torch.randint(0, 256, x.shape)
    values, spikes = native.small_integer_bytes(counts)
    assert not spikes and torch.equal(values, counts.to(torch.uint8))
    assert native.small_integer_bytes(torch.zeros(1, 1, 2, 2))[1]
    assert not native.small_integer_bytes(torch.full((1, 1, 2, 2), 2.0))[1]
    for other in (0.5, 255.5, -1.0, 256.0, 1e-40, float("nan"), float("inf")):
        x[2, 6, 110, 96] = other  # in the last chunk
        assert native.small_integer_bytes(x) is None, other


@needs_int8_kernels
@needs_c_compiler
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("largest", [1, 3, 255])
@pytest.mark.parametrize(("kernel", "padding", "bias"), [(1, 0, True), (3, 1, False), (3, 0, True)])
def test_integer_conv_is_as_close_to_the_exact_sum_as_float32(
    kernel: int, padding: int, bias: bool, largest: int, layout: str
) -> None:
    """Spikes (largest 1) and spike counts, through both sets of products."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(40, 48, kernel, padding=padding, bias=bias)
    with torch.no_grad():
        conv.weight[3] *= 1e4  # channels of very different scales
        conv.weight[7] = 0.0
    x = torch.randint(0, largest + 1, (4, 40, 9, 7)).float() * (torch.rand(4, 40, 9, 7) < 0.3)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    packed = integer_conv.pack(conv.weight, padding)
    values, spikes = native.small_integer_bytes(x)
    assert spikes == (largest == 1)
    out = integer_conv.conv2d(values, packed, conv.bias, spikes)
    b = None if conv.bias is None else conv.bias.double()
    exact = F.conv2d(x.double(), conv.weight.double(), b, padding=padding)
    per_channel = exact.abs().amax((0, 2, 3), keepdim=True).clamp_min(1e-30)
    float32_error = ((conv(x) - exact).abs() / per_channel).max()
    integer_error = ((out - exact).abs() / per_channel).max()
    assert integer_error <= max(2 * float32_error, 4e-7)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == exact.shape


@needs_int8_kernels
def test_pack_declines_layers_whose_int32_sums_could_overflow() -> None:
    assert integer_conv.pack(torch.ones(16, 8000, 3, 3), 1) is None  # 72,000 terms per output
    assert integer_conv.pack(torch.ones(16, 7000, 3, 3), 1) is not None


@needs_int8_kernels
@needs_c_compiler
def test_pack_declines_weights_that_are_not_finite() -> None:
    weight = torch.ones(16, 4, 3, 3)
    weight[2, 1, 0, 0] = float("inf")
    assert integer_conv.pack(weight, 1) is None
    spike_conv = SpikeConv2d(4, 16, 3, padding=1).eval()
    with torch.no_grad():
        spike_conv.weight.copy_(weight)
    spike_conv.max_density, spike_conv.integer_products = 0.0, True
    x = _spikes((2, 4, 5, 5), 0.5)
    with torch.inference_mode():
        out, float32 = spike_conv(x), spike_conv._conv_forward(x, weight, spike_conv.bias)
    torch.testing.assert_close(out, float32, rtol=0, atol=0, equal_nan=True)  # 0 * inf: NaN


@needs_int8_kernels
@needs_c_compiler
def test_eval_spike_conv_takes_the_faster_of_its_float32_and_integer_products(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    calls = []
    real = integer_conv.conv2d
    monkeypatch.setattr(
        integer_conv, "conv2d", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    )
    spike_conv = SpikeConv2d(32, 64, 3, padding=1)
    x = _spikes((4, 32, 8, 8), 0.3)
    with torch.inference_mode():
        spike_conv(x)  # training mode: float32 (the weights change every step)
        assert spike_conv.integer_products is None and not calls
        spike_conv.eval().max_density = 0.0  # not spike-driven
        spike_conv(x * 0.5)  # not integers: nothing to measure yet
        assert spike_conv.integer_products is None and not calls
        spike_conv(x)
        assert spike_conv.integer_products in (True, False) and len(calls) == 3  # warm-up, timed
        spike_conv.integer_products = True
        out = spike_conv(x)
        counts = spike_conv(x * 3)
        fraction = spike_conv(x * 0.5)
        spike_conv.integer_products = False
        float32 = spike_conv(x)
    assert len(calls) == 5
    weight, bias = spike_conv.weight, spike_conv.bias
    for inputs, result in ((x, out), (x * 3, counts)):
        exact = F.conv2d(inputs.double(), weight.double(), bias.double(), padding=1)
        torch.testing.assert_close(result.double(), exact, rtol=0, atol=1e-5)
    assert torch.equal(fraction, spike_conv._conv_forward(x * 0.5, weight, bias))
    assert torch.equal(float32, spike_conv._conv_forward(x, weight, bias))


@needs_int8_kernels
@needs_c_compiler
def test_integer_weights_follow_the_weights() -> None:
    spike_conv = SpikeConv2d(16, 16, 1).eval()
    spike_conv.max_density, spike_conv.integer_products = 0.0, True
    x = _spikes((2, 16, 4, 4), 0.5)
    with torch.no_grad():
        before = spike_conv(x)
        spike_conv.weight.mul_(2)
        after = spike_conv(x)
    bias = spike_conv.bias[None, :, None, None]
    torch.testing.assert_close(after - bias, 2 * (before - bias), rtol=1e-6, atol=1e-6)


@needs_int8_kernels
@needs_c_compiler
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_token_layers_take_int8_products_in_eval_mode_only(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        plain = torch.nn.Linear(24, 40)
        x = torch.randint(0, 4, (3, 5, 24)).float()  # spike counts, channels last
    else:
        plain = torch.nn.Conv1d(24, 40, 1)
        x = torch.randint(0, 4, (3, 24, 7)).float()
    holder = torch.nn.Sequential(plain)
    integer_token_layers(holder)
    layer = holder[0]
    assert isinstance(layer, SpikeLinear if kind == "linear" else SpikeConv1d)
    assert layer.weight is plain.weight and layer.bias is plain.bias and layer.training
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))  # training mode: the plain layer
        layer.eval().integer_products = True
        out, fraction = layer(x), layer(x + 0.5)
        if kind == "conv1d":  # unbatched [C, L]: the plain layer
            assert torch.equal(layer(x[0]), plain(x[0]))
    exact = plain.double()(x.double())
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
    assert out.shape == exact.shape and torch.equal(fraction, plain.float()(x + 0.5))


def test_token_layers_keep_the_state_dict() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Conv1d(8, 8, 1), torch.nn.Conv1d(8, 8, 3)
    )
    before = {name: value.clone() for name, value in model.state_dict().items()}
    integer_token_layers(model)
    assert [type(m) for m in model] == [SpikeLinear, SpikeConv1d, SpikeConv1d]
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    x = torch.randint(0, 2, (2, 8, 5)).float()
    with torch.no_grad():  # a kernel-3 Conv1d stays the plain convolution
        assert torch.equal(
            model[2].eval()(x), torch.nn.functional.conv1d(x, model[2].weight, model[2].bias)
        )
