"""Registers Castling-ViT with the `transformers` Auto classes (run on `import castling_hf`)."""

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

from .models.castling_vit import (
    CastlingViTBackbone,
    CastlingViTConfig,
    CastlingViTForImageClassification,
    CastlingViTForObjectDetection,
    CastlingViTModel,
)


def register_auto_classes() -> None:
    """Make `Auto*.from_pretrained` resolve `model_type="castling_vit"` to the Castling-ViT classes.

    Castling-ViT reads images as ViT does, so its image processor is ViT's: the PIL backend, or the torchvision
    backend where torchvision is installed. Detection checkpoints save Deformable DETR's image processor, which
    `AutoImageProcessor` finds by the type recorded in `preprocessor_config.json`.
    """
    AutoConfig.register(CastlingViTConfig.model_type, CastlingViTConfig, exist_ok=True)
    AutoModel.register(CastlingViTConfig, CastlingViTModel, exist_ok=True)
    AutoModelForImageClassification.register(CastlingViTConfig, CastlingViTForImageClassification, exist_ok=True)
    AutoModelForObjectDetection.register(CastlingViTConfig, CastlingViTForObjectDetection, exist_ok=True)
    AutoBackbone.register(CastlingViTConfig, CastlingViTBackbone, exist_ok=True)
    image_processor_classes = {"pil": ViTImageProcessorPil}
    if is_torchvision_available():
        from transformers import ViTImageProcessor

        image_processor_classes["torchvision"] = ViTImageProcessor
    AutoImageProcessor.register(CastlingViTConfig, image_processor_classes=image_processor_classes, exist_ok=True)
    register_pipeline_names()


def register_pipeline_names() -> None:
    """Name the detector in the table `pipeline("object-detection")` checks a model against: it looks the model's
    class name up in `transformers`' static `MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES`, which
    `AutoModelForObjectDetection.register` does not reach, and logs an error (then runs anyway) for a class it does
    not find. The Auto classes resolve `castling_vit` through their registered entries, never through this table."""
    modeling_auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault(
        CastlingViTConfig.model_type, CastlingViTForObjectDetection.__name__
    )


def image_processor_for(config: CastlingViTConfig) -> ViTImageProcessorPil:
    """A ViT image processor that resizes to the model's `image_size` (ImageNet mean and std)."""
    height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    return ViTImageProcessorPil(size={"height": height, "width": width})
