"""Castling a pretrained model: the source itself, each vision tower given the Castling terms in place, whose first
forward pass is the source's.

In the convex blend, (1 − α)·γ ⊙ (LA + DWConv) + α·(M⊙S)V, with α at 1 and no softmax mask threshold a castled
attention computes `proj(softmax(q kᵀ/√d) v)`: exactly the source's attention, with the source's own q/k/v/o weights
(docs/design.md §1, §8). Fine-tuning or distillation with the mask decay then hands each layer over to the
linear-angular term as α falls to 0 (§9). How a family's towers are found and castled is `in_place.TOWERS`, one
line per family (§10); here is what comes before it: loading the source, the exact start and the options a
castled model takes, and the image processor to save beside it. timm's MViTv2, whose pooling attention is not an
attention interface's, is converted into the project's Castling-MViTv2 instead (`conversion_timm`).
"""

import inspect
import os
import warnings

import transformers
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, PreTrainedConfig, PreTrainedModel, ViTImageProcessorPil
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from . import in_place
from .configuration_utils import CastlingAttentionConfig
from .modeling_utils import CastlingMethods

# With these and α = 1, a castled layer is the source's softmax attention: the convex blend weighs the linear term by
# 1 − α = 0, and the branch is dense. (γ = 1, so that the linear term is whole once α reaches 0.)
EXACT_START = dict(linear_branch_blend="convex", linear_branch_scale_init=1.0, softmax_mask_threshold=None)


def castling_start(overrides: dict) -> dict:
    """`EXACT_START` with `overrides` on top, as a castled config takes them. Refuses the overrides that lose the
    castled model's exact start or leave it without a linear term, and warns, by name, for those that change the
    start or the switch (docs/design.md §9)."""
    fields = {**EXACT_START, **overrides}
    blend, gamma = fields["linear_branch_blend"], fields["linear_branch_scale_init"]
    if blend == "additive" and gamma != 0:
        raise ValueError(
            f"castle(..., linear_branch_blend='additive') with linear_branch_scale_init={gamma:g} adds γ·(LA + DWConv) "
            "to the source's attention from the first step, so the castled model would not start as its source. "
            "Leave the blend to castle (convex), or give linear_branch_scale_init=0 for the additive blend of the "
            "first castling (which measured far below its source after the switch: docs/design.md §9)."
        )
    if blend == "additive":
        warnings.warn(
            "castle(..., linear_branch_blend='additive', linear_branch_scale_init=0) starts exactly, but a model "
            "castled with it keeps leaning on its softmax branch by shrinking γ and loses that at the switch "
            "(measured: docs/design.md §9). Leave the blend to castle (convex) unless you are measuring that.",
            UserWarning,
            stacklevel=3,
        )
    if blend == "convex" and gamma == 0:
        raise ValueError(
            "castle(..., linear_branch_scale_init=0) with the convex blend weighs the linear term by (1 − α)·γ = 0 "
            "while γ is held, so the layers lose their attention as α falls and have none at the switch. Leave "
            "linear_branch_scale_init to castle (1.0)."
        )
    if fields["softmax_mask_threshold"] is not None:
        warnings.warn(
            f"castle(..., softmax_mask_threshold={fields['softmax_mask_threshold']}) masks the softmax branch from the "
            "first step, so the castled model does not start exactly as its source (with None, the default, it does).",
            UserWarning,
            stacklevel=3,
        )
    return fields


# The fields of Castling attention: all that a model castled in place records (its source's config keeps the rest).
ATTENTION_FIELDS = (
    "attention_mode",
    "angular_normalization",
    "angular_eps",
    "residual_conv",
    "residual_kernel_size",
    "softmax_mask_threshold",
    "softmax_mask_threshold_type",
    "linear_branch_scale_init",
    "linear_branch_blend",
)


def castling_options(overrides: dict) -> dict:
    """`castling_start(overrides)` for a model castled in place, which keeps its source's config whole: overrides
    other than the fields of Castling attention are refused by name."""
    others = sorted(set(overrides) - set(ATTENTION_FIELDS))
    if others:
        raise TypeError(
            f"castle(...) got {others} for a model castled in place: it keeps its source's own config, heads and "
            f"labels, and takes only the fields of Castling attention ({', '.join(ATTENTION_FIELDS)})."
        )
    options = CastlingAttentionConfig(**castling_start(overrides))
    return {name: getattr(options, name) for name in ATTENTION_FIELDS}


# What a new label set is given by: the source is loaded with it, and its classifier starts fresh.
LABEL_FIELDS = ("num_labels", "id2label", "label2id")


def _square(config) -> dict:
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    return {"height": height, "width": width}


_IMAGENET = dict(image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
_DINOV2_PROCESSOR = lambda config: dict(  # noqa: E731
    size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, **_IMAGENET
)
# The image processor settings a family's published checkpoints carry, from its tower config, for a source saved
# without one (`source_image_processor`); a family not listed gets its processor class's defaults at its image size.
FAMILY_IMAGE_PROCESSORS = {
    "vit": lambda config: dict(size=_square(config)),  # 0.5 mean and std: ViT's defaults
    "deit": lambda config: dict(size={"height": 256, "width": 256}, crop_size=_square(config), **_IMAGENET),
    "dinov2": _DINOV2_PROCESSOR,
    "dinov2_with_registers": _DINOV2_PROCESSOR,
    "dinov3_vit": lambda config: dict(size={"height": 224, "width": 224}, **_IMAGENET),
}
SUPPORTED = (
    f"transformers models holding a vision tower of the families {', '.join(sorted(in_place.TOWERS))} (base models, "
    "classifiers, backbones, two-tower models, and task models on them such as UperNet, DPT, Depth Anything, "
    "Mask2Former, EoMT, LLaVA or PaliGemma), castled in place; timm's VisionTransformer, castled in place; and "
    "timm's MultiScaleVit (MViTv2), converted into Castling-MViTv2"
)
CASTLED_MODEL_TYPES = ("castling_vit", "castling_mvitv2")


def refuse_castled(config: PreTrainedConfig) -> None:
    if config.model_type in CASTLED_MODEL_TYPES or config.model_type.startswith("castled_"):
        raise TypeError(
            f"This is a castled model already ({config.model_type!r}): castle takes a pretrained softmax-attention "
            f"source ({SUPPORTED}). Fine-tune it with CastlingMaskDecayCallback, or distil it, instead."
        )


def load_source(model_or_path, model_class: type | None = None, **loading) -> nn.Module:
    """The source as a model: a model object as it is; a local timm checkpoint folder built by timm; a directory or
    Hub name with a `transformers` config loaded strictly with `model_class`, else the class that config records (a
    timm checkpoint on the Hub, whose config records none, with `TimmWrapperForImageClassification`, as
    `transformers` reads it). `loading` goes to `from_pretrained` (`revision`, `cache_dir`, `token`,
    `trust_remote_code`, or a new label set). Weights the checkpoint lacks are refused by name, but those of a head
    that starts fresh because the caller asked for another class or label set."""
    from .conversion_timm import timm_mvitv2_source, timm_wrapper_of

    timm_source = timm_mvitv2_source(model_or_path)
    if timm_source is not None:
        return timm_source
    if isinstance(model_or_path, nn.Module):
        if model_class is not None and not isinstance(model_or_path, model_class):
            raise TypeError(
                f"castle(model, model_class={model_class.__name__}): model_class is the class a checkpoint is loaded "
                f"with, and this {type(model_or_path).__name__} is loaded already; castle keeps its class."
            )
        if isinstance(model_or_path, PreTrainedModel):
            refuse_castled(model_or_path.config)
            return model_or_path
        if type(model_or_path).__module__.startswith("timm."):
            return timm_wrapper_of(model_or_path)
        raise TypeError(f"castle takes {SUPPORTED}; got a {type(model_or_path).__name__}.")
    config = AutoConfig.from_pretrained(model_or_path, **without_labels(loading))
    refuse_castled(config)
    source_class = model_class or source_model_class(config)
    if source_class is None:
        raise TypeError(
            f"{model_or_path!r} names its model class {config.architectures or 'nowhere'} in its config; castle needs "
            "one transformers class there to load it with (or model_class=...)."
        )
    if not issubclass(source_class, PreTrainedModel) or issubclass(source_class, CastlingMethods):
        raise TypeError(
            f"castle(..., model_class={source_class.__name__}): model_class is the transformers class to load the "
            "source with (e.g. ViTForImageClassification); castle keeps that class, castled in place."
        )
    new_head = model_class is not None or set(loading) & set(LABEL_FIELDS)
    if set(loading) & set(LABEL_FIELDS):
        loading = {**loading, "ignore_mismatched_sizes": True}
    model, info = source_class.from_pretrained(model_or_path, output_loading_info=True, **loading)
    pooler_only = info["missing_keys"] and all(".pooler." in f".{key}" for key in info["missing_keys"])
    if pooler_only and "add_pooling_layer" in inspect.signature(source_class.__init__).parameters:
        # A base model saved without its pooler: load it as it was saved rather than with a random pooler.
        model, info = source_class.from_pretrained(
            model_or_path, add_pooling_layer=False, output_loading_info=True, **loading
        )
    tower = in_place.first_tower(model)
    inside = next((f"{name}." if name else "" for name, module in model.named_modules() if module is tower), "")
    problems = {
        kind: keys
        for kind, keys in info.items()
        if keys and kind != "error_msgs" and not (new_head and fresh_head(kind, keys, inside))
    }
    if problems:
        raise ValueError(
            f"The checkpoint {model_or_path!r} does not match its own config ({source_class.__name__}): "
            + "; ".join(f"{kind.replace('_', ' ')}: {sorted(map(str, keys))}" for kind, keys in problems.items())
            + ". Castling it would leave those weights random, so nothing was castled."
        )
    return model


def fresh_head(kind: str, keys, tower_prefix: str) -> bool:
    """Whether loading problems are those of a head that starts fresh: weights the new head does not use, or missing
    and resized weights outside the vision tower (whose weights named `tower_prefix…` must all be the checkpoint's)."""
    names = [key[0] if isinstance(key, tuple) else str(key) for key in keys]  # mismatched: (name, shapes...)
    return kind == "unexpected_keys" or not any(name.startswith(tower_prefix) for name in names)


def without_labels(loading: dict) -> dict:
    return {name: value for name, value in loading.items() if name not in LABEL_FIELDS}


def source_model_class(config: PreTrainedConfig) -> type | None:
    """The `transformers` class a saved source's config records (`architectures`), or for a timm checkpoint, which
    records none, the one `transformers` reads it with: `TimmWrapperForImageClassification`, or `TimmWrapperModel`
    for one without a classifier."""
    architectures = config.architectures or []
    if len(architectures) == 1:
        return getattr(transformers, architectures[0], None)
    if config.model_type == "timm_wrapper" and not architectures:
        return transformers.TimmWrapperForImageClassification if config.num_labels else transformers.TimmWrapperModel
    return None


def castle(model_or_path, model_class: type | None = None, **overrides):
    """The Castling form of a pretrained model, whose first forward pass is the source's (docs/design.md §8, §10).

    `model_or_path` is a model object, or a local directory or Hub name holding one (loaded with the class its config
    records, or `model_class`, a `transformers` class): any `transformers` model holding vision towers of the
    `in_place.TOWERS` families (ViT, DeiT, Dinov2 with or without registers, DINOv3, SigLIP, SigLIP2, CLIP, EoMT,
    I-JEPA; base models, classifiers, backbones, two-tower models, and the task models on them: UperNet, DPT, Depth
    Anything, Mask2Former, LLaVA, PaliGemma, ...), timm's `VisionTransformer`, or timm's MViTv2. Each tower is
    castled in place (`in_place.castle_in_place`): the model keeps its class (`Castled<Class>` for the towers' own
    classes), config, heads and weights, and its attention modules get the Castling terms, set for an exact start
    (`castling_start`); `overrides` are fields of Castling attention, or for a checkpoint loaded here a new label set
    (`num_labels`, `id2label`, `label2id`), with which its classifier starts fresh. timm's MViTv2 becomes a
    Castling-MViTv2 (`conversion_timm.castle_mvitv2`). Fine-tune with `CastlingMaskDecayCallback`, or without labels
    distil from the source with `CastlingDistillationTrainer`, then `switch_to_inference()`; every model returned
    has `CastlingMethods` (`save_pretrained(..., inference=True)`, `switch_to_inference()`, ...). The source is left as
    it was; the castled model is on its device, in its dtype, in eval mode.
    """
    from .conversion_timm import castle_mvitv2, check_timm_vision_transformer, timm_labels, timm_model_of

    labels = {name: overrides.pop(name) for name in LABEL_FIELDS if name in overrides}
    if isinstance(model_or_path, nn.Module) and labels and timm_model_of(model_or_path) is None:
        raise TypeError(
            f"castle(model, {', '.join(f'{name}=...' for name in labels)}): a model object is castled with the head "
            "it has. Give castle the checkpoint's folder or Hub name with the new labels, or load the source with "
            "them yourself (from_pretrained(..., id2label=..., ignore_mismatched_sizes=True))."
        )
    # A new label set replaces the source's whole, as `transformers` would make it.
    if "num_labels" in labels and "id2label" not in labels:
        labels["id2label"] = {index: f"LABEL_{index}" for index in range(labels["num_labels"])}
    if "id2label" in labels and "label2id" not in labels:
        labels["label2id"] = {name: int(index) for index, name in labels["id2label"].items()}
    source = load_source(model_or_path, model_class, **labels)
    timm_model = timm_model_of(source)
    if timm_model is not None:
        names = source.config.id2label if isinstance(source, PreTrainedModel) else timm_labels(timm_model)
        return castle_mvitv2(timm_model, names, model_class, **labels, **overrides)
    if source.config.model_type == "timm_wrapper":
        check_timm_vision_transformer(source.timm_model, source.config.architecture)
    if not in_place.tower_families(source):
        raise TypeError(f"castle takes {SUPPORTED}; {type(source).__name__} holds none of these towers.")
    target = in_place.castle_in_place(source, castling_options(overrides))
    reference = next(source.parameters())
    return target.to(device=reference.device, dtype=reference.dtype).eval()


def source_image_processor(model_or_path, **loading):
    """The image processor that prepares images as the source (anything `castle` takes) was trained on them, to
    save with its castled model: the one saved with the source (a folder or Hub name holding
    `preprocessor_config.json`), else the one its family's published checkpoints carry (ImageNet mean and std for
    DeiT, Dinov2 and DINOv3, 0.5 for ViT), in the class `transformers` gives its model type (a task model's own:
    UperNet's, DPT's, ...). A processor class that needs torchvision where it is not installed (DINOv3's) becomes
    ViT's PIL processor with the same size, mean and std: both resize, rescale and normalise. `loading` goes to
    `from_pretrained` (`revision`, `cache_dir`, `token`, `trust_remote_code`)."""
    from .conversion_timm import is_timm_checkpoint, timm_image_processor, timm_model_of

    local_timm = isinstance(model_or_path, (str, os.PathLike)) and is_timm_checkpoint(model_or_path)
    if isinstance(model_or_path, (str, os.PathLike)) and not local_timm:
        try:
            settings, _ = ImageProcessingMixin.get_image_processor_dict(model_or_path, **loading)
        except OSError:  # saved without a processor
            settings = None
        if settings is not None and "data_config" in settings:  # a TimmWrapperImageProcessor: timm's settings
            return timm_image_processor(None, settings["data_config"])
        if settings is not None:
            try:
                return AutoImageProcessor.from_pretrained(model_or_path, **loading)
            except (ImportError, ValueError):  # how transformers says that the class needs torchvision
                if is_torchvision_available():
                    raise
                return _portable_image_processor(settings)
    source = load_source(model_or_path, **loading)
    timm_model = timm_model_of(source) or getattr(source, "timm_model", None)
    if timm_model is not None:  # timm's evaluation preprocessing, from the checkpoint's pretrained config
        return timm_image_processor(timm_model, getattr(getattr(source, "config", None), "pretrained_cfg", None))
    tower_config = in_place.first_tower(source).config
    family = in_place.TOWER_MODEL_TYPES.get(tower_config.model_type, tower_config.model_type)
    default = lambda config: {"size": _square(config)}  # noqa: E731
    settings = FAMILY_IMAGE_PROCESSORS.get(family, default)(tower_config)
    if source.config.model_type != tower_config.model_type:  # a task model: its processor's sizes, the tower's norm
        settings = {key: settings[key] for key in ("image_mean", "image_std") if key in settings}
    return _image_processor_of_type(source.config.model_type, settings)


def _image_processor_of_type(model_type: str, settings: dict):
    classes = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type, {})
    name = classes.get("pil") or (classes.get("torchvision") if is_torchvision_available() else None)
    if name is None:
        return _portable_image_processor(settings)
    return getattr(transformers, name)(**settings)


def _portable_image_processor(settings: dict) -> ViTImageProcessorPil:
    size = settings.get("size") or {"height": 224, "width": 224}
    if "height" not in size:  # a shortest edge: the processor then crops to `crop_size`
        size = settings.get("crop_size") or {"height": size["shortest_edge"], "width": size["shortest_edge"]}
    kept = {key: settings[key] for key in ("image_mean", "image_std", "resample", "rescale_factor") if key in settings}
    return ViTImageProcessorPil(size=size, **kept)


def from_vit(model_or_path, model_class: type | None = None, **overrides):
    """`castle` for a `ViTModel` or `ViTForImageClassification` source (DeiT checkpoints without a distillation token
    use these classes), kept for the code that called it by this name; it refuses every other source."""
    source = load_source(model_or_path, model_class)
    if source.config.model_type != "vit":
        raise TypeError(
            f"from_vit castles a transformers ViT (model_type 'vit'); got {type(source).__name__} (model_type "
            f"{source.config.model_type!r}). castle takes more families."
        )
    return castle(source, **overrides)
