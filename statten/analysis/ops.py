"""Dense and spike-driven operation counts of every layer, per time step, from forward hooks.

:class:`OpRecorder` watches a model while it runs (like :class:`~statten.analysis.SpikeRecorder`)
and counts, for every convolution, linear layer and attention product, the dense
multiply-accumulates (MACs) and the synaptic operations (SOPs) its spike inputs trigger.
``docs/profile.md`` states every counting rule; in short:

- a layer is *spike-driven* when every value it was fed is a non-negative integer (spikes, or
  counts of spikes); its SOPs are ``MACs x mean input value`` per time step, i.e. MACs times the
  input firing rate for binary input. Any other layer is real-valued (dense MACs only);
- a product of two spike tensors costs one SOP per pair of coinciding spikes;
- operations that fold exactly into weights or thresholds at inference (BatchNorm, the scale of
  STAtten's ``K^T V``), max pooling, token averaging, bias and residual additions and the
  neurons' own updates are not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor, nn

from statten.attention import SpatioTemporalAttention
from statten.naming import clean_module_name

__all__ = [
    "FLOPS_PER_MAC",
    "Counts",
    "LayerOps",
    "OpRecorder",
    "is_spike_count",
    "per_step_sum",
    "statten_counts",
]

# Layers counted as weighted sums: every convolution and linear map.
WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Dense FLOPs per counted MAC: a multiply and an add for weighted sums, one op for the rest.
FLOPS_PER_MAC = {"conv": 2, "linear": 2, "matmul": 2, "mul": 1, "sum": 1}
# {product label: (kind, macs [T], sops [T], spike_driven)} of one call of an attention.
Counts = dict[str, tuple[str, Tensor, Tensor, bool]]


def is_spike_count(x: Tensor) -> bool:
    """True if every element of ``x`` is a non-negative integer: spikes (0/1) or spike counts."""
    if x.dtype == torch.bool:
        return True
    return bool(((x >= 0) & (x == x.round())).all())


def per_step_sum(x: Tensor, time_steps: int) -> Tensor:
    """Sum of ``x`` per time step (float64 ``[T]``); ``x`` is ``[T, ...]`` or ``[T * B, ...]``."""
    return x.reshape(time_steps, -1).sum(1, dtype=torch.float64)


@dataclass
class LayerOps:
    """Operation counts of one layer, summed over the recorded calls (float64 ``[T]`` tensors).

    ``macs``: dense multiply-accumulates (one per element for element-wise products and sums);
    ``sops``: synaptic operations, meaningful when ``spike_driven``.
    """

    name: str
    kind: str
    params: int
    macs: Tensor
    sops: Tensor
    spike_driven: bool

    @property
    def flops(self) -> Tensor:
        """Dense floating-point operations per time step (bias additions not included)."""
        return self.macs * FLOPS_PER_MAC[self.kind]

    @property
    def input_rate(self) -> Tensor:
        """SOPs per dense MAC per time step: the input firing rate of a layer fed spikes."""
        return self.sops / self.macs.clamp(min=1)

    def scaled(self, factor: float) -> LayerOps:
        """The same counts multiplied by ``factor`` (e.g. ``1 / samples`` for per-image counts)."""
        return LayerOps(
            self.name,
            self.kind,
            self.params,
            self.macs * factor,
            self.sops * factor,
            self.spike_driven,
        )


def weighted_layer_counts(x: Tensor, macs: int, time_steps: int) -> tuple[Tensor, Tensor, bool]:
    """``(macs [T], sops [T], spike_driven)`` of a conv or linear layer with ``macs`` fed ``x``.

    SOPs per step are the step's MACs times the mean input value of that step.
    """
    steps = x.reshape(time_steps, -1)
    step_macs = torch.full((time_steps,), macs / time_steps, dtype=torch.float64)
    mean_input = steps.sum(1, dtype=torch.float64) / steps.shape[1]
    return step_macs, step_macs * mean_input, is_spike_count(x)


def dense_macs(module: nn.Module, out: Tensor) -> int:
    """MACs of a conv (``out`` elements x input channels per group x kernel) or linear layer."""
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return out.numel() * (module.in_channels // module.groups) * prod(module.kernel_size)


def statten_counts(q: Tensor, k: Tensor, v: Tensor) -> Counts:
    """Counts of STAtten's ``Q (K^T V)`` for ``q, k, v`` ``[T, B, heads, N, d]``.

    Step ``t`` is charged for its own tokens: ``N d^2`` MACs per head for ``K^T V`` and again
    for ``Q (K^T V)``. SOPs: the coinciding spike pairs of ``k`` and ``v`` (sum over tokens of
    ``|k_n| |v_n|``) and ``|q| x d``. The chunk size does not change any count. The scale of
    ``K^T V`` is not counted: it folds exactly into the threshold of the next neuron.
    """
    T, B, H, N, d = q.shape
    step_macs = torch.full((T,), float(B * H * N * d * d), dtype=torch.float64)
    kv_pairs = per_step_sum(k.sum(-1, dtype=torch.float64) * v.sum(-1, dtype=torch.float64), T)
    return {
        "k^T v": ("matmul", step_macs, kv_pairs, is_spike_count(k) and is_spike_count(v)),
        "q (k^T v)": ("matmul", step_macs.clone(), per_step_sum(q, T) * d, is_spike_count(q)),
    }


class OpRecorder:
    """Context manager counting the operations of every layer of a time-first spiking model.

    Counted: convolutions and linear layers, STAtten's products (hooked on
    :class:`~statten.attention.SpatioTemporalAttention`, which every family uses for its
    ``Q K^T V``), and whatever a module of a family counts itself: a module with a method
    ``register_op_counting(recorder, name)`` is asked to hook its own products with
    :meth:`hook` and report them with :meth:`add_products` (e.g. SDT's element-wise token mix)::

        with OpRecorder(model, time_steps=4) as ops:
            for x, _ in loader:
                model(x)
        ops.layers()        # [LayerOps] in execution order, summed over all calls

    Rows of an attention product are named ``<module>[<product>]``, e.g.
    ``block.0.attn.statten[k^T v]``.
    """

    def __init__(self, model: nn.Module, time_steps: int) -> None:
        self.model = model
        self.time_steps = time_steps
        self._layers: dict[str, LayerOps] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> OpRecorder:
        for name, module in self.model.named_modules():
            name = clean_module_name(name)
            if isinstance(module, WEIGHTED_LAYERS):
                self.hook(module, self._weighted_hook(name))
            elif isinstance(module, SpatioTemporalAttention):
                self.hook(module, self._statten_hook(name))
            elif hasattr(module, "register_op_counting"):
                module.register_op_counting(self, name)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def layers(self) -> list[LayerOps]:
        """Counts of every layer that ran, in the order of their first call."""
        return list(self._layers.values())

    def hook(self, module: nn.Module, hook: Callable, pre: bool = False) -> None:
        """Register a forward (or forward-pre) hook that lives as long as the ``with`` block."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(hook))

    def _add(
        self, name: str, kind: str, params: int, macs: Tensor, sops: Tensor, spiking: bool
    ) -> None:
        layer = self._layers.get(name)
        if layer is None:
            self._layers[name] = LayerOps(name, kind, params, macs, sops, spiking)
            return
        layer.macs = layer.macs + macs
        layer.sops = layer.sops + sops
        layer.spike_driven = layer.spike_driven and spiking

    def add_products(self, prefix: str, counts: Counts) -> None:
        """Add the counts of one call of products, as rows ``<prefix>[<product label>]``."""
        for label, (kind, macs, sops, spiking) in counts.items():
            self._add(f"{prefix}[{label}]", kind, 0, macs, sops, spiking)

    def _weighted_hook(self, name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple, out: Tensor) -> None:
            x = inputs[0].detach()
            macs, sops, spiking = weighted_layer_counts(x, dense_macs(module, out), self.time_steps)
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            params = sum(p.numel() for p in module.parameters(recurse=False))
            self._add(name, kind, params, macs, sops, spiking)

        return record

    def _statten_hook(self, name: str) -> Callable:
        def record(module: SpatioTemporalAttention, inputs: tuple, out: Tensor) -> None:
            q, k, v = (x.detach() for x in inputs[:3])
            self.add_products(name, statten_counts(q, k, v))

        return record
