"""Energy estimate of a spiking network from its operation counts (45 nm figures by default).

Spike-driven layers cost ``E_AC`` per synaptic operation, real-valued layers (the first
convolution, fed the image) ``E_MAC`` per dense multiply-accumulate. Defaults: Horowitz,
ISSCC 2014, 32-bit float at 45 nm, ``E_MAC = 4.6 pJ``, ``E_AC = 0.9 pJ``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from statten.analysis.ops import LayerOps

__all__ = ["E_AC_PJ", "E_MAC_PJ", "PJ_PER_MJ", "EnergyModel"]

E_MAC_PJ = 4.6
E_AC_PJ = 0.9
PJ_PER_MJ = 1e9


@dataclass(frozen=True)
class EnergyModel:
    """Energy per operation in picojoules: ``e_mac_pj`` per MAC, ``e_ac_pj`` per SOP."""

    e_mac_pj: float = E_MAC_PJ
    e_ac_pj: float = E_AC_PJ

    def __post_init__(self) -> None:
        if not (self.e_mac_pj >= 0 and self.e_ac_pj >= 0):
            raise ValueError(
                f"energies per operation must be >= 0, got E_MAC={self.e_mac_pj} pJ, "
                f"E_AC={self.e_ac_pj} pJ"
            )

    def layer_mj(self, layer: LayerOps) -> Tensor:
        """Energy per time step in mJ: SOPs x E_AC if spike-driven, else MACs x E_MAC."""
        if layer.spike_driven:
            return layer.sops * self.e_ac_pj / PJ_PER_MJ
        return layer.macs * self.e_mac_pj / PJ_PER_MJ

    def total_mj(self, layers: Sequence[LayerOps]) -> Tensor:
        """Energy of all ``layers`` per time step in mJ."""
        return torch.stack([self.layer_mj(layer) for layer in layers]).sum(0)
