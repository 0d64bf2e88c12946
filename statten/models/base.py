"""What every statten model is: a time-first spiking network with the same input contract,
memory-efficient switch and inference hooks, whatever its family.

A family's model class derives from :class:`SpikingModel` and defines ``forward_features`` and
``forward_head``; the rest of statten relies only on what is declared here and in the family's
:class:`~statten.models.family.ModelFamily`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from statten.fast.functions import use_fused_neurons
from statten.fast.host_memory import release_free_memory
from statten.fast.spike_conv import SpikeConv2d, spike_driven_convolutions
from statten.fast.storage import spike_storage

__all__ = ["SpikingModel"]


class SpikingModel(nn.Module):
    """Base of the models of every family.

    Attributes every model sets: ``family_name`` (class attribute), ``img_size``,
    ``in_channels``, ``num_classes``, ``num_features``, ``T`` (time steps), ``event_input``
    (True when it is built for event frames ``[B, T, C, H, W]``) and ``per_step_logits`` (True
    when ``forward`` returns ``[T, B, classes]``, e.g. for TET).
    """

    family_name: str  # the registered family (statten.models.family)
    img_size: int
    in_channels: int
    num_classes: int
    num_features: int
    T: int
    event_input: bool = False
    per_step_logits: bool = False

    def __init__(self) -> None:
        super().__init__()
        self._memory_efficient = False

    @property
    def memory_efficient(self) -> bool:
        """Fused LIF layers and 1-byte spikes for backward: bit-identical, less memory."""
        return self._memory_efficient

    @memory_efficient.setter
    def memory_efficient(self, enabled: bool) -> None:
        self._memory_efficient = bool(enabled)
        use_fused_neurons(self, self._memory_efficient)

    @property
    def spike_driven(self) -> bool:
        """Spike-driven convolutions (:mod:`statten.fast.spike_conv`): on CPU, the output and the
        weight gradient of every convolution fed spikes add weights or gradients at the spikes
        where, by measurement, that beats the dense product. Not bit-identical (opt-in)."""
        return any(isinstance(module, SpikeConv2d) for module in self.modules())

    @spike_driven.setter
    def spike_driven(self, enabled: bool) -> None:
        spike_driven_convolutions(self, bool(enabled))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (timm convention), e.g. for fine-tuning or linear probing."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def time_major(self, x: torch.Tensor) -> torch.Tensor:
        """Check the input and lay it out as ``[T, B, C, H, W]`` (images repeated over T)."""
        if x.dim() == 4:
            channels = x.shape[1]
        elif x.dim() == 5:
            channels = x.shape[2]
            if x.shape[1] != self.T:
                raise ValueError(
                    f"event input has {x.shape[1]} time steps (shape {tuple(x.shape)}), "
                    f"but the model was built with T={self.T}"
                )
        else:
            raise ValueError(
                f"expected images [B, C, H, W] or event frames [B, T, C, H, W], got a "
                f"{x.dim()}-D input of shape {tuple(x.shape)}"
            )
        if channels != self.in_channels:
            raise ValueError(
                f"input has {channels} channels (shape {tuple(x.shape)}), "
                f"but the model expects in_channels={self.in_channels}"
            )
        if x.dim() == 4:
            return x.unsqueeze(0).expand(self.T, *x.shape)
        return x.transpose(0, 1)

    def example_input(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A random input batch of the shape the model is built for (benchmarks, profiling).

        Event models get non-negative integer frame counts, image models normal noise.
        """
        size = (self.in_channels, self.img_size, self.img_size)
        if self.event_input:
            return torch.rand(batch_size, self.T, *size, device=device).mul_(4).floor_()
        return torch.randn(batch_size, *size, device=device)

    def batchnorm_folds(self) -> list[tuple[nn.Module, str, str]]:
        """``(parent, weight_layer, batchnorm)`` names of BatchNorms that can be folded at
        inference into the conv or linear layer right in front of them (same output channels).

        The default pairs ``<x>conv<y>`` / ``<x>linear<y>`` children with a ``<x>bn<y>`` sibling,
        the naming every family's reference code uses; a family whose names differ overrides it.
        """
        pairs = []
        for parent in self.modules():
            children = dict(parent.named_children())
            for name, child in children.items():
                if not isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                    continue
                kind = "linear" if isinstance(child, nn.Linear) else "conv"
                bn_name = name.replace(kind, "bn", 1)
                if bn_name != name and isinstance(
                    children.get(bn_name), (nn.BatchNorm1d, nn.BatchNorm2d)
                ):
                    pairs.append((parent, name, bn_name))
        return pairs

    def loss(self, output: Any, target: torch.Tensor, criterion: Callable) -> torch.Tensor:
        """The training loss of ``output`` (what ``forward`` returned in train mode) under
        ``criterion``; a model with several outputs (e.g. a distillation head) combines them."""
        return criterion(output, target)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compact = self.memory_efficient and torch.is_grad_enabled()
        compact = compact and not torch.compiler.is_compiling()
        with spike_storage(compact):
            output = self.forward_head(self.forward_features(self.time_major(x)))
        if compact and x.device.type == "cpu":
            release_free_memory()  # what the forward pass freed, before backward allocates
        return output
