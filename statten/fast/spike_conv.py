"""Spike-driven convolutions on CPU, for inference and for training.

A spiking network's convolutions are mostly fed 0/1 spikes at 3-30 % density. Two of the three
products of a convolution multiply by that input: the output and the weight gradient. For both,
the C kernels of ``spike_conv.c`` add weights (or output gradients) at the spikes instead of
multiplying every input, so their work grows with the number of spikes. The input gradient
multiplies the dense output gradient by the weights and stays oneDNN's.

Whether adding spikes beats oneDNN's dense product depends on the layer's shape, the density and
the CPU, so each :class:`SpikeConv2d` measures it: on its first spike input it times both paths
for each product and keeps the density up to which the spike-driven one is faster (its
crossover); from then on every call compares the input's density with it. The sums run in
another order than the dense ones, so results differ at the rounding level (spike-driven training
is opt-in; its measured deviation is in docs/performance.md), and, since the crossovers are
timed, two runs of the same seed may take different paths.

In eval mode a layer fed spikes or spike counts has a third product: exact int8 sums on oneDNN's
kernels (:mod:`statten.fast.integer_conv`), timed against the float32 one on the first such
input. Fast inference also gives it to the token layers (:class:`SpikeLinear`,
:class:`SpikeConv1d`, installed by :func:`integer_token_layers`); pointwise ``Conv1d`` layers
also take the spike-driven output outside autograd, and a spike-driven convolution followed by a
LIF can form the LIF's spikes in its kernel (:meth:`SpikeConv2d.lif_spikes`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from statten.fast import integer_conv, native
from statten.fast.integer_conv import IntegerWeights

__all__ = [
    "SpikeConv1d",
    "SpikeConv2d",
    "SpikeLinear",
    "conv2d_backward",
    "conv2d_forward",
    "integer_token_layers",
    "spike_driven_convolutions",
    "swap_layers",
]

# Timed calls of each path on a layer's first spike input (after a warm-up call).
TIMING_CALLS = 2
# The density assumed when timing an input with fewer spikes, so that a layer first fed (almost)
# no spikes does not conclude that the spike-driven path never pays.
MIN_TIMED_DENSITY = 0.01
# A layer with a measured crossover whose input the spike-driven output declined (too dense, or
# not spikes) goes straight to the dense product for this many calls before trying again: each
# try reads the input (a layer's density changes slowly), ~10 ms of a CIFAR-10 2-512 fast
# inference pass.
DECLINED_CALLS_SKIPPED = 7


def _kept_for(
    kept: tuple[tuple[int, int], Any] | None,
    weight: torch.Tensor,
    build: Callable[[torch.Tensor], Any],
) -> tuple[tuple[int, int], Any]:
    """``(key, build(weight))`` for a layer to keep, or ``kept`` itself while its key still names
    ``weight``'s memory and version (the weight has not changed since it was built)."""
    key = (weight.data_ptr(), weight._version)
    return kept if kept is not None and kept[0] == key else (key, build(weight))


class _IntegerProducts:
    """Exact int8 products (:mod:`statten.fast.integer_conv`) for a weight layer in eval mode fed
    spikes or spike counts: ``integer_products`` is None until timed against the layer's float32
    product on the first such input, then whether the int8 one was faster (set it to force
    either). The packed digits are kept until the weights change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the weight layer's
        self.integer_products: bool | None = None
        self._integer_weights: tuple[tuple[int, int], IntegerWeights | None] | None = None

    def _integer_product(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        padding: int,
        float32: Callable[[], torch.Tensor],
        shaped: Callable[[torch.Tensor], torch.Tensor] = lambda out: out,
    ) -> torch.Tensor | None:
        """The int8 product for ``x [N, C, H, W]`` and ``weight [C_out, C, kh, kw]`` (views of the
        layer's; stride 1, zero ``padding``), a channels-last float32 tensor made the layer's
        output by ``shaped``, or None where the layer takes its float32 product (``float32``,
        timed against it on the first call)."""
        if self.training or self.integer_products is False or not integer_conv.available():
            return None
        self._integer_weights = _kept_for(
            self._integer_weights, weight, lambda w: integer_conv.pack(w, padding)
        )
        packed = self._integer_weights[1]
        converted = None if packed is None else native.small_integer_bytes(x)
        if converted is None:
            return None

        def integer(converted: tuple[torch.Tensor, bool] | None = None) -> torch.Tensor:
            data, spikes = native.small_integer_bytes(x) if converted is None else converted
            return shaped(integer_conv.conv2d(data, packed, bias, spikes))

        if self.integer_products is None:
            integer()  # oneDNN builds its kernels on the first call
            integer_s, out = _fastest_of(TIMING_CALLS, integer)  # the conversion included
            float32_s, _ = _fastest_of(TIMING_CALLS, float32)
            self.integer_products = integer_s < float32_s
            return out if self.integer_products else None
        return integer(converted)


class _SpikeDrivenOutput:
    """The spike-driven output of a weight layer fed spikes (``spike_conv.c``): ``max_density``,
    the density of spikes up to which it is taken, None until measured on the first spike input
    (0: never, 1: always); after an input that crossover declined, the next
    ``DECLINED_CALLS_SKIPPED`` calls take the dense product without trying."""

    def __init__(self, *args: Any, max_density: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the weight layer's
        self.max_density = max_density
        self._weight_by_tap: tuple[tuple[int, int], torch.Tensor] | None = None
        self._dense_calls_left = 0

    def _spike_driven_output(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        padding: int,
        dense: Callable[[], torch.Tensor],
    ) -> torch.Tensor | None:
        """``conv2d(x, weight, bias, padding)`` for ``x [N, C, H, W]`` (detached) by the
        spike-driven kernel where the crossover picks it (measured against ``dense`` on the
        first spike input), else None: the caller takes its dense product."""
        if self._dense_calls_left > 0:
            self._dense_calls_left -= 1
            return None
        taps = self._weight_per_tap(weight)

        def spike_driven(limit: float) -> torch.Tensor | None:
            return native.spike_conv2d(x, taps, bias, padding, limit)

        out, self.max_density = _crossing(spike_driven, dense, x, self.max_density)
        if out is None and self.max_density:
            self._dense_calls_left = DECLINED_CALLS_SKIPPED
        return out

    def _weight_per_tap(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight [C_out, C_in, kh, kw]`` as ``[kh, kw, C_in, C_out]``, the kernels' layout,
        kept until it changes."""
        self._weight_by_tap = _kept_for(
            self._weight_by_tap, weight, lambda w: w.permute(2, 3, 1, 0).contiguous()
        )
        return self._weight_by_tap[1]


class SpikeConv2d(_SpikeDrivenOutput, _IntegerProducts, nn.Conv2d):
    """A convolution that, fed spikes on CPU, adds the weights of the spikes (a spike count, as
    residual sums of spikes make, as that many spikes).

    Under autograd the weight gradient adds the output gradients at the spikes the same way.
    Inputs the C kernels do not take (other values, GPU, strides, groups, a number of outputs
    that is not a multiple of 16) run the ordinary dense convolution.

    ``max_density`` and ``max_density_weight_grad`` are the densities of spikes up to which the
    output and the weight gradient are spike-driven: None until measured on the first spike
    input (see the module's docstring); set them to force a path (0: dense, 1: spike-driven).
    After an input declined by a measured crossover, the next ``DECLINED_CALLS_SKIPPED`` calls
    take the dense output without trying.
    In eval mode the dense output for spikes and spike counts (integers in [0, 255]) is the
    faster of oneDNN's float32 convolution and its exact-integer int8 one
    (:mod:`statten.fast.integer_conv`): ``integer_products``, None until measured on the first
    such input, True or False to force one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_density_weight_grad: float | None = None
        self.max_density_mlp: float | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> SpikeConv2d:
        """The same convolution, sharing ``conv``'s parameters, as a :class:`SpikeConv2d`."""
        return _rebuilt(conv, cls)

    def to_conv(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` sharing this layer's parameters."""
        return _rebuilt(self, nn.Conv2d)

    def handles(self, x: torch.Tensor) -> bool:
        """Whether the C kernels take ``x`` with this layer's shape (whatever its values)."""
        padding = self.padding
        return (
            x.dim() == 4
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and isinstance(padding, tuple)
            and padding[0] == padding[1]
            and self.out_channels % 16 == 0
            and native.library() is not None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.handles(x):
            return super().forward(x)
        if torch.is_grad_enabled():
            return _SpikeConv.apply(x, self.weight, self.bias, self)
        return self.product(x, self.weight, self.bias)

    def lif_spikes(
        self,
        x: torch.Tensor,
        steps: int,
        v_threshold: float,
        tau: float,
        pool: nn.MaxPool2d | None = None,
        pool_first: bool = False,
    ) -> torch.Tensor | None:
        """Outside autograd, the spikes of a LIF (``v_threshold``, ``tau``) fed this layer's output
        for the channels-last ``x [steps * B, C, H, W]`` (time-major), max-pooled by ``pool`` if
        given (with ``pool_first``, the LIF fed the max-pooled output), formed inside the
        spike-driven kernel while each output is in cache, so that the full-size output is never
        written, when the layer's measured crossover picks the spike-driven path for ``x`` and
        the kernel runs ``pool`` (square, floor mode, no dilation); else None (the caller runs
        the layer, then the LIF). Equal to the LIF kernels' spikes of the spike-driven output
        and ``max_pool2d``, in their order."""
        square = None if pool is None else _square_pool(pool)
        if (
            torch.is_grad_enabled()
            or not self.max_density
            or self._dense_calls_left > 0
            or not self.handles(x)
            or not x.is_contiguous(memory_format=torch.channels_last)
            or (pool is not None and square is None)
        ):
            return None
        bias = _detached(self.bias)
        taps = self._weight_per_tap(self.weight.detach())
        lif = (steps, v_threshold, tau)
        spikes = native.spike_conv2d(
            x, taps, bias, self.padding[0], self.max_density, lif, square, pool_first=pool_first
        )
        if spikes is None:  # declined: the caller's own call of the layer does not count
            self._dense_calls_left = DECLINED_CALLS_SKIPPED + 1
        return spikes

    def mlp_spikes(
        self,
        second: SpikeConv2d,
        x: torch.Tensor,
        steps: int,
        v_thresholds: tuple[float, float],
        tau: float,
        unfused: Callable[[], torch.Tensor],
    ) -> torch.Tensor | None:
        """Outside autograd, the spikes of a LIF (``v_thresholds[1]``, ``tau``) fed ``second``'s
        output for the spikes of a LIF (``v_thresholds[0]``) fed this layer's, both pointwise,
        for the channels-last ``x [steps * B, C, H, W]`` (time-major), in one kernel that never
        writes the hidden spikes (``native.spike_mlp``), while ``x``'s density is below the
        crossover ``max_density_mlp`` measured against ``unfused`` (the two layers one after
        the other, once both have measured their own paths); else None."""
        pointwise = all(
            layer.kernel_size == (1, 1) and layer.padding == (0, 0) for layer in (self, second)
        )
        if (
            torch.is_grad_enabled()
            or not pointwise
            or self.max_density is None
            or second.max_density is None
            or not (self.handles(x) and second.handles(x))  # x's shape aside, as its input
            or second.in_channels != self.out_channels
            or not x.is_contiguous(memory_format=torch.channels_last)
        ):
            return None
        weights = tuple(
            layer._weight_per_tap(layer.weight.detach()).flatten(0, 2) for layer in (self, second)
        )
        biases = tuple(_detached(layer.bias) for layer in (self, second))

        def fused(limit: float) -> torch.Tensor | None:
            return native.spike_mlp(x, weights, biases, limit, steps, v_thresholds, tau)

        spikes, self.max_density_mlp = _crossing(fused, unfused, x, self.max_density_mlp)
        return spikes

    def product(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``conv(x)`` with ``weight`` and ``bias``, outside autograd; spike-driven while ``x``
        is spikes at a density below the crossover, else (in eval mode) the faster of the float32
        and int8 products."""
        x, weight = x.detach(), weight.detach()
        bias = _detached(bias)
        if not self.handles(x):
            return self._conv_forward(x, weight, bias)

        def dense() -> torch.Tensor:
            float32 = functools.partial(self._conv_forward, x, weight, bias)
            out = self._integer_product(x, weight, bias, self.padding[0], float32)
            return float32() if out is None else out

        out = self._spike_driven_output(x, weight, bias, self.padding[0], dense)
        return dense() if out is None else out

    def grads(
        self,
        grad_out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        output_mask: Sequence[bool],
    ) -> tuple[torch.Tensor | None, ...]:
        """Gradients w.r.t. ``(x, weight, bias)`` where ``output_mask`` asks for them: the weight
        gradient spike-driven while ``x`` is spikes at a density below the crossover, the rest
        by oneDNN (in one call with the weight gradient when that is dense too: cheaper than
        two)."""
        x, grad_out = x.detach(), grad_out.detach()
        needs_x, needs_weight, needs_bias = output_mask
        grad_weight = None
        if needs_weight and self.handles(x):

            def spike_driven(limit: float) -> torch.Tensor | None:
                taps = native.spike_conv2d_weight_grad(
                    x, grad_out, self.kernel_size, self.padding[0], limit
                )
                return (
                    None
                    if taps is None
                    else torch.empty_like(weight).copy_(taps.permute(3, 2, 0, 1))
                )

            def dense() -> torch.Tensor:
                return _dense_grads(self, grad_out, x, weight, (False, True, False))[1]

            grad_weight, self.max_density_weight_grad = _crossing(
                spike_driven, dense, x, self.max_density_weight_grad
            )
        dense_mask = (needs_x, needs_weight and grad_weight is None, needs_bias)
        grad_x, dense_weight, grad_bias = _dense_grads(self, grad_out, x, weight, dense_mask)
        return grad_x, dense_weight if grad_weight is None else grad_weight, grad_bias


class SpikeLinear(_IntegerProducts, nn.Linear):
    """An ``nn.Linear`` (on the last axis) whose output, in eval mode on CPU for spikes and spike
    counts, is the exact int8 product where that measured faster (``integer_products``, see
    :class:`SpikeConv2d`); otherwise, and in training, the plain layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _takes_integer_products(self, x):
            return super().forward(x)
        rows = x.detach().reshape(-1, self.in_features)[..., None, None]
        weight, bias = self.weight.detach(), _detached(self.bias)
        float32 = functools.partial(F.linear, x, weight, bias)
        shape = (*x.shape[:-1], self.out_features)
        out = self._integer_product(
            rows, weight[..., None, None], bias, 0, float32, lambda out: out.reshape(shape)
        )  # the [M, C_out, 1, 1] rows of the int8 product are those of the output: a view
        return float32() if out is None else out


class SpikeConv1d(_SpikeDrivenOutput, _IntegerProducts, nn.Conv1d):
    """A pointwise ``nn.Conv1d`` (kernel 1, stride 1, no groups) whose output, in eval mode on CPU
    outside autograd, is spike-driven for spikes below its crossover (``max_density``, see
    :class:`SpikeConv2d`; with a multiple of 16 outputs), else for spikes and spike counts the
    exact int8 product where that measured faster (``integer_products``); otherwise, and in
    training, the plain layer's. Those two products leave their output in their input's layout
    (token-major for the tokens of a channels-last model, which the attention kernel then reads
    where they lie), where the plain layer's is contiguous: the families' views take both."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pointwise = (self.kernel_size, self.stride, self.padding, self.groups) == (
            (1,), (1,), (0,), 1
        )  # fmt: skip
        if not (pointwise and x.dim() == 3 and _takes_integer_products(self, x)):
            return super().forward(x)
        x4, weight4 = x.detach()[:, :, None], self.weight.detach()[..., None]
        bias = _detached(self.bias)

        def dense() -> torch.Tensor:
            float32 = functools.partial(self._conv_forward, x, weight4.squeeze(3), bias)
            out = self._integer_product(x4, weight4, bias, 0, float32, lambda y: y.squeeze(2))
            return float32() if out is None else out

        out = None
        if self.out_channels % 16 == 0 and not torch.is_grad_enabled():
            out = self._spike_driven_output(x4, weight4, bias, 0, dense)
        return dense() if out is None else out.squeeze(2)


def _square_pool(pool: nn.MaxPool2d) -> tuple[int, int, int] | None:
    """``(kernel, stride, padding)`` of a max pool that the spike kernels run (square, floor
    mode, no dilation or indices), else None."""
    kernel, stride, padding, dilation = (
        value if isinstance(value, tuple) else (value, value)
        for value in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)
    )
    plain = not pool.ceil_mode and not pool.return_indices and dilation == (1, 1)
    square = kernel[0] == kernel[1] and stride[0] == stride[1] and padding[0] == padding[1]
    return (kernel[0], stride[0], padding[0]) if plain and square else None


def _takes_integer_products(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer`` in its mode may run int8 products for ``x`` (what they take)."""
    return (
        not layer.training
        and x.device.type == "cpu"
        and x.dtype == layer.weight.dtype == torch.float32
        and x.dim() >= 2
        and native.library() is not None
    )


def _detached(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach()


def _rebuilt(conv: nn.Conv2d, kind: type[nn.Conv2d]) -> nn.Conv2d:
    """A ``kind`` with the hyperparameters of ``conv``, sharing its parameters and mode."""
    rebuilt = kind(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
    )  # fmt: skip
    rebuilt.weight, rebuilt.bias = conv.weight, conv.bias
    rebuilt.train(conv.training)
    return rebuilt


class _SpikeConv(torch.autograd.Function):
    """A :class:`SpikeConv2d` under autograd: both products that multiply by ``x`` spike-driven."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conv: SpikeConv2d,
    ) -> Any:
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        return conv.product(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        return *ctx.conv.grads(grad_out, x, weight, ctx.needs_input_grad[:3]), None


def _crossing(
    spike_driven: Callable[[float], torch.Tensor | None],
    dense: Callable[[], torch.Tensor],
    x: torch.Tensor,
    max_density: float | None,
) -> tuple[torch.Tensor | None, float | None]:
    """The spike-driven product for ``x`` if ``max_density`` picks it (None: the caller runs
    the dense one), and the crossover for later calls.

    ``spike_driven(limit)`` returns None when ``x`` is not spike counts or has more than
    ``limit`` spikes per element.
    An unmeasured crossover (None) is measured on the first spike input: both paths timed
    (``dense`` only for that), the spike-driven time taken as proportional to the density.
    """
    if max_density is not None:
        return (spike_driven(max_density) if max_density > 0 else None), max_density
    if spike_driven(1.0) is None:  # not spikes: measure on a later input (else: warmed up)
        return None, None
    density = max(x.sum().item() / x.numel(), MIN_TIMED_DENSITY)
    spike_driven_s, out = _fastest_of(TIMING_CALLS, lambda: spike_driven(1.0))
    dense_s, _ = _fastest_of(TIMING_CALLS, dense)
    return out, min(1.0, density * dense_s / spike_driven_s)


def _fastest_of(calls: int, run: Callable[[], Any]) -> tuple[float, Any]:
    """The shortest time of ``calls`` runs of ``run()``, and its last result."""
    best, result = float("inf"), None
    for _ in range(calls):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def conv2d_forward(
    conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``conv``'s output for ``x`` outside autograd (spike-driven for a :class:`SpikeConv2d`)."""
    if isinstance(conv, SpikeConv2d):
        return conv.product(x, weight, bias)
    return conv._conv_forward(x, weight, bias)


def conv2d_backward(
    conv: nn.Conv2d,
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``conv`` w.r.t. ``(x, weight, bias)`` where ``output_mask`` asks for them
    (the weight gradient spike-driven for a :class:`SpikeConv2d`)."""
    if isinstance(conv, SpikeConv2d):
        return conv.grads(grad_out, x, weight, output_mask)
    return _dense_grads(conv, grad_out, x, weight, output_mask)


def _dense_grads(
    conv: nn.Conv2d,
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """oneDNN's gradients of ``conv`` where ``output_mask`` asks for them, in one call."""
    if not any(output_mask):
        return None, None, None
    bias_sizes = None if conv.bias is None else [conv.out_channels]
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight.detach(), bias_sizes, conv.stride, conv.padding, conv.dilation,
        False, [0, 0], conv.groups, list(output_mask),
    )  # fmt: skip


def spike_driven_convolutions(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn every ``nn.Conv2d`` of ``model`` (in place) into a :class:`SpikeConv2d` sharing its
    parameters, or, with ``enabled=False``, every :class:`SpikeConv2d` back into an ``nn.Conv2d``.

    Modules are replaced: hooks registered on the old ones do not move to the new ones.
    """

    def swap(child: nn.Module) -> nn.Module | None:
        if enabled and type(child) is nn.Conv2d:
            return SpikeConv2d.from_conv(child)
        if not enabled and isinstance(child, SpikeConv2d):
            return child.to_conv()
        return None

    return swap_layers(model, swap)


def integer_token_layers(model: nn.Module) -> nn.Module:
    """Turn every ``nn.Linear`` and ``nn.Conv1d`` of ``model`` (in place) into a
    :class:`SpikeLinear` / :class:`SpikeConv1d` sharing its parameters (for inference: they
    differ from the plain layers only in eval mode)."""

    def swap(child: nn.Module) -> nn.Module | None:
        if type(child) is nn.Linear:
            layer = SpikeLinear(
                child.in_features, child.out_features, child.bias is not None, device="meta"
            )
        elif type(child) is nn.Conv1d:
            layer = SpikeConv1d(
                child.in_channels, child.out_channels, child.kernel_size, child.stride,
                child.padding, child.dilation, child.groups, child.bias is not None,
                child.padding_mode, device="meta",
            )  # fmt: skip
        else:
            return None
        layer.weight, layer.bias = child.weight, child.bias
        return layer.train(child.training)

    return swap_layers(model, swap)


def swap_layers(model: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace, in place, every submodule of ``model`` for which ``swap(module)`` returns a
    module by that module (hooks registered on the old ones stay behind)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            replacement = swap(child)
            if replacement is not None:
                setattr(module, name, replacement)
    return model
