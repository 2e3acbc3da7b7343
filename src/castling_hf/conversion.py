"""Castling a pretrained ViT: its weights in a Castling-ViT whose first forward pass is the source's.

With γ (the linear branch scale) at 0, α at 1 and no softmax mask threshold, a Castling layer computes
`proj(softmax(q kᵀ/√d) v)`: exactly ViT's attention, with ViT's own q/k/v/o weights (docs/design.md §1).
Fine-tuning with the mask decay then grows γ while α falls to 0, and the model ends in the linear-angular form.

Sources are `transformers`' `ViTModel` and `ViTForImageClassification` (DeiT checkpoints without a distillation token
use these classes too), as objects or as a local directory / Hub name. Every source tensor is mapped, checked and
stacked before the new model is touched, so a source that does not fit raises and nothing is half-converted.
"""

import re

import torch
from transformers import AutoConfig, PreTrainedModel, ViTConfig, ViTForImageClassification, ViTModel

from .configuration_castling_vit import SIZE_FIELDS, CastlingViTConfig
from .modeling_castling_vit import CastlingViTForImageClassification, CastlingViTModel

# The fields a Castling-ViT takes from the source config, all with ViTConfig's meaning.
INHERITED_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "pooler_output_size",
    "pooler_act",
    "id2label",
    "label2id",
    "problem_type",
)
# Fixed by the shapes of the source weights, so a conversion cannot override them.
SHAPE_FIELDS = (*SIZE_FIELDS, "num_channels", "qkv_bias", "pooler_output_size")
# With these, a converted layer is the source's softmax attention (γ = 0, dense softmax branch).
EXACT_START = dict(linear_branch_scale_init=0.0, softmax_mask_threshold=None)
# Castling-ViT's own tensors: no ViT counterpart, so they keep their initial values.
CASTLING_ONLY = re.compile(
    r"attention\.(linear_branch_scale|residual_conv\.weight|softmax_branch\.softmax_mask_scale)$"
)
# ViT's mask token serves masked-image-modelling only; no Castling-ViT model uses one.
IGNORED_SOURCE = re.compile(r"^embeddings\.mask_token$")
POOLER_KEYS = {"pooler.dense.weight", "pooler.dense.bias"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_QKV = re.compile(r"^attention\.([qkv])_proj\.(weight|bias)$")


def load_vit(model_or_path) -> ViTModel | ViTForImageClassification:
    """The source as a `ViTModel` or `ViTForImageClassification`; a directory or Hub name is loaded strictly."""
    if isinstance(model_or_path, PreTrainedModel):
        if not isinstance(model_or_path, (ViTModel, ViTForImageClassification)):
            raise TypeError(
                f"from_vit converts a transformers ViTModel or ViTForImageClassification (model_type 'vit'; DeiT "
                f"checkpoints without a distillation token use these classes), got {type(model_or_path).__name__}."
            )
        return model_or_path
    config = AutoConfig.from_pretrained(model_or_path)
    if config.model_type != "vit":
        raise TypeError(
            f"from_vit converts ViT checkpoints (model_type 'vit'), but {model_or_path!r} holds a "
            f"{config.model_type!r} model ({', '.join(config.architectures or [type(config).__name__])})."
        )
    unsupported = sorted(set(config.architectures or []) - {"ViTModel", "ViTForImageClassification"})
    if unsupported:
        raise TypeError(
            f"{model_or_path!r} holds a {', '.join(unsupported)}; from_vit converts ViTModel and "
            "ViTForImageClassification checkpoints (load the encoder alone with ViTModel.from_pretrained and pass it)."
        )
    source_class = (
        ViTForImageClassification if "ViTForImageClassification" in (config.architectures or []) else ViTModel
    )
    model, info = source_class.from_pretrained(model_or_path, output_loading_info=True)
    if source_class is ViTModel and info["missing_keys"] and set(info["missing_keys"]) <= POOLER_KEYS:
        # A ViTModel saved without its pooler: load it as it was saved rather than with a random pooler.
        model, info = ViTModel.from_pretrained(model_or_path, add_pooling_layer=False, output_loading_info=True)
    problems = {kind: keys for kind, keys in info.items() if keys and kind != "error_msgs"}
    if problems:
        raise ValueError(
            f"The checkpoint {model_or_path!r} does not match its own config ({source_class.__name__}): "
            + "; ".join(f"{kind.replace('_', ' ')}: {sorted(map(str, keys))}" for kind, keys in problems.items())
            + ". Converting it would leave those weights random, so nothing was converted."
        )
    return model


def castling_config_from_vit(vit_config: ViTConfig, **overrides) -> CastlingViTConfig:
    """A Castling-ViT config with the source's dimensions and labels, set for an exact start; `overrides` apply last.

    The fields that the source's weight shapes fix (`SHAPE_FIELDS`) cannot be overridden.
    """
    fixed = sorted(set(overrides) & set(SHAPE_FIELDS))
    if fixed:
        raise ValueError(
            f"Cannot override {fixed} when converting: they are fixed by the shapes of the source's weights. "
            f"Override Castling-ViT's own fields instead (e.g. residual_conv, angular_normalization)."
        )
    inherited = {name: getattr(vit_config, name) for name in INHERITED_CONFIG_FIELDS}
    if labels_overridden(overrides):  # a new label set replaces the source's whole, never half of it
        del inherited["id2label"], inherited["label2id"]
        if "id2label" in overrides and "label2id" not in overrides:
            overrides = {**overrides, "label2id": {label: int(i) for i, label in overrides["id2label"].items()}}
    return CastlingViTConfig(**{**inherited, **EXACT_START, **overrides})


def labels_overridden(overrides: dict) -> bool:
    return bool({"num_labels", "id2label", "label2id"} & set(overrides))


def castling_key(vit_key: str) -> str | None:
    """Where a tensor of a ViT backbone (keys relative to `ViTModel`) lives in a `CastlingViTModel`.

    q/k/v projections all map to the fused `qkv_proj`; None for a tensor Castling-ViT does not use.
    """
    if IGNORED_SOURCE.match(vit_key):
        return None
    layer = _LAYER.match(vit_key)
    if layer is None:
        return vit_key  # embeddings.*, layernorm.*, pooler.dense.*: same names
    index, rest = layer.groups()
    qkv = _QKV.match(rest)
    if qkv is not None:
        rest = f"attention.qkv_proj.{qkv.group(2)}"
    return f"encoder.layers.{index}.{rest}"


def castling_backbone_state_dict(vit_backbone_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `ViTModel` state dict renamed for `CastlingViTModel`, with each layer's q, k and v stacked (in that order,
    the order the fused projection splits them) into `qkv_proj`."""
    renamed, fused_parts = {}, {}
    for key, tensor in vit_backbone_state.items():
        target = castling_key(key)
        if target is None:
            continue
        if ".qkv_proj." in target:
            projection = _QKV.match(_LAYER.match(key).group(2)).group(1)
            fused_parts.setdefault(target, {})[projection] = tensor
        else:
            renamed[target] = tensor
    for target, parts in fused_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"{target} needs the source's q, k and v projections, but only {sorted(parts)} were found."
            )
        renamed[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return renamed


def castling_state_dict(
    source: ViTModel | ViTForImageClassification, target, keep_classifier: bool = True
) -> dict[str, torch.Tensor]:
    """The full state dict for `target` (a Castling-ViT model built for the source), checked against it; the
    source's classifier is carried over when `keep_classifier` and the source has one."""
    source_state = source.state_dict()
    if isinstance(source, ViTForImageClassification):
        backbone = {key.removeprefix("vit."): value for key, value in source_state.items() if key.startswith("vit.")}
        head = {key: value for key, value in source_state.items() if not key.startswith("vit.")}
    else:
        backbone, head = source_state, {}
    mapped = castling_backbone_state_dict(backbone)
    target_state = target.state_dict()
    prefix = (
        f"{target.base_model_prefix}." if target.base_model_prefix + ".embeddings.cls_token" in target_state else ""
    )
    mapped = {prefix + key: value for key, value in mapped.items()}
    if not any(".pooler." in f".{key}" for key in target_state):  # e.g. a classifier built from a ViTModel
        mapped = {key: value for key, value in mapped.items() if ".pooler." not in f".{key}"}
    if "classifier.weight" in target_state and keep_classifier:
        mapped.update({key: value for key, value in head.items() if key.startswith("classifier.")})

    unexpected = sorted(set(mapped) - set(target_state))
    missing = sorted(key for key in set(target_state) - set(mapped) if not _starts_fresh(key))
    if unexpected or missing:
        raise ValueError(
            f"The {type(source).__name__} does not fit a {type(target).__name__} with its config: "
            f"unexpected in the source: {unexpected or 'none'}; missing from the source: {missing or 'none'}. "
            "Nothing was converted."
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
    return mapped


def _starts_fresh(key: str) -> bool:
    """Target tensors with no source counterpart, which keep their initial values: Castling-ViT's own, and a
    classifier when the source has none or the target was given a different label set."""
    return bool(CASTLING_ONLY.search(key)) or key.startswith("classifier.")


def from_vit(
    model_or_path,
    model_class: type = CastlingViTForImageClassification,
    add_pooling_layer: bool | None = None,
    **config_overrides,
):
    """A `model_class` (`CastlingViTForImageClassification` or `CastlingViTModel`) with a pretrained ViT's weights,
    whose first forward pass is the source's.

    `model_or_path` is a `transformers` `ViTModel` or `ViTForImageClassification` (DeiT checkpoints without a
    distillation token use these classes), or a local directory or Hub name holding one. The config takes the
    source's dimensions and labels with `linear_branch_scale_init=0.0` and `softmax_mask_threshold=None`, so that with
    α = 1 every layer computes exactly the source's softmax attention; `config_overrides` apply on top (Castling-ViT's
    own fields, or a new label set, which starts the classifier fresh). A `CastlingViTModel` keeps the source's
    pooler unless `add_pooling_layer` says otherwise. Fine-tune with `CastlingMaskDecayCallback`, then
    `switch_to_inference()`.
    """
    source = load_vit(model_or_path)
    config = castling_config_from_vit(source.config, **config_overrides)
    backbone = source.vit if isinstance(source, ViTForImageClassification) else source
    source_has_pooler = getattr(backbone, "pooler", None) is not None
    kwargs = {}
    if issubclass(model_class, CastlingViTModel):
        kwargs["add_pooling_layer"] = source_has_pooler if add_pooling_layer is None else add_pooling_layer
        if kwargs["add_pooling_layer"] and not source_has_pooler:
            raise ValueError(
                "add_pooling_layer=True, but the source has no pooler to convert; leave add_pooling_layer unset to "
                "mirror the source."
            )
    elif add_pooling_layer is not None:
        raise ValueError(f"{model_class.__name__} has no pooler; add_pooling_layer applies to CastlingViTModel only.")
    target = model_class(config, **kwargs)
    target.load_state_dict(castling_state_dict(source, target, not labels_overridden(config_overrides)), strict=False)
    reference = next(source.parameters())
    return target.to(device=reference.device, dtype=reference.dtype).eval()
