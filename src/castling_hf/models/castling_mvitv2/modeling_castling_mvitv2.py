"""Castling-MViTv2: MViTv2 (Li et al., CVPR 2022) whose pooling attention is Castling attention (docs/design.md §10).

An MViTv2 block pools its queries, keys and values with strided depthwise convolutions (each followed by a layer norm)
and attends from the pooled queries to the pooled keys; the first stage keeps every query, so softmax attention there
is quadratic in the image's tokens. Castled, a block computes

    o_proj( w ⊙ (LA(q, K, V) + R(DWConv(V))) + α·(M⊙S)V + q ),   S = softmax(q Kᵀ/√d + B)

with q, K, V the pooled ones: LA the linear-angular attention over the pooled keys (never Nq × Nk), DWConv the
residual conv on V's grid resampled (R) to the query grid, B MViTv2's decomposed relative position bias inside the
softmax branch, + q MViTv2's residual pooling, and w the linear term's weight (`linear_branch_weight`: γ, or
(1 − α)·γ in the convex blend a castled model uses). The inference form drops the branch: no Nq × Nk work anywhere.
"""

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from ...attention import (
    CastlingResidualConv,
    CastlingSoftmaxBranch,
    linear_angular_attention,
    linear_branch_weight,
    live_softmax_mask_scale,
)
from ...configuration_utils import as_pair
from ...modeling_utils import (
    CastlingDropPath,
    CastlingModelMixin,
    check_no_attentions_asked,
    init_castling_tensors,
    kept_hidden_states,
)
from .configuration_castling_mvitv2 import CastlingMViTv2Config

Grid = tuple[int, int]


def check_pixel_values(pixel_values: torch.Tensor | None, config: CastlingMViTv2Config) -> None:
    """Reject input the model cannot read, saying what was wrong and what was expected. Any height and width will do:
    each strided conv pools a grid of n positions to ⌈n / stride⌉, as timm's MViTv2 does. The batch size is read as a
    size, never as a Python int, so that `torch.export` keeps it dynamic."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"`pixel_values` must be a non-empty (batch, channels, height, width) tensor, got {shape}.")
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"`pixel_values` has {pixel_values.shape[1]} channels, but the model expects {config.num_channels} "
            "(config.num_channels). Convert the images (e.g. to RGB) or use the model's image processor."
        )


def pool_tokens(tokens: torch.Tensor, grid: Grid, prefix: int, pool: nn.Module | None, norm: nn.Module | None):
    """MViTv2's pooling of one of q, k and v `(batch, heads, tokens, head_dim)`: each head's patch tokens laid on the
    grid and pooled (a strided depthwise conv over the head's channels), the prefix tokens passed through, then the
    layer norm. Returns the pooled tokens and their grid."""
    if pool is not None:
        batch, heads, _, head_dim = tokens.shape
        # Channels-last maps: the conv reads (and writes) them without a transposing copy.
        maps = pool(tokens[:, :, prefix:].reshape(batch * heads, *grid, head_dim).permute(0, 3, 1, 2))
        grid = tuple(maps.shape[-2:])
        pooled = maps.permute(0, 2, 3, 1).reshape(batch, heads, -1, head_dim)
        tokens = torch.cat([tokens[:, :, :prefix], pooled], dim=2) if prefix else pooled
    return (norm(tokens) if norm is not None else tokens), grid


def relative_distances(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """MViTv2's index into a relative position table for each (query, key) position along one axis, `(queries,
    keys)`: positions scaled to the finer of the two grids, offset so that the smallest is 0."""
    query_ratio, key_ratio = max(keys / queries, 1.0), max(queries / keys, 1.0)
    rows = torch.arange(queries, device=device)[:, None] * query_ratio
    distances = rows - torch.arange(keys, device=device)[None, :] * key_ratio + (keys - 1) * key_ratio
    return distances.long()


def table_for(table: torch.Tensor, length: int) -> torch.Tensor:
    """A relative position table `(positions, head_dim)` for an input whose distances along its axis take `length`
    values, as timm's MViTv2 reads it: as it is wherever it is long enough (at the size it was made for, and at
    smaller ones, where timm indexes it from its start without resizing), else linearly resampled to `length`
    positions, as timm's checkpoint filter resizes it for a model built for a larger size (timm itself would fail
    there)."""
    if table.shape[0] >= length:
        return table
    resampled = nn.functional.interpolate(table.T[None], size=length, mode="linear")
    return resampled[0].T


def relative_position_bias(query, query_grid: Grid, key_grid: Grid, rows_table, columns_table, prefix: int):
    """MViTv2's decomposed relative position bias as the softmax branch takes it: for each query i on the query grid
    and each row r (column c) of the key grid, row_bias[i, r] = q_i · Rrow[d(i, r)] and column_bias[i, c] =
    q_i · Rcol[d(i, c)] (`relative_distances`), the bias of key (r, c) being their sum; prefix queries get none.
    `query` is `(batch, heads, Nq, head_dim)` (pooled and normed, unscaled); returns two `(batch, heads, Nq, R or
    C)`."""
    batch, heads, _, head_dim = query.shape
    patches = query[:, :, prefix:].reshape(batch, heads, *query_grid, head_dim)
    rows = rows_table[relative_distances(query_grid[0], key_grid[0], query.device)]  # (q rows, k rows, d)
    columns = columns_table[relative_distances(query_grid[1], key_grid[1], query.device)]
    row_bias = torch.einsum("bhyxc,ykc->bhyxk", patches, rows).flatten(2, 3)
    column_bias = torch.einsum("bhyxc,xkc->bhyxk", patches, columns).flatten(2, 3)
    return tuple(nn.functional.pad(bias, (0, 0, prefix, 0)) for bias in (row_bias, column_bias))


def resampled_to_grid(tokens: torch.Tensor, grid: Grid, target: Grid) -> torch.Tensor:
    """Patch tokens `(batch, n, heads, head_dim)` on `grid` brought to the `target` grid: bilinearly up, by area
    down (the residual conv is computed on V's grid, its term is needed on the queries')."""
    if grid == target:
        return tokens
    batch, _, heads, head_dim = tokens.shape
    maps = tokens.reshape(batch, *grid, heads * head_dim).permute(0, 3, 1, 2)
    if target[0] >= grid[0] and target[1] >= grid[1]:
        maps = nn.functional.interpolate(maps, size=target, mode="bilinear", align_corners=False)
    else:
        maps = nn.functional.adaptive_avg_pool2d(maps, target)
    return maps.permute(0, 2, 3, 1).reshape(batch, -1, heads, head_dim)


class CastlingMViTv2SoftmaxBranch(CastlingSoftmaxBranch):
    """The softmax branch with MViTv2's relative position tables, one for the rows and one for the columns of the
    key grid, `lengths` positions each (2·max(query side, key side) − 1 along its axis at the config's image size):
    only the branch uses them, so they go with it at the switch."""

    def __init__(self, config, lengths: Grid, head_dim: int):
        super().__init__(config, config.attention_probs_dropout_prob)
        self.relative_position_rows = self.relative_position_columns = None
        if config.relative_position_embeddings:
            self.relative_position_rows = nn.Parameter(torch.zeros(lengths[0], head_dim))
            self.relative_position_columns = nn.Parameter(torch.zeros(lengths[1], head_dim))

    def relative_position_bias(self, query, query_grid: Grid, key_grid: Grid, prefix: int):
        """B for this input (None without tables), each table read for the 2·max(query side, key side) − 1
        distances along its own axis (`table_for`)."""
        if self.relative_position_rows is None:
            return None
        rows = table_for(self.relative_position_rows, 2 * max(query_grid[0], key_grid[0]) - 1)
        columns = table_for(self.relative_position_columns, 2 * max(query_grid[1], key_grid[1]) - 1)
        return relative_position_bias(query, query_grid, key_grid, rows, columns, prefix)


class CastlingMViTv2Attention(nn.Module):
    """MViTv2's pooling attention, castled (see the module's docstring). `grid` is the block's input grid at
    `config.image_size`, which sizes the relative position tables (other inputs resize them)."""

    def __init__(self, config, width_in: int, width_out: int, heads: int, grid: Grid, query_stride, key_value_stride):
        super().__init__()
        self.num_heads, self.head_dim, self.width_out = heads, width_out // heads, width_out
        self.prefix = int(config.use_cls_token)
        self.angular_eps, self.linear_branch_blend = config.angular_eps, config.linear_branch_blend
        self.residual_pooling = config.residual_pooling
        self.query_stride, self.key_value_stride = as_pair(query_stride), as_pair(key_value_stride)
        self.qkv_proj = nn.Linear(width_in, 3 * width_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(width_out, width_out)
        kernel = as_pair(config.pooling_kernel_size)

        def pooling(stride):
            if math.prod(kernel) == 1 and math.prod(stride) == 1:
                return None, None
            padding = tuple(size // 2 for size in kernel)
            conv = nn.Conv2d(self.head_dim, self.head_dim, kernel, stride, padding, groups=self.head_dim, bias=False)
            return conv, nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

        self.pool_query, self.norm_query = pooling(self.query_stride)
        self.pool_key, self.norm_key = pooling(self.key_value_stride)
        self.pool_value, self.norm_value = pooling(self.key_value_stride)
        self.residual_conv = None
        if config.residual_conv is not None:
            self.residual_conv = CastlingResidualConv("spatial", width_out, heads, config.residual_kernel_size)
        self.linear_branch_scale = nn.Parameter(torch.full((heads,), float(config.linear_branch_scale_init)))
        self.softmax_branch = None
        if config.attention_mode == "castling":
            self.softmax_branch = CastlingMViTv2SoftmaxBranch(config, self.table_lengths(grid), self.head_dim)

    def table_lengths(self, grid: Grid) -> Grid:
        """Positions of the row and the column table at the config's image size: 2·max(query side, key side) − 1
        along each axis of the block's input `grid`, the sides its length over the query and key strides (timm's
        sizes, which it defines for square images only)."""
        return tuple(
            2 * max(side // query, side // key) - 1
            for side, query, key in zip(grid, self.query_stride, self.key_value_stride, strict=True)
        )

    def forward(self, hidden_states: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        batch, tokens, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) each
        query, query_grid = pool_tokens(query, grid, self.prefix, self.pool_query, self.norm_query)
        key, key_grid = pool_tokens(key, grid, self.prefix, self.pool_key, self.norm_key)
        value, _ = pool_tokens(value, grid, self.prefix, self.pool_value, self.norm_value)
        query_t, key_t, value_t = (tensor.transpose(1, 2) for tensor in (query, key, value))  # token-major

        branch = self.softmax_branch
        alpha = live_softmax_mask_scale(branch)
        scale = linear_branch_weight(self.linear_branch_scale, alpha, self.linear_branch_blend)
        attended = linear_angular_attention(query_t, key_t, value_t, "kernel", self.angular_eps, scale)
        if self.residual_conv is not None:
            conv = self.residual_conv(value_t, self.prefix, key_grid, scale)
            attended[:, self.prefix :] += resampled_to_grid(conv, key_grid, query_grid)
        if alpha is not None:
            bias = branch.relative_position_bias(query, query_grid, key_grid, self.prefix)
            attended += branch(query_t, key_t, value_t, bias)
        elif branch is not None:
            branch(query_t, key_t, value_t)  # spent: it does no work, and forgets its kept share
        if self.residual_pooling:
            attended += query_t
        return self.o_proj(attended.reshape(batch, -1, self.width_out)), query_grid


class CastlingMViTv2MLP(nn.Module):
    def __init__(self, config: CastlingMViTv2Config, width_in: int, width_out: int):
        super().__init__()
        self.fc1 = nn.Linear(width_in, int(width_in * config.mlp_ratio))
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(int(width_in * config.mlp_ratio), width_out)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CastlingMViTv2Layer(GradientCheckpointingLayer):
    """An MViTv2 block: x + Attention(LN(x)), then x + MLP(LN(x)), where a block that pools its queries max-pools the
    shortcut to their grid, and a block that widens projects the shortcut (of its normed input) to its width."""

    def __init__(self, config, width_in, width_out, heads, grid, query_stride, key_value_stride, drop_path: float):
        super().__init__()
        widens, expand = width_in != width_out, config.expand_attention
        attention_width = width_out if expand else width_in
        self.layernorm_before = nn.LayerNorm(width_in, eps=config.layer_norm_eps)
        self.shortcut_proj_attention = nn.Linear(width_in, width_out) if widens and expand else None
        query_stride = as_pair(query_stride)
        self.shortcut_pool = None
        if math.prod(query_stride) > 1:
            kernel = [stride + 1 if stride > 1 else stride for stride in query_stride]
            self.shortcut_pool = nn.MaxPool2d(kernel, query_stride, [size // 2 for size in kernel])
        self.attention = CastlingMViTv2Attention(
            config, width_in, attention_width, heads, grid, query_stride, key_value_stride
        )
        self.layernorm_after = nn.LayerNorm(attention_width, eps=config.layer_norm_eps)
        self.shortcut_proj_mlp = nn.Linear(width_in, width_out) if widens and not expand else None
        self.mlp = CastlingMViTv2MLP(config, attention_width, width_out)
        self.drop_path = CastlingDropPath(drop_path) if drop_path > 0 else nn.Identity()

    def pooled_shortcut(self, hidden_states: torch.Tensor, grid: Grid) -> torch.Tensor:
        if self.shortcut_pool is None:
            return hidden_states
        prefix = self.attention.prefix
        patches = hidden_states[:, prefix:].transpose(1, 2).unflatten(2, grid)
        patches = self.shortcut_pool(patches).flatten(2).transpose(1, 2)
        return torch.cat([hidden_states[:, :prefix], patches], dim=1) if prefix else patches

    def forward(self, hidden_states: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        normed = self.layernorm_before(hidden_states)
        # As MViTv2: the shortcut is the block's input itself unless it is projected, then from the normed input.
        shortcut = hidden_states if self.shortcut_proj_attention is None else self.shortcut_proj_attention(normed)
        attended, pooled_grid = self.attention(normed, grid)
        hidden_states = self.pooled_shortcut(shortcut, grid) + self.drop_path(attended)
        normed = self.layernorm_after(hidden_states)
        shortcut = hidden_states if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(normed)
        return shortcut + self.drop_path(self.mlp(normed)), pooled_grid


class CastlingMViTv2Stage(nn.Module):
    def __init__(self, config: CastlingMViTv2Config, stage: int, grid: Grid, drop_paths: list[float]):
        super().__init__()
        width_in, width_out = config.stage_widths(stage)
        depth = config.depths[stage]
        widths = [width_out] * depth if config.expand_attention else [width_in] * (depth - 1) + [width_out]
        self.layers = nn.ModuleList()
        for index in range(depth):
            query_stride = config.query_strides[stage] if index == 0 else (1, 1)
            self.layers.append(
                CastlingMViTv2Layer(
                    config,
                    width_in,
                    widths[index],
                    config.num_attention_heads[stage],
                    grid,
                    query_stride,
                    config.key_value_strides[stage],
                    drop_paths[index],
                )
            )
            width_in = widths[index]
            grid = (grid[0] // as_pair(query_stride)[0], grid[1] // as_pair(query_stride)[1])
        self.grid = grid

    def forward(self, hidden_states: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        for layer in self.layers:
            hidden_states, grid = layer(hidden_states, grid)
        return hidden_states, grid


class CastlingMViTv2Embeddings(nn.Module):
    """The patch embedding (a strided conv), [CLS] (`use_cls_token`) and absolute position embeddings
    (`use_absolute_position_embeddings`, for `image_size` only)."""

    def __init__(self, config: CastlingMViTv2Config):
        super().__init__()
        width = config.hidden_sizes[0]
        self.projection = nn.Conv2d(
            config.num_channels,
            width,
            as_pair(config.patch_kernel_size),
            as_pair(config.patch_stride),
            as_pair(config.patch_padding),
        )
        stride = as_pair(config.patch_stride)
        self.grid = tuple(size // step for size, step in zip(as_pair(config.image_size), stride, strict=True))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if config.use_cls_token else None
        self.position_embeddings = None
        if config.use_absolute_position_embeddings:
            self.position_embeddings = nn.Parameter(
                torch.zeros(1, math.prod(self.grid) + int(config.use_cls_token), width)
            )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        patches = self.projection(pixel_values)
        grid = tuple(patches.shape[-2:])
        tokens = patches.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        if self.position_embeddings is not None:
            if grid != self.grid:
                raise ValueError(
                    f"This model's absolute position embeddings are for a {self.grid} grid of patches (its "
                    f"image_size); got {grid}. Resize the images to the model's image_size."
                )
            tokens = tokens + self.position_embeddings
        return tokens, grid


class CastlingMViTv2Encoder(nn.Module):
    def __init__(self, config: CastlingMViTv2Config, grid: Grid):
        super().__init__()
        total = sum(config.depths)
        # timm's rates, rising block by block; computed on the host, so that a model built on the meta device (big
        # models, `device_map`) needs no tensor values.
        rates = [config.drop_path_rate * index / max(total - 1, 1) for index in range(total)]
        self.stages = nn.ModuleList()
        first = 0
        for stage in range(config.num_stages):
            depth = config.depths[stage]
            self.stages.append(CastlingMViTv2Stage(config, stage, grid, rates[first : first + depth]))
            grid, first = self.stages[-1].grid, first + depth

    def forward(self, hidden_states: torch.Tensor, grid: Grid, kept: set[int] = frozenset()):
        """The last stage's output and grid, and the outputs (tokens) and grids of the stages whose index is in
        `kept` (0 for the embeddings, 1 … 4 for the stages), in order."""
        stages = [(hidden_states, grid)] if 0 in kept else []
        for index, stage in enumerate(self.stages, start=1):
            hidden_states, grid = stage(hidden_states, grid)
            if index in kept:
                stages.append((hidden_states, grid))
        return hidden_states, grid, stages


def hidden_states_tuple(stages: list, kept: set[int], asked: set[int], count: int) -> tuple:
    """The `count` hidden states as `output_hidden_states` asked for them: the encoder's outputs of the `asked`
    stages, None in the places of the others (`stages` holds the `kept` ones, in order)."""
    by_index = dict(zip(sorted(kept), (stage for stage, _ in stages), strict=True))
    return tuple(by_index[index] if index in asked else None for index in range(count))


class CastlingMViTv2PreTrainedModel(CastlingModelMixin, PreTrainedModel):
    """Weight initialisation; α, the switch and the inference checkpoint come from `CastlingModelMixin`."""

    config: CastlingMViTv2Config
    config_class = CastlingMViTv2Config
    base_model_prefix = "castling_mvitv2"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["CastlingMViTv2Embeddings", "CastlingMViTv2Layer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # normal(initializer_range) weights and zero biases; LayerNorm at 1 and 0
        init_castling_tensors(module, self.config)
        std = self.config.initializer_range
        if isinstance(module, CastlingMViTv2SoftmaxBranch) and module.relative_position_rows is not None:
            init.trunc_normal_(module.relative_position_rows, std=std)
            init.trunc_normal_(module.relative_position_columns, std=std)
        elif isinstance(module, CastlingMViTv2Embeddings):
            for tokens in (module.cls_token, module.position_embeddings):
                if tokens is not None:
                    init.trunc_normal_(tokens, std=std)


class CastlingMViTv2Model(CastlingMViTv2PreTrainedModel):
    """The bare Castling-MViTv2: embeddings, four stages, the final layer norm, and as `pooler_output` the mean of the
    final patch tokens (or the final [CLS], `classifier_pooling="cls"`)."""

    def __init__(self, config: CastlingMViTv2Config):
        super().__init__(config)
        self.embeddings = CastlingMViTv2Embeddings(config)
        self.encoder = CastlingMViTv2Encoder(config, self.embeddings.grid)
        self.layernorm = nn.LayerNorm(config.stage_widths(config.num_stages - 1)[1], eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.projection

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        output_hidden_states (`bool`, an index or a list of indices, *optional*):
            Also return the embeddings' and every stage's output as `hidden_states` (token sequences, before the
            final norm; each stage at its own width and grid); given indices, those alone (None for the others).
        """
        check_pixel_values(pixel_values, self.config)
        check_no_attentions_asked(kwargs, self.config)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        count = self.config.num_stages + 1
        kept = kept_hidden_states(self, output_hidden_states, count)
        tokens, grid = self.embeddings(pixel_values.to(self.embeddings.projection.weight.dtype))
        tokens, grid, stages = self.encoder(tokens, grid, kept)
        sequence_output = self.layernorm(tokens)
        prefix = int(self.config.use_cls_token)
        pooled = (
            sequence_output[:, 0] if self.config.classifier_pooling == "cls" else sequence_output[:, prefix:].mean(1)
        )
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled,
            hidden_states=hidden_states_tuple(stages, kept, kept, count) if output_hidden_states else None,
        )


class CastlingMViTv2ForImageClassification(CastlingMViTv2PreTrainedModel):
    """Castling-MViTv2 with a linear classifier on the pooled final tokens (their mean, or [CLS]), as timm's
    `MultiScaleVit` head; the loss follows `config.problem_type` as ViT's does."""

    def __init__(self, config: CastlingMViTv2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.castling_mvitv2 = CastlingMViTv2Model(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        width = config.stage_widths(config.num_stages - 1)[1]
        self.classifier = nn.Linear(width, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class ids for the loss (float targets for regression, multi-hot for multi-label; see `problem_type`).
        """
        outputs = self.castling_mvitv2(pixel_values, return_dict=True, **kwargs)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class CastlingMViTv2Backbone(BackboneMixin, CastlingMViTv2PreTrainedModel):
    """Castling-MViTv2 as a backbone for `transformers`' task models (`AutoBackbone`, `backbone_config=` in UperNet,
    Mask2Former, DETR-family configs): the outputs of the stages in `config.out_features` as `(batch, channels, rows,
    columns)` maps, "stem" at the patch stride (4 px) and "stage1" … "stage4" at 4, 8, 16 and 32 px with the
    defaults, unnormalised as timm's feature maps; [CLS] dropped. It stops after the last stage it returns."""

    def __init__(self, config: CastlingMViTv2Config):
        super().__init__(config)
        self.num_features = [config.hidden_sizes[0]] + [
            config.stage_widths(stage)[1] for stage in range(config.num_stages)
        ]
        self.embeddings = CastlingMViTv2Embeddings(config)
        self.encoder = CastlingMViTv2Encoder(config, self.embeddings.grid)
        last = max(self.stage_names.index(name) for name in self.out_features)
        self.encoder.stages = self.encoder.stages[:last]  # a backbone keeps only the stages up to its last map
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.projection

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BackboneOutput:
        r"""
        output_hidden_states (`bool`, an index or a list of indices, *optional*):
            Also return every computed stage's output as `hidden_states` (token sequences); given indices, those
            alone (None for the others).
        """
        check_pixel_values(pixel_values, self.config)
        check_no_attentions_asked(kwargs, self.config)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        wanted = {self.stage_names.index(name) for name in self.out_features}
        count = len(self.encoder.stages) + 1
        asked = kept_hidden_states(self, output_hidden_states, count)
        kept = wanted | asked
        tokens, grid = self.embeddings(pixel_values.to(self.embeddings.projection.weight.dtype))
        _, _, stages = self.encoder(tokens, grid, kept)
        prefix = int(self.config.use_cls_token)
        feature_maps = tuple(
            stage[:, prefix:].transpose(1, 2).unflatten(2, stage_grid)
            for index, (stage, stage_grid) in zip(sorted(kept), stages, strict=True)
            if index in wanted
        )
        hidden_states = hidden_states_tuple(stages, kept, asked, count) if output_hidden_states else None
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states)


# The Auto class that loads each model class from a checkpoint's own code (`trust_remote_code=True`).
CastlingMViTv2PreTrainedModel.remote_auto_classes = {
    "AutoModel": CastlingMViTv2Model,
    "AutoBackbone": CastlingMViTv2Backbone,
    "AutoModelForImageClassification": CastlingMViTv2ForImageClassification,
}
