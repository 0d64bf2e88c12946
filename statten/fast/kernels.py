"""Fused multi-step LIF kernels: spikes forward, input gradient backward, nothing else stored;
and max pooling with int32 argmaxes (C where it runs, torch otherwise, the same results).

The arithmetic is SpikingJelly's, operation for operation (``H = V + (X - V) / tau``, spike when
``H >= v_th``, hard reset to 0, sigmoid surrogate ``(1 - s) s alpha`` with ``s = sigmoid(alpha
(H - v_th))``, reset path detached), so spikes and gradients are bit-identical to
:class:`statten.neurons.LIF` under autograd. The backward recomputes the membrane potentials from
the input instead of reading a stored sequence.

Three implementations of the same arithmetic:

- on CPU, the C loops of ``lif.c`` (:mod:`statten.fast.native`), in which each element's T steps
  stay in registers, built on first use with the system C compiler (unless
  ``use_native_kernels(False)``);
- after :func:`use_compiled_kernels`, ``torch.compile``d functions doing the same (Triton on
  CUDA, C++ on CPU), at the price of a one-off compilation and of the compiler's memory;
- otherwise eager torch operations, step by step, in place, with few temporaries.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from statten.fast import native

__all__ = [
    "batch_norm_lif_input_grad",
    "batch_norm_lif_spikes",
    "compiled_kernels_enabled",
    "lif_input_grad",
    "lif_spikes",
    "max_pool_with_argmax",
    "max_unpool",
    "use_compiled_kernels",
    "use_native_kernels",
]

_compiled: dict[str, Callable[..., torch.Tensor]] = {}
_use_compiled = False
_use_native = True


def _spikes_eager(x: torch.Tensor, v_threshold: float, tau: float) -> torch.Tensor:
    spikes = torch.empty_like(x)
    v = torch.zeros_like(x[0])
    step = torch.empty_like(v)
    for t in range(x.shape[0]):
        v.add_(torch.sub(x[t], v, out=step).div_(tau))
        fire = v >= v_threshold
        spikes[t].copy_(fire)
        v.masked_fill_(fire, 0.0)
    return spikes


def _input_grad_eager(
    grad_spikes: torch.Tensor, x: torch.Tensor, v_threshold: float, tau: float, alpha: float
) -> torch.Tensor:
    charged = torch.empty_like(x)
    v = torch.zeros_like(x[0])
    for t in range(x.shape[0]):
        torch.sub(x[t], v, out=charged[t]).div_(tau).add_(v)
        v = charged[t].masked_fill(charged[t] >= v_threshold, 0.0)
    grad_x = torch.empty_like(x)
    grad_v = None
    for t in reversed(range(x.shape[0])):
        h = charged[t]
        sig = torch.sub(h, v_threshold).mul_(alpha).sigmoid_()
        grad_h = torch.rsub(sig, 1).mul_(sig).mul_(alpha).mul_(grad_spikes[t])
        if grad_v is not None:
            grad_h.add_(grad_v.mul_(h < v_threshold))
        torch.div(grad_h, tau, out=grad_x[t])
        grad_v = grad_h.sub_(grad_x[t])
    return grad_x


def _spikes(x: torch.Tensor, v_threshold: float, tau: float) -> torch.Tensor:
    spikes = []
    v = None
    for x_t in x.unbind(0):
        h = x_t / tau if v is None else v + (x_t - v) / tau
        s = (h >= v_threshold).to(x.dtype)
        spikes.append(s)
        v = h - h * s
    return torch.stack(spikes)


def _input_grad(
    grad_spikes: torch.Tensor, x: torch.Tensor, v_threshold: float, tau: float, alpha: float
) -> torch.Tensor:
    charged = []
    v = None
    for x_t in x.unbind(0):
        h = x_t / tau if v is None else v + (x_t - v) / tau
        charged.append(h)
        v = torch.where(h >= v_threshold, 0.0, h)
    grads = []
    grad_v = None
    for h, grad_s in zip(reversed(charged), reversed(grad_spikes.unbind(0)), strict=True):
        sig = torch.sigmoid(alpha * (h - v_threshold))
        grad_h = grad_s * ((1 - sig) * sig * alpha)
        if grad_v is not None:
            grad_h = grad_h + grad_v * (h < v_threshold)
        grad_x = grad_h / tau
        grad_v = grad_h - grad_x
        grads.append(grad_x)
    return torch.stack(grads[::-1])


def use_compiled_kernels(enabled: bool = True) -> None:
    """Run the LIF kernels through ``torch.compile`` where the C kernels do not run.

    That is on GPUs (Triton), or on CPU with ``use_native_kernels(False)``; on a CPU without a C
    compiler, where ``torch.compile`` could not build its kernels either, they stay eager.
    """
    global _use_compiled
    _use_compiled = enabled


def compiled_kernels_enabled() -> bool:
    return _use_compiled


def use_native_kernels(enabled: bool = True) -> None:
    """Run the CPU kernels of :mod:`statten.fast.native` where they apply (the default: LIF
    loops, max pooling, spike-driven attention) or torch operations instead."""
    global _use_native
    _use_native = enabled


def _native(*rows: torch.Tensor) -> bool:
    return _use_native and all(native.available(r) for r in rows)


def _kernel(
    fn: Callable[..., torch.Tensor], eager: Callable[..., torch.Tensor], x: torch.Tensor
) -> Callable[..., torch.Tensor]:
    """``fn`` compiled, if asked for and buildable for ``x``'s device, else ``eager``."""
    no_compiler = x.device.type == "cpu" and native.library() is None
    if not _use_compiled or no_compiler:
        return eager
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn.__name__]


def _memory_order(x: torch.Tensor) -> list[int]:
    """The axes of ``x [T, ...]``: time first, then from outermost to innermost in memory."""
    return [0, *sorted(range(1, x.dim()), key=lambda axis: -x.stride(axis))]


def _rows(x: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``x`` as ``[T, n]`` in the memory order ``order``, detached (no copy unless ``x`` has gaps).

    Detached tensors carry no view history, so compiled kernels are not recompiled per view.
    """
    return x.permute(order).contiguous().view(x.shape[0], -1).detach()


def _unrows(rows: torch.Tensor, like: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Inverse of :func:`_rows`: a tensor shaped and laid out like ``like``."""
    permuted = rows.view([like.shape[axis] for axis in order])
    return permuted.permute([order.index(axis) for axis in range(like.dim())])


def lif_spikes(
    x: torch.Tensor, v_threshold: float, tau: float, overwrite_input: bool = False
) -> torch.Tensor:
    """Spikes ``[T, ...]`` of a LIF layer fed ``x [T, ...]``, starting from ``V = 0``.

    With ``overwrite_input`` the C kernels may write the spikes into ``x``'s memory (for a caller
    that owns ``x`` and no longer needs it: no fresh tensor to allocate and fault in).
    """
    if torch.compiler.is_compiling():  # inside a compiled model: traced into its graph
        return _spikes(x, v_threshold, tau)
    order = _memory_order(x)
    rows = _rows(x, order)
    if _native(rows):
        out = rows if overwrite_input else None
        return _unrows(native.lif_spikes(rows, v_threshold, tau, out=out), x, order)
    return _unrows(_kernel(_spikes, _spikes_eager, x)(rows, v_threshold, tau), x, order)


def lif_input_grad(
    grad_spikes: torch.Tensor,
    x: torch.Tensor,
    v_threshold: float,
    tau: float,
    alpha: float,
    overwrite_input: bool = False,
) -> torch.Tensor:
    """Gradient w.r.t. the LIF input ``x [T, ...]`` from the gradient w.r.t. its spikes.

    With ``overwrite_input`` the C kernels may write the gradient into ``x``'s memory (for a
    caller that no longer needs ``x``: one tensor fewer at the backward pass's peak).
    """
    if torch.compiler.is_compiling():
        return _input_grad(grad_spikes, x, v_threshold, tau, alpha)
    order = _memory_order(x)
    rows, grad_rows = _rows(x, order), _rows(grad_spikes, order)
    if _native(rows, grad_rows):
        copied = rows.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        work = rows if overwrite_input or copied else torch.empty_like(rows)
        grad = _native_input_grad(grad_rows, rows, work, v_threshold, tau, alpha)
        return _unrows(grad, x, order)
    kernel = _kernel(_input_grad, _input_grad_eager, x)
    grad = kernel(grad_rows, rows, v_threshold, tau, alpha)
    return _unrows(grad, x, order)


def _native_input_grad(
    grad_rows: torch.Tensor,
    rows: torch.Tensor,
    work: torch.Tensor,
    v_threshold: float,
    tau: float,
    alpha: float,
    affine: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """The C kernels' input gradient, built in ``work`` (which may be ``rows``)."""
    below = native.lif_charge(rows, work, v_threshold, tau, alpha, affine)
    for step in work:  # torch's sigmoid, row by row as in _input_grad_eager: same bits
        step.sigmoid_()
    return native.lif_grad(work, grad_rows, below, tau, alpha)


def batch_norm_lif_input_grad(
    grad_spikes: torch.Tensor,
    conv_out: torch.Tensor,
    batch_stats: tuple[torch.Tensor, torch.Tensor],
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    v_threshold: float,
    tau: float,
    alpha: float,
) -> torch.Tensor | None:
    """Gradient w.r.t. ``y``, for a LIF layer fed ``y = BatchNorm(conv_out)`` in training mode.

    ``conv_out [T * B, C, H, W]``, ``batch_stats`` its ``(mean, invstd)``, ``grad_spikes [T, B,
    C, H, W]``. ``y`` is not materialised: the C kernels form each of its elements from
    ``conv_out`` on the fly, as torch's CPU BatchNorm kernel does, which saves recomputing the
    statistics and a full-size tensor. None where that is not bit-identical to ``y`` here (not
    the C kernels, a layout other than contiguous or channels-last, or a torch build whose
    BatchNorm rounds differently, checked once per layout): the caller then recomputes ``y``.
    """
    layout = _batch_norm_layout(conv_out)
    if torch.compiler.is_compiling() or layout is None or not _batch_norm_formed_exactly(layout):
        return None
    return _fused_batch_norm_input_grad(
        grad_spikes, conv_out, batch_stats, bn_weight, bn_bias, v_threshold, tau, alpha
    )


def _fused_batch_norm_input_grad(
    grad_spikes: torch.Tensor,
    conv_out: torch.Tensor,
    batch_stats: tuple[torch.Tensor, torch.Tensor],
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    v_threshold: float,
    tau: float,
    alpha: float,
) -> torch.Tensor | None:
    """:func:`batch_norm_lif_input_grad` without the checks of torch's formula; None where the
    C kernels do not run."""
    x = conv_out.unflatten(0, grad_spikes.shape[:2])
    order = _memory_order(x)
    rows, grad_rows = _rows(x, order), _rows(grad_spikes, order)
    if not _native(rows, grad_rows):
        return None
    terms = native.batch_norm_terms(*batch_stats, bn_weight.detach(), bn_bias.detach())
    inner = math.prod(x.shape[axis] for axis in order[order.index(2) + 1 :])
    work = torch.empty_like(rows)
    grad = _native_input_grad(grad_rows, rows, work, v_threshold, tau, alpha, (terms, inner))
    return _unrows(grad, x, order)


def _batch_norm_layout(x: torch.Tensor) -> torch.memory_format | None:
    """The memory format of ``x [N, C, H, W]`` for which torch's CPU BatchNorm runs its
    ``x * scale + shift`` kernels; None for other layouts (another formula)."""
    if x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _probe_conv_output() -> tuple[torch.Generator, torch.Tensor]:
    """A small ``[T * B, C, H, W] = [4, 19, 5, 7]`` conv output (odd sizes: partial vectors) for
    the checks against torch's BatchNorm, and the seeded generator that drew it."""
    generator = torch.Generator().manual_seed(0)
    return generator, torch.randn(4, 19, 5, 7, generator=generator).mul_(3).add_(0.5)


@functools.cache
def _batch_norm_formed_exactly(layout: torch.memory_format) -> bool:
    """Whether the C kernels' on-the-fly BatchNorm output equals torch's bit for bit in
    ``layout`` (it depends on how torch was compiled: fused multiply-adds or not)."""
    generator, conv_out = _probe_conv_output()
    conv_out = conv_out.contiguous(memory_format=layout)
    weight, bias = torch.randn(2, 19, generator=generator)
    grad = torch.randn(2, 2, 19, 5, 7, generator=generator)
    y, mean, invstd = torch.ops.aten.native_batch_norm(
        conv_out, weight, bias, None, None, True, 0.1, 1e-5
    )
    fused = _fused_batch_norm_input_grad(
        grad, conv_out, (mean, invstd), weight, bias, 0.5, 2.0, 4.0
    )
    expected = lif_input_grad(grad, y.unflatten(0, (2, 2)), 0.5, 2.0, 4.0)
    return fused is not None and torch.equal(fused, expected)


def batch_norm_lif_spikes(
    conv_out: torch.Tensor,
    steps: tuple[int, int],
    bn: torch.nn.BatchNorm2d,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    v_threshold: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Spikes ``[T, B, C, H, W]`` of a LIF layer fed ``y = bn(conv_out)`` in training mode, and
    the batch's ``(mean, invstd)``; ``bn``'s running statistics are updated as torch does.

    ``conv_out [T * B, C, H, W]`` with ``(T, B) = steps``. ``y`` is not materialised: the C
    kernels collect the statistics in torch's order of additions and form each element of ``y``
    inside the LIF loop, as torch's CPU kernel would. None where that is not bit-identical to
    ``native_batch_norm`` here (not contiguous, not the C kernels, or a torch build that rounds
    differently, checked once): the caller then runs BatchNorm itself.
    """
    if not (_native_batch_norm_input(conv_out) and bn.eps > 0 and _batch_norm_forward_exactly()):
        return None
    return _fused_batch_norm_spikes(conv_out, steps, bn, bn_weight, bn_bias, v_threshold, tau)


def _native_batch_norm_input(x: torch.Tensor) -> bool:
    """A non-empty contiguous ``[N, C, H, W]`` float32 CPU tensor, outside a compiled graph."""
    return (
        not torch.compiler.is_compiling()
        and _batch_norm_layout(x) == torch.contiguous_format
        and x.numel() > 0
        and _native(x)
    )


def _fused_batch_norm_spikes(
    conv_out: torch.Tensor,
    steps: tuple[int, int],
    bn: torch.nn.BatchNorm2d,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    v_threshold: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`batch_norm_lif_spikes` without the checks (the arithmetic of torch's
    ``batch_norm_cpu_update_stats_template``, in its order and precisions)."""
    mean, var_sum = native.batch_norm_stats(conv_out)
    count = conv_out.numel() // conv_out.shape[1]
    invstd = (var_sum / count).double().add_(bn.eps).sqrt_().reciprocal_().float()
    if bn.running_mean is not None:
        momentum = torch.tensor(bn.momentum, dtype=torch.float32)
        keep = 1 - momentum
        with torch.no_grad():
            bn.running_mean.copy_(momentum * mean + keep * bn.running_mean)
            unbiased = (var_sum / (count - 1)).double()
            bn.running_var.copy_(momentum.double() * unbiased + (keep * bn.running_var).double())
    terms = native.batch_norm_terms(mean, invstd, bn_weight.detach(), bn_bias.detach())
    rows = conv_out.detach().view(steps[0], -1)
    spikes = native.lif_spikes(rows, v_threshold, tau, (terms, conv_out[0, 0].numel()))
    return spikes.view(*steps, *conv_out.shape[1:]), mean, invstd


@functools.cache
def _batch_norm_forward_exactly() -> bool:
    """Whether :func:`batch_norm_lif_spikes` gives torch's spikes, statistics and running
    statistics bit for bit (it depends on how torch was compiled)."""
    generator, conv_out = _probe_conv_output()
    expected, fused = (torch.nn.BatchNorm2d(19, momentum=0.3) for _ in range(2))
    for bn in (expected, fused):
        with torch.no_grad():
            bn.weight.copy_(torch.randn(19, generator=generator))
            bn.running_mean.normal_(generator=generator)
    fused.load_state_dict(expected.state_dict())
    y, mean, invstd = torch.ops.aten.native_batch_norm(
        conv_out, expected.weight, expected.bias, expected.running_mean, expected.running_var,
        True, expected.momentum, expected.eps,
    )  # fmt: skip
    spikes = lif_spikes(y.unflatten(0, (2, 2)), 0.5, 2.0)
    results = _fused_batch_norm_spikes(conv_out, (2, 2), fused, fused.weight, fused.bias, 0.5, 2.0)
    return all(
        torch.equal(a, b)
        for a, b in zip(
            (spikes, mean, invstd, expected.running_mean, expected.running_var),
            (*results, fused.running_mean, fused.running_var),
            strict=True,
        )
    )


def _pool_geometry(x: torch.Tensor, pool: torch.nn.MaxPool2d) -> tuple[tuple[int, int], ...] | None:
    """``(kernel, stride, padding, output size)`` of ``pool`` on ``x [N, C, H, W]`` where the C
    pooling kernels take them (dilation 1, floor mode, padding at most half the window, a
    non-empty output, not traced), else None."""
    kernel, stride, padding = (
        torch.nn.modules.utils._pair(value)
        for value in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding)
    )
    if (
        x.dim() != 4
        or torch.nn.modules.utils._pair(pool.dilation) != (1, 1)
        or pool.ceil_mode
        or not all(0 <= 2 * p <= k for p, k in zip(padding, kernel, strict=True))
        or torch.compiler.is_compiling()
    ):
        return None
    size = tuple(
        (length + 2 * p - k) // s + 1
        for length, p, k, s in zip(x.shape[2:], padding, kernel, stride, strict=True)
    )
    return (kernel, stride, padding, size) if min(size) > 0 else None


def max_pool_with_argmax(
    x: torch.Tensor, pool: torch.nn.MaxPool2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pool(x)`` for ``x [N, C, H, W]`` and the int32 argmax of every window in its plane:
    ``max_pool2d_with_indices``, through the C kernel where it runs (contiguous float32 on CPU,
    dilation 1, floor mode)."""
    geometry = _pool_geometry(x, pool)
    if (
        geometry is not None
        and _native(x)
        and geometry[0][0] <= native.MAX_POOL_KERNEL
        and geometry[3][1] <= native.MAX_POOL_WIDTH
    ):
        return native.max_pool2d(x, *geometry)
    out, indices = torch.nn.functional.max_pool2d_with_indices(
        x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode
    )
    return out, indices.to(torch.int32)


def max_pool_values(x: torch.Tensor, pool: torch.nn.MaxPool2d) -> torch.Tensor:
    """``pool(x)`` without indices (inference): through the C kernel for channels-last float32
    ``x`` on CPU (torch's writes int64 indices it then drops), else torch's."""
    geometry = _pool_geometry(x, pool)
    if (
        geometry is not None
        and not pool.return_indices
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and _use_native
        and native.library() is not None
    ):
        return native.max_pool2d_channels_last(x, *geometry)
    return torch.nn.functional.max_pool2d(
        x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
        pool.return_indices,
    )  # fmt: skip


def max_unpool(
    grad_out: torch.Tensor, indices: torch.Tensor, shape: torch.Size, stride: tuple[int, ...]
) -> torch.Tensor:
    """Gradient w.r.t. a max pool's input (``shape``, ``stride``): ``grad_out`` summed into each
    window's argmax (``indices`` from :func:`max_pool_with_argmax`), in scatter_add's order."""
    contiguous = stride == tuple(math.prod(shape[axis + 1 :]) for axis in range(len(shape)))
    native_layouts = contiguous and indices.is_contiguous() and _native(grad_out)
    if native_layouts and not torch.compiler.is_compiling():
        return native.max_unpool2d(grad_out, indices, shape)
    grad_x = torch.empty_strided(shape, stride, dtype=grad_out.dtype, device=grad_out.device)
    planes = grad_x.zero_().view(shape[0], shape[1], -1)
    planes.scatter_add_(2, indices.flatten(2).long(), grad_out.flatten(2))
    return grad_x


COUNT_LIMIT = 1 << 24  # float32 holds every integer count up to here exactly


def spike_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, scale: float
) -> torch.Tensor | None:
    """STAtten's attention of spikes ``q, k, v [T, B, heads, N, d]`` through the C kernel
    (:func:`~statten.fast.native.spatiotemporal_attention`; the output laid out so that merging
    heads is a view); None where it does not run: not float32 on CPU, layouts the kernel does not
    read, or values other than 0 and 1. ``T`` must be a multiple of ``chunk_size``."""
    tokens, dim = q.shape[-2:]
    if not (
        _use_native
        and all(x.device.type == "cpu" and x.dtype == torch.float32 for x in (q, k, v))
        and q.stride() == k.stride() == v.stride()
        and (q.stride(-1) == 1 or dim == 1)
        and chunk_size * tokens < COUNT_LIMIT
        and q.numel() > 0
        and native.library() is not None
    ):
        return None
    return native.spatiotemporal_attention(q, k, v, chunk_size, scale)
