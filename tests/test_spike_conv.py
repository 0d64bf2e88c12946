"""statten.fast.spike_conv: spike-driven convolutions give the dense results up to the order of
their sums, in inference and in training, and choose their path by measured crossovers."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_c_compiler

import statten
from statten.config import model_config, parse_config
from statten.engine.losses import time_averaged
from statten.fast import native
from statten.fast.functions import use_fused_neurons
from statten.fast.kernels import lif_spikes
from statten.fast.spike_conv import DECLINED_CALLS_SKIPPED, SpikeConv2d, integer_token_layers
from statten.layers import conv_bn_lif, conv_bn_pool_lif, mlp_conv_bn_lif
from statten.neurons import LIF

SHAPES = [
    (3, (16, 32), 9, 0.1),
    (1, (48, 80), 5, 0.3),
    (3, (70, 128), 5, 0.2),  # spike bits in two words, the second partial; 8-vector tiles
    (1, (130, 48), 4, 0.3),
    (3, (3, 144), 1, 0.7),  # all taps but the centre fall in the padding
    (3, (5, 16), 2, 1.0),  # half of the taps fall in the padding
]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` contiguous, channels-last, or (``"transposed"``) neither: a view with H and W swapped
    in memory, which the kernels' callers copy."""
    if layout == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x.contiguous(memory_format=LAYOUTS[layout])


@needs_c_compiler
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize(("kernel", "channels", "size", "density"), SHAPES)
def test_spike_conv_adds_the_weights_of_the_spikes(
    kernel: int, channels: tuple[int, int], size: int, density: float, layout: str
) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(*channels, kernel, padding=kernel // 2)
    spike_conv = SpikeConv2d.from_conv(conv)
    spike_conv.max_density = 1.0  # not timed: forced
    x = _laid_out((torch.rand(3, channels[0], size, size) < density).float(), layout)
    calls = []
    with torch.inference_mode(), _counting_spike_convs(calls):
        expected = conv(x)
        out = spike_conv(x)
        dense = spike_conv(x * 0.5)  # not spikes: the dense convolution
    assert calls == [True, False]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)  # the order of the sums differs
    assert out.is_contiguous(memory_format=LAYOUTS.get(layout, torch.contiguous_format))
    assert torch.equal(dense, conv(x * 0.5))


@needs_c_compiler
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(("kernel", "channels", "size", "density"), SHAPES[:4])
def test_spike_conv_adds_a_spike_count_as_that_many_spikes(
    kernel: int, channels: tuple[int, int], size: int, density: float, layout: str
) -> None:
    """Residual connections add spike tensors: their counts are spikes too; other values are not."""
    torch.manual_seed(0)
    weight = torch.randn(channels[1], channels[0], kernel, kernel)
    taps, padding = weight.permute(2, 3, 1, 0).contiguous(), kernel // 2
    counts = torch.randint(1, 4, (3, channels[0], size, size)) * (
        torch.rand(3, channels[0], size, size) < density
    )
    x = _laid_out(counts.float(), layout)
    x[0, 0, 0, 0] = 255.0  # the largest count
    out = native.spike_conv2d(x, taps, None, padding, 1.0)
    assert out is not None
    torch.testing.assert_close(out, F.conv2d(x, weight, padding=padding), rtol=2e-5, atol=1e-4)
    grad_out = torch.randn_like(out)
    grad_taps = native.spike_conv2d_weight_grad(x, grad_out, (kernel, kernel), padding, 1.0)
    expected = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [padding] * 2, [1, 1], False, [0, 0], 1,
        [False, True, False],
    )[1]  # fmt: skip
    assert grad_taps is not None
    torch.testing.assert_close(grad_taps.permute(3, 2, 0, 1), expected, rtol=1e-5, atol=1e-3)
    for other in (256.0, -1.0, 0.5, float("nan"), float("inf")):
        y = x.clone()
        y[-1, -1, -1, -1] = other  # in the last block, which a sample does not read
        assert native.spike_conv2d(y, taps, None, padding, 1.0) is None, other


@needs_c_compiler
def test_spike_conv_runs_dense_when_too_dense_or_strided() -> None:
    torch.manual_seed(0)
    spike_conv = SpikeConv2d(16, 32, 3, padding=1, max_density=0.3)
    x = (torch.rand(2, 16, 6, 6) < 0.5).float()
    calls = []
    with torch.inference_mode(), _counting_spike_convs(calls):
        spike_conv(x)  # half of the inputs are ones: above max_density
        SpikeConv2d(16, 32, 3, stride=2, max_density=1.0)(x)  # strided: not handled in C
        SpikeConv2d(16, 24, 1, max_density=1.0)(x)  # 24 outputs: not a multiple of 16
    assert calls == [False]


@needs_c_compiler
def test_spike_conv_measures_its_crossover_on_its_first_spikes() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 64, 3, padding=1)
    spike_conv = SpikeConv2d.from_conv(conv)
    x = (torch.rand(4, 32, 8, 8) < 0.1).float()
    calls = []
    with torch.inference_mode(), _counting_spike_convs(calls):
        spike_conv(x * 0.5)  # not spikes: nothing to measure yet
        assert spike_conv.max_density is None
        first = spike_conv(x)
        crossover = spike_conv.max_density
        assert 0 < crossover <= 1 and calls == [False, True, True, True]  # warm-up, 2 timed
        second = spike_conv(x)
        spike_conv.max_density = 0.0  # forced dense: the C kernel is not even asked
        spike_conv(x)
    below = x.mean().item() <= crossover  # spike-driven again only below the crossover
    assert calls == [False, True, True, True, below]
    torch.testing.assert_close(first, conv(x), rtol=0, atol=1e-6)
    assert not below or torch.equal(first, second)


@needs_c_compiler
def test_spike_conv_skips_the_kernel_for_a_while_after_a_declined_input() -> None:
    torch.manual_seed(0)
    spike_conv = SpikeConv2d(16, 32, 3, padding=1, max_density=0.3)
    sparse, dense = ((torch.rand(2, 16, 6, 6) < p).float() for p in (0.1, 0.6))
    calls = []
    with torch.inference_mode(), _counting_spike_convs(calls):
        spike_conv(dense)  # declined: above max_density
        skipped = [spike_conv(sparse) for _ in range(DECLINED_CALLS_SKIPPED)]
        asked_again = spike_conv(sparse)
    assert calls == [False, True]
    expected = spike_conv.to_conv()(sparse)
    for out in (*skipped, asked_again):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@needs_c_compiler
@pytest.mark.parametrize(("kernel", "channels", "size", "density"), SHAPES)
def test_spike_conv_forms_the_lif_spikes_of_its_output_in_its_kernel(
    kernel: int, channels: tuple[int, int], size: int, density: float
) -> None:
    """Bit for bit the LIF kernels' spikes of the spike-driven output, over time-major images."""
    torch.manual_seed(0)
    spike_conv = SpikeConv2d(*channels, kernel, padding=kernel // 2, max_density=1.0)
    x = (torch.rand(4 * 2, channels[0], size, size) < density).float()
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = spike_conv(x)
        spikes = spike_conv.lif_spikes(x, 4, 0.5, 2.0)
        expected = lif_spikes(out.unflatten(0, (4, 2)), 0.5, 2.0).flatten(0, 1)
    assert spikes is not None and torch.equal(spikes, expected)
    assert spikes.is_contiguous(memory_format=torch.channels_last)


POOLS = [(3, 2, 1), (2, 2, 0), (3, 1, 1), (4, 3, 2)]


@needs_c_compiler
@pytest.mark.parametrize(("kernel", "channels", "size", "density"), SHAPES)
@pytest.mark.parametrize("pool", POOLS, ids=str)
@pytest.mark.parametrize("pool_first", [False, True])
def test_spike_conv_pools_the_lif_spikes_in_its_kernel(
    kernel: int,
    channels: tuple[int, int],
    size: int,
    density: float,
    pool: tuple[int, ...],
    pool_first: bool,
) -> None:
    """Bit for bit ``max_pool2d`` of the unpooled spikes (or, ``pool_first``, the LIF's spikes
    of the pooled output), whatever rows each thread takes (they span samples: 5 per step)."""
    torch.manual_seed(0)
    spike_conv = SpikeConv2d(*channels, kernel, padding=kernel // 2, max_density=1.0)
    x = (torch.rand(3 * 5, channels[0], size + 2, size + 3) < density).float()
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        pooled = spike_conv.lif_spikes(x, 3, 0.5, 2.0, torch.nn.MaxPool2d(*pool), pool_first)
        if pool_first:
            sums = F.max_pool2d(spike_conv(x), *pool)
            expected = lif_spikes(sums.unflatten(0, (3, 5)), 0.5, 2.0).flatten(0, 1)
        else:
            expected = F.max_pool2d(spike_conv.lif_spikes(x, 3, 0.5, 2.0), *pool)
    assert pooled is not None and torch.equal(pooled, expected)
    assert pooled.is_contiguous(memory_format=torch.channels_last)


@needs_c_compiler
def test_spike_conv_pools_its_sums_with_torchs_rule_for_nan() -> None:
    """A NaN in a window wins, as in ``max_pool2d``: the LIF after it never fires again."""
    torch.manual_seed(0)
    spike_conv = SpikeConv2d(16, 32, 3, padding=1, max_density=1.0)
    with torch.no_grad():
        spike_conv.weight[:4, 0, 1, 1] = float("nan")
    x = (torch.rand(2 * 3, 16, 8, 8) < 0.3).float().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        pooled = spike_conv.lif_spikes(x, 2, 0.5, 2.0, torch.nn.MaxPool2d(3, 2, 1), True)
        sums = F.max_pool2d(spike_conv(x), 3, 2, 1)
        expected = lif_spikes(sums.unflatten(0, (2, 3)), 0.5, 2.0).flatten(0, 1)
    assert sums.isnan().any() and pooled is not None and torch.equal(pooled, expected)


@needs_c_compiler
def test_spike_conv_leaves_pools_its_kernel_does_not_run_to_its_caller() -> None:
    torch.manual_seed(0)
    spike_conv = SpikeConv2d(16, 32, 3, padding=1, max_density=1.0)
    x = (torch.rand(4, 16, 9, 9) < 0.2).float().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for pool in (torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True), torch.nn.MaxPool2d((3, 2))):
            assert spike_conv.lif_spikes(x, 2, 1.0, 2.0, pool) is None
    assert spike_conv._dense_calls_left == 0  # not a declined input
    with pytest.raises(ValueError, match="max pooling"):
        native.spike_conv2d(x, spike_conv.weight.permute(2, 3, 1, 0).contiguous(), None, 1, 1.0,
                            (2, 1.0, 2.0), (2, 2, 2))  # fmt: skip


@needs_c_compiler
def test_spike_conv_leaves_the_lif_to_its_caller_off_its_spike_driven_path() -> None:
    torch.manual_seed(0)
    spike_conv = SpikeConv2d(16, 32, 3, padding=1)
    x = (torch.rand(4, 16, 6, 6) < 0.1).float().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert spike_conv.lif_spikes(x, 2, 1.0, 2.0) is None  # crossover not measured yet
        spike_conv.max_density = 0.3
        assert spike_conv.lif_spikes(x.contiguous(), 2, 1.0, 2.0) is None  # not channels-last
        assert spike_conv.lif_spikes((x + 1) / 2, 2, 1.0, 2.0) is None  # not spikes: declined
        assert spike_conv._dense_calls_left == DECLINED_CALLS_SKIPPED + 1
    assert spike_conv.lif_spikes(x, 2, 1.0, 2.0) is None  # under autograd


@needs_c_compiler
def test_fast_inference_conv_lif_layers_form_their_spikes_in_the_spike_conv() -> None:
    torch.manual_seed(0)
    conv = SpikeConv2d(16, 32, 3, padding=1, max_density=1.0)
    lif = LIF(0.5)
    use_fused_neurons(lif, True)
    x = (torch.rand(4, 2, 16, 6, 6) < 0.2).float()
    x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (4, 2))
    formed, real = [], conv.lif_spikes
    conv.lif_spikes = lambda *args: formed.append(real(*args)) or formed[-1]
    with torch.inference_mode():
        fused = conv_bn_lif(conv, torch.nn.Identity(), lif, x)
        handle = conv.register_forward_hook(lambda *args: None)  # a hook sees the conv output
        separate = conv_bn_lif(conv, torch.nn.Identity(), lif, x)
        handle.remove()
    assert len(formed) == 1 and formed[0] is not None  # the hooked call ran conv, then LIF
    assert torch.equal(fused, separate)


@needs_c_compiler
def test_fast_inference_pools_inside_the_spike_conv_unless_a_hook_sees_the_lif_spikes() -> None:
    torch.manual_seed(0)
    conv = SpikeConv2d(16, 32, 3, padding=1, max_density=1.0)
    lif, pool = LIF(0.5), torch.nn.MaxPool2d(3, 2, 1)
    use_fused_neurons(lif, True)
    x = (torch.rand(4, 2, 16, 8, 8) < 0.2).float()
    x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (4, 2))
    pools, real = [], conv.lif_spikes
    conv.lif_spikes = lambda *args: pools.append(args[4]) or real(*args)
    seen = []
    with torch.inference_mode():
        pooled_inside = conv_bn_lif(conv, torch.nn.Identity(), lif, x, pool=pool)
        handle = lif.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        pooled_after = conv_bn_lif(conv, torch.nn.Identity(), lif, x, pool=pool)
        handle.remove()
    assert pools == [pool, None]
    assert seen == [torch.Size((4, 2, 32, 8, 8))]  # a spike recorder sees the unpooled spikes
    assert torch.equal(pooled_inside, pooled_after)
    assert pooled_inside.shape == (4, 2, 32, 4, 4)


@needs_c_compiler
def test_fast_inference_pools_before_the_lif_inside_the_spike_conv_unless_hooked() -> None:
    """QKFormer's pooled units: ``lif(pool(bn(conv(x))))``, as the unfused layers compute it."""
    torch.manual_seed(0)
    conv = SpikeConv2d(16, 32, 3, padding=1, max_density=1.0)
    lif, pool = LIF(0.5), torch.nn.MaxPool2d(3, 2, 1)
    x = (torch.rand(4, 2, 16, 8, 8) < 0.2).float()
    x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (4, 2))
    with torch.inference_mode():
        unfused = conv_bn_pool_lif(conv, torch.nn.Identity(), pool, lif, x)
    use_fused_neurons(lif, True)
    formed, real = [], conv.lif_spikes
    conv.lif_spikes = lambda *args: formed.append(real(*args)) or formed[-1]
    with torch.inference_mode():
        fused = conv_bn_pool_lif(conv, torch.nn.Identity(), pool, lif, x)
        handle = pool.register_forward_hook(lambda *args: None)  # a hook sees the pooled sums
        hooked = conv_bn_pool_lif(conv, torch.nn.Identity(), pool, lif, x)
        handle.remove()
    assert len(formed) == 1 and formed[0] is not None
    assert fused.shape == (4, 2, 32, 4, 4)
    assert torch.equal(fused, unfused) and torch.equal(hooked, unfused)


MLP_SHAPES = [(40, 400, 96), (70, 128, 48), (16, 64, 16)]


def _mlp(widths: tuple[int, int, int]) -> tuple[SpikeConv2d, SpikeConv2d]:
    """Two pointwise spike convolutions forced spike-driven, weights large enough to fire."""
    first = SpikeConv2d(widths[0], widths[1], 1, max_density=1.0)
    second = SpikeConv2d(widths[1], widths[2], 1, max_density=1.0)
    with torch.no_grad():
        first.weight.mul_(4)
        second.weight.mul_(6)
    return first, second


@needs_c_compiler
@pytest.mark.parametrize("widths", MLP_SHAPES, ids=str)
def test_spike_mlp_forms_both_layers_spikes_in_one_kernel(widths: tuple[int, int, int]) -> None:
    """Bit for bit the two spike-driven layers and their LIFs, the hidden spikes never written;
    counts in, other values declined."""
    torch.manual_seed(0)
    first, second = _mlp(widths)
    first.max_density_mlp = 1.0
    counts = torch.randint(1, 3, (3 * 5, widths[0], 6, 7)) * (torch.rand(15, widths[0], 6, 7) < 0.3)
    x = counts.float().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        hidden = first.lif_spikes(x, 3, 0.3, 2.0)
        expected = second.lif_spikes(hidden, 3, 0.7, 2.0)
        spikes = first.mlp_spikes(second, x, 3, (0.3, 0.7), 2.0, lambda: expected)
        declined = first.mlp_spikes(second, x * 0.5, 3, (0.3, 0.7), 2.0, lambda: expected)
    assert 0.05 < hidden.mean() < 0.95 and 0.05 < expected.mean() < 0.95
    assert spikes is not None and torch.equal(spikes, expected)
    assert declined is None


@needs_c_compiler
def test_spike_mlp_measures_its_crossover_once_both_layers_have_theirs() -> None:
    torch.manual_seed(0)
    first, second = _mlp((32, 64, 32))
    x = (torch.rand(6, 32, 5, 5) < 0.2).float().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        second.max_density = None
        assert first.mlp_spikes(second, x, 2, (1.0, 1.0), 2.0, lambda: x) is None
        second.max_density = 1.0
        unfused = first.lif_spikes(x, 2, 1.0, 2.0)
        assert first.mlp_spikes(second, x.contiguous(), 2, (1.0, 1.0), 2.0, lambda: x) is None
        timed = first.mlp_spikes(second, x, 2, (1.0, 1.0), 2.0, lambda: unfused)
    assert timed is not None and first.max_density_mlp is not None
    assert first.mlp_spikes(second, x, 2, (1.0, 1.0), 2.0, lambda: x) is None  # under autograd


@needs_c_compiler
def test_fast_inference_runs_an_mlp_as_one_kernel_unless_a_hook_sees_its_hidden_spikes() -> None:
    torch.manual_seed(0)
    convs = _mlp((32, 64, 32))
    layers = [(conv, torch.nn.Identity(), LIF(0.5)) for conv in convs]
    for _, _, lif in layers:
        use_fused_neurons(lif, True)
    convs[0].max_density_mlp = 1.0
    x = (torch.rand(4, 2, 32, 6, 6) < 0.2).float()
    x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (4, 2))
    calls = []
    with torch.inference_mode(), _counting_kernels(calls):
        fused = mlp_conv_bn_lif(*layers, x)
        seen = []
        handle = layers[0][2].register_forward_hook(lambda *args: seen.append(args[2]))
        unfused = mlp_conv_bn_lif(*layers, x)
        handle.remove()
    assert calls[0] == "spike_mlp" and "spike_mlp" not in calls[1:]
    assert len(seen) == 1 and seen[0].shape == (4, 2, 64, 6, 6)
    assert torch.equal(fused, unfused)


@needs_c_compiler
@pytest.mark.parametrize("token_major", [False, True])
def test_pointwise_conv1d_adds_the_weights_of_its_spikes_outside_autograd(
    token_major: bool,
) -> None:
    torch.manual_seed(0)
    holder = torch.nn.Sequential(torch.nn.Conv1d(70, 48, 1))
    plain = copy.deepcopy(holder[0])
    layer = integer_token_layers(holder)[0].eval()
    layer.integer_products = False  # the dense product: float32, as the plain layer's
    x = (torch.rand(6, 70, 20) < 0.1).float()
    if token_major:  # channels innermost in memory, as a channels-last model leaves them
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    calls = []
    with torch.no_grad(), _counting_spike_convs(calls):
        measured = layer(x)  # on its first spikes: warm-up, 2 timed calls
        layer.max_density = 1.0
        forced = layer(x)
        counts = layer(x * 3)  # spike counts: three spikes each
        halves = layer(x * 0.5)  # not spikes: declined
    assert calls == [True, True, True, True, True, False]
    for out, spikes in ((measured, x), (forced, x), (counts, x * 3)):
        torch.testing.assert_close(out, plain(spikes), rtol=0, atol=1e-5)
        assert out.stride(1) == (1 if token_major else 20)  # laid out as its input
    assert torch.equal(halves, plain(x * 0.5))
    layer._dense_calls_left = 0
    with torch.enable_grad(), _counting_spike_convs(calls):
        layer(x)  # under autograd: the plain layer
    assert len(calls) == 6


@contextlib.contextmanager
def _counting_spike_convs(calls: list[bool]) -> Iterator[None]:
    """Record, for each call of the C spike convolution, whether it ran (True) or declined."""
    real = native.spike_conv2d

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor | None:
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    native.spike_conv2d = counting
    try:
        yield
    finally:
        native.spike_conv2d = real


@needs_c_compiler
@pytest.mark.parametrize(
    "layouts", [("contiguous", "contiguous"), ("channels_last", "contiguous"),
                ("contiguous", "channels_last"), ("transposed", "channels_last")],
)  # fmt: skip
@pytest.mark.parametrize(("kernel", "channels", "size", "density"), SHAPES)
def test_spike_conv_weight_grad_adds_the_output_gradients_at_the_spikes(
    kernel: int, channels: tuple[int, int], size: int, density: float, layouts: tuple[str, str]
) -> None:
    torch.manual_seed(0)
    x = (torch.rand(3, channels[0], size, size) < density).float()
    grad_out = torch.randn(3, channels[1], size, size)
    weight = torch.randn(channels[1], channels[0], kernel, kernel)
    expected = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [kernel // 2] * 2, [1, 1], False, [0, 0], 1,
        [False, True, False],
    )[1]  # fmt: skip
    taps = native.spike_conv2d_weight_grad(
        _laid_out(x, layouts[0]),
        _laid_out(grad_out, layouts[1]),
        (kernel, kernel),
        kernel // 2,
        1.0,
    )
    torch.testing.assert_close(taps.permute(3, 2, 0, 1), expected, rtol=0, atol=1e-5)
    assert native.spike_conv2d_weight_grad(x * 0.5, grad_out, (kernel, kernel), 0, 1.0) is None


def _forced(conv: torch.nn.Conv2d, density: float) -> SpikeConv2d:
    spike_conv = SpikeConv2d.from_conv(conv)
    spike_conv.max_density = spike_conv.max_density_weight_grad = density
    return spike_conv


@needs_c_compiler
@pytest.mark.parametrize("kernel", [1, 3])
def test_spike_conv_trains_like_the_dense_layer(kernel: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 32, kernel, padding=kernel // 2)
    x = (torch.rand(4, 24, 7, 7) < 0.2).float().requires_grad_()
    grad_out = torch.randn(4, 32, 7, 7)
    expected = torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), grad_out)
    calls: list[str] = []
    with _counting_kernels(calls):
        spike_driven = torch.autograd.grad(
            _forced(conv, 1.0)(x), (x, conv.weight, conv.bias), grad_out
        )
        dense = torch.autograd.grad(_forced(conv, 0.0)(x), (x, conv.weight, conv.bias), grad_out)
    assert calls == ["output", "weight_grad"]  # forced dense: the C kernels are not asked
    for got, want in zip(spike_driven, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for got, want in zip(dense, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@needs_c_compiler
def test_spike_conv_measures_the_weight_gradient_crossover_in_its_first_backward() -> None:
    torch.manual_seed(0)
    spike_conv = SpikeConv2d(32, 64, 3, padding=1)
    x = (torch.rand(4, 32, 8, 8) < 0.1).float()
    assert spike_conv.max_density_weight_grad is None
    spike_conv(x * 0.5).sum().backward()  # not spikes: nothing measured
    assert spike_conv.max_density is None and spike_conv.max_density_weight_grad is None
    spike_conv(x).sum().backward()
    assert 0 < spike_conv.max_density <= 1 and 0 < spike_conv.max_density_weight_grad <= 1


@contextlib.contextmanager
def _counting_kernels(calls: list[str]) -> Iterator[None]:
    """Record which spike-driven C kernel ran (``"output"``, ``"weight_grad"``, ``"spike_mlp"``),
    each time."""
    real = native.spike_conv2d, native.spike_conv2d_weight_grad, native.spike_mlp

    def counting(name: str, kernel: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> torch.Tensor | None:
            out = kernel(*args, **kwargs)
            if out is not None:
                calls.append(name)
            return out

        return run

    native.spike_conv2d = counting("output", real[0])
    native.spike_conv2d_weight_grad = counting("weight_grad", real[1])
    native.spike_mlp = counting("spike_mlp", real[2])
    try:
        yield
    finally:
        native.spike_conv2d, native.spike_conv2d_weight_grad, native.spike_mlp = real


TINY_SDT = {"img_size": 16, "embed_dims": 64, "num_heads": 4, "depths": 1, "num_classes": 5, "T": 2}


def test_spike_driven_switch_replaces_the_convolutions_and_keeps_the_parameters() -> None:
    model = statten.create_model("sdt", **TINY_SDT, spike_driven=True)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert model.spike_driven and all(type(m) is SpikeConv2d for m in convs)
    parameters = dict(model.named_parameters())
    model.spike_driven = False
    assert not model.spike_driven
    assert all(
        type(m) is torch.nn.Conv2d for m in model.modules() if isinstance(m, torch.nn.Conv2d)
    )
    assert all(parameters[name] is p for name, p in model.named_parameters())
    assert not statten.create_model("sdt", **TINY_SDT).spike_driven


def _exact_and_forced_spike_driven(family: str, config: dict) -> tuple[torch.nn.Module, ...]:
    """Two training-mode models with the same weights: exact, and spike-driven with every
    spike-fed convolution forced onto the spike-driven products."""
    torch.manual_seed(0)
    exact = statten.create_model(family, **config).train()
    spike_driven = statten.create_model(family, **config, spike_driven=True).train()
    spike_driven.load_state_dict(exact.state_dict())
    for module in spike_driven.modules():
        if isinstance(module, SpikeConv2d):
            module.max_density = module.max_density_weight_grad = 1.0
    return exact, spike_driven


def _assert_gradients_close(exact: torch.nn.Module, spike_driven: torch.nn.Module) -> None:
    """Every parameter's gradient within 1e-3 of the exact one (relative, in norm), floored at 1 %
    of the largest gradient for the biases in front of a training BatchNorm (true gradient 0);
    float64 norms: an untrained SDT v2's largest gradients overflow a float32 sum of squares."""
    gradients = dict(spike_driven.named_parameters())
    want = {name: p.grad.double() for name, p in exact.named_parameters()}
    floor = max(g.norm() for g in want.values()) * 1e-2
    errors = {
        name: ((gradients[name].grad.double() - g).norm() / g.norm().clamp_min(floor)).item()
        for name, g in want.items()
    }
    assert max(errors.values()) < 1e-3, sorted(errors.items(), key=lambda item: -item[1])[:3]


@needs_c_compiler
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_spike_driven_training_step_stays_close_to_the_exact_one(memory_efficient: bool) -> None:
    """Every spike-fed convolution forced spike-driven: gradients within the documented bound."""
    config = {**TINY_SDT, "memory_efficient": memory_efficient}
    exact, spike_driven = _exact_and_forced_spike_driven("sdt", config)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2
    calls: list[str] = []
    exact(x).sum().backward()
    with _counting_kernels(calls):
        spike_driven(x).sum().backward()
    spike_fed = (
        sum(isinstance(m, SpikeConv2d) for m in spike_driven.modules()) - 1
    )  # not the image's
    assert calls.count("weight_grad") == spike_fed and calls.count("output") >= spike_fed
    _assert_gradients_close(exact, spike_driven)


@needs_c_compiler
def test_large_inputs_far_above_the_limit_are_declined_from_a_sample() -> None:
    torch.manual_seed(0)
    weight = torch.randn(3, 3, 8, 16)
    x = (torch.rand(16, 8, 32, 32) < 0.5).float()  # 16,384 positions: sampled first
    assert native.spike_conv2d(x, weight, None, 1, 0.1) is None
    out = native.spike_conv2d(x, weight, None, 1, 0.6)
    expected = torch.nn.functional.conv2d(x, weight.permute(3, 2, 0, 1), padding=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    x[0, 0, 0, 0] = 0.5  # in the first sampled block
    assert native.spike_conv2d(x, weight, None, 1, 1.0) is None
    x[0, 0, 0, 0], x[0, 0, 31, 31] = 1.0, 0.5  # outside the sample: found by the full count
    assert native.spike_conv2d(x, weight, None, 1, 1.0) is None


@needs_c_compiler
@pytest.mark.parametrize("family", statten.list_models())
def test_every_family_trains_spike_driven_close_to_the_exact_path(family: str) -> None:
    """The digits recipe's model of each family, every spike-fed convolution forced spike-driven."""
    layers = ["--layer", "3"] if family == "qkformer" else []  # its smallest with an SSA stage
    config = model_config(parse_config(["--model", family, *layers], "train"))
    exact, spike_driven = _exact_and_forced_spike_driven(family, config)
    x, target = exact.example_input(8), torch.randint(0, 10, (8,))
    calls: list[str] = []
    with _counting_kernels(calls):
        for model in (exact, spike_driven):

            def criterion(logits: torch.Tensor, labels: torch.Tensor, m=model) -> torch.Tensor:
                return F.cross_entropy(time_averaged(logits, m.per_step_logits), labels)

            model.loss(model(x), target, criterion).backward()
    assert "output" in calls and "weight_grad" in calls
    _assert_gradients_close(exact, spike_driven)
