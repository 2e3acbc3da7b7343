"""Registers the Castling families with the `transformers` Auto classes (run on `import castling_hf`)."""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForObjectDetection,
    ViTImageProcessorPil,
)
from transformers.models.auto import modeling_auto
from transformers.utils import is_torchvision_available

from .configuration_utils import CastlingAttentionConfig
from .models.castling_mvitv2 import (
    CastlingMViTv2Backbone,
    CastlingMViTv2Config,
    CastlingMViTv2ForImageClassification,
    CastlingMViTv2Model,
)
from .models.castling_vit import (
    CastlingViTBackbone,
    CastlingViTConfig,
    CastlingViTForImageClassification,
    CastlingViTForObjectDetection,
    CastlingViTModel,
)

# Each family's config and its model class for each Auto class.
FAMILY_AUTO_CLASSES = {
    CastlingViTConfig: {
        AutoModel: CastlingViTModel,
        AutoModelForImageClassification: CastlingViTForImageClassification,
        AutoModelForObjectDetection: CastlingViTForObjectDetection,
        AutoBackbone: CastlingViTBackbone,
    },
    CastlingMViTv2Config: {
        AutoModel: CastlingMViTv2Model,
        AutoModelForImageClassification: CastlingMViTv2ForImageClassification,
        AutoBackbone: CastlingMViTv2Backbone,
    },
}


def register_auto_classes() -> None:
    """Make `Auto*.from_pretrained` resolve `model_type="castling_vit"` and `"castling_mvitv2"` to their classes.

    Both read images as ViT does, so their image processor is ViT's: the PIL backend, or the torchvision backend
    where torchvision is installed. Checkpoints that carry another processor (a castled source's own, Deformable
    DETR's for the detector) are found by the type recorded in `preprocessor_config.json`.
    """
    image_processor_classes = {"pil": ViTImageProcessorPil}
    if is_torchvision_available():
        from transformers import ViTImageProcessor

        image_processor_classes["torchvision"] = ViTImageProcessor
    for config_class, model_classes in FAMILY_AUTO_CLASSES.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class, model_class in model_classes.items():
            auto_class.register(config_class, model_class, exist_ok=True)
        AutoImageProcessor.register(config_class, image_processor_classes=image_processor_classes, exist_ok=True)
    register_pipeline_names()


def register_pipeline_names() -> None:
    """Name the detector in the table `pipeline("object-detection")` checks a model against: it looks the model's
    class name up in `transformers`' static `MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES`, which
    `AutoModelForObjectDetection.register` does not reach, and logs an error (then runs anyway) for a class it does
    not find. The Auto classes resolve `castling_vit` through their registered entries, never through this table."""
    modeling_auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault(
        CastlingViTConfig.model_type, CastlingViTForObjectDetection.__name__
    )


def image_processor_for(config: CastlingAttentionConfig) -> ViTImageProcessorPil:
    """A ViT image processor that resizes to a new model's `image_size` (ViT's 0.5 mean and std)."""
    height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    return ViTImageProcessorPil(size={"height": height, "width": width})
