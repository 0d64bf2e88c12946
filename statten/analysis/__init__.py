"""Analysis tools: spike recording and firing rates."""

from statten.analysis.recorder import SpikeRecorder

__all__ = ["SpikeRecorder"]
