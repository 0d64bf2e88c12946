"""STAtten as a standalone module, checked against its defining sum over time steps."""

from __future__ import annotations

import pytest
import torch

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
