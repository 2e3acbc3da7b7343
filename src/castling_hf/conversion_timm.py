"""Castling timm's MViTv2 (`timm.models.mvitv2.MultiScaleVit`): its weights in a Castling-MViTv2 whose first forward
pass is the source's (docs/design.md §10).

timm keeps no config object on the model, so the architecture is read from the modules themselves (`mvitv2_config`),
every field converted or refused by name; the weights follow one mapping table (`MVITV2_WEIGHTS`), checked whole
before the new model is touched. A source is a `MultiScaleVit` (from `timm.create_model`), a
local folder holding a timm checkpoint (`config.json` naming its `architecture`, loaded by timm), or `transformers`'
`TimmWrapperForImageClassification` around one (what `castle` makes of a timm checkpoint's Hub name). timm is the
optional extra `castling-hf[timm]`.
"""

import json
import math
import os
import re
import tempfile

from torch import nn
from transformers import BitImageProcessorPil
from transformers.image_utils import PILImageResampling

from .conversion import LABEL_FIELDS, castling_start
from .models.castling_mvitv2 import (
    CastlingMViTv2Backbone,
    CastlingMViTv2Config,
    CastlingMViTv2ForImageClassification,
    CastlingMViTv2Model,
)

_WB = r"(weight|bias)"
_BLOCK = r"stages\.(\d+)\.blocks\.(\d+)"
_LAYER = r"encoder.stages.\1.layers.\2"
MVITV2_WEIGHTS = (
    (rf"patch_embed\.proj\.{_WB}", r"embeddings.projection.\1"),
    (r"cls_token", r"embeddings.cls_token"),
    (r"pos_embed", r"embeddings.position_embeddings"),
    (rf"{_BLOCK}\.norm1\.{_WB}", rf"{_LAYER}.layernorm_before.\3"),
    (rf"{_BLOCK}\.norm2\.{_WB}", rf"{_LAYER}.layernorm_after.\3"),
    (rf"{_BLOCK}\.attn\.qkv\.{_WB}", rf"{_LAYER}.attention.qkv_proj.\3"),
    (rf"{_BLOCK}\.attn\.proj\.{_WB}", rf"{_LAYER}.attention.o_proj.\3"),
    (rf"{_BLOCK}\.attn\.pool_q\.weight", rf"{_LAYER}.attention.pool_query.weight"),
    (rf"{_BLOCK}\.attn\.pool_k\.weight", rf"{_LAYER}.attention.pool_key.weight"),
    (rf"{_BLOCK}\.attn\.pool_v\.weight", rf"{_LAYER}.attention.pool_value.weight"),
    (rf"{_BLOCK}\.attn\.norm_q\.{_WB}", rf"{_LAYER}.attention.norm_query.\3"),
    (rf"{_BLOCK}\.attn\.norm_k\.{_WB}", rf"{_LAYER}.attention.norm_key.\3"),
    (rf"{_BLOCK}\.attn\.norm_v\.{_WB}", rf"{_LAYER}.attention.norm_value.\3"),
    (rf"{_BLOCK}\.attn\.rel_pos_h", rf"{_LAYER}.attention.softmax_branch.relative_position_rows"),
    (rf"{_BLOCK}\.attn\.rel_pos_w", rf"{_LAYER}.attention.softmax_branch.relative_position_columns"),
    (rf"{_BLOCK}\.shortcut_proj_attn\.{_WB}", rf"{_LAYER}.shortcut_proj_attention.\3"),
    (rf"{_BLOCK}\.shortcut_proj_mlp\.{_WB}", rf"{_LAYER}.shortcut_proj_mlp.\3"),
    (rf"{_BLOCK}\.mlp\.fc1\.{_WB}", rf"{_LAYER}.mlp.fc1.\3"),
    (rf"{_BLOCK}\.mlp\.fc2\.{_WB}", rf"{_LAYER}.mlp.fc2.\3"),
    (rf"norm\.{_WB}", r"layernorm.\1"),
    (rf"head\.fc\.{_WB}", None),  # the classifier: mapped with the head below
)


# Castling-MViTv2's own tensors: no counterpart in the source, so they keep their initial values.
CASTLING_ONLY = re.compile(
    r"attention\.(linear_branch_scale|residual_conv\.weight|softmax_branch\.softmax_mask_scale)$"
)


def castling_name(source_key: str) -> str | None:
    """Where a timm MViTv2 tensor lives in a Castling-MViTv2 base model (`MVITV2_WEIGHTS`); None for the classifier.
    Raises for a name the table lacks."""
    for pattern, target in MVITV2_WEIGHTS:
        match = re.fullmatch(pattern, source_key)
        if match:
            return match.expand(target) if target is not None else None
    raise ValueError(f"The timm MViTv2 source has a tensor {source_key!r} that castling does not know.")


def check_and_load(target: nn.Module, mapped: dict, source_name: str) -> None:
    """Load `mapped` into `target` after checking it against every tensor `target` expects: names both ways (but
    Castling's own tensors and a classifier, which start fresh), then shapes. Raises, touching nothing, when anything
    does not fit."""
    target_state = target.state_dict()
    unexpected = sorted(set(mapped) - set(target_state))
    starts_fresh = lambda key: CASTLING_ONLY.search(key) or key.startswith("classifier.")  # noqa: E731
    missing = sorted(key for key in set(target_state) - set(mapped) if not starts_fresh(key))
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
            "The source's weights do not match the shapes its config implies: " + "; ".join(mismatched) + ". Nothing "
            "was converted."
        )
    target.load_state_dict(mapped, strict=False)


def is_timm_mvitv2(model) -> bool:
    return type(model).__name__ == "MultiScaleVit" and type(model).__module__.startswith("timm.")


def timm_model_of(source) -> nn.Module | None:
    """The timm MViTv2 that a source is or wraps (`TimmWrapperModel` / `TimmWrapperForImageClassification`); None for
    any other source."""
    if is_timm_mvitv2(source):
        return source
    wrapped = getattr(source, "timm_model", None)
    return wrapped if wrapped is not None and is_timm_mvitv2(wrapped) else None


def is_timm_checkpoint(folder) -> bool:
    """Whether a local folder holds a timm checkpoint: a `config.json` that names an `architecture` and no
    `transformers` `model_type`."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as file:
        config = json.load(file)
    return "architecture" in config and "model_type" not in config


def timm_mvitv2_source(model_or_path) -> nn.Module | None:
    """The timm MViTv2 that `castle` was given, as an object or as a local timm checkpoint folder (loaded by timm);
    None for any other source."""
    if isinstance(model_or_path, (str, os.PathLike)) and is_timm_checkpoint(model_or_path):
        model_or_path = load_timm_checkpoint(str(model_or_path))
    return model_or_path if isinstance(model_or_path, nn.Module) and is_timm_mvitv2(model_or_path) else None


def import_timm():
    try:
        import timm
    except ModuleNotFoundError as error:
        if error.name != "timm":
            raise ImportError(f"timm is installed but does not import: {error}. timm needs torchvision.") from error
        raise ImportError(
            "Castling a timm MViTv2 from a checkpoint needs timm: pip install 'castling-hf[timm]' (timm and its "
            "torchvision)."
        ) from error
    return timm


def timm_wrapper_of(model: nn.Module):
    """A timm model object as `transformers`' TimmWrapper of it (`TimmWrapperForImageClassification`, or
    `TimmWrapperModel` without a classifier): saved as timm saves for the Hub (its architecture and the arguments it
    was built with) and loaded by the wrapper, so that a model castled in place saves and reloads as one."""
    from transformers import TimmWrapperForImageClassification, TimmWrapperModel

    timm = import_timm()
    with tempfile.TemporaryDirectory() as folder:
        timm.models.save_for_hf(model, folder)
        config_path = os.path.join(folder, "config.json")
        with open(config_path) as file:
            config = json.load(file)
        config.get("model_args", {}).pop("num_classes", None)  # the wrapper passes its own, from `num_classes`
        with open(config_path, "w") as file:
            json.dump(config, file)
        wrapper_class = TimmWrapperForImageClassification if model.num_classes else TimmWrapperModel
        wrapper = wrapper_class.from_pretrained(folder)
    reference = next(model.parameters())
    return wrapper.to(device=reference.device, dtype=reference.dtype).train(model.training)


# The attention classes of timm's VisionTransformer that castling takes, and what it says of the others.
UNCASTLED_TIMM_ATTENTION = {
    "AttentionRope": "rotary position embedding inside timm's attention",
    "DiffAttention": "differential attention (two softmax maps subtracted)",
    "EvaAttention": "EVA-02's rotary attention (and its SwiGLU MLP)",
}


def check_timm_vision_transformer(model: nn.Module, architecture: str) -> None:
    """Refuse, by name, a timm model that castling in place does not take: another class than `VisionTransformer`
    (MViTv2 is converted), or a `VisionTransformer` whose blocks' attention is not timm's plain `Attention`."""
    classes = {type(module).__name__ for module in model.modules()}
    why = [f"{name}: {UNCASTLED_TIMM_ATTENTION[name]}" for name in sorted(classes & set(UNCASTLED_TIMM_ATTENTION))]
    if type(model).__name__ != "VisionTransformer" or why:
        raise TypeError(
            f"castle takes timm's VisionTransformer with its plain Attention (castled in place) and MultiScaleVit "
            f"(converted); got {type(model).__name__} ({architecture!r}){''.join(f'; {text}' for text in why)}, "
            "which is not castled."
        )


def load_timm_checkpoint(folder: str) -> nn.Module:
    """The timm model a local folder holds (`config.json` with its `architecture` and `model_args`,
    `model.safetensors`), built and loaded by timm itself (`local-dir:`)."""
    return import_timm().create_model(f"local-dir:{folder}", pretrained=True).eval()


def first_pooling(model, name: str) -> nn.Conv2d | None:
    """The first `name` ("pool_q", "pool_k") conv of any block: MViTv2's pooling kernel."""
    for stage in model.stages:
        for block in stage.blocks:
            if getattr(block.attn, name, None) is not None:
                return getattr(block.attn, name)
    return None


def stride_of(conv: nn.Conv2d | None) -> tuple[int, int]:
    return tuple(conv.stride) if conv is not None else (1, 1)


def mvitv2_config(model) -> dict:
    """Castling-MViTv2 config fields read from a timm `MultiScaleVit`'s modules; what Castling-MViTv2 cannot express
    is refused by name."""
    first = model.stages[0].blocks[0]
    refused = []
    if type(first.attn).__name__ != "MultiScaleAttention":
        refused.append("pool_first=True (q, k, v pooled before their projections)")
    if first.attn.mode != "conv":
        refused.append(f"mode={first.attn.mode!r} (pooling other than per-head depthwise convs)")
    if first.attn.rel_pos_type not in ("spatial", ""):
        refused.append(f"rel_pos_type={first.attn.rel_pos_type!r}")
    if not isinstance(model.norm, nn.LayerNorm):
        refused.append(f"norm_layer {type(model.norm).__name__}")
    activation = first.mlp.act
    if not (isinstance(activation, nn.GELU) and activation.approximate == "none"):
        refused.append(f"act_layer {activation}")
    if model.global_pool not in ("avg", "token"):
        refused.append(f"global_pool={model.global_pool!r}")
    if refused:
        raise ValueError(
            f"This timm MultiScaleVit uses {', '.join(refused)}, which Castling-MViTv2 does not support; nothing was "
            "converted."
        )
    stage_outputs = [stage.blocks[-1].dim_out for stage in model.stages]
    width = model.patch_embed.proj.out_channels
    hidden_sizes = stage_outputs if model.expand_attn else [width, *stage_outputs[:-1]]
    patch = model.patch_embed.proj
    pooling = first_pooling(model, "pool_q") or first_pooling(model, "pool_k")
    return dict(
        image_size=source_image_size(model),
        num_channels=patch.in_channels,
        patch_kernel_size=list(patch.kernel_size),
        patch_stride=list(patch.stride),
        patch_padding=list(patch.padding),
        hidden_sizes=hidden_sizes,
        depths=list(model.depths),
        num_attention_heads=[stage.blocks[0].attn.num_heads for stage in model.stages],
        mlp_ratio=first.mlp.fc1.out_features / first.mlp.fc1.in_features,
        qkv_bias=first.attn.qkv.bias is not None,
        expand_attention=bool(model.expand_attn),
        use_cls_token=model.cls_token is not None,
        use_absolute_position_embeddings=model.pos_embed is not None,
        residual_pooling=bool(first.attn.residual_pooling),
        pooling_kernel_size=list(pooling.kernel_size) if pooling is not None else [1, 1],
        query_strides=[list(stride_of(stage.blocks[0].attn.pool_q)) for stage in model.stages],
        key_value_strides=[list(stride_of(stage.blocks[0].attn.pool_k)) for stage in model.stages],
        relative_position_embeddings=first.attn.rel_pos_type == "spatial",
        layer_norm_eps=model.norm.eps,
        drop_path_rate=getattr(model.stages[-1].blocks[-1].drop_path1, "drop_prob", 0.0),
        classifier_dropout_prob=model.drop_rate,
        classifier_pooling="mean" if model.global_pool == "avg" else "cls",
    )


def source_image_size(model) -> int:
    """The resolution the source's relative position tables (else its position embeddings, else its pretrained
    config, else timm's default 224 px) were made for: timm does not keep it on the model."""
    first = model.stages[0].blocks[0].attn
    stride = model.patch_embed.proj.stride[0]
    if getattr(first, "rel_pos_h", None) is not None:
        # 2·max(query side, key side) − 1 positions, the sides the first grid over each pooling stride
        side = (first.rel_pos_h.shape[0] + 1) // 2
        return side * min(stride_of(first.pool_q)[1], stride_of(first.pool_k)[1]) * stride
    if model.pos_embed is not None:
        return int(round((model.pos_embed.shape[1] - (model.cls_token is not None)) ** 0.5)) * stride
    return (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]


def timm_labels(model) -> dict[int, str] | None:
    """The class names of a timm classifier, as `transformers` names a timm checkpoint's: its pretrained config's
    `label_names`, else ImageNet's class descriptions where its number of classes is an ImageNet subset's (timm's
    `infer_imagenet_subset`), else None."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names is None and model.num_classes:
        data = import_timm().data
        subset = data.infer_imagenet_subset(model)
        if subset:
            info = data.ImageNetInfo(subset)
            descriptions = info.label_descriptions(as_dict=True)
            names = [descriptions[synset] for synset in info.label_names()]
    return dict(enumerate(names)) if names is not None else None


def castle_mvitv2(source, labels: dict | None = None, model_class=None, **overrides):
    """A Castling-MViTv2 (a classifier where the source has a head, else the bare model) from a timm
    `MultiScaleVit`, with its weights and the exact start of `conversion.castling_start`; `labels` names the classes
    (`timm_labels`, or a `TimmWrapperForImageClassification`'s id2label), `LABEL_i` where None."""
    fields = mvitv2_config(source)
    fixed = sorted(set(overrides) & set(fields) - {"drop_path_rate", "classifier_dropout_prob"})
    if fixed:
        raise ValueError(
            f"Cannot override {fixed} when converting: the source's weights and modules fix them. Override "
            "Castling-MViTv2's own fields instead (e.g. residual_conv)."
        )
    has_head = source.num_classes > 0
    model_class = model_class or (CastlingMViTv2ForImageClassification if has_head else CastlingMViTv2Model)
    new_labels = bool(set(overrides) & set(LABEL_FIELDS))
    if has_head and not new_labels:
        labels = labels or {index: f"LABEL_{index}" for index in range(source.num_classes)}
        fields.update(id2label=dict(labels), label2id={name: int(index) for index, name in labels.items()})
    target = model_class(CastlingMViTv2Config(**{**fields, **castling_start(overrides)}))
    prefix = f"{target.base_model_prefix}." if isinstance(target, CastlingMViTv2ForImageClassification) else ""
    mapped = {}
    for key, tensor in source.state_dict().items():
        name = castling_name(key)
        if name is not None:
            mapped[prefix + name] = tensor
        elif key.startswith("head.fc.") and "classifier.weight" in target.state_dict():
            if not new_labels:
                mapped[key.replace("head.fc.", "classifier.")] = tensor
    if isinstance(target, CastlingMViTv2Backbone):  # it keeps the stages up to its last map, no final norm
        mapped = {key: tensor for key, tensor in mapped.items() if key in target.state_dict()}
    check_and_load(target, mapped, type(source).__name__)
    reference = next(source.parameters())
    return target.to(device=reference.device, dtype=reference.dtype).eval()


def timm_image_processor(model, pretrained_cfg: dict | None = None) -> BitImageProcessorPil:
    """The evaluation preprocessing of a timm model as a `transformers` PIL processor: resize the shortest edge to
    input_size / crop_pct (bicubic or bilinear), centre-crop input_size, normalise with its mean and std. The settings
    come from `pretrained_cfg` (a timm checkpoint's, or a `TimmWrapperImageProcessor`'s `data_config`) where given,
    else from timm's own `resolve_data_config` for `model` (its pretrained config, or for a model built without one,
    timm's defaults at the size it was built for)."""
    if pretrained_cfg is None:
        made_for = getattr(model, "pretrained_cfg", None) or {"input_size": (3, *(source_image_size(model),) * 2)}
        pretrained_cfg = import_timm().data.resolve_data_config(pretrained_cfg=made_for, model=model)
    size = pretrained_cfg["input_size"][-1]
    bicubic = pretrained_cfg.get("interpolation", "bicubic") == "bicubic"
    return BitImageProcessorPil(
        size={"shortest_edge": math.floor(size / pretrained_cfg.get("crop_pct", 0.875))},
        crop_size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC if bicubic else PILImageResampling.BILINEAR,
        image_mean=list(pretrained_cfg.get("mean", (0.485, 0.456, 0.406))),
        image_std=list(pretrained_cfg.get("std", (0.229, 0.224, 0.225))),
        do_convert_rgb=True,
    )


__all__ = [
    "MVITV2_WEIGHTS",
    "castle_mvitv2",
    "is_timm_mvitv2",
    "load_timm_checkpoint",
    "mvitv2_config",
    "timm_image_processor",
    "timm_labels",
    "timm_model_of",
]
