"""Recording the spikes of every neuron layer, by module name, without touching forward code."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from statten.naming import clean_module_name
from statten.neurons import is_neuron


class SpikeRecorder:
    """Context manager that records the output spikes of every neuron layer of a model.

    Layers are named by their module path (``patch_embed.proj_lif``, ``block.0.attn.q_lif``, ...,
    ``head_lif``), the same with or without DDP / ``torch.compile`` wrappers. Firing rates are
    accumulated over all forward calls made inside the ``with`` block::

        with SpikeRecorder(model) as rec:
            for x, _ in loader:
                model(x)
        rec.firing_rates()          # {name: tensor [T]}, mean spike rate per time step
        rec.mean_firing_rates()     # {name: float}, mean over time steps

    With ``keep_spikes=True`` the spike tensors ``[T, B, ...]`` of each call are kept (detached)
    in ``rec.spikes[name]``, a list with one entry per call.
    """

    def __init__(self, model: nn.Module, keep_spikes: bool = False) -> None:
        self.model = model
        self.keep_spikes = keep_spikes
        self.spikes: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = defaultdict(int)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def layer_names(self) -> list[str]:
        """Names of the neuron layers this recorder watches, in module order."""
        return [clean_module_name(n) for n, m in self.model.named_modules() if is_neuron(m)]

    def __enter__(self) -> SpikeRecorder:
        for name, module in self.model.named_modules():
            if is_neuron(module):
                self._handles.append(
                    module.register_forward_hook(self._hook(clean_module_name(name)))
                )
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, inputs: tuple, spikes: torch.Tensor) -> None:
            spikes = spikes.detach()
            per_step = spikes.flatten(1).sum(1, dtype=torch.float64)
            previous = self._sums.get(name)
            self._sums[name] = per_step if previous is None else previous + per_step
            self._counts[name] += spikes[0].numel()
            if self.keep_spikes:
                self.spikes[name].append(spikes)

        return record

    def spike_counts(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Spikes per time step ``{layer: float64 [T]}`` and neurons per time step ``{layer: n}``.

        The firing rate is their ratio; sums of these over processes give the rates of all the
        processes' samples together.
        """
        return dict(self._sums), dict(self._counts)

    def firing_rates(self) -> dict[str, torch.Tensor]:
        """Mean firing rate per time step, ``{layer name: float64 tensor [T]}`` (on the CPU)."""
        return {name: (s / self._counts[name]).cpu() for name, s in self._sums.items()}

    def mean_firing_rates(self) -> dict[str, float]:
        """Mean firing rate over all time steps, ``{layer name: float}``."""
        return {name: rates.mean().item() for name, rates in self.firing_rates().items()}

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.spikes.clear()
        self._sums.clear()
        self._counts.clear()
