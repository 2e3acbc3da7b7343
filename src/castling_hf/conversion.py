"""Castling a pretrained model: its weights in a Castling-ViT whose first forward pass is the source's.

In the convex blend, (1 − α)·γ ⊙ (LA + DWConv) + α·(M⊙S)V, with α at 1 and no softmax mask threshold a Castling
layer computes `proj(softmax(q kᵀ/√d) v)`: exactly the source's attention, with the source's own q/k/v/o weights
(docs/design.md §1, §8). Fine-tuning or distillation with the mask decay then hands each layer over to the
linear-angular term as α falls to 0 (§9).

Each source family is a `SourceFamily`: a mapping table from its config to `CastlingViTConfig` fields and one from
its weight names to Castling-ViT's, plus the places its task heads keep their weights. `castle` reads the table of
the family it meets; no family has code of its own. Every source tensor is mapped, checked and stacked before the
new model is touched, so a source that does not fit raises and nothing is half-converted.
"""

import copy
import inspect
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, PreTrainedConfig, PreTrainedModel, ViTImageProcessorPil
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from . import in_place
from .configuration_utils import CastlingAttentionConfig
from .modeling_utils import with_castling_methods
from .models.castling_vit import (
    CastlingViTBackbone,
    CastlingViTConfig,
    CastlingViTForImageClassification,
    CastlingViTModel,
)
from .models.castling_vit.configuration_castling_vit import SIZE_FIELDS

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


# Fields the source's weight shapes and token layout fix, so that castling cannot override them.
SHAPE_FIELDS = (
    *SIZE_FIELDS,
    "num_channels",
    "qkv_bias",
    "pooler_output_size",
    "layerscale_value",
    "num_register_tokens",
    "use_distillation_token",
    "position_embedding_type",
    "classifier_pooling",
)
# The ViT fields every family shares under the same names.
COMMON_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "id2label",
    "label2id",
    "problem_type",
)
BACKBONE_FIELDS = ("out_features", "apply_layernorm", "reshape_hidden_states")
# Castling-ViT's own tensors: no counterpart in any source, so they keep their initial values.
CASTLING_ONLY = re.compile(
    r"attention\.(linear_branch_scale|residual_conv\.weight|softmax_branch\.softmax_mask_scale)$"
)
_LAYER = r"(\d+)"
_WB = r"(weight|bias)"


@dataclass(frozen=True)
class SourceFamily:
    """How one `transformers` model family maps onto Castling-ViT.

    - `model_type`: the source config's `model_type`;
    - `config`: Castling-ViT config fields from the source config (besides `COMMON_FIELDS`, which every family has);
    - `weights`: (source name, Castling-ViT name) regular expressions, names relative to the base model; a q, k or v
      projection maps to `qkv_proj` with `{q}`, `{k}` or `{v}` marking its third of the fused weight; `None` drops a
      source tensor no Castling-ViT model uses (a masked-image-modelling mask token);
    - `absent_biases`: biases the family can leave out (by source-name template and the config flag that says so):
      they enter as zeros, which is exactly the source's function;
    - `unsupported`: config flags Castling-ViT cannot express, with what they mean;
    - `heads`: per model class, a `Head`: the attribute holding its base model, the (source, Castling-ViT) names of
      its classifier weights, and the config fields its head implies; `backbone`: the family's `AutoBackbone` class;
    - `image_processor`: the settings of the image processor its published checkpoints carry, from the source
      config, for a source saved without one (`source_image_processor`).
    """

    model_type: str
    config: Callable[[PreTrainedConfig], dict]
    weights: tuple[tuple[str, str | None], ...]
    heads: dict[str, "Head"]
    image_processor: Callable[[PreTrainedConfig], dict]
    backbone: str | None = None
    absent_biases: tuple[tuple[str, str], ...] = ()
    unsupported: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Head:
    """Where a source class keeps its base model (`base`, an attribute name; "" for a base model itself), how its
    classifier weights are named in Castling-ViT (`weights`, (source, Castling-ViT) regular expressions; empty for a
    base model), and the config fields its head implies (`config`)."""

    base: str = ""
    weights: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def _vit_config(config) -> dict:
    return dict(
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        intermediate_size=config.intermediate_size,
        qkv_bias=config.qkv_bias,
        pooler_output_size=config.pooler_output_size,
        pooler_act=config.pooler_act,
    )


def _dinov2_config(config) -> dict:
    return dict(
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        drop_path_rate=config.drop_path_rate,
        intermediate_size=int(config.hidden_size * config.mlp_ratio),
        qkv_bias=config.qkv_bias,
        layerscale_value=config.layerscale_value,
        interpolate_pos_encoding=True,
        pooler_type="cls",
        classifier_pooling="cls_and_patch_mean",
    )


def _dinov2_with_registers_config(config) -> dict:
    return {
        **_dinov2_config(config),
        "num_register_tokens": config.num_register_tokens,
        "position_embedding_antialias": True,
    }


def _dinov3_config(config) -> dict:
    return dict(
        attention_probs_dropout_prob=config.attention_dropout,
        drop_path_rate=config.drop_path_rate,
        intermediate_size=config.intermediate_size,
        qkv_bias=config.query_bias or config.key_bias or config.value_bias,
        layerscale_value=config.layerscale_value,
        num_register_tokens=config.num_register_tokens,
        position_embedding_type="rope",
        rope_theta=config.rope_theta,
        pos_embed_shift=config.pos_embed_shift,
        pos_embed_jitter=config.pos_embed_jitter,
        pos_embed_rescale=config.pos_embed_rescale,
        pooler_type="cls",
    )


def _layer_weights(layers: str, norms: tuple[str, str], mlp: tuple[str, str], layer_scale: bool):
    """The weight table of one family's transformer blocks, whose module names differ from family to family."""
    before, after = norms
    fc1, fc2 = mlp
    rows = [
        (rf"{layers}\.{_LAYER}\.attention\.([qkv])_proj\.{_WB}", r"encoder.layers.\1.attention.qkv_proj.\3{\2}"),
        (rf"{layers}\.{_LAYER}\.attention\.o_proj\.{_WB}", r"encoder.layers.\1.attention.o_proj.\2"),
        (rf"{layers}\.{_LAYER}\.{before}\.{_WB}", r"encoder.layers.\1.layernorm_before.\2"),
        (rf"{layers}\.{_LAYER}\.{after}\.{_WB}", r"encoder.layers.\1.layernorm_after.\2"),
        (rf"{layers}\.{_LAYER}\.mlp\.{fc1}\.{_WB}", r"encoder.layers.\1.mlp.fc1.\2"),
        (rf"{layers}\.{_LAYER}\.mlp\.{fc2}\.{_WB}", r"encoder.layers.\1.mlp.fc2.\2"),
    ]
    if layer_scale:
        rows.append((rf"{layers}\.{_LAYER}\.(layer_scale[12])\.lambda1", r"encoder.layers.\1.\2.lambda1"))
    return tuple(rows)


_EMBEDDINGS = (
    (r"embeddings\.(cls_token|distillation_token|register_tokens|position_embeddings)", r"embeddings.\1"),
    (rf"embeddings\.patch_embeddings\.projection\.{_WB}", r"embeddings.patch_embeddings.projection.\1"),
    (r"embeddings\.mask_token", None),
)
_VIT_WEIGHTS = (
    *_EMBEDDINGS,
    *_layer_weights("layers", ("layernorm_before", "layernorm_after"), ("fc1", "fc2"), layer_scale=False),
    (rf"layernorm\.{_WB}", r"layernorm.\1"),
    (rf"pooler\.dense\.{_WB}", r"pooler.dense.\1"),
)
_DINOV2_WEIGHTS = (
    *_EMBEDDINGS,
    *_layer_weights("encoder.layer", ("norm1", "norm2"), ("fc1", "fc2"), layer_scale=True),
    (rf"layernorm\.{_WB}", r"layernorm.\1"),
)
_CLASSIFIER = {rf"classifier\.{_WB}": r"classifier.\1"}
_IMAGENET = dict(image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)


def _square(config) -> dict:
    height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    return {"height": height, "width": width}


# The image processors of the families' published checkpoints (google/vit-*, facebook/deit-*, facebook/dinov2-*,
# facebook/dinov3-vit*), for a source saved without its own.
_VIT_PROCESSOR = lambda config: dict(size=_square(config))  # noqa: E731  (0.5 mean and std: ViT's defaults)
_DEIT_PROCESSOR = lambda config: dict(size={"height": 256, "width": 256}, crop_size=_square(config), **_IMAGENET)  # noqa: E731
_DINOV2_PROCESSOR = lambda config: dict(  # noqa: E731
    size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, **_IMAGENET
)
_DINOV3_PROCESSOR = lambda config: dict(size={"height": 224, "width": 224}, **_IMAGENET)  # noqa: E731

FAMILIES = {
    family.model_type: family
    for family in (
        SourceFamily(
            "vit",
            _vit_config,
            _VIT_WEIGHTS,
            heads={"ViTModel": Head(), "ViTForImageClassification": Head("vit", _CLASSIFIER)},
            image_processor=_VIT_PROCESSOR,
        ),
        SourceFamily(
            "deit",
            lambda config: {**_vit_config(config), "use_distillation_token": True},
            _VIT_WEIGHTS,
            heads={
                "DeiTModel": Head(),
                "DeiTForImageClassification": Head("deit", _CLASSIFIER),
                "DeiTForImageClassificationWithTeacher": Head(
                    "deit",
                    {
                        rf"cls_classifier\.{_WB}": r"classifier.\1",
                        rf"distillation_classifier\.{_WB}": r"distillation_classifier.\1",
                    },
                    {"classifier_pooling": "cls_and_distillation"},
                ),
            },
            image_processor=_DEIT_PROCESSOR,
        ),
        SourceFamily(
            "dinov2",
            _dinov2_config,
            _DINOV2_WEIGHTS,
            heads={"Dinov2Model": Head(), "Dinov2ForImageClassification": Head("dinov2", _CLASSIFIER)},
            image_processor=_DINOV2_PROCESSOR,
            backbone="Dinov2Backbone",
            unsupported=(("use_swiglu_ffn", "a SwiGLU MLP (the giant size)"),),
        ),
        SourceFamily(
            "dinov2_with_registers",
            _dinov2_with_registers_config,
            _DINOV2_WEIGHTS,
            heads={
                "Dinov2WithRegistersModel": Head(),
                "Dinov2WithRegistersForImageClassification": Head("dinov2_with_registers", _CLASSIFIER),
            },
            image_processor=_DINOV2_PROCESSOR,
            backbone="Dinov2WithRegistersBackbone",
            unsupported=(("use_swiglu_ffn", "a SwiGLU MLP (the giant size)"),),
        ),
        SourceFamily(
            "dinov3_vit",
            _dinov3_config,
            (
                (r"embeddings\.(cls_token|register_tokens)", r"embeddings.\1"),
                (rf"embeddings\.patch_embeddings\.{_WB}", r"embeddings.patch_embeddings.projection.\1"),
                (r"embeddings\.mask_token", None),
                *_layer_weights("model.layer", ("norm1", "norm2"), ("up_proj", "down_proj"), layer_scale=True),
                (rf"norm\.{_WB}", r"layernorm.\1"),
            ),
            heads={"DINOv3ViTModel": Head()},
            image_processor=_DINOV3_PROCESSOR,
            absent_biases=(
                ("model.layer.{i}.attention.q_proj.bias", "query_bias"),
                ("model.layer.{i}.attention.k_proj.bias", "key_bias"),
                ("model.layer.{i}.attention.v_proj.bias", "value_bias"),
                ("model.layer.{i}.attention.o_proj.bias", "proj_bias"),
                ("model.layer.{i}.mlp.up_proj.bias", "mlp_bias"),
                ("model.layer.{i}.mlp.down_proj.bias", "mlp_bias"),
            ),
            unsupported=(("use_gated_mlp", "a gated MLP (the largest sizes)"),),
        ),
    )
}
SUPPORTED = (
    "ViT, DeiT (with or without its distillation head), Dinov2, Dinov2 with registers and DINOv3 ViT models, their "
    "image classifiers, Dinov2 backbones, and transformers task models whose backbone is a Dinov2 backbone (e.g. "
    "UperNetForSemanticSegmentation, DPTForDepthEstimation, DepthAnythingForDepthEstimation, "
    "Mask2FormerForUniversalSegmentation)"
)


def refuse_castled(config: PreTrainedConfig) -> None:
    if config.model_type == CastlingViTConfig.model_type:
        raise TypeError(
            "This is a Castling-ViT model already: castle converts a pretrained softmax-attention source "
            f"({SUPPORTED}). Fine-tune it with CastlingMaskDecayCallback instead."
        )


def family_of(config: PreTrainedConfig) -> SourceFamily:
    refuse_castled(config)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise TypeError(f"castle converts {SUPPORTED}; got a {config.model_type!r} model ({type(config).__name__}).")
    used = [f"`{flag}=True` ({meaning})" for flag, meaning in family.unsupported if getattr(config, flag, False)]
    if used:
        raise ValueError(
            f"This {config.model_type} model uses {', '.join(used)}, which Castling-ViT does not support; nothing "
            "was converted."
        )
    return family


def castling_config(
    source_config: PreTrainedConfig, head: Head | None = None, backbone: bool = False, **overrides
) -> CastlingViTConfig:
    """A Castling-ViT config with the source's architecture, dimensions and labels (and its head's fields, or for a
    backbone its feature stages), set for an exact start; `overrides` apply last, except to the fields the weights
    fix (`SHAPE_FIELDS`)."""
    fixed = sorted(set(overrides) & set(SHAPE_FIELDS))
    if fixed:
        raise ValueError(
            f"Cannot override {fixed} when converting: they are fixed by the shapes of the source's weights. "
            f"Override Castling-ViT's own fields instead (e.g. residual_conv, angular_normalization)."
        )
    family = family_of(source_config)
    fields = {name: getattr(source_config, name) for name in COMMON_FIELDS}
    fields.update(family.config(source_config))
    fields.update(head.config if head is not None else {})
    if backbone:
        fields.update({name: getattr(source_config, name) for name in BACKBONE_FIELDS})
    if labels_overridden(overrides):  # a new label set replaces the source's whole, never half of it
        del fields["id2label"], fields["label2id"]
        if "id2label" in overrides and "label2id" not in overrides:
            overrides = {**overrides, "label2id": {label: int(i) for i, label in overrides["id2label"].items()}}
    return CastlingViTConfig(**{**fields, **castling_start(overrides)})


def labels_overridden(overrides: dict) -> bool:
    return bool({"num_labels", "id2label", "label2id"} & set(overrides))


def castling_key(family: SourceFamily, source_key: str) -> tuple[str | None, str | None]:
    """Where a source tensor (named relative to its base model) lives in a Castling-ViT base model, and which third
    of the fused q/k/v projection it is (None for other tensors). Raises for a name the family's table lacks."""
    for pattern, target in family.weights:
        match = re.fullmatch(pattern, source_key)
        if match:
            if target is None:
                return None, None
            key = match.expand(target)
            part = re.search(r"\{([qkv])\}$", key)
            return (key[: part.start()], part.group(1)) if part else (key, None)
    raise ValueError(f"The {family.model_type} source has a tensor {source_key!r} that castling does not know.")


def castling_backbone_state_dict(family: SourceFamily, source_state: dict, source_config) -> dict:
    """A base model's state dict renamed for Castling-ViT, each layer's q, k and v stacked (in the order the fused
    projection splits them) into `qkv_proj`, and the biases the family leaves out entered as zeros (q, k and v's
    only where one of them has a bias: without any, the fused projection has none); empty tensors are dropped."""
    source_state = dict(source_state)
    fused_bias = family.config(source_config).get("qkv_bias", True)
    for template, flag in family.absent_biases:
        if not getattr(source_config, flag, True):
            for index in range(source_config.num_hidden_layers):
                key = template.format(i=index)
                if castling_key(family, key)[1] is not None and not fused_bias:
                    continue  # none of q, k, v has a bias: neither has the fused projection
                weight = source_state[key.removesuffix("bias") + "weight"]
                source_state.setdefault(key, weight.new_zeros(weight.shape[0]))
    renamed, fused_parts = {}, {}
    for key, tensor in source_state.items():
        target, part = castling_key(family, key)
        if target is None or tensor.numel() == 0:  # DINOv3 keeps a (1, 0, C) tensor when it has no registers
            continue
        if part is not None:
            fused_parts.setdefault(target, {})[part] = tensor
        else:
            renamed[target] = tensor
    for target, parts in fused_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"{target} needs the source's q, k and v projections, but only {sorted(parts)} were found."
            )
        renamed[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return renamed


def check_and_load(target: nn.Module, mapped: dict, source_name: str) -> None:
    """Load `mapped` into `target` after checking it against every tensor `target` expects: names both ways (but the
    tensors that start fresh), then shapes. Raises, touching nothing, when anything does not fit."""
    target_state = target.state_dict()
    unexpected = sorted(set(mapped) - set(target_state))
    missing = sorted(key for key in set(target_state) - set(mapped) if not _starts_fresh(key))
    if unexpected or missing:
        raise ValueError(
            f"The {source_name} does not fit a {type(target).__name__} with its config: unexpected in the source: "
            f"{unexpected or 'none'}; missing from the source: {missing or 'none'}. Nothing was converted."
        )
    mismatched = [
        f"{key}: source {tuple(value.shape)}, expected {tuple(target_state[key].shape)}"
        for key, value in mapped.items()
        if value.shape != target_state[key].shape
    ]
    if mismatched:
        raise ValueError(
            "The source's weights do not match the shapes its config implies: "
            + "; ".join(mismatched)
            + ". Nothing was converted."
        )
    target.load_state_dict(mapped, strict=False)


def _starts_fresh(key: str) -> bool:
    """Target tensors with no source counterpart, which keep their initial values: Castling-ViT's own, and
    classifiers when the source has none or the target was given a different label set."""
    return bool(CASTLING_ONLY.search(key)) or key.startswith(("classifier.", "distillation_classifier."))


def _head_weights(state: dict, table: dict[str, str]) -> dict:
    renamed = {}
    for key, tensor in state.items():
        for pattern, target in table.items():
            match = re.fullmatch(pattern, key)
            if match:
                renamed[match.expand(target)] = tensor
    return renamed


def load_source(model_or_path, **loading) -> nn.Module:
    """The source as a model: a model object as it is; a local timm checkpoint folder built by timm; a directory or
    Hub name with a `transformers` config loaded strictly with the class that config records (a timm checkpoint on
    the Hub, whose config records none, with `TimmWrapperForImageClassification`, as `transformers` reads it).
    `loading` goes to `from_pretrained` (`revision`, `cache_dir`, `token`, `trust_remote_code`)."""
    from .conversion_timm import timm_mvitv2_source, timm_wrapper_of

    timm_source = timm_mvitv2_source(model_or_path)
    if timm_source is not None:
        return timm_source
    if isinstance(model_or_path, nn.Module):
        if isinstance(model_or_path, PreTrainedModel):
            return model_or_path
        if type(model_or_path).__module__.startswith("timm."):
            return timm_wrapper_of(model_or_path)
        raise TypeError(f"castle converts {SUPPORTED}; got a {type(model_or_path).__name__}.")
    config = AutoConfig.from_pretrained(model_or_path, **loading)
    refuse_castled(config)
    source_class = source_model_class(config)
    if source_class is None:
        raise TypeError(
            f"{model_or_path!r} names its model class {config.architectures or 'nowhere'} in its config; castle needs "
            "one transformers class there to load it with."
        )
    model, info = source_class.from_pretrained(model_or_path, output_loading_info=True, **loading)
    pooler_only = info["missing_keys"] and all(".pooler." in f".{key}" for key in info["missing_keys"])
    if pooler_only and "add_pooling_layer" in inspect.signature(source_class.__init__).parameters:
        # A base model saved without its pooler: load it as it was saved rather than with a random pooler.
        model, info = source_class.from_pretrained(
            model_or_path, add_pooling_layer=False, output_loading_info=True, **loading
        )
    problems = {kind: keys for kind, keys in info.items() if keys and kind != "error_msgs"}
    if problems:
        raise ValueError(
            f"The checkpoint {model_or_path!r} does not match its own config ({source_class.__name__}): "
            + "; ".join(f"{kind.replace('_', ' ')}: {sorted(map(str, keys))}" for kind, keys in problems.items())
            + ". Converting it would leave those weights random, so nothing was converted."
        )
    return model


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


def castle_base_or_classifier(source: PreTrainedModel, model_class=None, add_pooling_layer=None, **overrides):
    """A Castling-ViT encoder or classifier from a base model or an image classifier of a supported family."""
    family = family_of(source.config)
    class_name = type(source).__name__
    if class_name not in family.heads:
        raise TypeError(
            f"castle converts {', '.join(family.heads)} of the {family.model_type} family, not {class_name}."
        )
    head = family.heads[class_name]
    base = getattr(source, head.base) if head.base else source
    model_class = model_class or (CastlingViTForImageClassification if head.weights else CastlingViTModel)
    config = castling_config(source.config, head, **overrides)
    source_has_pooler = getattr(base, "pooler", None) is not None
    kwargs = {}
    if issubclass(model_class, CastlingViTModel):
        mirrored = source_has_pooler or config.pooler_type == "cls"
        kwargs["add_pooling_layer"] = mirrored if add_pooling_layer is None else add_pooling_layer
        if kwargs["add_pooling_layer"] and not mirrored:
            raise ValueError(
                "add_pooling_layer=True, but the source has no pooler to convert; leave add_pooling_layer unset to "
                "mirror the source."
            )
    elif add_pooling_layer is not None:
        raise ValueError(f"{model_class.__name__} has no pooler; add_pooling_layer applies to CastlingViTModel only.")
    target = model_class(config, **kwargs)
    mapped = castling_backbone_state_dict(family, base.state_dict(), source.config)
    target_state = target.state_dict()
    prefix = (
        f"{target.base_model_prefix}." if f"{target.base_model_prefix}.embeddings.cls_token" in target_state else ""
    )
    mapped = {prefix + key: value for key, value in mapped.items()}
    if not any(".pooler." in f".{key}" for key in target_state):  # e.g. a classifier built from a base model
        mapped = {key: value for key, value in mapped.items() if ".pooler." not in f".{key}"}
    if head.weights and "classifier.weight" in target_state and not labels_overridden(overrides):
        head_state = {key: value for key, value in source.state_dict().items() if not key.startswith(f"{head.base}.")}
        mapped.update(_head_weights(head_state, head.weights))
    check_and_load(target, mapped, class_name)
    return target


def castle_backbone(source: PreTrainedModel, **overrides) -> CastlingViTBackbone:
    """A `CastlingViTBackbone` from a Dinov2(-with-registers) backbone: same stages, layer norm and layout."""
    family = family_of(source.config)
    target = CastlingViTBackbone(castling_config(source.config, backbone=True, **overrides))
    check_and_load(
        target, castling_backbone_state_dict(family, source.state_dict(), source.config), type(source).__name__
    )
    return target


def task_model_backbone(source: PreTrainedModel) -> str:
    """The module name of the one supported backbone (a Dinov2 `AutoBackbone`) inside a task model; raises, naming
    what castle converts, for a model that holds none or several."""
    backbone_classes = tuple(getattr(transformers, family.backbone) for family in FAMILIES.values() if family.backbone)
    backbones = [name for name, module in source.named_modules() if isinstance(module, backbone_classes)]
    if len(backbones) != 1:
        raise TypeError(
            f"castle converts {SUPPORTED}; {type(source).__name__} holds "
            f"{'none of these' if not backbones else f'{len(backbones)} backbones ({backbones})'}."
        )
    return backbones[0]


def source_part(source: nn.Module) -> nn.Module:
    """The part of a source that castling converts: a classifier's base model, a task model's backbone, or the source
    itself (a base model or a backbone); for a timm MViTv2, its final norm, whose output is its final tokens (what a
    Castling-MViTv2 base model returns)."""
    from .conversion_timm import timm_model_of

    timm_model = timm_model_of(source)
    if timm_model is not None:
        return timm_model.norm
    family = FAMILIES.get(source.config.model_type)
    families = in_place.tower_families(source)
    if family is None and families and families.isdisjoint(FAMILIES):
        return in_place.first_tower(source)
    if family is None:
        return source.get_submodule(task_model_backbone(source))
    head = family.heads.get(type(source).__name__)
    return getattr(source, head.base) if head is not None and head.base else source


def castle_task_model(source: PreTrainedModel, **overrides) -> PreTrainedModel:
    """A copy of a task model whose backbone (a supported `AutoBackbone`) is castled, its heads untouched, and its
    config's `backbone_config` the Castling-ViT one, so that its Auto class reloads it where castling_hf is imported."""
    backbone = task_model_backbone(source)
    castled = castle_backbone(source.get_submodule(backbone), **overrides)
    target = copy.deepcopy(source)
    parent, _, attribute = backbone.rpartition(".")
    setattr(target.get_submodule(parent), attribute, castled)
    if getattr(target.config, "backbone_config", None) is not None:
        target.config.backbone_config = castled.config
    # A source loaded with from_pretrained records how it renamed the Hub's weight names, and save_pretrained would
    # rename the castled backbone's tensors back with it; without the record, saving finds the castled model's own.
    target.__dict__.pop("_weight_conversions", None)
    return with_castling_methods(target)


def castle(model_or_path, model_class: type | None = None, add_pooling_layer: bool | None = None, **overrides):
    """The Castling form of a pretrained model, whose first forward pass is the source's (docs/design.md §8).

    `model_or_path` is a model object, or a local directory or Hub name holding one: a ViT, DeiT (`DeiTModel`,
    `DeiTForImageClassification`, `DeiTForImageClassificationWithTeacher`), Dinov2, Dinov2 with registers or DINOv3
    ViT base model or image classifier (→ `CastlingViTModel` / `CastlingViTForImageClassification`; `model_class`
    picks the other), a Dinov2 backbone (→ `CastlingViTBackbone`), or any `transformers` task model whose backbone
    is a Dinov2 backbone (UperNet, DPT, Depth Anything, Mask2Former, ...; → a copy with a `CastlingViTBackbone` and
    the source's own heads). The config takes the source's architecture, dimensions and labels with
    `linear_branch_blend="convex"` and `softmax_mask_threshold=None`, so that with α = 1 every layer computes
    exactly the source's softmax attention; `overrides` apply on top (Castling-ViT's own fields, or a new label set,
    which starts the classifier fresh). Fine-tune with `CastlingMaskDecayCallback`, or without labels distil from
    the source with `CastlingDistillationTrainer`, then `switch_to_inference()`. A task model comes back as its
    own class with `CastlingMethods` added (`save_pretrained(..., inference=True)`, `switch_to_inference()`, ...).
    Overrides that would lose the exact start are refused, or warned of, by name (`castling_start`).
    The source is left as it was; the castled model is on its device, in its dtype, in eval mode.
    """
    from .conversion_timm import castle_mvitv2, check_timm_vision_transformer, timm_labels, timm_model_of

    source = load_source(model_or_path)
    timm_model = timm_model_of(source)
    if timm_model is not None:
        labels = source.config.id2label if isinstance(source, PreTrainedModel) else timm_labels(timm_model)
        return castle_mvitv2(timm_model, labels, model_class, **overrides)
    if source.config.model_type == "timm_wrapper":
        check_timm_vision_transformer(source.timm_model, source.config.architecture)
    families = in_place.tower_families(source)
    if families and families.isdisjoint(FAMILIES):  # the families converted into Castling-ViT stay converted
        target = with_castling_methods(in_place.castle_in_place(source, castling_options(overrides)))
    elif type(source).__name__ in {family.backbone for family in FAMILIES.values()}:
        target = castle_backbone(source, **overrides)
    elif source.config.model_type in FAMILIES:
        target = castle_base_or_classifier(source, model_class, add_pooling_layer, **overrides)
    else:
        target = castle_task_model(source, **overrides)
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
    timm_model = timm_model_of(source)
    if timm_model is not None:  # timm's evaluation preprocessing, from the checkpoint's pretrained config
        return timm_image_processor(timm_model, getattr(getattr(source, "config", None), "pretrained_cfg", None))
    transformer = source_part(source)
    settings = FAMILIES[transformer.config.model_type].image_processor(transformer.config)
    if source.config.model_type not in FAMILIES:  # a task model: its processor's sizes, its backbone's normalisation
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


def from_vit(model_or_path, model_class: type | None = None, add_pooling_layer: bool | None = None, **overrides):
    """`castle` for a `ViTModel` or `ViTForImageClassification` source (DeiT checkpoints without a distillation token
    use these classes), kept for the code that called it by this name; it makes a classifier unless `model_class`
    says otherwise, and refuses every other source."""
    source = load_source(model_or_path)
    if type(source).__name__ not in FAMILIES["vit"].heads:
        raise TypeError(
            f"from_vit converts a transformers ViTModel or ViTForImageClassification (model_type 'vit'); got "
            f"{type(source).__name__} (model_type {source.config.model_type!r}). castle converts more families."
        )
    return castle(source, model_class or CastlingViTForImageClassification, add_pooling_layer, **overrides)
