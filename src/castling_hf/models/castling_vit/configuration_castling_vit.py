"""Configuration of Castling-ViT (You et al., CVPR 2023).

Field names follow `ViTConfig` wherever the meaning is the same, so that a ViT user can read a
Castling-ViT config at a glance; the fields after `pooler_act` are Castling-ViT's own.
"""

import math
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin

from ...configuration_utils import CastlingAttentionConfig, as_pair

# The four sizes of docs/design.md §3. `nano` is small enough to train on a CPU in a test or a demo.
SIZE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
)
CASTLING_VIT_SIZES: dict[str, dict] = {
    name: dict(zip(SIZE_FIELDS, values, strict=True))
    for name, values in {
        "nano": (64, 4, 4, 128, 32, 4),
        "tiny": (192, 12, 3, 768, 224, 16),
        "small": (384, 12, 6, 1536, 224, 16),
        "base": (768, 12, 12, 3072, 224, 16),
    }.items()
}


def pyramid_scale(patch_size: int, stride: int) -> float | None:
    """How much a map at `stride` pixels is finer than the patch grid (2 = twice as many rows and columns, 0.5 =
    half), or None when that is not a power of two."""
    scale = patch_size / stride
    exponent = round(math.log2(scale)) if scale > 0 else None
    return scale if exponent is not None and 2.0**exponent == scale else None


@strict
class CastlingViTConfig(BackboneConfigMixin, CastlingAttentionConfig):
    r"""
    Configuration of a Castling-ViT model (`CastlingViTModel`, `CastlingViTForImageClassification`).

    The ViT fields (`hidden_size` ... `pooler_act`) mean what they mean in `ViTConfig`. The next ones describe the
    architecture of a pretrained source that `castling_hf.castle` converts (DeiT, Dinov2, Dinov2 with registers,
    DINOv3), named as `transformers` names them where the meaning is the same; their defaults are ViT's:

    layerscale_value (`float` or `None`, defaults to `None`):
        Initial value of a learned per-channel scale on each residual branch (attention and MLP), as Dinov2's and
        DINOv3's LayerScale (`layer_scale1`, `layer_scale2`); `None`: no LayerScale (ViT, DeiT).
    num_register_tokens (`int`, defaults to 0):
        Register tokens after [CLS] (and the distillation token): learned, without position embedding, dropped from
        the feature maps, as Dinov2 with registers and DINOv3.
    use_distillation_token (`bool`, defaults to `False`):
        A distillation token after [CLS] with its own position embedding, as DeiT.
    position_embedding_type (`"learned"` or `"rope"`, defaults to `"learned"`):
        `"learned"`: position embeddings added to [CLS], the distillation token and the patches (ViT, DeiT, Dinov2).
        `"rope"`: no learned position embeddings; 2D rotary embeddings on the patch tokens' q and k in every layer,
        before both the linear-angular path and the softmax branch (DINOv3).
    interpolate_pos_encoding (`bool`, defaults to `False`):
        Resize the learned position embeddings for any input size, as Dinov2 does; with `False` only when the forward
        pass is given `interpolate_pos_encoding=True`, as ViT (the backbone and the detector always resize).
    position_embedding_antialias (`bool`, defaults to `False`):
        Resize learned position embeddings bicubically with antialiasing (Dinov2 with registers) rather than without
        (ViT, DeiT, Dinov2).
    rope_theta (`float`, defaults to 100.0), pos_embed_shift, pos_embed_jitter, pos_embed_rescale (`float` or `None`):
        DINOv3's rotary embedding: the base of its frequencies, and the random shift, jitter and rescaling of the
        patch coordinates it applies in training.
    pooler_type (`"dense"` or `"cls"`, defaults to `"dense"`):
        `CastlingViTModel`'s `pooler_output`: `"dense"`, a dense layer and `pooler_act` on [CLS] (ViT); `"cls"`, the
        final-norm [CLS] token itself (Dinov2, DINOv3).
    classifier_pooling (`"cls"`, `"cls_and_patch_mean"` or `"cls_and_distillation"`, defaults to `"cls"`):
        What `CastlingViTForImageClassification` classifies: the final [CLS] token (ViT, DeiT); [CLS] concatenated
        with the mean of the patch tokens (Dinov2); or [CLS] and the distillation token, each by its own classifier,
        their logits averaged (`DeiTForImageClassificationWithTeacher`; needs `use_distillation_token`).

    drop_path_rate (`float`, defaults to 0.0):
        Stochastic depth: in training, each layer's attention and MLP branches are dropped for a whole image with
        this probability (and the kept ones scaled by 1/(1 − p)), as Dinov2's and DINOv3's `drop_path_rate`, the same
        rate in every layer.

    Castling attention (`attention_mode`, `angular_normalization`, `residual_conv`, `softmax_mask_threshold`, ...): the
    fields every Castling family shares, documented in `CastlingAttentionConfig`.

    Object detection (`CastlingViTForObjectDetection`: a dense, NMS-free head on the patch grid, trained with
    Deformable DETR's one-to-one set loss, whose field names these follow):

    detection_tower_depth (`int`, defaults to 2):
        3×3 conv (+ group norm, GELU) layers in each of the head's two towers, the class tower and the box tower.
    detection_prior_probability (`float`, defaults to 0.01):
        The score every cell starts with for every class (the bias of the class logits is set to match), so that
        the focal loss of the many empty cells does not swamp the first steps (as RetinaNet / FCOS).
    class_cost, bbox_cost, giou_cost (`float`, defaults to 2, 5, 2):
        Weights of the focal classification, L1 box and generalised-IoU terms in the Hungarian matching cost that
        assigns each object to one cell.
    bbox_loss_coefficient, giou_loss_coefficient (`float`, defaults to 5, 2):
        Weights of the L1 box and generalised-IoU losses.
    focal_alpha (`float`, defaults to 0.25):
        α of the sigmoid focal loss on the class scores.
    auxiliary_loss (`bool`, defaults to False):
        Whether to add the set loss of the head applied after every intermediate layer as well.

    As a backbone (`CastlingViTBackbone`, `AutoBackbone`; stages named as Dinov2's: `"stem"` for the embeddings,
    then `"stage1"` ... `"stageL"` for the layers):

    out_features (`list[str]`, *optional*) / out_indices (`list[int]`, *optional*):
        The stages whose outputs the backbone returns as feature maps; the last stage by default.
    apply_layernorm (`bool`, defaults to True):
        Whether to apply the final layer norm to each feature map.
    reshape_hidden_states (`bool`, defaults to True):
        Whether to return feature maps as `(batch, hidden_size, rows, columns)` ([CLS] dropped) rather than token
        sequences `(batch, tokens, hidden_size)`.
    simple_feature_pyramid (`bool`, defaults to False):
        Turn four selected stages into a pyramid of output strides `simple_feature_pyramid_strides`, as ViTDet's
        simple feature pyramid, whatever the patch size: for heads that need true 2× scale steps (UperNet, RT-DETR,
        D-FINE). Needs exactly four `out_features` and `reshape_hidden_states`.
    simple_feature_pyramid_strides (`list[int]`, defaults to `[4, 8, 16, 32]`):
        The pyramid's output strides in pixels, one per map: a map finer than the patch grid is upsampled by
        stride-2 transposed convs, a coarser one max-pooled. Each must be the patch size times or divided by a
        power of two (patch 16: ×4, ×2, ×1, ×½ the grid, as ViTDet; patch 4: ×1, ×½, ×¼, ×⅛).

    Use `CastlingViTConfig.from_size(name, **overrides)` for one of the sizes in `CASTLING_VIT_SIZES`
    (`"nano"`, `"tiny"`, `"small"`, `"base"`).

    Example:

    ```python
    >>> from castling_hf import CastlingViTConfig, CastlingViTForImageClassification
    >>> config = CastlingViTConfig.from_size("small", num_labels=10)
    >>> model = CastlingViTForImageClassification(config)
    ```
    """

    model_type = "castling_vit"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"

    layerscale_value: float | None = None
    num_register_tokens: int = 0
    use_distillation_token: bool = False
    position_embedding_type: Literal["learned", "rope"] = "learned"
    interpolate_pos_encoding: bool = False
    position_embedding_antialias: bool = False
    rope_theta: float | int = 100.0
    pos_embed_shift: float | None = None
    pos_embed_jitter: float | None = None
    pos_embed_rescale: float | None = None
    pooler_type: Literal["dense", "cls"] = "dense"
    classifier_pooling: Literal["cls", "cls_and_patch_mean", "cls_and_distillation"] = "cls"

    detection_tower_depth: int = 2
    detection_prior_probability: float = 0.01
    class_cost: float | int = 2
    bbox_cost: float | int = 5
    giou_cost: float | int = 2
    bbox_loss_coefficient: float | int = 5
    giou_loss_coefficient: float | int = 2
    focal_alpha: float = 0.25
    auxiliary_loss: bool = False

    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True
    simple_feature_pyramid: bool = False
    simple_feature_pyramid_strides: list[int] | tuple[int, ...] = (4, 8, 16, 32)

    def __post_init__(self, **kwargs):
        self.pooler_output_size = self.pooler_output_size or self.hidden_size
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    @classmethod
    def from_size(cls, size: str, **overrides) -> "CastlingViTConfig":
        """The configuration of a named size (`"nano"`, `"tiny"`, `"small"`, `"base"`), with `overrides` applied."""
        if size not in CASTLING_VIT_SIZES:
            raise ValueError(f"Unknown Castling-ViT size {size!r}; expected one of {sorted(CASTLING_VIT_SIZES)}.")
        return cls(**{**CASTLING_VIT_SIZES[size], **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: [CLS], the distillation token, the registers. They get no residual conv term
        and no rotary embedding, and are dropped from feature maps."""
        return 1 + int(self.use_distillation_token) + self.num_register_tokens

    @property
    def decoder_layers(self) -> int:
        """The layers the auxiliary detection loss reads: `transformers`' detection loss names them `decoder_layers`;
        in this encoder-only detector they are the encoder layers."""
        return self.num_hidden_layers

    @property
    def patch_grid_size(self) -> tuple[int, int]:
        """(rows, columns) of patch tokens at `image_size`: the grid the position embeddings are learned on."""
        (height, width), (patch_height, patch_width) = as_pair(self.image_size), as_pair(self.patch_size)
        return height // patch_height, width // patch_width

    def validate_dimensions(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}): each head gets hidden_size / num_attention_heads channels."
            )
        image_size, patch_size = as_pair(self.image_size), as_pair(self.patch_size)
        if len(image_size) != 2 or len(patch_size) != 2 or min(*image_size, *patch_size) < 1:
            raise ValueError(
                f"`image_size` and `patch_size` must be positive integers or (height, width) pairs, "
                f"got {self.image_size} and {self.patch_size}."
            )
        if image_size[0] % patch_size[0] or image_size[1] % patch_size[1]:
            raise ValueError(
                f"`image_size` {self.image_size} must be a multiple of `patch_size` {self.patch_size}, "
                "so that the patches tile the image."
            )

    def validate_source_architecture(self):
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"`drop_path_rate` is a probability in [0, 1), got {self.drop_path_rate}.")
        if self.num_register_tokens < 0:
            raise ValueError(f"`num_register_tokens` must be >= 0, got {self.num_register_tokens}.")
        if self.classifier_pooling == "cls_and_distillation" and not self.use_distillation_token:
            raise ValueError(
                "`classifier_pooling='cls_and_distillation'` classifies the distillation token as well as [CLS]: it "
                "needs `use_distillation_token=True`."
            )
        if self.position_embedding_type == "rope" and self.head_dim % 4:
            raise ValueError(
                f"2D rotary embeddings split each head's channels into four equal parts (sine and cosine of rows and "
                f"columns): head_dim = hidden_size / num_attention_heads must be a multiple of 4, got {self.head_dim}."
            )

    def validate_simple_feature_pyramid(self):
        if not self.simple_feature_pyramid:
            return
        strides = list(self.simple_feature_pyramid_strides)
        if len(self.out_features) != 4 or not self.reshape_hidden_states or len(strides) != 4:
            raise ValueError(
                "`simple_feature_pyramid` turns exactly four feature maps on the patch grid into the four output "
                f"strides of `simple_feature_pyramid_strides` (got {strides}): it needs four `out_features` (got "
                f"{self.out_features}) and `reshape_hidden_states=True` (got {self.reshape_hidden_states})."
            )
        patch = max(as_pair(self.patch_size))
        if len(set(as_pair(self.patch_size))) != 1 or not all(pyramid_scale(patch, stride) for stride in strides):
            raise ValueError(
                f"`simple_feature_pyramid_strides` {strides} must each be the (square) patch size {self.patch_size} "
                "times or divided by a power of two, so that each map is the patch grid upsampled by 2× steps or "
                f"max-pooled: e.g. {[patch * 2**k for k in (-2, -1, 0, 1)]}."
            )

    def validate_detection_head(self):
        if self.detection_tower_depth < 0:
            raise ValueError(f"`detection_tower_depth` must be >= 0, got {self.detection_tower_depth}.")
        if not 0.0 < self.detection_prior_probability < 1.0:
            raise ValueError(
                f"`detection_prior_probability` must lie in (0, 1), got {self.detection_prior_probability}."
            )


__all__ = ["CASTLING_VIT_SIZES", "SIZE_FIELDS", "CastlingViTConfig"]
