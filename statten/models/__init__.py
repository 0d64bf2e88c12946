"""Model families of statten, registered with timm on import."""

from statten.models.sdt import MODEL_FACTORIES, SpikeDrivenTransformer, checkpoint_filter_fn

__all__ = ["MODEL_FACTORIES", "SpikeDrivenTransformer", "checkpoint_filter_fn"]
