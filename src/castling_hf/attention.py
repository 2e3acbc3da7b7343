"""Castling-ViT attention: the math as pure functions (DESIGN §1), then the modules that hold the weights.

Every function takes per-head tensors laid out `(batch, heads, tokens, head_dim)`.

    Sim(q, k)     = 1 - θ(q, k)/π = 1/2 + arcsin(q̂·k̂)/π          (angular kernel)
    Sim_lin(q, k) = 1/2 + (q̂·k̂)/π                               (its linear term, kept here)

Layer output, before the output projection:

    γ ⊙ (LA(q, k, v) + DWConv(v)) + α·(M⊙S)V,    S = softmax(q kᵀ/√d),  M = 1[S > τ]
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_castling_vit import CastlingViTConfig

INV_PI = 1.0 / math.pi


def linear_angular_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    normalization: str = "kernel",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Attention with the kernel Sim_lin(q, k) = 1/2 + (q̂·k̂)/π, in O(N·d²): no N×N tensor is formed.

    `"kernel"` (the paper):
        o_i = Σ_j Sim_lin(q_i, k_j) v_j / Σ_j Sim_lin(q_i, k_j)
            = [½ Σ_j v_j + (1/π) q̂_i (K̂ᵀV)] / [½ N + (1/π) q̂_i Σ_j k̂_j]
        Sim_lin ∈ [1/2 - 1/π, 1/2 + 1/π] is strictly positive, so the denominator never vanishes.
    `"l2"` (the authors' public snippet):
        o_i = normalize(½ v_i + (1/π) q̂_i (K̂ᵀV))

    q and k are L2-normalised with `eps`, so a zero vector gives Sim_lin = 1/2 rather than NaN. The reductions
    run in fp32 whatever the autocast dtype: sums over N tokens lose too much in half precision.
    """
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = F.normalize(query.float(), dim=-1, eps=eps)
        k = F.normalize(key.float(), dim=-1, eps=eps)
        v = value.float()
        if normalization == "kernel":
            # One K̂ᵀ[V, 1] product gives numerator (first d columns) and denominator (last column) together.
            v_ones = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
            context = k.transpose(-2, -1) @ v_ones
            weighted = 0.5 * v_ones.sum(dim=-2, keepdim=True) + INV_PI * (q @ context)
            out = weighted[..., :-1] / weighted[..., -1:]
        elif normalization == "l2":
            context = k.transpose(-2, -1) @ v
            out = F.normalize(0.5 * v + INV_PI * (q @ context), dim=-1, eps=eps)
        else:
            raise ValueError(f"Unknown angular normalization {normalization!r}; expected 'kernel' or 'l2'.")
    return out.to(value.dtype)


def masked_softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    threshold: float | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """(M⊙S)V with S = softmax(q kᵀ/√d) and M = 1[S > τ]; the kept probabilities are not renormalised.

    With `threshold=None` the mask keeps everything and this is plain softmax attention, done by SDPA.
    """
    if threshold is None:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p)
    scores = (query @ key.transpose(-2, -1)) * query.shape[-1] ** -0.5
    probabilities = scores.softmax(dim=-1, dtype=torch.float32)
    probabilities = probabilities.masked_fill(probabilities <= threshold, 0.0)
    probabilities = F.dropout(probabilities, p=dropout_p)
    return probabilities.to(value.dtype) @ value


def spatial_depthwise_conv(
    value: torch.Tensor, weight: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]
) -> torch.Tensor:
    """A depthwise k×k conv of V over the (rows, columns) grid of patch tokens, one filter per channel.

    `weight` is `(heads·head_dim, 1, k, k)`, channels in the head-major order of the hidden state. The
    first `num_prefix_tokens` tokens ([CLS], detection tokens) are not on the grid and get zero.
    """
    batch, heads, _, head_dim = value.shape
    patches = value[:, :, num_prefix_tokens:]
    grid = patches.transpose(-2, -1).reshape(batch, heads * head_dim, *grid_size)
    conv = F.conv2d(grid, weight, padding=weight.shape[-1] // 2, groups=heads * head_dim)
    conv = conv.reshape(batch, heads, head_dim, -1).transpose(-2, -1)
    return F.pad(conv, (0, 0, num_prefix_tokens, 0))


def sequence_depthwise_conv(value: torch.Tensor, weight: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """A depthwise k×1 conv of V along the token axis, one filter per head shared by its channels.

    `weight` is `(heads, 1, k, 1)`. Only patch tokens are convolved; prefix tokens get zero.
    """
    heads = value.shape[1]
    conv = F.conv2d(value[:, :, num_prefix_tokens:], weight, padding=(weight.shape[-2] // 2, 0), groups=heads)
    return F.pad(conv, (0, 0, num_prefix_tokens, 0))


class CastlingResidualConv(nn.Module):
    """The depthwise conv on V that stands in for the high-order terms of the angular kernel (`residual_conv`)."""

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        self.mode = config.residual_conv
        size = config.residual_kernel_size
        if self.mode == "spatial":
            self.weight = nn.Parameter(torch.empty(config.hidden_size, 1, size, size))
        else:
            self.weight = nn.Parameter(torch.empty(config.num_attention_heads, 1, size, 1))
        nn.init.normal_(self.weight, std=config.initializer_range)

    def forward(self, value: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]) -> torch.Tensor:
        if self.mode == "spatial":
            return spatial_depthwise_conv(value, self.weight, num_prefix_tokens, grid_size)
        return sequence_depthwise_conv(value, self.weight, num_prefix_tokens)


class CastlingSoftmaxBranch(nn.Module):
    """The auxiliary masked softmax attention of the training form, scaled by the layer's softmax mask scale α.

    α is a persistent buffer, so that a checkpoint taken in the middle of the mask decay reloads with the α it had.
    """

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        self.threshold = config.softmax_mask_threshold
        self.dropout_p = config.attention_probs_dropout_prob
        self.register_buffer("softmax_mask_scale", torch.tensor(1.0))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout_p if self.training else 0.0
        attended = masked_softmax_attention(query, key, value, self.threshold, dropout_p)
        return self.softmax_mask_scale.to(attended.dtype) * attended

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, softmax_mask_scale={self.softmax_mask_scale.item():g}"


class CastlingViTAttention(nn.Module):
    """Multi-head Castling attention: `o_proj(γ ⊙ (LA + DWConv(v)) + α·(M⊙S)V)`.

    In `attention_mode="linear"` the softmax branch is not built (`softmax_branch is None`).
    """

    def __init__(self, config: CastlingViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.angular_normalization = config.angular_normalization
        self.angular_eps = config.angular_eps
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.residual_conv = CastlingResidualConv(config) if config.residual_conv is not None else None
        self.linear_branch_scale = nn.Parameter(torch.full((self.num_heads,), float(config.linear_branch_scale_init)))
        self.softmax_branch = CastlingSoftmaxBranch(config) if config.attention_mode == "castling" else None

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = states.shape
        return states.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]
    ) -> torch.Tensor:
        query = self._split_heads(self.q_proj(hidden_states))
        key = self._split_heads(self.k_proj(hidden_states))
        value = self._split_heads(self.v_proj(hidden_states))

        attended = linear_angular_attention(query, key, value, self.angular_normalization, self.angular_eps)
        if self.residual_conv is not None:
            attended = attended + self.residual_conv(value, num_prefix_tokens, grid_size)
        attended = attended * self.linear_branch_scale.view(1, -1, 1, 1).to(attended.dtype)
        if self.softmax_branch is not None:
            attended = attended + self.softmax_branch(query, key, value)

        batch, _, tokens, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(batch, tokens, -1))


__all__ = [
    "CastlingResidualConv",
    "CastlingSoftmaxBranch",
    "CastlingViTAttention",
    "linear_angular_attention",
    "masked_softmax_attention",
    "sequence_depthwise_conv",
    "spatial_depthwise_conv",
]
