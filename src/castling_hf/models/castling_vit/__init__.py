"""Castling-ViT: the plain family (ViT, DeiT, Dinov2, DINOv3 layouts)."""

from .configuration_castling_vit import CASTLING_VIT_SIZES, CastlingViTConfig
from .modeling_castling_vit import (
    CastlingViTBackbone,
    CastlingViTForImageClassification,
    CastlingViTForObjectDetection,
    CastlingViTModel,
    CastlingViTObjectDetectionOutput,
    CastlingViTPreTrainedModel,
)

__all__ = [
    "CASTLING_VIT_SIZES",
    "CastlingViTBackbone",
    "CastlingViTConfig",
    "CastlingViTForImageClassification",
    "CastlingViTForObjectDetection",
    "CastlingViTModel",
    "CastlingViTObjectDetectionOutput",
    "CastlingViTPreTrainedModel",
]
