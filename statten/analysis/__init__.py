"""Analysis tools: spike recording, firing rates, operation counts and energy estimates.

They work on any model through forward hooks and never import a model family: a family's module
that computes something they cannot see from the outside counts it itself (see
:class:`OpRecorder`). ``statten profile`` (:mod:`statten.engine.profiler`) puts them together;
see docs/profile.md.
"""

from statten.analysis.energy import EnergyModel
from statten.analysis.ops import LayerOps, OpRecorder
from statten.analysis.recorder import SpikeRecorder

__all__ = ["EnergyModel", "LayerOps", "OpRecorder", "SpikeRecorder"]
