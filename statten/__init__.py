"""statten: STAtten spiking transformers (CVPR 2025) in PyTorch, faithful to the reference code.

Importing statten registers its model families (``statten.list_models()``) with timm
(``timm.create_model("sdt", ...)``); their classes are in :mod:`statten.models`.
"""

from statten.analysis.recorder import SpikeRecorder
from statten.attention import SpatioTemporalAttention
from statten.checkpoint import (
    CheckpointError,
    create_model_from_checkpoint,
    load_checkpoint,
    model_config_from_checkpoint,
)
from statten.factory import create_model, list_models
from statten.models import SpikeDrivenTransformer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "SpatioTemporalAttention",
    "SpikeDrivenTransformer",
    "SpikeRecorder",
    "create_model",
    "create_model_from_checkpoint",
    "list_models",
    "load_checkpoint",
    "model_config_from_checkpoint",
]
