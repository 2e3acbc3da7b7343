"""castling-hf: Castling-ViT (You et al., CVPR 2023) as Hugging Face Transformers model families: the plain
Castling-ViT and the multiscale Castling-MViTv2.

Importing this package registers both with the `transformers` Auto classes.
"""

from . import data, metrics
from .attention import linear_angular_attention, masked_softmax_attention
from .conversion import castle, from_vit, source_image_processor
from .distillation import CastlingDistillationTrainer, fidelity
from .in_place import register_castled_families
from .modeling_utils import (
    measure_softmax_mask_kept_shares,
    set_softmax_mask_scale,
    softmax_mask_kept_shares,
    softmax_mask_scales,
    switch_to_inference,
)
from .models.castling_mvitv2 import (
    CASTLING_MVITV2_SIZES,
    CastlingMViTv2Backbone,
    CastlingMViTv2Config,
    CastlingMViTv2ForImageClassification,
    CastlingMViTv2Model,
    CastlingMViTv2PreTrainedModel,
)
from .models.castling_vit import (
    CASTLING_VIT_SIZES,
    CastlingViTBackbone,
    CastlingViTConfig,
    CastlingViTForImageClassification,
    CastlingViTForObjectDetection,
    CastlingViTModel,
    CastlingViTObjectDetectionOutput,
    CastlingViTPreTrainedModel,
)
from .registration import image_processor_for, register_auto_classes
from .training import CastlingMaskDecayCallback, clear_held_gradients, softmax_mask_scale

register_auto_classes()
register_castled_families()

__version__ = "0.1.0"

__all__ = [
    "CASTLING_MVITV2_SIZES",
    "CASTLING_VIT_SIZES",
    "CastlingMViTv2Backbone",
    "CastlingMViTv2Config",
    "CastlingMViTv2ForImageClassification",
    "CastlingMViTv2Model",
    "CastlingMViTv2PreTrainedModel",
    "data",
    "metrics",
    "CastlingDistillationTrainer",
    "CastlingMaskDecayCallback",
    "castle",
    "clear_held_gradients",
    "measure_softmax_mask_kept_shares",
    "set_softmax_mask_scale",
    "softmax_mask_kept_shares",
    "softmax_mask_scales",
    "switch_to_inference",
    "CastlingViTBackbone",
    "CastlingViTConfig",
    "CastlingViTForImageClassification",
    "CastlingViTForObjectDetection",
    "CastlingViTModel",
    "CastlingViTObjectDetectionOutput",
    "CastlingViTPreTrainedModel",
    "fidelity",
    "from_vit",
    "image_processor_for",
    "linear_angular_attention",
    "masked_softmax_attention",
    "register_auto_classes",
    "softmax_mask_scale",
    "source_image_processor",
]
