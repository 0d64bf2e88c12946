"""STAtten: spatial-temporal self-attention on spike tensors, usable in any spiking transformer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from statten.fast.inference import SpikeDrivenInference
from statten.fast.kernels import spike_attention
from statten.fast.storage import mark_spikes


def dvs_max_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 max pooling, stride 1, padding 1, over the last two axes of a tensor of any rank.

    The reference's "dvs pooling" (``MaxPool3d((1, 3, 3), 1, (0, 1, 1))`` applied to 5-D tensors).
    """
    pooled = F.max_pool2d(x.reshape(-1, 1, *x.shape[-2:]), kernel_size=3, stride=1, padding=1)
    return pooled.view(x.shape)


class SpatioTemporalAttention(SpikeDrivenInference, nn.Module):
    """Block-wise spatial-temporal linear attention of STAtten (Lee et al., CVPR 2025).

    The ``T`` time steps are split into consecutive blocks of ``chunk_size`` steps. Within a block,
    every token of every step attends to all tokens of all steps of the block:

        out[t] = scale * sum_{t' in block(t)} Q[t] @ (K[t']^T @ V[t'])

    computed as ``Q_block @ (K_block^T @ V_block)`` so the cost is ``O(T N d^2)`` per head, the same
    as spatial-only attention. ``chunk_size=1`` is spatial-only attention per time step;
    ``chunk_size=T`` lets every step attend to all steps. There is no softmax: with binary Q, K, V
    every product is an integer count, then scaled.

    Args:
        chunk_size: number of consecutive time steps that attend to each other; must divide ``T``.

    Shapes:
        ``q, k, v``: ``[T, B, heads, N, d]`` spike tensors (any float dtype; N tokens per step;
        in a memory-efficient model they are stored for backward as 1-byte tensors).
        ``scale``: float multiplier of ``K^T V`` (the reference uses ``1 / H_grid`` for images and
        ``1 / (H_grid**2 * chunk_size)`` for event data).
        Output: ``[T, B, heads, N, d]``, real-valued (feed it to a spiking neuron).

    With ``spike_driven_inference`` (set by :func:`~statten.fast.optimize_for_inference`), spike
    inputs on CPU outside autograd run the spike-driven C kernel (``statten/fast/attention.c``):
    no copies of Q, K, V into blocks, work in proportion to the spikes, and an output whose
    heads merge into channels without a copy; its sums are added in another order than the
    dense products' (equal up to rounding).
    """

    def __init__(self, chunk_size: int) -> None:
        super().__init__()
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise ``ValueError`` unless q, k, v share a shape ``[T, B, heads, N, d]`` whose ``T``
        is a multiple of ``chunk_size``."""
        if q.dim() != 5 or q.shape != k.shape or k.shape != v.shape:
            raise ValueError(
                "q, k and v must have the same shape [T, B, heads, N, d], got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if q.shape[0] % self.chunk_size:
            raise ValueError(f"T={q.shape[0]} is not divisible by chunk_size={self.chunk_size}")

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor:
        self.check_inputs(q, k, v)
        if self.spike_driven_inference and not (
            torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        ):
            out = spike_attention(q, k, v, self.chunk_size, scale)
            if out is not None:
                return out
        T, B, H, N, D = q.shape
        c = self.chunk_size
        # [T, B, H, N, D] -> [T/c, B, H, c*N, D]: one sequence per block of c time steps.
        q, k, v = (
            x.view(T // c, c, B, H, N, D).permute(0, 2, 3, 1, 4, 5).reshape(T // c, B, H, c * N, D)
            for x in (q, k, v)
        )
        q, k, v = (mark_spikes(x) for x in (q, k, v))
        kv = torch.matmul(k.transpose(-2, -1), v) * scale  # [T/c, B, H, D, D]
        out = torch.matmul(q, kv)  # [T/c, B, H, c*N, D]
        return out.view(T // c, B, H, c, N, D).permute(0, 3, 1, 2, 4, 5).reshape(T, B, H, N, D)
