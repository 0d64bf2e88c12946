"""Analysis tools: spike recording, firing rates, operation counts and energy estimates.

``statten profile`` (:mod:`statten.analysis.profile`) puts them together; see docs/profile.md.
"""

from statten.analysis.energy import EnergyModel
from statten.analysis.ops import LayerOps, OpRecorder
from statten.analysis.recorder import SpikeRecorder

__all__ = ["EnergyModel", "LayerOps", "OpRecorder", "SpikeRecorder"]
