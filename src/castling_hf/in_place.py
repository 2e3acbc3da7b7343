"""Castling a `transformers` vision transformer in place: its own classes, heads, norms, position codes and outputs,
with each attention module given the Castling terms and selected through `transformers`' attention interface
(docs/design.md §10).

Every vision transformer of `transformers` whose attention goes through `ALL_ATTENTION_FUNCTIONS` hands its
attention function the module, q, k and v `(batch, heads, tokens, head_dim)`, the attention mask and the softmax
scale. Castling registers one more function, `"castling"`, which reads the Castling terms held by the module
(`CastlingAttentionTerms`: the residual conv, γ, and in the training form the softmax branch with α) and returns

    (1 − α)·γ ⊙ (LA(q, k, v) + DWConv(v)) + α·(M⊙S)V      (convex)     or      γ ⊙ (LA + DWConv) + α·(M⊙S)V

from `attention.py`'s functions, which the module's own output projection then reads. A family is a `Tower`
entry: the class of its embeddings (whose patch projection gives the grid the residual conv runs over) and of its
attention modules. The patch tokens are the last rows × columns tokens of the sequence; the tokens before them
([CLS], registers, distillation or query tokens) get no conv term.

A castled model is an instance of `Castled<Class>`, a subclass of its source class built by `castled_class`, whose
config (`Castled<Config>`, `model_type="castled_<type>"`) records the Castling fields of each castled tower in the
tower config's `castling` dict; both are registered with the Auto classes that take the source class, so that
`AutoModel*.from_pretrained` rebuilds the castled model from a checkpoint.
"""

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from torch import nn
from transformers import AttentionInterface, AutoConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto import modeling_auto

from .attention import (
    CastlingResidualConv,
    CastlingSoftmaxBranch,
    linear_angular_attention,
    linear_branch_weight,
    live_softmax_mask_scale,
    masked_linear_angular_attention,
)
from .configuration_utils import CastlingAttentionConfig
from .modeling_utils import (
    RELATIVE_IMPORT,
    CastlingMethods,
    check_no_attentions_asked,
    reclassed,
    relative_import_closure,
)

ATTENTION_IMPLEMENTATION = "castling"


@dataclass(frozen=True)
class Tower:
    """How a family lays out a vision tower: the class of its embeddings, the attribute path inside them of the
    convolution whose output is the patch grid, the class of its attention modules, and whether they call the
    attention interface (a timm model's do not: `timm_attention_forward` stands in). A tower whose embeddings
    take patches already cut out (SigLIP2's NaFlex) names no projection: its grids are the `spatial_shapes` its
    embeddings are called with, one per image, each image's patches first in its row and padding after them."""

    embeddings: str
    patch_projection: str | None
    attention: str
    through_interface: bool = True


# One entry per family, by source `model_type`: a family whose attention goes through the attention interface is
# castled by this table alone.
TOWERS = {
    "vit": Tower("ViTEmbeddings", "patch_embeddings.projection", "ViTAttention"),
    "deit": Tower("DeiTEmbeddings", "patch_embeddings.projection", "DeiTAttention"),
    "dinov2": Tower("Dinov2Embeddings", "patch_embeddings.projection", "Dinov2Attention"),
    "dinov2_with_registers": Tower(
        "Dinov2WithRegistersEmbeddings", "patch_embeddings.projection", "Dinov2WithRegistersAttention"
    ),
    "dinov3_vit": Tower("DINOv3ViTEmbeddings", "patch_embeddings", "DINOv3ViTAttention"),
    "siglip": Tower("SiglipVisionEmbeddings", "patch_embedding", "SiglipAttention"),
    "clip": Tower("CLIPVisionEmbeddings", "patch_embedding", "CLIPAttention"),
    "siglip2": Tower("Siglip2VisionEmbeddings", None, "Siglip2Attention"),
    "eomt": Tower("EomtEmbeddings", "patch_embeddings.projection", "EomtAttention"),
    "ijepa": Tower("IJepaEmbeddings", "patch_embeddings.projection", "IJepaAttention"),
    # timm's VisionTransformer inside `transformers`' TimmWrapper: its attention calls SDPA itself, so its forward is
    # `timm_attention_forward`, which hands q, k, v to the same attention function.
    "timm_wrapper": Tower("PatchEmbed", "proj", "Attention", through_interface=False),
}
# Model types whose configs hold a tower's config (a vision-only model of a two-tower family) under another name.
TOWER_MODEL_TYPES = {"siglip_vision_model": "siglip", "siglip2_vision_model": "siglip2", "clip_vision_model": "clip"}
TOWERS_BY_EMBEDDINGS = {tower.embeddings: tower for tower in TOWERS.values()}


@dataclass
class PatchGrid:
    """The (rows, columns) of patch tokens of the images a tower is running on, written by a hook as its embeddings
    run, so that each forward pass reads the grid of its own input, at any resolution: `size`, one grid for the
    batch, its patches the last tokens (`read_projection`, on the patch projection), or `sizes`, one grid per image,
    its patches the first tokens and padding after them (`read_spatial_shapes`, on NaFlex embeddings)."""

    size: tuple[int, int] | None = None
    sizes: list[tuple[int, int]] | None = None

    def read_projection(self, module: nn.Module, args, output: torch.Tensor) -> None:
        self.size, self.sizes = tuple(output.shape[-2:]), None

    def read_spatial_shapes(self, module: nn.Module, args, kwargs) -> None:
        shapes = kwargs["spatial_shapes"] if "spatial_shapes" in kwargs else args[1]
        self.size, self.sizes = None, [tuple(shape) for shape in shapes.tolist()]


class CastlingAttentionTerms(nn.Module):
    """What Castling adds to a source's attention module: the residual conv on V, the per-head scale γ
    (`linear_branch_scale`) and, in the training form, the softmax branch with its α. `forward` is the castled
    attention itself, from the module's q, k and v."""

    def __init__(self, options: CastlingAttentionConfig, hidden_size: int, num_heads: int, grid: PatchGrid):
        super().__init__()
        self.angular_normalization = options.angular_normalization
        self.angular_eps = options.angular_eps
        self.linear_branch_blend = options.linear_branch_blend
        self.grid = grid
        self.residual_conv = None
        if options.residual_conv is not None:
            self.residual_conv = CastlingResidualConv(
                options.residual_conv, hidden_size, num_heads, options.residual_kernel_size
            )
        self.linear_branch_scale = nn.Parameter(torch.full((num_heads,), float(options.linear_branch_scale_init)))
        self.softmax_branch = CastlingSoftmaxBranch(options) if options.attention_mode == "castling" else None

    def forward(
        self, query, key, value, scaling: float | None, dropout: float, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The castled attention of token-major q, k, v `(batch, tokens, heads, head_dim)`, token-major out.
        `scaling` is the source's softmax scale (the branch's; the linear term normalises q and k).
        `attention_mask` is the source's (`allowed_by`): the linear term sums over the keys each query may attend to
        (`masked_linear_angular_attention`), the softmax branch takes it as SDPA does."""
        head_dim = query.shape[-1]
        if self.grid.size is None and self.grid.sizes is None:
            raise RuntimeError(
                "A castled attention module was called before its tower's patch embeddings ran, so the patch grid its "
                "residual conv works on is unknown: call the model (or its vision tower), not the attention module."
            )
        alpha = live_softmax_mask_scale(self.softmax_branch)
        weight = linear_branch_weight(self.linear_branch_scale, alpha, self.linear_branch_blend)
        allowed = allowed_by(attention_mask)
        if allowed is None:
            attended = linear_angular_attention(query, key, value, self.angular_normalization, self.angular_eps, weight)
        elif self.angular_normalization == "kernel":
            attended = masked_linear_angular_attention(query, key, value, allowed, self.angular_eps, weight)
        else:
            raise ValueError("An attention mask needs angular_normalization='kernel' ('l2' sums over every token).")
        if self.residual_conv is not None:
            self.add_residual_conv(attended, value, weight)
        if alpha is not None:
            if scaling is not None and scaling != head_dim**-0.5:  # the branch scales by 1/√d, as SDPA
                query = query * (scaling * head_dim**0.5)
            attended += self.softmax_branch(query, key, value, dropout_p=dropout, attention_mask=attention_mask)
        return attended

    def add_residual_conv(self, attended: torch.Tensor, value: torch.Tensor, weight: torch.Tensor) -> None:
        """attended += DWConv(v) on the patch tokens, in place: over the batch's grid (the last tokens), or over each
        image's own grid (its first tokens; padding gets no conv term)."""
        if self.grid.size is not None:
            num_prefix_tokens = value.shape[1] - self.grid.size[0] * self.grid.size[1]
            attended[:, num_prefix_tokens:] += self.residual_conv(value, num_prefix_tokens, self.grid.size, weight)
            return
        for image, (rows, columns) in enumerate(self.grid.sizes):
            patches = slice(0, rows * columns)
            conv = self.residual_conv(value[image : image + 1, patches], 0, (rows, columns), weight)
            attended[image : image + 1, patches] += conv


# An additive mask entry at or below this masks its key (transformers writes the dtype's minimum, EoMT -1e9).
MASKED_BELOW = -1e4


def allowed_by(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Where a source's attention mask lets query i attend to key j, as a bool tensor; None for no mask or one that
    allows everything. A boolean mask is that already. An additive one masks the entries at or below `MASKED_BELOW`
    and allows the others, which must be equal along each row (softmax does not see a constant added to a row: EoMT
    adds 1 where it allows); any other values are a bias, not a mask, and are refused: the linear term cannot add one.
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask > MASKED_BELOW
        if not (~allowed | (attention_mask == attention_mask.amax(dim=-1, keepdim=True))).all():
            raise ValueError(
                "A castled attention was given an additive attention mask whose allowed entries differ along a row: "
                "an attention bias, which the linear-angular term cannot add. Castling takes masks only."
            )
    return None if allowed.all() else allowed


def castling_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `"castling"` attention function of `transformers`' attention interface: the Castling terms of `module`
    on its head-major q, k, v; no attention weights (none is ever formed)."""
    terms = getattr(module, "castling", None)
    if not isinstance(terms, CastlingAttentionTerms):
        raise ValueError(
            f"attn_implementation='castling' on a {type(module).__name__} that has no Castling terms: castle the "
            "model with castling_hf.castle(...) rather than setting the attention implementation by hand."
        )
    if is_causal:
        raise ValueError(f"A castled {type(module).__name__} was asked for causal attention; vision towers have none.")
    attended = terms(*(tensor.transpose(1, 2) for tensor in (query, key, value)), scaling, dropout, attention_mask)
    return attended, None


AttentionInterface.register(ATTENTION_IMPLEMENTATION, castling_attention_forward)
# Masks reach the castled attention as SDPA takes them: boolean, or None where nothing is masked.
AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)


def is_castled(config) -> bool:
    """Whether `config` is that of a tower castled in place: it records the tower's Castling fields."""
    return getattr(config, "castling", None) is not None


def tower_of(model_type: str) -> Tower | None:
    return TOWERS.get(TOWER_MODEL_TYPES.get(model_type, model_type))


def towers(model: nn.Module):
    """(tower module, its embeddings, its Tower entry) for every vision tower inside `model`: the module holding
    embeddings of a class in `TOWERS`."""
    for name, module in model.named_modules():
        tower = TOWERS_BY_EMBEDDINGS.get(type(module).__name__)
        if tower is not None:
            parent = name.rpartition(".")[0]
            yield model.get_submodule(parent), module, tower


def first_tower(model: nn.Module) -> nn.Module | None:
    """The first vision tower inside `model` (the module holding its embeddings), or None: the part whose final
    hidden states distillation compares, in a castled model and its source alike."""
    return next((tower_module for tower_module, _, _ in towers(model)), None)


def tower_families(model: nn.Module) -> set[str]:
    """The `TOWERS` families of the vision towers inside `model`, by model type."""
    found = {tower for _, _, tower in towers(model)}
    return {model_type for model_type, tower in TOWERS.items() if tower in found}


def attention_modules(tower_module: nn.Module, tower: Tower) -> list[nn.Module]:
    return [module for module in tower_module.modules() if type(module).__name__ == tower.attention]


def tower_attentions(model: nn.Module):
    """(embeddings, Tower entry, attention modules, the config that holds the tower's Castling fields) for every
    vision tower inside `model` with attention modules: the attention modules' own config (`transformers`), or the
    model's (a timm model inside a TimmWrapper, whose modules have none)."""
    for tower_module, embeddings, tower in towers(model):
        modules = attention_modules(tower_module, tower)
        if modules:
            yield embeddings, tower, modules, getattr(modules[0], "config", None) or model.config


def width_and_heads(module: nn.Module, config) -> tuple[int, int]:
    """The attention's width (heads × head size) and head count: its config's, or a timm module's own."""
    if getattr(module, "config", None) is not None:
        return config.hidden_size, config.num_attention_heads
    return module.attn_dim, module.num_heads


def install_castling(model: nn.Module) -> nn.Module:
    """Give every attention module of each tower whose config records Castling fields (`config.castling`) its
    Castling terms, hook the grid reader on the tower's patch projection, and select the `"castling"` attention
    function for the tower; in place, and once."""
    for embeddings, tower, modules, config in tower_attentions(model):
        if getattr(config, "castling", None) is None or isinstance(getattr(modules[0], "castling", None), nn.Module):
            continue
        options = CastlingAttentionConfig(**config.castling)
        grid = PatchGrid()
        if tower.patch_projection is None:
            embeddings.register_forward_pre_hook(grid.read_spatial_shapes, with_kwargs=True)
        else:
            embeddings.get_submodule(tower.patch_projection).register_forward_hook(grid.read_projection)
        reference = next(modules[0].parameters())
        for module in modules:
            terms = CastlingAttentionTerms(options, *width_and_heads(module, config), grid)
            module.castling = terms.to(device=reference.device, dtype=reference.dtype)
            if not tower.through_interface:
                reclassed(module, castled_timm_attention(type(module)))
        config._attn_implementation_internal = ATTENTION_IMPLEMENTATION
    return model


def timm_attention_forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    """timm's `Attention.forward` with its attention computed by `castling_attention_forward`: the same fused
    projection, q/k norms, output norm, gate and projections around it."""
    batch, tokens, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    query, key = self.q_norm(query), self.k_norm(key)
    dropout = self.attn_drop.p if self.training else 0.0
    attended, _ = castling_attention_forward(self, query, key, value, attn_mask, self.scale, dropout, is_causal)
    attended = self.norm(attended.reshape(batch, tokens, self.attn_dim))
    if gate is not None:
        attended = attended * gate
    return self.proj_drop(self.proj(attended))


_CASTLED_TIMM_ATTENTIONS: dict[type, type] = {}


def castled_timm_attention(attention_class: type) -> type:
    """timm's attention class with `timm_attention_forward`, under the same name."""
    if attention_class in _CASTLED_TIMM_ATTENTIONS.values():
        return attention_class
    if attention_class not in _CASTLED_TIMM_ATTENTIONS:
        attributes = {"forward": timm_attention_forward, "__module__": attention_class.__module__}
        _CASTLED_TIMM_ATTENTIONS[attention_class] = type(attention_class.__name__, (attention_class,), attributes)
    return _CASTLED_TIMM_ATTENTIONS[attention_class]


class CastledModelMixin(CastlingMethods):
    """A source model class castled in place (`castled_class`): built as its source, then its towers given their
    Castling terms from their configs. Its checkpoints carry the code that rebuilds it (`write_castled_remote_code`),
    so that its Auto classes load it with `trust_remote_code=True` where castling_hf is not installed."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        install_castling(self)

    def save_pretrained(self, save_directory, *args, inference: bool = False, force: bool = False, **kwargs):
        """`CastlingMethods.save_pretrained` (`inference=True` saves the inference form), with the remote code."""
        if inference:
            return super().save_pretrained(save_directory, *args, inference=True, force=force, **kwargs)
        source_type = self.config.model_type.removeprefix("castled_")
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            **{
                auto: f"{REMOTE_MODULE}.{(type(self) if type(self) in classes else classes[0]).__name__}"
                for auto, classes in castled_auto_classes(source_type).items()
            },
        }
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        write_castled_remote_code(source_type, save_directory)
        return saved

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        if attn_implementation != ATTENTION_IMPLEMENTATION:
            raise ValueError(
                f"set_attn_implementation({attn_implementation!r}) on a castled {type(self).__name__}: its vision "
                "towers run Castling attention, which another implementation would silently skip. Load the source "
                "model for softmax attention."
            )
        return super().set_attn_implementation(attn_implementation, *args, **kwargs)


_CASTLED_CONFIGS: dict[type, type] = {}
_CASTLED_MODELS: dict[type, type] = {}


def castled_config_class(config_class: type) -> type:
    """`Castled<Config>`: the source config class with `model_type="castled_<type>"`, so that a castled checkpoint
    names what it is and `AutoConfig` finds the class that rebuilds it."""
    if config_class in _CASTLED_CONFIGS.values():
        return config_class
    if config_class not in _CASTLED_CONFIGS:
        attributes = {
            "model_type": f"castled_{config_class.model_type}",
            "castled_from": config_class,
            "__module__": __name__,
        }
        _CASTLED_CONFIGS[config_class] = type(f"Castled{config_class.__name__}", (config_class,), attributes)
    return _CASTLED_CONFIGS[config_class]


def castled_model_classes() -> list[type]:
    """Every castled model class made so far (those of the `TOWERS` families are made on import)."""
    return list(_CASTLED_MODELS.values())


def refusing_attentions(forward):
    """A source class's `forward` that refuses `output_attentions=True`: the castled tower forms no attention maps,
    and the source's code would return none, or an empty tuple, without saying so. Its signature is the source's."""

    @functools.wraps(forward)
    def castled_forward(self, *args, **kwargs):
        check_no_attentions_asked(kwargs, self.config)
        return forward(self, *args, **kwargs)

    return castled_forward


def castled_class(model_class: type) -> type:
    """`Castled<Class>`: `model_class` with `CastledModelMixin`, the castled config class and `refusing_attentions`."""
    if model_class in _CASTLED_MODELS.values():
        return model_class
    if model_class not in _CASTLED_MODELS:
        attributes = {
            "config_class": castled_config_class(model_class.config_class),
            "castled_from": model_class,
            "forward": refusing_attentions(model_class.forward),
            "__module__": __name__,
        }
        name = f"Castled{model_class.__name__}"
        _CASTLED_MODELS[model_class] = type(name, (CastledModelMixin, model_class), attributes)
    return _CASTLED_MODELS[model_class]


# The Auto classes a castled model is registered with, by the name of their table in `transformers`: each takes the
# castled class of the source class it lists for the model type.
AUTO_CLASSES = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForZeroShotImageClassification": "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "AutoBackbone": "MODEL_FOR_BACKBONE_MAPPING_NAMES",
    "AutoModelForUniversalSegmentation": "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES",
}


def register_castled_families() -> None:
    """Register `Castled<Config>` with `AutoConfig` and `Castled<Class>` with every Auto class that takes `<Class>`,
    for every model type of the `TOWERS` table (run on `import castling_hf`)."""
    for model_type in (*TOWERS, *TOWER_MODEL_TYPES):
        classes = castled_auto_classes(model_type)
        (castled_config,) = classes.pop("AutoConfig")
        AutoConfig.register(castled_config.model_type, castled_config, exist_ok=True)
        for auto_name, castled in classes.items():
            # Several classes for one Auto class (DeiT's classifier with and without its teacher): the checkpoint's
            # `architectures` picks one, as for the source's.
            getattr(transformers, auto_name).register(
                castled_config, castled if len(castled) > 1 else castled[0], exist_ok=True
            )
            # The pipelines check a model's class name against these static tables, which `register` does not
            # reach, and log an error for a class they do not find.
            names = tuple(cls.__name__ for cls in castled)
            getattr(modeling_auto, AUTO_CLASSES[auto_name]).setdefault(
                castled_config.model_type, names if len(names) > 1 else names[0]
            )


def castled_auto_classes(model_type: str) -> dict[str, tuple[type, ...]]:
    """The castled config class and, by Auto class, the castled model classes of the source classes that the Auto
    classes of `AUTO_CLASSES` map `model_type` to (most one, DeiT's classifiers two)."""
    classes = {"AutoConfig": (castled_config_class(transformers.CONFIG_MAPPING[model_type]),)}
    for auto_name, table in AUTO_CLASSES.items():
        class_names = getattr(modeling_auto, table).get(model_type)
        if class_names is not None:
            class_names = class_names if isinstance(class_names, tuple) else (class_names,)
            classes[auto_name] = tuple(castled_class(getattr(transformers, name)) for name in class_names)
    return classes


# The pipeline task of a castled class, from the first of these `transformers` tables that lists its source class.
PIPELINE_TASKS = {
    "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES": "zero-shot-image-classification",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "image-classification",
    "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES": "image-segmentation",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "image-text-to-text",
    "MODEL_MAPPING_NAMES": "image-feature-extraction",
}


def listed_in(table: str, class_name: str) -> bool:
    names = getattr(modeling_auto, table).values()
    return any(class_name == name or (isinstance(name, tuple) and class_name in name) for name in names)


def pipeline_task(castled: type) -> str | None:
    """The pipeline task of a castled class (that of its source class), or None for another class."""
    source = getattr(castled, "castled_from", None)
    return next((task for table, task in PIPELINE_TASKS.items() if source and listed_in(table, source.__name__)), None)


def auto_class_name(castled: type) -> str | None:
    """The Auto class that loads a castled class: the first of `AUTO_CLASSES` (most specific first) that lists its
    source class; None for another class."""
    source = getattr(castled, "castled_from", None)
    ordered = sorted(AUTO_CLASSES.items(), key=lambda item: item[0] == "AutoModel")
    return next((auto for auto, table in ordered if source and listed_in(table, source.__name__)), None)


def card_fields(model: nn.Module) -> SimpleNamespace | None:
    """What a model card says of a model castled in place: its first castled tower's architecture and Castling
    fields; None for a model with no tower castled in place."""
    for _, _, _, config in tower_attentions(model):
        if getattr(config, "castling", None) is not None:
            architecture = {
                name: getattr(config, name, "—")
                for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
            }
            architecture["image_size"] = getattr(config, "image_size", "any (NaFlex)")
            architecture["patch_size"] = getattr(config, "patch_size", "—")
            return SimpleNamespace(**architecture, **config.castling, weight_init="the source's (castled in place)")
    return None


# The module a castled checkpoint's `auto_map` names: it builds the castled classes from `transformers`' own.
REMOTE_MODULE = "castled_classes"


def write_castled_remote_code(model_type: str, folder) -> None:
    """Write into `folder` the module `REMOTE_MODULE`, which makes the castled classes of `model_type`'s family from
    `transformers`' classes, and this module with every module it imports, flat (`write_remote_code`'s way)."""
    castled = {cls for classes in castled_auto_classes(model_type).values() for cls in classes}
    sources = sorted({cls.castled_from.__name__ for cls in castled})
    lines = [
        f"from transformers import {', '.join(sources)}",
        "",
        "from .in_place import castled_class, castled_config_class",
        "",
    ]
    for cls in sorted(castled, key=lambda cls: cls.__name__):
        make = "castled_class" if issubclass(cls, CastledModelMixin) else "castled_config_class"
        lines.append(f"{cls.__name__} = {make}({cls.castled_from.__name__})")
    write_remote_module(lines, folder)


def write_remote_module(lines: list[str], folder) -> None:
    """`REMOTE_MODULE` of `lines`, and this module with every module it imports, flat, into `folder`."""
    Path(folder, f"{REMOTE_MODULE}.py").write_text("\n".join(lines) + "\n")
    for path in relative_import_closure([Path(__file__)]):
        text = RELATIVE_IMPORT.sub(lambda m: f"{m[1]}.{m[3].rsplit('.', 1)[-1]}{m[4]}", path.read_text())
        Path(folder, path.name).write_text(text)


def auto_classes_listing(model_class: type) -> list[str]:
    """The names of `transformers`' Auto model classes whose mapping lists `model_class`."""
    found = []
    for name, auto in vars(modeling_auto).items():
        names = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", None)
        if name.startswith("Auto") and isinstance(names, dict):
            if any(
                model_class.__name__ in (value if isinstance(value, tuple) else (value,)) for value in names.values()
            ):
                found.append(name)
    return found


class CastledHolderMixin(CastlingMethods):
    """A model that holds vision towers castled in place under a class of its own (LLaVA, PaliGemma, UperNet, DPT,
    Mask2Former, ...): it stays its class, whose config names the castled types of its towers (`vision_config`,
    `backbone_config`), with `CastlingMethods`. Its checkpoints carry `REMOTE_MODULE`, which registers the castled
    tower types before its config is read and subclasses its class and config under their own names (without
    them, `trust_remote_code` would mark `transformers`' own classes as remote code), so that its Auto classes load
    it with `trust_remote_code=True` where castling_hf is not installed."""

    def save_pretrained(self, save_directory, *args, inference: bool = False, force: bool = False, **kwargs):
        if inference:
            return super().save_pretrained(save_directory, *args, inference=True, force=force, **kwargs)
        source = self.castled_from
        config_name = source.config_class.__name__
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": f"{REMOTE_MODULE}.{config_name}",
            **{auto: f"{REMOTE_MODULE}.{source.__name__}" for auto in auto_classes_listing(source)},
        }
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        model_type = self.config.model_type
        lines = [
            "import transformers",
            "from transformers.conversion_mapping import (",
            "    get_checkpoint_conversion_mapping,",
            "    register_checkpoint_conversion_mapping,",
            ")",
            "",
            "from .in_place import register_castled_families",
            "",
            "register_castled_families()  # the castled tower types this model's config names",
            "# transformers renames a checkpoint's weights (saved under their Hub names) for its own classes only: the",
            "# same renaming for these, which load the same checkpoints.",
            f"renaming = get_checkpoint_conversion_mapping({model_type!r})",
            "if renaming is not None:",
            f"    register_checkpoint_conversion_mapping({model_type!r}, renaming, overwrite=True)",
            "",
            "",
            f"class {config_name}(transformers.{config_name}):",
            "    pass",
            "",
            "",
            f"class {source.__name__}(transformers.{source.__name__}):",
            f"    config_class = {config_name}",
        ]
        write_remote_module(lines, save_directory)
        return saved


_CASTLED_HOLDERS: dict[type, type] = {}


def with_holder_methods(model: PreTrainedModel) -> PreTrainedModel:
    """`model`, a model holding towers castled in place, its class made a subclass of its class and
    `CastledHolderMixin` under the same name and module, in place: it saves the same `architectures`."""
    cls = type(model)
    if isinstance(model, CastlingMethods):
        return model
    if cls not in _CASTLED_HOLDERS:
        attributes = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "castled_from": cls}
        _CASTLED_HOLDERS[cls] = type(cls.__name__, (CastledHolderMixin, cls), {**attributes, "__doc__": cls.__doc__})
    return reclassed(model, _CASTLED_HOLDERS[cls])


def castle_in_place(source: PreTrainedModel, options: dict) -> PreTrainedModel:
    """A copy of `source` with every vision tower of a `TOWERS` family castled with the Castling fields `options`
    (`castling_start`'s), every model class of a tower made its castled class, and a model holding towers under a
    class of its own given `CastledHolderMixin`; the source is left as it was."""
    model = copy.deepcopy(source)
    found = False
    for _, _, _, config in tower_attentions(model):
        config.castling = dict(options)
        found = True
    if not found:
        raise TypeError(f"{type(source).__name__} holds no vision tower that castle knows ({sorted(TOWERS)}).")
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and tower_of(module.config.model_type) is not None:
            module.config.__class__ = castled_config_class(type(module.config))
            reclassed(module, castled_class(type(module)))
    install_castling(model)
    model.__dict__.pop("_weight_conversions", None)
    return with_holder_methods(model)


__all__ = [
    "CastledModelMixin",
    "CastlingAttentionTerms",
    "TOWERS",
    "Tower",
    "castle_in_place",
    "castled_class",
    "castled_config_class",
    "castling_attention_forward",
    "first_tower",
    "install_castling",
    "register_castled_families",
]
