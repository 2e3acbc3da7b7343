"""Castling-ViT models: a pre-norm ViT whose attention is Castling attention (see `attention.py`).

Two forms share these classes (docs/design.md §2): the training form (`attention_mode="castling"`), whose layers carry
the auxiliary softmax branch and its softmax mask scale α, and the inference form (`attention_mode="linear"`),
which has no softmax branch at all. `switch_to_inference()` turns the first into the second in memory;
`save_pretrained(..., inference=True)` and `push_to_hub(..., inference=True)` write the second from the first.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from ...attention import (
    CastlingResidualConv,
    CastlingSoftmaxBranch,
    linear_angular_attention,
    linear_branch_weight,
    live_softmax_mask_scale,
    rotary_position_embedding,
)
from ...configuration_utils import as_pair
from ...modeling_utils import (
    CastlingDropPath,
    CastlingModelMixin,
    check_no_attentions_asked,
    init_castling_tensors,
    kept_hidden_states,
)
from .configuration_castling_vit import CastlingViTConfig


def check_pixel_values(pixel_values: torch.Tensor | None, config: CastlingViTConfig) -> None:
    """Reject input the model cannot read, saying what was wrong and what was expected."""
    if pixel_values is None:
        raise ValueError("`pixel_values` is required: a (batch, channels, height, width) tensor of images.")
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.dim() != 4:
        hint = (
            " For a single image, add the batch dimension: pixel_values.unsqueeze(0)."
            if pixel_values.dim() == 3
            else ""
        )
        raise ValueError(
            f"`pixel_values` must be a 4-D tensor (batch, channels, height, width), got shape "
            f"{tuple(pixel_values.shape)}.{hint}"
        )
    batch, channels, height, width = pixel_values.shape
    if batch == 0:
        raise ValueError(
            f"`pixel_values` is an empty batch (shape {tuple(pixel_values.shape)}); expected at least one image."
        )
    if channels != config.num_channels:
        raise ValueError(
            f"`pixel_values` has {channels} channels, but the model expects {config.num_channels} "
            f"(config.num_channels). Convert the images (e.g. to RGB) or use the model's image processor."
        )
    patch_height, patch_width = as_pair(config.patch_size)
    if height % patch_height or width % patch_width:
        raise ValueError(
            f"Image size {height}×{width} is not a multiple of the patch size {patch_height}×{patch_width}; "
            "resize or pad the images (the model's image processor does this)."
        )


class CastlingViTPatchEmbeddings(nn.Module):
    """Cuts images into non-overlapping patches and projects each one to `hidden_size`."""

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        patch_size = as_pair(config.patch_size)
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        patches = self.projection(pixel_values)
        grid_size = tuple(patches.shape[-2:])
        return patches.flatten(2).transpose(1, 2), grid_size


class CastlingViTEmbeddings(nn.Module):
    """[CLS], the distillation token (`use_distillation_token`), the register tokens (`num_register_tokens`), then
    the patch embeddings: the prefix tokens, which get no residual conv term and no rotary embedding.

    Learned position embeddings (`position_embedding_type="learned"`) are added to [CLS], the distillation token and
    the patches, bicubically resized for other input sizes (antialiased with `position_embedding_antialias`), never
    to the registers; with `"rope"` there are none, and `rotary` gives the layers their rotary embeddings instead.
    """

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        hidden = config.hidden_size
        self.grid_size = config.patch_grid_size
        self.num_prefix_tokens = config.num_prefix_tokens
        self.always_resize = config.interpolate_pos_encoding
        self.antialias = config.position_embedding_antialias
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, hidden)) if config.use_distillation_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, hidden)) if config.num_register_tokens else None
        )
        self.patch_embeddings = CastlingViTPatchEmbeddings(config)
        self.num_positioned_prefix_tokens = 1 + int(config.use_distillation_token)
        self.position_embeddings = self.rotary = None
        if config.position_embedding_type == "learned":
            num_patches = self.grid_size[0] * self.grid_size[1]
            self.position_embeddings = nn.Parameter(
                torch.zeros(1, self.num_positioned_prefix_tokens + num_patches, hidden)
            )
        else:
            self.rotary = CastlingViTRotaryEmbedding(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def rotary_embedding(
        self, grid_size: tuple[int, int], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layers' rotary (cos, sin) for this patch grid, or None for learned position embeddings."""
        return self.rotary(grid_size, dtype) if self.rotary is not None else None

    def resized_position_embeddings(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Position embeddings for a (rows, columns) patch grid other than the one they were learned on."""
        if grid_size == self.grid_size:
            return self.position_embeddings
        lead = self.num_positioned_prefix_tokens
        prefix_positions, patch_positions = self.position_embeddings[:, :lead], self.position_embeddings[:, lead:]
        hidden_size = patch_positions.shape[-1]
        patch_positions = patch_positions.reshape(1, *self.grid_size, hidden_size).permute(0, 3, 1, 2)
        # In fp32, as the sources do: bicubic resampling in half precision shifts the embeddings.
        patch_positions = nn.functional.interpolate(
            patch_positions.float(), size=grid_size, mode="bicubic", align_corners=False, antialias=self.antialias
        ).to(prefix_positions.dtype)
        patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, -1, hidden_size)
        return torch.cat([prefix_positions, patch_positions], dim=1)

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        patches, grid_size = self.patch_embeddings(pixel_values)
        batch = patches.shape[0]
        lead = [self.cls_token] + ([self.distillation_token] if self.distillation_token is not None else [])
        lead = torch.cat([token.expand(batch, -1, -1) for token in lead], dim=1)
        if self.position_embeddings is not None:
            if grid_size != self.grid_size and not (interpolate_pos_encoding or self.always_resize):
                patch_height, patch_width = self.patch_embeddings.projection.stride
                expected = (self.grid_size[0] * patch_height, self.grid_size[1] * patch_width)
                raise ValueError(
                    f"Input image size {pixel_values.shape[-2]}×{pixel_values.shape[-1]} does not match the model's "
                    f"{expected[0]}×{expected[1]}. Resize the images, or pass `interpolate_pos_encoding=True` to "
                    "resize the position embeddings to this input."
                )
            positions = self.resized_position_embeddings(grid_size)
            lead = lead + positions[:, : lead.shape[1]]
            patches = patches + positions[:, lead.shape[1] :]
        registers = [self.register_tokens.expand(batch, -1, -1)] if self.register_tokens is not None else []
        return self.dropout(torch.cat([lead, *registers, patches], dim=1)), grid_size


class CastlingViTRotaryEmbedding(nn.Module):
    """DINOv3's 2D rotary embedding of the patch tokens (`position_embedding_type="rope"`): each patch's centre on
    the grid, normalised to [-1, 1] in rows and columns (randomly shifted, jittered and rescaled in training, as the
    config says), turned into the angles of `rotary_angles`; returns their (cos, sin), `(patches, head_dim)`."""

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        self.shift, self.jitter, self.rescale = (
            config.pos_embed_shift,
            config.pos_embed_jitter,
            config.pos_embed_rescale,
        )
        frequencies = rotary_inverse_frequencies(config.rope_theta, config.head_dim)
        self.register_buffer("inverse_frequencies", frequencies, persistent=False)

    def forward(self, grid_size: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        coordinates = patch_center_coordinates(grid_size, self.inverse_frequencies.device)
        if self.training:
            coordinates = augmented_coordinates(coordinates, self.shift, self.jitter, self.rescale)
        angles = rotary_angles(coordinates, self.inverse_frequencies)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_inverse_frequencies(theta: float, head_dim: int) -> torch.Tensor:
    """head_dim/4 frequencies θ^(-4j/head_dim), j = 0 .. head_dim/4 - 1: one set for rows, one for columns."""
    return 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)


def patch_center_coordinates(grid_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(row, column) of every patch centre, row-major, each axis scaled to [-1, 1]: `(patches, 2)`."""
    rows, columns = (torch.arange(0.5, n, device=device, dtype=torch.float32) / n for n in grid_size)
    return 2.0 * torch.stack(torch.meshgrid(rows, columns, indexing="ij"), dim=-1).flatten(0, 1) - 1.0


def augmented_coordinates(coordinates, shift: float | None, jitter: float | None, rescale: float | None):
    """Training-time augmentation of the patch coordinates: a shift uniform in ±shift per axis, a per-axis factor
    log-uniform in [1/jitter, jitter], and one log-uniform in [1/rescale, rescale] for both axes."""
    if shift is not None:
        coordinates = coordinates + torch.empty(1, 2, device=coordinates.device).uniform_(-shift, shift)
    if jitter is not None:
        coordinates = (
            coordinates
            * torch.empty(1, 2, device=coordinates.device).uniform_(-math.log(jitter), math.log(jitter)).exp()
        )
    if rescale is not None:
        coordinates = (
            coordinates
            * torch.empty(1, device=coordinates.device).uniform_(-math.log(rescale), math.log(rescale)).exp()
        )
    return coordinates


def rotary_angles(coordinates: torch.Tensor, inverse_frequencies: torch.Tensor) -> torch.Tensor:
    """θ = 2π · coordinate · frequency for the row and the column at head_dim/4 frequencies each, laid out
    [rows, columns, rows, columns] along the head dimension (the two halves `rotate_half` pairs): `(patches, d)`."""
    angles = 2 * math.pi * coordinates[:, :, None] * inverse_frequencies[None, None, :]
    return angles.flatten(1, 2).tile(2)


class CastlingViTAttention(nn.Module):
    """Multi-head Castling attention: `o_proj(γ ⊙ (LA + DWConv(v)) + α·(M⊙S)V)`, or with
    `linear_branch_blend="convex"` `o_proj((1 − α)·γ ⊙ (LA + DWConv(v)) + α·(M⊙S)V)` (`linear_branch_weight`).

    In `attention_mode="linear"` the softmax branch is not built (`softmax_branch is None`).
    """

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.angular_normalization = config.angular_normalization
        self.angular_eps = config.angular_eps
        self.linear_branch_blend = config.linear_branch_blend
        # One projection for q, k and v: one GEMM instead of three, and q, k come out adjacent for normalisation.
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.residual_conv = None
        if config.residual_conv is not None:
            self.residual_conv = CastlingResidualConv(
                config.residual_conv, config.hidden_size, config.num_attention_heads, config.residual_kernel_size
            )
        self.linear_branch_scale = nn.Parameter(torch.full((self.num_heads,), float(config.linear_branch_scale_init)))
        self.softmax_branch = None
        if config.attention_mode == "castling":
            self.softmax_branch = CastlingSoftmaxBranch(config, config.attention_probs_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        num_prefix_tokens: int,
        grid_size: tuple[int, int],
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`rotary`, the (cos, sin) of `rotary_position_embedding`, rotates the patch tokens' q and k before both the
        linear-angular path and the softmax branch (a model with `position_embedding_type="rope"`)."""
        batch, tokens, hidden_size = hidden_states.shape
        query, key, value = self.qkv_proj(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim).unbind(2)
        if rotary is not None:
            query, key = (rotary_position_embedding(x, *rotary, num_prefix_tokens) for x in (query, key))
        branch = self.softmax_branch
        alpha = live_softmax_mask_scale(branch)
        scale = linear_branch_weight(self.linear_branch_scale, alpha, self.linear_branch_blend)
        attended = linear_angular_attention(query, key, value, self.angular_normalization, self.angular_eps, scale)
        if self.residual_conv is not None:
            # In place, also under autograd: no op before this needs `attended` itself for its backward.
            attended[:, num_prefix_tokens:] += self.residual_conv(value, num_prefix_tokens, grid_size, scale)
        branch_output = branch(query, key, value) if branch is not None else None  # None once α is 0
        if branch_output is not None:
            attended += branch_output
        return self.o_proj(attended.reshape(batch, tokens, hidden_size))


class CastlingViTMLP(nn.Module):
    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CastlingViTLayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (Dinov2's and DINOv3's LayerScale), from `layerscale_value`."""

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class CastlingViTLayer(GradientCheckpointingLayer):
    """A pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x)), each branch scaled by a LayerScale
    where the config has one (`layerscale_value`) and dropped by stochastic depth where it asks (`drop_path_rate`)."""

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        scaled = config.layerscale_value is not None
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = CastlingViTAttention(config)
        self.layer_scale1 = CastlingViTLayerScale(config) if scaled else nn.Identity()
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CastlingViTMLP(config)
        self.layer_scale2 = CastlingViTLayerScale(config) if scaled else nn.Identity()
        self.drop_path = CastlingDropPath(config.drop_path_rate) if config.drop_path_rate > 0 else nn.Identity()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        num_prefix_tokens: int,
        grid_size: tuple[int, int],
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # One expression, so that the attention's output is freed before the MLP runs (peak memory at high resolution).
        hidden_states = hidden_states + self.drop_path(
            self.dropout(
                self.layer_scale1(
                    self.attention(self.layernorm_before(hidden_states), num_prefix_tokens, grid_size, rotary)
                )
            )
        )
        return hidden_states + self.drop_path(
            self.dropout(self.layer_scale2(self.mlp(self.layernorm_after(hidden_states))))
        )


class CastlingViTEncoder(nn.Module):
    """The stack of Castling layers. Their outputs are recorded as `hidden_states` by `capture_outputs` (see
    `CastlingViTPreTrainedModel._can_record_outputs`), after the embeddings' output."""

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        self.layers = nn.ModuleList([CastlingViTLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        num_prefix_tokens: int,
        grid_size: tuple[int, int],
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, num_prefix_tokens, grid_size, rotary)
        return hidden_states


class CastlingViTPooler(nn.Module):
    """Dense + activation on the [CLS] token, as ViT's pooler."""

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.activation = ACT2FN[config.pooler_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class CastlingViTPreTrainedModel(CastlingModelMixin, PreTrainedModel):
    """Weight initialisation; α, the switch and the inference checkpoint come from `CastlingModelMixin`."""

    config: CastlingViTConfig
    config_class = CastlingViTConfig
    base_model_prefix = "castling_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["CastlingViTEmbeddings", "CastlingViTLayer"]
    # The linear path never forms an attention matrix, so there are no attentions to record.
    _can_record_outputs = {"hidden_states": CastlingViTLayer}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # normal(initializer_range) weights and zero biases; LayerNorm at 1 and 0
        init_castling_tensors(module, self.config)
        std = self.config.initializer_range
        if isinstance(self, CastlingViTForObjectDetection) and module is self.head.class_logits:
            # Every cell starts at the prior score (as RetinaNet), so the empty cells do not swamp the focal loss.
            prior = self.config.detection_prior_probability
            init.constant_(module.bias, -math.log((1 - prior) / prior))
        if isinstance(module, CastlingViTEmbeddings):
            for tokens in (module.position_embeddings, module.cls_token, module.distillation_token):
                if tokens is not None:
                    init.trunc_normal_(tokens, mean=0.0, std=std)
            if module.register_tokens is not None:
                init.zeros_(module.register_tokens)  # as Dinov2 with registers
        elif isinstance(module, CastlingViTRotaryEmbedding):  # not saved: from_pretrained must recompute it
            init.copy_(
                module.inverse_frequencies,
                rotary_inverse_frequencies(self.config.rope_theta, self.config.head_dim),
            )
        elif isinstance(module, CastlingViTLayerScale):
            init.constant_(module.lambda1, float(self.config.layerscale_value))


class CastlingViTModel(CastlingViTPreTrainedModel):
    """The bare Castling-ViT encoder: embeddings, Castling layers, final norm and (optionally) a pooler, whose output
    is ViT's (`pooler_type="dense"`: dense + `pooler_act` on [CLS]) or Dinov2's (`"cls"`: the final [CLS] token)."""

    def __init__(self, config: CastlingViTConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = CastlingViTEmbeddings(config)
        self.encoder = CastlingViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.add_pooling_layer = add_pooling_layer
        self.pooler = CastlingViTPooler(config) if add_pooling_layer and config.pooler_type == "dense" else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        interpolate_pos_encoding (`bool`, *optional*):
            Resize the position embeddings (bicubically) to an input size other than `config.image_size` (always
            done when `config.interpolate_pos_encoding`).
        """
        check_pixel_values(pixel_values, self.config)
        check_no_attentions_asked(kwargs, self.config)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        embeddings, grid_size = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        rotary = self.embeddings.rotary_embedding(grid_size, embeddings.dtype)
        hidden_states = self.encoder(embeddings, self.embeddings.num_prefix_tokens, grid_size, rotary)
        sequence_output = self.layernorm(hidden_states)
        if self.pooler is not None:
            pooled_output = self.pooler(sequence_output)
        else:
            pooled_output = sequence_output[:, 0] if self.add_pooling_layer else None
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output)


@dataclass
class CastlingViTImageClassifierOutput(ImageClassifierOutput):
    r"""`ImageClassifierOutput`, and with two heads (`classifier_pooling="cls_and_distillation"`, a castled
    `DeiTForImageClassificationWithTeacher`) the logits of each, which `logits` averages.

    cls_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
        The [CLS] classifier's logits.
    distillation_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
        The distillation classifier's logits.
    """

    cls_logits: torch.Tensor | None = None
    distillation_logits: torch.Tensor | None = None


class CastlingViTForImageClassification(CastlingViTPreTrainedModel):
    """Castling-ViT with a linear classifier on the final [CLS] token, as `ViTForImageClassification`; on [CLS] and
    the mean patch token with `classifier_pooling="cls_and_patch_mean"`, as `Dinov2ForImageClassification`; and with
    a second classifier on the distillation token whose logits are averaged with the first's
    (`"cls_and_distillation"`), as `DeiTForImageClassificationWithTeacher`.

    The loss follows `config.problem_type` (single-label, multi-label or regression) exactly as ViT's does, on the
    returned `logits`.
    """

    def __init__(self, config: CastlingViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.castling_vit = CastlingViTModel(config, add_pooling_layer=False)
        features = config.hidden_size * (2 if config.classifier_pooling == "cls_and_patch_mean" else 1)

        def head():
            return nn.Linear(features, config.num_labels) if config.num_labels > 0 else nn.Identity()

        self.classifier = head()
        self.distillation_classifier = head() if config.classifier_pooling == "cls_and_distillation" else None
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CastlingViTImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class ids for the loss (float targets for regression, multi-hot for multi-label; see `problem_type`).
        """
        outputs = self.castling_vit(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        sequence = outputs.last_hidden_state
        features = sequence[:, 0]
        if self.config.classifier_pooling == "cls_and_patch_mean":
            patches = sequence[:, self.castling_vit.embeddings.num_prefix_tokens :]
            features = torch.cat([features, patches.mean(dim=1)], dim=1)
        logits = cls_logits = self.classifier(features)
        distillation_logits = None
        if self.distillation_classifier is not None:
            distillation_logits = self.distillation_classifier(sequence[:, 1])
            logits = (cls_logits + distillation_logits) / 2
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        return CastlingViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            cls_logits=cls_logits if distillation_logits is not None else None,
            distillation_logits=distillation_logits,
        )


def patch_grid(hidden_states: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Token sequences `(batch, tokens, hidden_size)` → the patch tokens on their grid, `(batch, hidden_size, rows,
    columns)`, as dense heads and feature pyramids read them."""
    return hidden_states[:, num_prefix_tokens:].transpose(1, 2).unflatten(2, grid_size)


def upsampler(channels: int, scale: int) -> nn.Sequential:
    """`scale` (a power of two) × the rows and columns by stride-2 transposed convs, batch norm and GELU between
    them, as ViTDet's simple feature pyramid."""
    layers = []
    for step in range(int(math.log2(scale))):
        if step:
            layers += [nn.BatchNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class CastlingViTSimpleFeaturePyramid(nn.Module):
    """Four maps on the patch grid → the output strides `simple_feature_pyramid_strides` (4, 8, 16, 32 px by
    default, whatever the patch size), as ViTDet's simple feature pyramid: a map finer than the grid is upsampled
    (`upsampler`), a coarser one max-pooled, one at the patch stride passes as it is. Channels stay `hidden_size`."""

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        patch = as_pair(config.patch_size)[0]
        self.scales = nn.ModuleList()
        for stride in config.simple_feature_pyramid_strides:
            scale = patch / stride
            if scale > 1:
                self.scales.append(upsampler(config.hidden_size, int(scale)))
            elif scale < 1:
                self.scales.append(nn.MaxPool2d(kernel_size=int(1 / scale), stride=int(1 / scale)))
            else:
                self.scales.append(nn.Identity())

    def forward(self, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [scale(feature_map) for scale, feature_map in zip(self.scales, feature_maps, strict=True)]


class CastlingViTBackbone(BackboneMixin, CastlingViTPreTrainedModel):
    """Castling-ViT as a backbone for `transformers`' task models (`AutoBackbone`, `backbone_config=` in UperNet,
    Mask2Former, DETR-family configs), as `Dinov2Backbone`: the outputs of the stages in `config.out_features`
    ("stem" = the embeddings, "stageN" = layer N), each optionally normalised by the final layer norm
    (`apply_layernorm`) and laid back on the patch grid as `(batch, hidden_size, rows, columns)`
    (`reshape_hidden_states`), and with `simple_feature_pyramid` made into four scales
    (`CastlingViTSimpleFeaturePyramid`). Inputs of any size the patches tile are accepted (position embeddings are
    resized).
    """

    def __init__(self, config: CastlingViTConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = CastlingViTEmbeddings(config)
        self.encoder = CastlingViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pyramid = CastlingViTSimpleFeaturePyramid(config) if config.simple_feature_pyramid else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BackboneOutput:
        r"""
        output_hidden_states (`bool`, `int` or `list[int]`, *optional*):
            Also return every stage's output as `hidden_states` (token sequences, before any layer norm); given
            indices, only those stages, `None` in the places of the others.
        """
        check_pixel_values(pixel_values, self.config)
        check_no_attentions_asked(kwargs, self.config)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        kept = kept_hidden_states(self, output_hidden_states, len(self.stage_names))
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        hidden_state, grid_size = self.embeddings(pixel_values, interpolate_pos_encoding=True)
        num_prefix_tokens = self.embeddings.num_prefix_tokens
        rotary = self.embeddings.rotary_embedding(grid_size, hidden_state.dtype)
        # Only the chosen stages are kept (all of them only when asked for): at high resolution every stage held is
        # a (tokens × hidden_size) tensor of peak memory.
        hidden_states, feature_maps = [], []
        for index, name in enumerate(self.stage_names):
            if index > 0:
                hidden_state = self.encoder.layers[index - 1](hidden_state, num_prefix_tokens, grid_size, rotary)
            if output_hidden_states:
                hidden_states.append(hidden_state if index in kept else None)
            if name in self.out_features:
                feature_maps.append(self.feature_map(hidden_state, num_prefix_tokens, grid_size))
        if self.pyramid is not None:
            feature_maps = self.pyramid(feature_maps)
        return BackboneOutput(
            feature_maps=tuple(feature_maps), hidden_states=tuple(hidden_states) if output_hidden_states else None
        )

    def feature_map(self, stage: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]) -> torch.Tensor:
        """One stage's output as the config asks: final layer norm (`apply_layernorm`), then on the patch grid
        (`reshape_hidden_states`)."""
        if self.config.apply_layernorm:
            stage = self.layernorm(stage)
        if self.config.reshape_hidden_states:
            stage = patch_grid(stage, num_prefix_tokens, grid_size)
        return stage


def conv_tower(channels: int, depth: int) -> nn.Sequential:
    """`depth` × (3×3 conv, group norm, GELU), keeping the channel count: one tower of an FCOS / PicoDet head."""
    layers = []
    for _ in range(depth):
        layers += [
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.GroupNorm(math.gcd(8, channels), channels),
            nn.GELU(),
        ]
    return nn.Sequential(*layers)


def cell_boxes(distances: torch.Tensor) -> torch.Tensor:
    """Boxes from the (left, top, right, bottom) distances of their edges to each cell's centre, in cells, clipped to
    the image, as normalised (center_x, center_y, width, height).

    `distances` is `(batch, 4, rows, columns)`; the boxes come out `(batch, rows · columns, 4)`, cells row-major.
    """
    rows, columns = distances.shape[-2:]
    row, column = torch.meshgrid(
        torch.arange(rows, device=distances.device, dtype=distances.dtype),
        torch.arange(columns, device=distances.device, dtype=distances.dtype),
        indexing="ij",
    )
    center_x, center_y = (column + 0.5) / columns, (row + 0.5) / rows
    left, top, right, bottom = distances.unbind(1)
    corners = torch.stack(
        [center_x - left / columns, center_y - top / rows, center_x + right / columns, center_y + bottom / rows]
    )
    # Clipped in value but not in gradient: an edge that overshoots the border still learns its way back.
    corners = corners + (corners.clamp(0, 1) - corners).detach()
    x0, y0, x1, y1 = corners
    boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
    return boxes.flatten(1, 2)


class CastlingViTDetectionHead(nn.Module):
    """A dense head on the grid of patch tokens: every cell scores each class (sigmoid) and predicts one box by the
    distances of its edges from the cell's centre, each from its own small tower of 3×3 convs (as FCOS / PicoDet).

    Trained with a one-to-one assignment (each object to one cell, Hungarian, as OneNet / DeFCN), the other cells
    learn to score low, so the detections need no non-maximum suppression.
    """

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        hidden = config.hidden_size
        self.class_tower = conv_tower(hidden, config.detection_tower_depth)
        self.box_tower = conv_tower(hidden, config.detection_tower_depth)
        self.class_logits = nn.Conv2d(hidden, config.num_labels, kernel_size=3, padding=1)
        self.box_distances = nn.Conv2d(hidden, 4, kernel_size=3, padding=1)

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`grid` `(batch, hidden_size, rows, columns)` → class logits `(batch, cells, num_labels)` and boxes
        `(batch, cells, 4)` (normalised center_x, center_y, width, height), cells row-major."""
        # Contiguous, as DETR's logits are: the image processors' post-processing views them flat.
        logits = self.class_logits(self.class_tower(grid)).flatten(2).transpose(1, 2).contiguous()
        # softplus keeps the distances positive without the overflow exp can give in the first steps.
        distances = nn.functional.softplus(self.box_distances(self.box_tower(grid)))
        return logits, cell_boxes(distances)


@dataclass
class CastlingViTObjectDetectionOutput(ModelOutput):
    r"""Output of `CastlingViTForObjectDetection`, with the fields of `DeformableDetrObjectDetectionOutput` that a
    dense detector has: one detection per cell of the patch grid.

    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
        The set loss: focal classification, L1 box and generalised-IoU terms of the one-to-one (Hungarian)
        assignment of objects to cells, weighted as the config says, plus the auxiliary terms when
        `config.auxiliary_loss`.
    loss_dict (`dict[str, torch.FloatTensor]`, *optional*, returned when `labels` are given):
        Each term of the loss on its own (`loss_ce`, `loss_bbox`, `loss_giou`, `cardinality_error`, and the
        auxiliary terms suffixed with the layer index).
    logits (`torch.FloatTensor` of shape `(batch, cells, num_labels)`):
        Class logits of each cell (sigmoid scores: no "no object" class), cells row-major.
    pred_boxes (`torch.FloatTensor` of shape `(batch, cells, 4)`):
        Each cell's box as (center_x, center_y, width, height), relative to the (padded) input (0 to 1).
    auxiliary_outputs (`list[dict]`, *optional*, returned when `labels` are given and `config.auxiliary_loss`):
        `logits` and `pred_boxes` of the head applied after every intermediate layer.
    last_hidden_state (`torch.FloatTensor` of shape `(batch, tokens, hidden_size)`):
        The encoder's final hidden states, after the last layer norm: [CLS], then the patch tokens.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The embeddings' output and every layer's output, each `(batch, tokens, hidden_size)`.
    """

    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict] | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class CastlingViTForObjectDetection(CastlingViTPreTrainedModel):
    """A dense, NMS-free detector: the Castling-ViT encoder, its patch tokens laid back on their grid, and
    `CastlingViTDetectionHead`, trained with Deformable DETR's set loss (`transformers`' own
    `DeformableDetrForObjectDetectionLoss`: Hungarian one-to-one assignment with a focal class cost, L1 + GIoU).

    The outputs read as Deformable DETR's, so `DeformableDetrImageProcessor(Pil).post_process_object_detection`
    and `pipeline("object-detection")` take them unchanged. Inputs of any size that the patches tile are accepted
    (position embeddings are resized); `labels` is a list of dicts with `class_labels` and `boxes` (normalised cx,
    cy, w, h), the format the detection image processors produce.
    """

    def __init__(self, config: CastlingViTConfig):
        super().__init__(config)
        self.castling_vit = CastlingViTModel(config, add_pooling_layer=False)
        self.head = CastlingViTDetectionHead(config)
        self.loss_type = "DeformableDetrForObjectDetection"
        self.post_init()

    def _predict(self, hidden_states: torch.Tensor, grid_size: tuple[int, int]):
        return self.head(patch_grid(hidden_states, self.castling_vit.embeddings.num_prefix_tokens, grid_size))

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: list[dict] | None = None,
        pixel_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CastlingViTObjectDetectionOutput:
        r"""
        labels (`list[dict]`, *optional*):
            One dict per image with `class_labels` `(objects,)` and `boxes` `(objects, 4)` (normalised cx, cy, w, h).
        pixel_mask (`torch.LongTensor`, *optional*):
            Accepted for the detection image processors and ignored: the model reads every pixel.
        """
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        auxiliary = labels is not None and self.config.auxiliary_loss
        outputs = self.castling_vit(
            pixel_values,
            interpolate_pos_encoding=True,
            output_hidden_states=True if auxiliary else output_hidden_states,  # the auxiliary loss reads every layer
            return_dict=True,
            **kwargs,
        )
        patch_height, patch_width = as_pair(self.config.patch_size)
        grid_size = (pixel_values.shape[-2] // patch_height, pixel_values.shape[-1] // patch_width)
        logits, pred_boxes = self._predict(outputs.last_hidden_state, grid_size)

        loss = loss_dict = auxiliary_outputs = None
        if labels is not None:
            check_detection_labels(labels, len(pixel_values), self.config.num_labels)
            outputs_class = outputs_coord = None
            if auxiliary:
                # The head on each intermediate layer, normalised as the last one is, then on the last one itself
                # (the loss drops it), stacked as (layers, batch, cells, ...).
                layers = torch.cat([self.castling_vit.layernorm(h) for h in outputs.hidden_states[1:]])
                outputs_class, outputs_coord = (
                    t.unflatten(0, (-1, len(pixel_values))) for t in self._predict(layers, grid_size)
                )
            loss, loss_dict, auxiliary_outputs = self.loss_function(
                logits, labels, self.device, pred_boxes, self.config, outputs_class, outputs_coord
            )

        return CastlingViTObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            auxiliary_outputs=auxiliary_outputs,
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=selected_layers(self, outputs.hidden_states, output_hidden_states),
        )


def selected_layers(model, hidden_states: tuple | None, output_hidden_states) -> tuple | None:
    """`hidden_states` as `output_hidden_states` asks for them (`kept_hidden_states`), `None` in the places of the
    others; `None` when none are asked for."""
    if not output_hidden_states or hidden_states is None:
        return None
    kept = kept_hidden_states(model, output_hidden_states, len(hidden_states))
    return tuple(state if index in kept else None for index, state in enumerate(hidden_states))


def check_detection_labels(labels: list[dict], batch_size: int, num_labels: int) -> None:
    """Reject detection targets the set loss would misread, saying which image and what was expected."""
    if len(labels) != batch_size:
        raise ValueError(f"Got {len(labels)} label dicts for a batch of {batch_size} images; expected one per image.")
    for index, target in enumerate(labels):
        if "class_labels" not in target or "boxes" not in target:
            raise ValueError(
                f"labels[{index}] must have 'class_labels' and 'boxes' (normalised cx, cy, w, h), got keys "
                f"{sorted(target)}; the detection image processors produce this format from COCO annotations."
            )
        classes, boxes = target["class_labels"], target["boxes"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) != len(classes):
            raise ValueError(
                f"labels[{index}]: {len(classes)} class labels and boxes of shape {tuple(boxes.shape)}; expected "
                "(number of objects, 4)."
            )
        unknown = classes[(classes < 0) | (classes >= num_labels)]
        if len(unknown):
            raise ValueError(
                f"labels[{index}] has class id {int(unknown[0])}, outside the model's {num_labels} classes "
                f"(0 .. {num_labels - 1})."
            )


# The Auto class that loads each model class from a checkpoint's own code (`trust_remote_code=True`).
CastlingViTPreTrainedModel.remote_auto_classes = {
    "AutoModel": CastlingViTModel,
    "AutoBackbone": CastlingViTBackbone,
    "AutoModelForImageClassification": CastlingViTForImageClassification,
    "AutoModelForObjectDetection": CastlingViTForObjectDetection,
}
