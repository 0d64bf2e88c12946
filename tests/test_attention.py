"""STAtten as a standalone module, checked against its defining sum over time steps."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_c_compiler

from statten import SpatioTemporalAttention
from statten.attention import dvs_max_pool


def naive_statten(q, k, v, chunk_size: int, scale: float) -> torch.Tensor:
    """out[t] = scale * sum over t' in the block of t of Q[t] K[t']^T V[t']."""
    out = torch.zeros_like(q)
    for t in range(q.shape[0]):
        start = t - t % chunk_size
        for u in range(start, start + chunk_size):
            out[t] += q[t] @ (k[u].transpose(-2, -1) @ v[u])
    return out * scale


def spikes(*shape: int) -> torch.Tensor:
    return (torch.rand(shape) < 0.3).float()


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 6])
def test_statten_equals_its_definition(chunk_size: int) -> None:
    q, k, v = (spikes(6, 2, 3, 10, 4) for _ in range(3))
    out = SpatioTemporalAttention(chunk_size)(q, k, v, scale=0.125)
    torch.testing.assert_close(out, naive_statten(q, k, v, chunk_size, 0.125), atol=0, rtol=0)


def test_chunk_size_one_is_spatial_attention_per_step() -> None:
    q, k, v = (spikes(4, 2, 2, 5, 3) for _ in range(3))
    out = SpatioTemporalAttention(1)(q, k, v)
    torch.testing.assert_close(out, q @ (k.transpose(-2, -1) @ v), atol=0, rtol=0)


def test_gradients_flow_to_q_k_v() -> None:
    q, k, v = (spikes(4, 1, 2, 5, 3).requires_grad_() for _ in range(3))
    SpatioTemporalAttention(2)(q, k, v).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_bad_shapes_and_chunk_sizes_raise() -> None:
    with pytest.raises(ValueError, match="positive integer"):
        SpatioTemporalAttention(0)
    with pytest.raises(ValueError, match="T=4 is not divisible by chunk_size=3"):
        SpatioTemporalAttention(3)(*(spikes(4, 1, 1, 2, 2) for _ in range(3)))
    with pytest.raises(ValueError, match="same shape"):
        SpatioTemporalAttention(1)(
            spikes(4, 1, 1, 2, 2), spikes(4, 1, 1, 3, 2), spikes(4, 1, 1, 2, 2)
        )


def test_dvs_pool_is_a_3x3_max_over_the_last_two_axes() -> None:
    x = torch.rand(2, 3, 4, 5, 6)
    reference = torch.nn.MaxPool3d((1, 3, 3), stride=1, padding=(0, 1, 1))(x)
    torch.testing.assert_close(dvs_max_pool(x), reference, atol=0, rtol=0)


def token_major(*shape: int, density: float = 0.3) -> torch.Tensor:
    """Spikes ``[T, B, heads, N, d]`` laid out ``[T, B, N, heads, d]`` in memory, as the heads of
    a channels-last fast-inference model are (the layout the spike-driven kernel reads)."""
    T, B, H, N, D = shape
    return (torch.rand(T, B, N, H, D) < density).float().transpose(2, 3)


def spike_driven(chunk_size: int) -> SpatioTemporalAttention:
    attention = SpatioTemporalAttention(chunk_size)
    attention.spike_driven_inference = True
    return attention


def ran_the_kernel(out: torch.Tensor) -> bool:
    """The kernel writes its output token-major; the torch products return it contiguous."""
    return not out.is_contiguous() and out.transpose(2, 3).is_contiguous()


@needs_c_compiler
@pytest.mark.parametrize("chunk_size", [1, 2, 4])
@pytest.mark.parametrize("dim", [8, 32, 48, 64, 70, 130])
def test_spike_driven_inference_equals_the_products(chunk_size: int, dim: int) -> None:
    """Equal up to the order of the additions; the scaled K^T V counts are the same bits, and
    a zero query row gives zeros (-0 counts as 0). Head sizes cover whole and partial vector
    tiles and rows of more than 64 channels."""
    torch.manual_seed(dim)
    q, k, v = (token_major(4, 2, 3, 10, dim) for _ in range(3))
    q[0, 0, 0, 0] = 0
    q[0, 0, 0, 1, 0] = -0.0  # counts as 0
    expected = SpatioTemporalAttention(chunk_size)(q, k, v, scale=0.3)
    with torch.inference_mode():
        out = spike_driven(chunk_size)(q, k, v, scale=0.3)
    assert ran_the_kernel(out)
    torch.testing.assert_close(out, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
    assert torch.equal(out[0, 0, 0, 0], torch.zeros(dim))
    merged = out.transpose(-1, -2).flatten(2, 3)  # heads into channels, as merge_heads does
    assert merged.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()


@needs_c_compiler
@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan")])
def test_spike_driven_inference_of_other_values_takes_the_products(value: float) -> None:
    q, k, v = (token_major(2, 1, 2, 5, 16) for _ in range(3))
    for x in (q, k, v):
        polluted = x.clone()
        polluted[1, 0, 1, 4, 15] = value
        inputs = [polluted if y is x else y for y in (q, k, v)]
        out = spike_driven(2)(*inputs)
        assert not ran_the_kernel(out)
        expected = SpatioTemporalAttention(2)(*inputs)
        assert torch.equal(out.nan_to_num(), expected.nan_to_num())


@needs_c_compiler
def test_spike_driven_inference_leaves_autograd_and_other_layouts_to_the_products() -> None:
    q, k, v = (token_major(2, 1, 2, 5, 16).requires_grad_() for _ in range(3))
    out = spike_driven(1)(q, k, v)
    assert not ran_the_kernel(out)
    out.sum().backward()
    assert q.grad is not None
    channel_major = [spikes(2, 1, 2, 16, 5).transpose(-1, -2) for _ in range(3)]
    assert not ran_the_kernel(spike_driven(1)(*channel_major))
    assert ran_the_kernel(spike_driven(1)(*(x.detach() for x in (q, k, v))))


def test_spike_driven_inference_is_off_by_default_and_checks_shapes() -> None:
    assert not SpatioTemporalAttention(2).spike_driven_inference
    with pytest.raises(ValueError, match="T=3 is not divisible by chunk_size=2"):
        spike_driven(2)(*(token_major(3, 1, 1, 2, 16) for _ in range(3)))
