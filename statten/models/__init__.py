"""Model families of statten, registered with timm and with :mod:`statten.models.family` on import.

Each family lives in its own file (building blocks, model class, registered factories and its
:class:`~statten.models.family.ModelFamily` at the bottom).
"""

from statten.models.family import ModelFamily, family_names, get_family
from statten.models.qkformer import QKFormer
from statten.models.sdt import SpikeDrivenTransformer
from statten.models.sdtv2 import MetaSpikeFormer
from statten.models.spikformer import Spikformer

__all__ = [
    "MetaSpikeFormer",
    "ModelFamily",
    "QKFormer",
    "SpikeDrivenTransformer",
    "Spikformer",
    "family_names",
    "get_family",
]
