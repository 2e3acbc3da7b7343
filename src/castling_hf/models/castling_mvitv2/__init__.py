"""Castling-MViTv2: the multiscale family (MViTv2's pooling attention, castled)."""

from .configuration_castling_mvitv2 import CASTLING_MVITV2_SIZES, CastlingMViTv2Config
from .modeling_castling_mvitv2 import (
    CastlingMViTv2Backbone,
    CastlingMViTv2ForImageClassification,
    CastlingMViTv2Model,
    CastlingMViTv2PreTrainedModel,
)

__all__ = [
    "CASTLING_MVITV2_SIZES",
    "CastlingMViTv2Backbone",
    "CastlingMViTv2Config",
    "CastlingMViTv2ForImageClassification",
    "CastlingMViTv2Model",
    "CastlingMViTv2PreTrainedModel",
]
