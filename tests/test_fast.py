"""statten.fast: every fast path gives the plain model's results, forward and gradients."""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import DEFAULT_THREAD_WORK, golden_model_config, needs_c_compiler

import statten
from statten import bench
from statten.config import parse_config
from statten.fast import (
    fold_batchnorm,
    host_memory,
    native,
    optimize_for_inference,
    optimize_for_training,
    use_compiled_kernels,
    use_heap_release,
    use_native_kernels,
)
from statten.fast.functions import record_saved_tensors
from statten.fast.inference import InferenceMaxPool2d
from statten.fast.kernels import (
    batch_norm_lif_input_grad,
    batch_norm_lif_spikes,
    lif_input_grad,
    lif_spikes,
    max_pool_with_argmax,
    max_unpool,
)
from statten.fast.storage import _Packed, _SpikeStore, _unpack
from statten.models.base import SpikingModel
from statten.neurons import LIF, is_neuron

TINY = {"img_size": 16, "embed_dims": 64, "num_heads": 4, "depths": 2, "num_classes": 5, "T": 4}
DVS = {"in_channels": 2, "dvs_mode": True}
CASES = {
    "statten": {},
    "sdt": {"attention_mode": "SDT"},
    "plif": {"spike_mode": "plif"},
    "chunk_T": {"chunk_size": 4},
    "dvs_tet": {**DVS, "TET": True},
    "dvs_sdt": {**DVS, "attention_mode": "SDT"},
    "inner_shortcut": {"mlp_ratio": 1.0},
}


def _model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return statten.create_model("sdt", **{**TINY, "memory_efficient": False, **overrides})


def _inputs(model: torch.nn.Module, batch: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    size = model.img_size
    if model.event_input:
        return torch.rand(batch, model.T, 2, size, size, generator=generator).mul(4).floor()
    return torch.randn(batch, model.in_channels, size, size, generator=generator) * 2


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return out, {name: p.grad for name, p in model.named_parameters()}


def _assert_identical(plain: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor) -> None:
    out, grads = _run(plain, x)
    fast_out, fast_grads = _run(fast, x)
    assert torch.equal(out, fast_out)
    for name, grad in grads.items():
        assert torch.equal(grad, fast_grads[name]), name
    for (name, value), fast_value in zip(
        plain.state_dict().items(), fast.state_dict().values(), strict=True
    ):
        assert torch.equal(value, fast_value), name  # running statistics, num_batches_tracked


@pytest.mark.parametrize("case", sorted(CASES))
def test_memory_efficient_training_is_bit_identical(case: str) -> None:
    plain = _model(**CASES[case]).train()
    fast = copy.deepcopy(plain)
    fast.memory_efficient = True
    _assert_identical(plain, fast, _inputs(plain))


def test_memory_efficient_backward_twice_with_retain_graph() -> None:
    plain = _model().train()
    fast = copy.deepcopy(plain)
    fast.memory_efficient = True
    x = _inputs(plain)
    for model in (plain, fast):
        out = model(x)
        out.sum().backward(retain_graph=True)
        out.sum().backward()  # the fused layers recompute what the first backward dropped
    for (name, p), fast_p in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert torch.equal(p.grad, fast_p.grad), name


def test_lif_takes_the_conv_and_batchnorm_in_front_of_it() -> None:
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
    x = torch.randn(4, 2, 3, 6, 6)
    expected = LIF()(bn(conv(x.flatten(0, 1))).unflatten(0, (4, 2)))
    fused = LIF()
    fused.fused = True
    for lif in (LIF(), fused):
        assert torch.equal(lif(x, conv_bn=(conv, bn)), expected)


@needs_c_compiler
@pytest.mark.parametrize("channels_last", [False, True])
def test_lif_spikes_may_overwrite_their_input(channels_last: bool) -> None:
    x = torch.randn(4, 3, 8, 5, 5) * 2
    x = _channels_last(x) if channels_last else x
    expected = lif_spikes(x, 1.0, 2.0)
    spikes = lif_spikes(x, 1.0, 2.0, overwrite_input=True)
    assert torch.equal(spikes, expected) and spikes.data_ptr() == x.data_ptr()
    assert spikes.stride() == x.stride() and torch.equal(x, expected)


class _RecordingConv(torch.nn.Conv2d):
    """A convolution that remembers where its last output lies (without a hook)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        self.output_at = out.data_ptr()
        return out


@needs_c_compiler
def test_inference_lif_writes_its_spikes_over_the_conv_output_nobody_else_holds() -> None:
    torch.manual_seed(0)
    conv = _RecordingConv(3, 8, 3, padding=1)
    x = torch.randn(4, 2, 3, 6, 6)
    expected = LIF()(conv(x.flatten(0, 1)).unflatten(0, (4, 2)))
    lif = LIF()
    lif.fused = True
    with torch.no_grad():
        spikes = lif(x, conv_bn=(conv, torch.nn.Identity()))
        assert torch.equal(spikes, expected) and spikes.data_ptr() == conv.output_at
        kept = []
        conv.register_forward_hook(lambda module, args, out: kept.append(out))
        hooked = lif(x, conv_bn=(conv, torch.nn.Identity()))
    assert torch.equal(hooked, expected) and hooked.data_ptr() != conv.output_at
    assert torch.equal(kept[0], conv(x.flatten(0, 1)))  # what the hook kept is left alone


def test_memory_efficient_flag_is_a_model_option() -> None:
    model = _model(memory_efficient=True)
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert model.memory_efficient and lifs and all(m.fused for m in lifs)
    model.memory_efficient = False
    assert not any(m.fused for m in lifs)


def test_memory_efficient_forward_hands_free_heap_memory_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once per training forward pass, before backward: not in eval, without grad, or plain."""
    calls = []
    monkeypatch.setattr("statten.models.base.release_free_memory", lambda: calls.append(1))
    model = _model(memory_efficient=True).train()
    x = _inputs(model)
    model(x).sum().backward()
    assert len(calls) == 1
    with torch.no_grad():
        model(x)
    model.memory_efficient = False
    model(x)
    assert len(calls) == 1


def test_release_free_memory_runs_here_and_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert host_memory._malloc_trim() is not None  # this machine's C library is glibc
    host_memory.release_free_memory()
    calls = []
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: calls.append)
    host_memory.release_free_memory()
    use_heap_release(False)
    try:
        host_memory.release_free_memory()
    finally:
        use_heap_release(True)
    assert calls == [0]


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages a forward pass keeps for backward."""
    storages: dict[int, int] = {}

    def record(tensor: torch.Tensor, owner: str | None) -> None:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    record_saved_tensors(lambda: model(x), record)
    return sum(storages.values())


def test_memory_efficient_training_stores_under_40_percent() -> None:
    plain = _model(img_size=32).train()
    fast = copy.deepcopy(plain)
    fast.memory_efficient = True
    x = _inputs(plain, batch=8)
    params = sum(p.numel() * p.element_size() for p in plain.parameters())
    plain_bytes = _saved_bytes(plain, x) - params
    fast_bytes = _saved_bytes(fast, x) - params
    assert fast_bytes < 0.4 * plain_bytes, (fast_bytes, plain_bytes)  # ~0.33 here, 0.24 for 2-512


KERNELS = {"eager": (False, False), "native": (True, False), "compiled": (False, True)}


@contextlib.contextmanager
def _kernels(kind: str) -> Iterator[None]:
    """Run the LIF kernels as ``kind``: torch operations, the C loops, or torch.compile."""
    use_native, use_compiled = KERNELS[kind]
    use_native_kernels(use_native)
    use_compiled_kernels(use_compiled)
    try:
        yield
    finally:
        use_native_kernels(True)
        use_compiled_kernels(False)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """The layout of a channels-last conv output unflattened to ``[T, B, ...]``."""
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, x.shape[:2])


@pytest.mark.parametrize("kind", ["eager", pytest.param("native", marks=needs_c_compiler)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("v_threshold", [1.0, 0.5])
def test_lif_kernels_equal_spikingjelly(v_threshold: float, channels_last: bool, kind: str) -> None:
    x = torch.randn(4, 3, 8, 5, 5) * 2
    x = (_channels_last(x) if channels_last else x).requires_grad_()
    spikes = LIF(v_threshold)(x)
    grad = torch.randn_like(spikes)
    spikes.backward(grad)
    with _kernels(kind):
        fast_spikes = lif_spikes(x.detach(), v_threshold, 2.0)
        fast_grad = lif_input_grad(grad, x.detach(), v_threshold, 2.0, 4.0)
    assert torch.equal(fast_spikes, spikes)
    assert fast_spikes.stride() == x.stride()
    assert torch.equal(fast_grad, x.grad)


def _kernel_outputs(x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    for v_threshold in (1.0, 0.5):
        outputs += [lif_spikes(x, v_threshold, 2.0), lif_input_grad(grad, x, v_threshold, 2.0, 4.0)]
        in_place = x.clone()
        outputs.append(lif_input_grad(grad, in_place, v_threshold, 2.0, 4.0, True))
    return outputs


# The C kernels leave the sigmoid to torch, row by row as the eager kernels do: equal bits for
# any size. torch.compile's kernels take a scalar exp for the elements past the last full vector,
# where torch takes a vectorised one: equal bits when a step has a multiple of 32 elements.
@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        pytest.param("native", (4, 3, 37, 7, 9), marks=needs_c_compiler),
        ("compiled", (4, 2, 16, 7, 7)),
    ],
)
def test_fused_kernels_equal_eager_kernels(kind: str, shape: tuple[int, ...]) -> None:
    x = _channels_last(torch.randn(shape) * 2)
    grad = torch.randn_like(x)
    with _kernels("eager"):
        expected = _kernel_outputs(x, grad)
    with _kernels(kind):
        fused = _kernel_outputs(x, grad)
    for eager, fast in zip(expected, fused, strict=True):
        assert torch.equal(eager, fast)
        assert eager.stride() == fast.stride()


# A fused conv -> BatchNorm -> LIF layer's backward forms BatchNorm's output inside the LIF
# kernels instead of recomputing it: the same bits as torch's kernel, in both layouts, for
# channel and plane sizes that leave partial vectors.
@needs_c_compiler
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(2, 3, 37, 7, 9), (4, 2, 24, 4, 4)])
def test_lif_gradient_through_batch_norm_equals_recomputed(
    size: tuple[int, ...], channels_last: bool
) -> None:
    generator = torch.Generator().manual_seed(0)
    steps, channels = size[:2], size[2]
    conv_out = torch.randn(steps[0] * steps[1], *size[2:], generator=generator).mul_(3)
    conv_out = conv_out.contiguous(memory_format=torch.channels_last) if channels_last else conv_out
    weight, bias = torch.randn(2, channels, generator=generator)
    grad = torch.randn(size, generator=generator)
    y, mean, invstd = torch.ops.aten.native_batch_norm(
        conv_out, weight, bias, None, None, True, 0.1, 1e-5
    )
    expected = lif_input_grad(grad, y.unflatten(0, steps), 0.5, 2.0, 4.0)
    fused = batch_norm_lif_input_grad(grad, conv_out, (mean, invstd), weight, bias, 0.5, 2.0, 4.0)
    assert fused is not None, "torch's BatchNorm rounds unlike the C kernels on this build"
    assert torch.equal(fused, expected)
    assert fused.stride() == expected.stride()


# ... and its forward collects BatchNorm's statistics in torch's order of additions and feeds
# the LIF BatchNorm's output element by element: same spikes, statistics and running statistics.
@needs_c_compiler
@pytest.mark.parametrize("size", [(2, 3, 37, 7, 9), (4, 2, 24, 4, 4), (1, 2, 5, 1, 1)])
def test_lif_spikes_through_batch_norm_equal_torch(size: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    steps, channels = size[:2], size[2]
    conv_out = torch.randn(steps[0] * steps[1], *size[2:], generator=generator).mul_(3).add_(1)
    expected, fused = (torch.nn.BatchNorm2d(channels, momentum=0.2) for _ in range(2))
    with torch.no_grad():
        expected.weight.normal_(generator=generator)
        expected.running_mean.normal_(generator=generator)
    fused.load_state_dict(expected.state_dict())
    y = expected(conv_out)
    result = batch_norm_lif_spikes(conv_out, steps, fused, fused.weight, fused.bias, 0.5, 2.0)
    assert result is not None, "torch's BatchNorm rounds unlike the C kernels on this build"
    spikes, mean, invstd = result
    assert torch.equal(spikes, lif_spikes(y.unflatten(0, steps), 0.5, 2.0))
    stats = torch.ops.aten.native_batch_norm(conv_out, None, None, None, None, True, 0.0, 1e-5)
    assert torch.equal(mean, stats[1])
    assert torch.equal(invstd, stats[2])
    assert torch.equal(fused.running_mean, expected.running_mean)
    assert torch.equal(fused.running_var, expected.running_var)


def test_lif_spikes_through_batch_norm_decline_channels_last() -> None:
    conv_out = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(3)
    assert batch_norm_lif_spikes(conv_out, (2, 2), bn, bn.weight, bn.bias, 1.0, 2.0) is None


def test_lif_gradient_through_batch_norm_declines_other_layouts() -> None:
    conv_out = torch.randn(4, 3, 6, 6).transpose(2, 3)  # neither contiguous nor channels-last
    stats = torch.zeros(3), torch.ones(3)
    grad = torch.randn(2, 2, 3, 6, 6)
    assert batch_norm_lif_input_grad(grad, conv_out, stats, *stats, 1.0, 2.0, 4.0) is None


# (kernel size, stride, padding) of the pooling tests: the families' 3x3/2/1, others, asymmetric
POOL_WINDOWS = [(3, 2, 1), (2, 2, 0), (3, 1, 1), ((3, 2), (2, 1), (1, 0))]


def _pool_input(kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if kind == "spikes":  # ties everywhere: the first maximum of each window must win
        return (torch.rand(shape, generator=generator) < 0.3).float()
    x = torch.randn(shape, generator=generator).round_()  # ties, plus NaN and -inf
    x.view(-1)[torch.randperm(x.numel(), generator=generator)[:40]] = float("nan")
    x.view(-1)[torch.randperm(x.numel(), generator=generator)[:40]] = float("-inf")
    x[0, 0] = float("-inf")  # windows of -inf only
    return x


@needs_c_compiler
@pytest.mark.parametrize("kind", ["spikes", "values"])
@pytest.mark.parametrize(("kernel_size", "stride", "padding"), POOL_WINDOWS)
@pytest.mark.parametrize("shape", [(3, 5, 9, 11), (3, 5, 8, 10), (4, 130, 8, 10)])
def test_max_pool_kernels_equal_torch(
    kind: str,
    kernel_size: int | tuple,
    stride: int | tuple,
    padding: int | tuple,
    shape: tuple[int, ...],
) -> None:
    x = _pool_input(kind, shape)
    pool = torch.nn.MaxPool2d(kernel_size, stride, padding)
    expected, indices = torch.nn.functional.max_pool2d_with_indices(x, kernel_size, stride, padding)
    out, argmax = max_pool_with_argmax(x, pool)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert argmax.dtype == torch.int32 and torch.equal(argmax.long(), indices)
    grad = torch.randn(expected.shape)  # overlapping windows add into one input
    expected_grad = (
        torch.zeros_like(x)
        .view(*shape[:2], -1)
        .scatter_add_(2, indices.flatten(2), grad.flatten(2))
    )
    assert torch.equal(max_unpool(grad, argmax, x.shape, x.stride()), expected_grad.view_as(x))


@needs_c_compiler
@pytest.mark.parametrize("kind", ["spikes", "values"])
@pytest.mark.parametrize(("kernel_size", "stride", "padding"), POOL_WINDOWS)
@pytest.mark.parametrize("shape", [(3, 5, 9, 11), (4, 130, 8, 10)])
def test_inference_max_pool_equals_torch_on_channels_last_inputs(
    kind: str,
    kernel_size: int | tuple,
    stride: int | tuple,
    padding: int | tuple,
    shape: tuple[int, ...],
) -> None:
    x = _pool_input(kind, shape)
    x.view(-1)[::7] = -0.0  # signed zeros tie with 0: the first one stays, as in torch
    x = x.contiguous(memory_format=torch.channels_last)
    pool = InferenceMaxPool2d(kernel_size, stride, padding)
    calls = []
    real = native.max_pool2d_channels_last
    native.max_pool2d_channels_last = lambda *args: calls.append(1) or real(*args)
    try:
        with torch.no_grad():
            out = pool(x)
            plain = pool(x.contiguous())  # not channels-last: torch's kernel
    finally:
        native.max_pool2d_channels_last = real
    expected = torch.nn.functional.max_pool2d(x, kernel_size, stride, padding)
    assert len(calls) == 1 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.isnan(), expected.isnan())
    bits = [t.nan_to_num().contiguous().view(torch.int32) for t in (out, expected, plain)]
    assert torch.equal(bits[0], bits[1]) and torch.equal(bits[2], bits[1])


def test_optimize_for_inference_pools_in_c_and_leaves_the_model_alone() -> None:
    model = SpikingModel()
    model.pool = torch.nn.MaxPool2d(3, 2, 1)
    fast = optimize_for_inference(model, compile_kernels=False)
    assert type(model.pool) is torch.nn.MaxPool2d and type(fast.pool) is InferenceMaxPool2d
    assert (fast.pool.kernel_size, fast.pool.stride, fast.pool.padding) == (3, 2, 1)


def test_optimize_for_inference_makes_the_attention_spike_driven() -> None:
    model = SpikingModel()
    model.statten = statten.SpatioTemporalAttention(2)
    fast = optimize_for_inference(model, compile_kernels=False)
    assert fast.statten.spike_driven_inference and not model.statten.spike_driven_inference
    exact = optimize_for_inference(model, compile_kernels=False, spike_driven=False)
    assert not exact.statten.spike_driven_inference


@needs_c_compiler
def test_native_kernels_write_in_place_only_when_allowed() -> None:
    x = torch.randn(4, 1000) * 2
    kept, overwritten = x.clone(), x.clone()
    grad = torch.randn_like(x)
    lif_input_grad(grad, kept, 1.0, 2.0, 4.0)
    assert torch.equal(kept, x)
    result = lif_input_grad(grad, overwritten, 1.0, 2.0, 4.0, True)
    assert result.data_ptr() == overwritten.data_ptr()


@needs_c_compiler
def test_small_kernel_calls_run_on_one_thread_with_the_same_results() -> None:
    """Below their work per thread, calls run on the calling thread alone: same results."""
    torch.manual_seed(0)
    x = torch.randn(4, 2, 64, 5, 5) * 2
    spikes = (torch.rand(8, 48, 6, 6) < 0.2).float().contiguous(memory_format=torch.channels_last)
    taps = torch.randn(3, 3, 48, 32)

    def results() -> list[torch.Tensor]:
        pooled = native.spike_conv2d(spikes, taps, None, 1, 1.0, (4, 1.0, 2.0), (3, 2, 1))
        return [lif_spikes(x, 1.0, 2.0), native.spike_conv2d(spikes, taps, None, 1, 1.0), pooled]

    split = results()  # the tests' setting (conftest): every call split over the threads
    native.set_thread_work(DEFAULT_THREAD_WORK)
    try:
        alone = results()
    finally:
        native.set_thread_work(1)
    assert all(torch.equal(a, b) for a, b in zip(split, alone, strict=True))


def test_without_a_c_compiler_the_kernels_fall_back_to_torch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("STATTEN_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="C kernels could not be built"):
            assert native.library() is None
        x = torch.randn(4, 2, 8, 3, 3) * 2
        with _kernels("eager"):
            expected = lif_spikes(x, 1.0, 2.0)
        assert torch.equal(lif_spikes(x, 1.0, 2.0), expected)
    finally:
        native.library.cache_clear()


@needs_c_compiler
@pytest.mark.parametrize("shared", ["folder", "library"])
def test_a_kernel_cache_others_can_write_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shared: str
) -> None:
    """Loading a library another user could have replaced would run their code."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("STATTEN_CACHE", str(cache))
    native.library.cache_clear()
    try:
        assert native.library() is not None  # a private cache: built and loaded
        library = next(cache.glob("kernels-*.so"))
        assert library.stat().st_mode & 0o022 == 0 and cache.stat().st_mode & 0o077 == 0
        (cache if shared == "folder" else library).chmod(0o777)
        native.library.cache_clear()
        with pytest.warns(RuntimeWarning, match="not private to this user"):
            assert native.library() is None
    finally:
        native.library.cache_clear()


def test_spike_storage_packs_each_spike_tensor_once_as_uint8() -> None:
    store = _SpikeStore()
    spikes = (torch.randn(4, 6, 5) > 0).float()
    store.mark(spikes.view(24, 5))
    views = [spikes.transpose(1, 2), spikes[1:3], spikes.flatten(0, 1)]
    packed = [store.pack(view) for view in views]
    assert all(isinstance(p, _Packed) and p.data.dtype == torch.uint8 for p in packed)
    assert len({p.data.data_ptr() for p in packed}) == 1
    for view, p in zip(views, packed, strict=True):
        restored = _unpack(p)
        assert torch.equal(restored, view) and restored.stride() == view.stride()
    other = torch.randn(3)
    assert store.pack(other) is other


def test_optimize_for_training_keeps_nchw_on_cpu() -> None:
    """On CPU the BatchNorm -> LIF kernels need NCHW: the default leaves the layout alone."""
    fast = optimize_for_training(_model().train(), compile_kernels=False)
    assert fast.memory_efficient
    assert fast.patch_embed.proj_conv.weight.is_contiguous()
    assert not bench._channels_last_weights(fast)
    assert bench._channels_last_weights(fast.to(memory_format=torch.channels_last))


def test_optimize_for_training_matches_the_plain_model_in_channels_last() -> None:
    """Same spikes and outputs; gradients round differently (other channels-last kernels)."""
    plain = _model().train().to(memory_format=torch.channels_last)
    fast = optimize_for_training(_model().train(), channels_last=True, compile_kernels=False)
    assert fast.memory_efficient
    assert fast.patch_embed.proj_conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = _inputs(plain).contiguous(memory_format=torch.channels_last)
    out, grads = _run(plain, x)
    fast_out, fast_grads = _run(fast, x)
    assert torch.equal(out, fast_out)
    largest = max(grad.abs().max().item() for grad in grads.values())
    for name, grad in grads.items():  # biases in front of BatchNorm have ~0 (noise) gradients
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5 * largest)


@pytest.mark.parametrize(
    ("layer", "norm", "shape"),
    [
        (torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.BatchNorm2d(6), (2, 4, 8, 8)),
        (torch.nn.Conv1d(4, 6, 1), torch.nn.BatchNorm1d(6), (2, 4, 5)),
        (torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), (2, 4)),
    ],
)
def test_fold_batchnorm_matches_layer_then_batchnorm(
    layer: torch.nn.Module, norm: torch.nn.Module, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2)
    norm.weight.data.normal_()
    layers = torch.nn.Sequential(layer, norm).eval()
    holder = SpikingModel()
    kind = "linear" if isinstance(layer, torch.nn.Linear) else "conv"
    setattr(holder, f"proj_{kind}", copy.deepcopy(layer))
    holder.proj_bn = copy.deepcopy(norm)
    fold_batchnorm(holder)
    assert isinstance(holder.proj_bn, torch.nn.Identity)
    x = torch.randn(*shape)
    with torch.no_grad():
        folded = getattr(holder, f"proj_{kind}")(x)
        torch.testing.assert_close(folded, layers(x), rtol=1e-5, atol=1e-5)


def _neuron_outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Logits and the spikes of every neuron layer, in call order."""
    spikes: list[torch.Tensor] = []
    hooks = [
        module.register_forward_hook(lambda m, i, out: spikes.append(out.clone()))
        for module in model.modules()
        if is_neuron(module)
    ]
    with torch.inference_mode():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    return logits, spikes


def test_optimize_for_inference_matches_the_eval_model(golden: dict) -> None:
    """Equal but where a potential lies within rounding error of a threshold (docs/performance.md).

    Over 10 batches like this one, at most 7e-6 of the spikes flipped, moving 10 of 1,600 logits
    by more than 1e-4 (``benchmarks/fast_inference_deviation.py``). A wrong convolution would
    flip a large share.
    """
    model = statten.create_model("sdt", **golden_model_config(golden["config"]))
    statten.load_checkpoint(model, golden["state_dict"], strict=True)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    fast = optimize_for_inference(model, compile_kernels=False)
    noise = torch.randn(13, *golden["input"].shape[1:], generator=torch.Generator().manual_seed(0))
    x = torch.cat([golden["input"], noise])
    logits, spikes = _neuron_outputs(model, x)
    x = x.contiguous(memory_format=torch.channels_last)
    fast_logits, fast_spikes = _neuron_outputs(fast, x)
    torch.testing.assert_close(fast_logits[:3], golden["logits_eval"], atol=1e-4, rtol=0)
    assert (fast_logits - logits).abs().median() < 1e-5
    flipped = sum((a != b).sum().item() for a, b in zip(spikes, fast_spikes, strict=True))
    assert flipped <= 1e-2 * sum(a.numel() for a in spikes)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # the original model is left as it was


def test_bench_runs_end_to_end_and_writes_json(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    argv = ["--device", "cpu", "-b", "4", "--repeats", "2", "--warmup", "1"]
    bench.main([*argv, "--eager-kernels", "--json", str(path)])
    document = json.loads(path.read_text())
    assert document["train_flops_per_image"] == 3 * document["forward_flops_per_image"] > 0
    assert document["matmul_flops_per_s_median"] > 0
    measured = {(r["task"], r["mode"]) for r in document["results"]}
    assert measured == {(t, m) for t in bench.TASKS for m in bench.MODES}
    for result in document["results"]:
        assert len(result["step_seconds"]) == 2
        assert result["derived"]["images_per_s"] > 0
        assert result["derived"]["matmul_fraction"] > 0
        assert result["peak_memory_bytes"] >= result["memory_after_import_bytes"] > 0
    assert set(document["ratios"]) >= {"train_speedup", "train_peak_memory_ratio", "infer_speedup"}
    assert 0.01 < document["inference_mean_firing_rate"] < 0.5


@pytest.mark.parametrize(("mode", "flags", "spike_driven"), [
    ("fast", ["--spike-driven"], True), ("fast", [], False), ("eager", ["--spike-driven"], False),
])  # fmt: skip
def test_bench_fast_training_is_spike_driven_when_asked(
    mode: str, flags: list[str], spike_driven: bool
) -> None:
    cfg = parse_config(["--device", "cpu", *flags], "train")
    model = bench.training_model({"mode": mode, "fused_kernels": True}, cfg, torch.device("cpu"))
    assert model.spike_driven is spike_driven and model.memory_efficient is (mode == "fast")


def test_bench_peak_memory_is_the_measuring_process_own(tmp_path: Path) -> None:
    ballast = torch.ones(2**28)  # 1 GiB resident in this (parent) process
    code = "from statten.bench import peak_rss_bytes; print(peak_rss_bytes())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own_peak = int(child.stdout)
    assert 0 < own_peak < ballast.numel() * ballast.element_size()  # not the inherited mark
    del ballast


def test_calibrated_batchnorm_makes_an_untrained_model_fire() -> None:
    model = _model().eval()
    x = _inputs(model, batch=8)

    def deep_rate() -> float:  # the layers after the patch embedding's first neuron
        with torch.no_grad(), statten.SpikeRecorder(model) as recorder:
            model(x)
        rates = recorder.mean_firing_rates()
        return sum(rates.values()) - rates["patch_embed.proj_lif"]

    assert deep_rate() == 0.0  # default statistics: silent
    bench.calibrate_batchnorm(model, x)
    assert not model.training and deep_rate() > 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_efficient_training_on_cuda_matches_plain() -> None:
    plain = _model().cuda().train()
    fast = copy.deepcopy(plain)
    fast.memory_efficient = True
    x = _inputs(plain).cuda()
    out, grads = _run(plain, x)
    fast_out, fast_grads = _run(fast, x)
    torch.testing.assert_close(fast_out, out, atol=1e-4, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    ("bad", "message"),
    [(["--repeats", "0"], "must be >= 1, got 0"), (["--warmup", "-1"], "must be >= 0, got -1"),
     (["--tasks", "fly"], "invalid choice: 'fly'")],
)  # fmt: skip
def test_bench_options_out_of_range_are_one_line(
    bad: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    from statten.cli import main

    assert main(["bench", *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("statten bench: error:") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("name", statten.list_models())
def test_training_is_lean_by_default_where_it_is_bit_identical(name: str) -> None:
    """Every family trains memory-efficiently by default (bit-identical, tested with each
    family's golden vectors)."""
    with torch.device("meta"):
        model = statten.create_model(name)
    assert model.memory_efficient is True


def test_fused_layer_matches_autograd_for_a_gradient_in_another_layout() -> None:
    """A gradient arriving channels-last (as from a token reshape) changes BatchNorm backward's
    summation order in the plain layers; the fused layer must follow it to stay bit-identical."""
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(16, 64, 3, padding=1), torch.nn.BatchNorm2d(64)
    x = (torch.rand(4, 3, 16, 8, 8) < 0.3).float()
    grad = torch.randn(4, 3, 8, 8, 64).permute(0, 1, 4, 2, 3) * 1e-4  # channels fastest
    grads = []
    for fused in (False, True):
        layers = copy.deepcopy((conv, bn))
        lif = LIF()
        lif.fused = fused
        lif(x, conv_bn=layers).backward(grad)
        grads.append([p.grad for layer in layers for p in layer.parameters()])
    for plain, fast in zip(*grads, strict=True):
        assert torch.equal(plain, fast)
