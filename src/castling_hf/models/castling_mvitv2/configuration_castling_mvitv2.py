"""Configuration of Castling-MViTv2: MViTv2's pooling attention (Li et al., CVPR 2022), castled (docs/design.md §10).

The architecture fields follow timm's `MultiScaleVitCfg` (the MViTv2 implementation whose weights are on the Hub),
named as `transformers` names them where it has a name for the thing (`hidden_sizes`, `depths`,
`num_attention_heads`, `layer_norm_eps`, `drop_path_rate`); the Castling attention fields are every family's
(`CastlingAttentionConfig`).
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin

from ...configuration_utils import CastlingAttentionConfig, as_pair

# timm's mvitv2_tiny / small / base (their `MultiScaleVitCfg`s, 224 px), and `nano` for tests and demos on a CPU, at
# about the plain Castling-ViT nano's inference MACs on the focus task (9.9 M against 9.5 M). Tiny's depths at a sixth
# of its width stayed at chance on that task in two seeds of three, softmax MViTv2 as well; depths (1, 1, 3, 1) at a
# fifth of tiny's width with heads of 10 channels learn it in every seed measured (docs/design.md §10).
STAGE_FIELDS = ("hidden_sizes", "depths", "num_attention_heads")
CASTLING_MVITV2_SIZES: dict[str, dict] = {
    "nano": dict(hidden_sizes=(20, 40, 80, 160), depths=(1, 1, 3, 1), num_attention_heads=(2, 4, 8, 16)),
    "tiny": dict(hidden_sizes=(96, 192, 384, 768), depths=(1, 2, 5, 2), num_attention_heads=(1, 2, 4, 8)),
    "small": dict(hidden_sizes=(96, 192, 384, 768), depths=(1, 2, 11, 2), num_attention_heads=(1, 2, 4, 8)),
    "base": dict(hidden_sizes=(96, 192, 384, 768), depths=(2, 3, 16, 3), num_attention_heads=(1, 2, 4, 8)),
}


@strict
class CastlingMViTv2Config(BackboneConfigMixin, CastlingAttentionConfig):
    r"""
    Configuration of a Castling-MViTv2 model (`CastlingMViTv2Model`, `CastlingMViTv2ForImageClassification`,
    `CastlingMViTv2Backbone`): four stages of MViTv2 blocks, each stage at half the resolution and twice the width of
    the one before, whose attention pools its queries, keys and values and is castled.

    image_size (`int` or `(height, width)`, defaults to 224):
        The resolution the relative position tables are sized for (other resolutions resize them, as timm does).
    num_channels (`int`, defaults to 3):
        Channels of the input images.
    patch_kernel_size, patch_stride, patch_padding (`int` or pairs, default to 7, 4 and 3):
        The convolution that embeds the image into the first stage's tokens (stride 4: the first stage's grid).
    hidden_sizes (`list[int]`, defaults to `[96, 192, 384, 768]`), depths (`[1, 2, 5, 2]`),
    num_attention_heads (`[1, 2, 4, 8]`):
        Width, number of blocks and attention heads of each stage.
    mlp_ratio (`float`, defaults to 4.0):
        The MLP's hidden width over its input width.
    qkv_bias (`bool`, defaults to True):
        Whether the q, k, v projection has a bias.
    expand_attention (`bool`, defaults to True):
        Where a stage widens: in the first block's attention (True, MViTv2-T/S/B) or in the last block's MLP (False,
        MViTv2-L).
    use_cls_token (`bool`, defaults to False):
        A [CLS] token before the patch tokens (unpooled, no residual conv term, no relative position bias).
    use_absolute_position_embeddings (`bool`, defaults to False):
        Learned position embeddings added to the first stage's tokens (for `image_size` only).
    residual_pooling (`bool`, defaults to True):
        Add the pooled queries to the attention output (MViTv2's residual pooling connection).
    pooling_kernel_size (`int` or pair, defaults to 3):
        Kernel of the depthwise convolutions that pool q, k and v (each followed by a layer norm).
    query_strides (`list` of pairs, defaults to `[[1, 1], [2, 2], [2, 2], [2, 2]]`):
        The stride of each stage's query pooling, in its first block (the other blocks keep the grid).
    key_value_strides (`list` of pairs, defaults to `[[4, 4], [2, 2], [1, 1], [1, 1]]`):
        The stride of each stage's key and value pooling, in every block (timm's adaptive `stride_kv`).
    relative_position_embeddings (`bool`, defaults to True):
        MViTv2's decomposed relative position bias on the attention scores (rows and columns of the key grid, each
        from q); in Castling-MViTv2 it is part of the softmax branch.
    hidden_act (`str`, defaults to `"gelu"`), layer_norm_eps (`float`, defaults to 1e-6),
    initializer_range (`float`, defaults to 0.02):
        As in `ViTConfig`.
    drop_path_rate (`float`, defaults to 0.0):
        Stochastic depth, rising linearly from 0 at the first block to this rate at the last (timm's schedule).
    attention_probs_dropout_prob (`float`, defaults to 0.0):
        Dropout on the softmax branch's kept probabilities.
    classifier_dropout_prob (`float`, defaults to 0.0):
        Dropout before the classifier.
    classifier_pooling (`"mean"` or `"cls"`, defaults to `"mean"`):
        What `CastlingMViTv2ForImageClassification` classifies: the mean of the final patch tokens or [CLS].

    Castling attention (`attention_mode`, `residual_conv`, `softmax_mask_threshold`, ...): see
    `CastlingAttentionConfig`. The residual conv is depthwise k×k on V's grid, resampled to the query grid; the
    linear-angular normalisation must be `"kernel"` (queries and keys are pooled apart).

    As a backbone (`CastlingMViTv2Backbone`, `AutoBackbone`): stages `"stem"` (the patch embeddings), `"stage1"` …
    `"stage4"`, at output strides 4, 8, 16 and 32 px with the defaults; `out_features` / `out_indices` choose them
    (the last stage by default), as `(batch, channels, rows, columns)` maps.

    Use `CastlingMViTv2Config.from_size(name, **overrides)` for one of `CASTLING_MVITV2_SIZES`.
    """

    model_type = "castling_mvitv2"

    image_size: int | list[int] | tuple[int, int] = 224
    num_channels: int = 3
    patch_kernel_size: int | list[int] | tuple[int, int] = 7
    patch_stride: int | list[int] | tuple[int, int] = 4
    patch_padding: int | list[int] | tuple[int, int] = 3
    hidden_sizes: list[int] | tuple[int, ...] = (96, 192, 384, 768)
    depths: list[int] | tuple[int, ...] = (1, 2, 5, 2)
    num_attention_heads: list[int] | tuple[int, ...] = (1, 2, 4, 8)
    mlp_ratio: float | int = 4.0
    qkv_bias: bool = True
    expand_attention: bool = True
    use_cls_token: bool = False
    use_absolute_position_embeddings: bool = False
    residual_pooling: bool = True
    pooling_kernel_size: int | list[int] | tuple[int, int] = 3
    query_strides: list | tuple = ((1, 1), (2, 2), (2, 2), (2, 2))
    key_value_strides: list | tuple = ((4, 4), (2, 2), (1, 1), (1, 1))
    relative_position_embeddings: bool = True
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    drop_path_rate: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    classifier_dropout_prob: float | int = 0.0
    classifier_pooling: Literal["mean", "cls"] = "mean"

    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, len(self.depths) + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    @classmethod
    def from_size(cls, size: str, **overrides) -> "CastlingMViTv2Config":
        """The configuration of a named size (`"nano"`, `"tiny"`, `"small"`, `"base"`), with `overrides` applied."""
        if size not in CASTLING_MVITV2_SIZES:
            raise ValueError(f"Unknown Castling-MViTv2 size {size!r}; expected one of {sorted(CASTLING_MVITV2_SIZES)}.")
        return cls(**{**CASTLING_MVITV2_SIZES[size], **overrides})

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage_widths(self, stage: int) -> tuple[int, int]:
        """(input width, output width) of `stage`: a stage widens in its first block's attention with
        `expand_attention`, else in its last block's MLP to the next stage's width (timm's `MultiScaleVit`)."""
        widths = list(self.hidden_sizes)
        width_in = widths[0] if stage == 0 else self.stage_widths(stage - 1)[1]
        width_out = widths[stage] if self.expand_attention else widths[min(stage + 1, len(widths) - 1)]
        return width_in, width_out

    def validate_stages(self):
        lengths = {name: len(getattr(self, name)) for name in (*STAGE_FIELDS, "query_strides", "key_value_strides")}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"Every per-stage field needs one entry per stage, got lengths {lengths}.")
        for stage, (width, heads) in enumerate(zip(self.hidden_sizes, self.num_attention_heads, strict=True)):
            if width < 1 or heads < 1 or width % heads:
                raise ValueError(
                    f"Stage {stage + 1}: `hidden_sizes` {width} must be a positive multiple of `num_attention_heads` "
                    f"{heads} (each head gets width / heads channels)."
                )
        if min(self.depths) < 1:
            raise ValueError(f"`depths` must be positive, got {self.depths}.")
        for name in ("query_strides", "key_value_strides"):
            if any(len(as_pair(stride)) != 2 or min(as_pair(stride)) < 1 for stride in getattr(self, name)):
                raise ValueError(
                    f"`{name}` must hold one positive (rows, columns) stride per stage, got {getattr(self, name)}."
                )

    def validate_pooled_attention(self):
        if self.angular_normalization != "kernel":
            raise ValueError(
                "Castling-MViTv2 pools queries and keys apart, so its linear-angular attention must normalise by the "
                "kernel (`angular_normalization='kernel'`); 'l2' adds each query's own value. Got "
                f"{self.angular_normalization!r}."
            )
        if self.residual_conv not in ("spatial", None):
            raise ValueError(
                f"Castling-MViTv2's residual conv is spatial (on V's grid) or None, got {self.residual_conv!r}."
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"`drop_path_rate` is a probability in [0, 1), got {self.drop_path_rate}.")
        if self.classifier_pooling == "cls" and not self.use_cls_token:
            raise ValueError(
                "`classifier_pooling='cls'` pools the [CLS] token, which needs `use_cls_token=True`; without one, "
                "use `classifier_pooling='mean'`."
            )


__all__ = ["CASTLING_MVITV2_SIZES", "CastlingMViTv2Config"]
