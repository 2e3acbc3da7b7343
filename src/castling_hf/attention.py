"""Castling attention, shared by every family: the math as pure functions (docs/design.md §1), then the modules
that hold its own weights (the residual conv, the softmax branch and its α). Each family's attention module (e.g.
`CastlingViTAttention`) puts them together around its projections.

Per-head tensors are token-major, `(batch, tokens, heads, head_dim)`: the layout a projection's output has once
viewed per head, and the one the output projection reads back.

    Sim(q, k)     = 1 - θ(q, k)/π = 1/2 + arcsin(q̂·k̂)/π          (angular kernel)
    Sim_lin(q, k) = 1/2 + (q̂·k̂)/π                               (its linear term, kept here)

Layer output, before the output projection:

    γ ⊙ (LA(q, k, v) + DWConv(v)) + α·(M⊙S)V,    S = softmax(q kᵀ/√d),  M = 1[S > τ/N] (or 1[S > τ])

or, with `linear_branch_blend="convex"` (castled models), (1 − α)·γ ⊙ (LA + DWConv) + α·(M⊙S)V.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_utils import CastlingAttentionConfig
from .masked_softmax import BlockwiseMaskedSoftmax, flex_masked_softmax, traced_masked_softmax


def reduction_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the attention sums over tokens run in: fp32 for half-precision input, else the input's own."""
    return torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype


def linear_angular_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    normalization: str = "kernel",
    eps: float = 1e-6,
    head_scale: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with the kernel Sim_lin(q, k) = 1/2 + (q̂·k̂)/π, in O(N·d²): no N×N tensor is formed.

    `"kernel"` (the paper):
        o_i = Σ_j Sim_lin(q_i, k_j) v_j / Σ_j Sim_lin(q_i, k_j)
            = [½ Σ_j v_j + (1/π) q̂_i (K̂ᵀV)] / [½ N + (1/π) q̂_i Σ_j k̂_j]
        Sim_lin ∈ [1/2 - 1/π, 1/2 + 1/π] is strictly positive, so the denominator never vanishes.
    `"l2"` (the authors' public snippet):
        o_i = normalize(½ v_i + (1/π) q̂_i (K̂ᵀV))

    Inputs and output are `(batch, tokens, heads, head_dim)`, keys and values as many as each other, queries any
    number (MViTv2 pools them apart); `head_scale` (γ, per head) multiplies the output. `key_mask` (bool, `(batch,
    heads or 1, keys)`), where given, leaves the keys it marks False out of every sum, the count N included (padding
    tokens; `"kernel"` only).
    q and k are L2-normalised with `eps`, so a zero vector gives Sim_lin = 1/2 rather than NaN. Half-precision
    inputs are computed in fp32, also under autocast: sums over N tokens lose too much in half precision; fp32 and
    fp64 inputs are computed in their own precision.
    """
    if normalization not in ("kernel", "l2"):
        raise ValueError(f"Unknown angular normalization {normalization!r}; expected 'kernel' or 'l2'.")
    dtype = reduction_dtype(value)
    with torch.autocast(device_type=value.device.type, enabled=False):
        # Head-major views, (B, H, N, d): no copy; the products below read them strided.
        query, key, values = (x.to(dtype).transpose(1, 2) for x in (query, key, value))
        key = key / torch.linalg.vector_norm(key, dim=-1, keepdim=True).clamp_min(eps)
        count = torch.full((1, 1, 1), float(values.shape[-2]), dtype=dtype, device=values.device)
        if key_mask is not None:
            if normalization != "kernel":
                raise ValueError("A key mask needs angular_normalization='kernel'; 'l2' adds each token's own value.")
            kept = key_mask.to(dtype).unsqueeze(-1)  # (B, H or 1, N, 1)
            key, values, count = key * kept, values * kept, kept.sum(dim=-2)
        context = key.mT @ values  # K̂ᵀV: (B, H, d, d)
        if normalization == "kernel":
            out = _kernel_normalized(query, key, values, context, eps, head_scale, count)
        else:
            if query.shape[-2] != values.shape[-2]:
                raise ValueError(
                    f"angular_normalization='l2' adds each query's own value (½ v_i), so it needs as many queries as "
                    f"keys; got {query.shape[-2]} and {values.shape[-2]}. Use 'kernel' where they are pooled apart."
                )
            # Multiplied through by π, which the normalisation removes: normalize(q̂ K̂ᵀV + (π/2) v).
            query = F.normalize(query, dim=-1, eps=eps)
            out = F.normalize(query @ context + (math.pi / 2) * values, dim=-1, eps=eps).transpose(1, 2)
            if head_scale is not None:
                out = out * head_scale.to(dtype).view(-1, 1)
    return out.to(value.dtype)


def _kernel_normalized(query, key, values, context, eps, head_scale, count):
    """The kernel form multiplied through by π‖q_i‖ (the ratio is unchanged), so that q is never normalised:

        [num_i, den_i] = q_i @ mix + (π/2) ‖q_i‖ [Σ_j v_j, N],   mix = [K̂ᵀV, Σ_j k̂_j]   (d × (d+1))

    one batched product for both terms (the ‖q‖ term as its added input), then num / den. Head-major
    `(B, H, N, d)` in, token-major `(B, N, H, d)` out; `count` is N, `(B or 1, H or 1, 1)`.
    """
    batch, heads, tokens, head_dim = query.shape
    mix = torch.cat([context, key.sum(dim=-2).unsqueeze(-1)], dim=-1)  # (B, H, d, d+1)
    sums = values.sum(dim=-2)
    totals = torch.cat([sums, count.expand(*sums.shape[:-1], 1)], dim=-1)  # [Σ_j v_j, N_keys]: (B, H, d+1)
    if head_scale is not None:
        # γ scales the numerator columns of these (d+1)-wide factors: no pass over the tokens.
        gamma = F.pad(head_scale.to(query.dtype).view(-1, 1).expand(-1, head_dim), (0, 1), value=1.0)  # (H, d+1)
        mix, totals = mix * gamma.unsqueeze(-2), totals * gamma
    query_norm = torch.linalg.vector_norm(query, dim=-1, keepdim=True).clamp_min(eps)  # (B, H, N, 1)
    weighted = torch.baddbmm(
        ((math.pi / 2) * query_norm * totals.unsqueeze(-2)).flatten(0, 1), query.flatten(0, 1), mix.flatten(0, 1)
    )
    weighted = weighted.view(batch, heads, tokens, head_dim + 1).transpose(1, 2)  # token-major view
    # An elementwise result takes the memory order of its first operand: a token-major 1/den (N·H values) lays the
    # quotient out token-major, as the output projection reads it, instead of a transposing copy of N·C values.
    inverse_denominator = weighted[..., -1:].contiguous().reciprocal()
    return inverse_denominator * weighted[..., :-1]


def masked_linear_angular_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    eps: float = 1e-6,
    head_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `"kernel"` linear-angular attention under an attention mask, `allowed` (bool, `(batch, heads or 1, Nq,
    Nk)`, True where query i may attend to key j):

        o_i = Σ_j m_ij Sim_lin(q_i, k_j) v_j / Σ_j m_ij Sim_lin(q_i, k_j)

    Keys that no query may attend to (padding) leave the sums of `linear_angular_attention` (`key_mask`), in O(N·d²).
    The R rows the mask restricts further (EoMT's query tokens) are then computed from their explicit kernel over the
    keys they may attend to, in O(R·N·d): linear in N while R is fixed (a mask that restricts every row costs what
    softmax attention does). A row with no key allowed gives 0. Token-major in and out, as `linear_angular_attention`.
    """
    key_mask = allowed.any(dim=-2)  # (B, H or 1, Nk)
    out = linear_angular_attention(query, key, value, "kernel", eps, head_scale, key_mask)
    restricted = (allowed != key_mask.unsqueeze(-2)).any(dim=-1).flatten(0, 1).any(dim=0)  # (Nq,)
    rows = restricted.nonzero().squeeze(-1)
    if rows.numel():
        out[:, rows] = explicit_angular_rows(query[:, rows], key, value, allowed[..., rows, :], eps, head_scale)
    return out


def explicit_angular_rows(query, key, value, allowed, eps, head_scale):
    """o_i = Σ_j m_ij Sim_lin(q_i, k_j) v_j / Σ_j m_ij Sim_lin(q_i, k_j) for a few rows i, from the R × N kernel;
    `allowed` is `(batch, heads or 1, R, N)`. Token-major in and out, in the reductions' dtype."""
    dtype = reduction_dtype(value)
    with torch.autocast(device_type=value.device.type, enabled=False):
        query, key, values = (x.to(dtype).transpose(1, 2) for x in (query, key, value))
        similarity = 0.5 + F.normalize(query, dim=-1, eps=eps) @ F.normalize(key, dim=-1, eps=eps).mT / math.pi
        similarity = similarity * allowed.to(dtype)
        denominator = similarity.sum(dim=-1, keepdim=True)
        out = (similarity @ values) / torch.where(denominator > 0, denominator, 1.0)  # a row with no key: 0, not 0/0
        if head_scale is not None:
            out = out * head_scale.to(dtype).view(-1, 1, 1)
    return out.transpose(1, 2).to(value.dtype)


def softmax_mask_cutoff(threshold: float, threshold_type: str, num_keys: int) -> float:
    """The probability at or below which the mask M drops a softmax entry:

        "relative":  τ/N   τ in units of the uniform probability 1/N over the N keys
        "absolute":  τ     a probability (the authors' public snippet: 0.02)

    A near-uniform softmax (as at initialisation) has probabilities near 1/N: a relative τ ≤ 1 keeps a share of
    them at every token count, where an absolute τ above 1/N keeps none, and the branch then passes no gradient.
    """
    if threshold_type == "relative":
        return threshold / num_keys
    if threshold_type == "absolute":
        return threshold
    raise ValueError(f"Unknown softmax mask threshold type {threshold_type!r}; expected 'relative' or 'absolute'.")


def masked_softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    threshold: float | None,
    threshold_type: str = "relative",
    dropout_p: float = 0.0,
    measure_kept_share: bool = False,
    scale: float | torch.Tensor = 1.0,
    relative_bias: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`scale`·(M⊙S)V with S = softmax(q kᵀ/√d + B) and M = 1[S > cutoff] (`softmax_mask_cutoff`); kept probabilities
    are not renormalised, and attention dropout (`dropout_p`) drops kept ones. With `threshold=None` the mask keeps
    everything and this is plain softmax attention, done by SDPA. `scale` is the branch's α (a float, or the 0-dim
    tensor of its buffer), applied where it costs nothing extra. Queries and keys may differ in number (MViTv2 pools
    them apart).

    B is 0, or MViTv2's decomposed relative position bias: `relative_bias` = (row_bias, column_bias), `(batch, heads,
    Nq, R)` and `(batch, heads, Nq, C)` for the keys' R × C grid after any prefix keys (`add_relative_bias`).

    No N×N tensor is held for the backward pass (docs/design.md §7): on CUDA without dropout or a bias the mask runs
    inside FlexAttention's fused kernels (`masked_softmax.flex_masked_softmax`), elsewhere over tiles of query rows
    recomputed in the backward pass (`masked_softmax.BlockwiseMaskedSoftmax`, dense or masked); half-precision input
    is computed in fp32 there, fp32 and fp64 in their own precision. A graph traced by `torch.compile` or
    `torch.export` gets the formula in plain operations instead (`masked_softmax.traced_masked_softmax`).

    `attention_mask` is a source's own mask (bool, or additive), as SDPA takes it; only a dense branch without a bias
    takes one (it runs through SDPA).

    Inputs and output are `(batch, tokens, heads, head_dim)`. Also returns the share of probabilities M keeps, a
    0-dim tensor (1 when dense), or None unless `measure_kept_share`: 0 means the branch adds nothing and passes no
    gradient.
    """
    query, key, value = (tensor.transpose(1, 2) for tensor in (query, key, value))
    if attention_mask is not None and (threshold is not None or relative_bias is not None):
        raise ValueError(
            "The softmax branch takes an attention mask only when it is dense (softmax_mask_threshold=None, what "
            "castle sets): its thresholded tiles have no place for a mask."
        )
    if threshold is None and relative_bias is None:
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout_p)
        return scale * attended.transpose(1, 2), value.new_ones(()) if measure_kept_share else None
    # Dense with a bias: every probability is kept (P ≥ 0 > -1), through the same tiles.
    cutoff = -1.0 if threshold is None else softmax_mask_cutoff(threshold, threshold_type, key.shape[-2])
    flex = query.device.type == "cuda" and dropout_p == 0.0 and relative_bias is None
    if flex and not torch.compiler.is_compiling():
        attended, kept_share = flex_masked_softmax(query, key, value, cutoff, measure_kept_share, scale)
        return attended.transpose(1, 2), kept_share
    dtype = reduction_dtype(value)
    function = traced_masked_softmax if torch.compiler.is_compiling() else BlockwiseMaskedSoftmax.apply
    biases = [bias.to(dtype) for bias in relative_bias] if relative_bias is not None else [None, None]
    with torch.autocast(device_type=value.device.type, enabled=False):
        attended, kept_share = function(
            *(tensor.to(dtype) for tensor in (query, key, value)),
            cutoff,
            dropout_p,
            measure_kept_share,
            scale,
            *biases,
        )
    return attended.to(value.dtype).transpose(1, 2), kept_share


def rotary_position_embedding(
    tensor: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int
) -> torch.Tensor:
    """x·cos θ + rotate_half(x)·sin θ on the patch tokens of `tensor` `(B, N, H, d)`, where rotate_half(x) =
    [−x₂, x₁] for the halves x = [x₁, x₂] of the head dimension; the prefix tokens pass unchanged (DINOv3's RoPE,
    applied to q and k). `cos` and `sin` are `(N - num_prefix_tokens, d)`."""
    prefix, patches = tensor[:, :num_prefix_tokens], tensor[:, num_prefix_tokens:]
    first, second = patches.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return torch.cat([prefix, patches * cos[:, None] + rotated * sin[:, None]], dim=1)


def spatial_depthwise_conv(
    value: torch.Tensor, weight: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]
) -> torch.Tensor:
    """A depthwise k×k conv of V over the (rows, columns) grid of patch tokens, one filter per channel.

    `value` is `(B, N, H, d)`; `weight` is `(H·d, 1, k, k)`, channels in the head-major order of the hidden state.
    Returns `(B, N - num_prefix_tokens, H, d)`: the conv term of the patch tokens only, since prefix tokens
    ([CLS]) are not on the grid.
    """
    batch, tokens, heads, head_dim = value.shape
    patches = value[:, num_prefix_tokens:].reshape(batch, *grid_size, heads * head_dim).permute(0, 3, 1, 2)
    # V is a strided slice of the fused projection; the depthwise conv reads a dense channels-last copy of it up to
    # 18× faster than the view (measured on a 64×64 grid), for one pass over V.
    patches = patches.contiguous(memory_format=torch.channels_last)
    conv = F.conv2d(patches, weight.to(value.dtype), padding=weight.shape[-1] // 2, groups=heads * head_dim)
    return conv.permute(0, 2, 3, 1).reshape(batch, -1, heads, head_dim)


def sequence_depthwise_conv(value: torch.Tensor, weight: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """A depthwise k×1 conv of V along the token axis, one filter per head shared by its channels.

    `value` is `(B, N, H, d)`; `weight` is `(H, 1, k, 1)`. Returns the conv term of the patch tokens,
    `(B, N - num_prefix_tokens, H, d)`.
    """
    patches = value[:, num_prefix_tokens:].transpose(1, 2)
    conv = F.conv2d(patches, weight.to(value.dtype), padding=(weight.shape[-2] // 2, 0), groups=value.shape[2])
    return conv.transpose(1, 2)


class CastlingResidualConv(nn.Module):
    """The depthwise conv on V that stands in for the high-order terms of the angular kernel (`residual_conv`):
    `"spatial"`, k×k per channel over `channels` channels, or `"sequence"`, k×1 per head over `heads` heads."""

    def __init__(self, mode: str, channels: int, heads: int, kernel_size: int):
        super().__init__()
        self.mode = mode
        if self.mode == "spatial":
            self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size))
        else:
            self.weight = nn.Parameter(torch.empty(heads, 1, kernel_size, 1))
        # As nn.Conv2d's own default (uniform in ±1/√fan_in); the model's `_init_weights` applies `config.weight_init`.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(
        self,
        value: torch.Tensor,
        num_prefix_tokens: int,
        grid_size: tuple[int, int],
        head_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The conv term of the patch tokens, `(B, N - num_prefix_tokens, H, d)`, times `head_scale` per head."""
        weight = self.weight
        if head_scale is not None:
            # Scaling the filters, not the output, keeps γ off the token-sized tensors.
            per_channel = head_scale.repeat_interleave(weight.shape[0] // head_scale.shape[0])
            weight = weight * per_channel.view(-1, 1, 1, 1)
        if self.mode == "spatial":
            return spatial_depthwise_conv(value, weight, num_prefix_tokens, grid_size)
        return sequence_depthwise_conv(value, weight, num_prefix_tokens)


class CastlingSoftmaxBranch(nn.Module):
    """The auxiliary masked softmax attention of the training form, scaled by the layer's softmax mask scale α.

    α is a persistent buffer, so that a checkpoint taken in the middle of the mask decay reloads with the α it had,
    and it enters the arithmetic as that tensor. Once α is 0 the branch does no work at all and returns None (adding
    it would add exactly 0); whether α is 0 is a host-side flag (`active`), so that the skip is a Python branch: no
    device sync per layer and step, and `torch.compile` / `torch.export` see a constant rather than a data-dependent
    condition.

    The flag cannot fall behind α, however α is written: it is read from the buffer again whenever the buffer is
    another tensor or autograd's version counter says it was written in place since the flag was last read
    (`set_scale`, `load_state_dict`, `from_pretrained`, `.fill_`, `.copy_`, accelerate's
    `set_module_tensor_to_device`, a move to another device), one sync per write, none per step. A compiled graph
    guards on the flag as it was when traced; `set_scale` (the decay's path) updates it, and so does any eager
    forward pass.

    `kept_share` is the share of softmax probabilities the mask kept in the last forward pass: whether the branch is
    alive. It is measured only while `measure_kept_share` is True (`measure_softmax_mask_kept_shares`;
    `CastlingMaskDecayCallback` turns it on for the steps it logs), and is None otherwise and while α is 0.
    """

    def __init__(self, config: CastlingAttentionConfig, dropout_p: float = 0.0):
        super().__init__()
        self.threshold = config.softmax_mask_threshold
        self.threshold_type = config.softmax_mask_threshold_type
        self.dropout_p = dropout_p
        self.register_buffer("softmax_mask_scale", torch.tensor(1.0))
        self._active, self._read_from = True, (None, -1)  # the flag, and the α tensor and version it was read from
        self.measure_kept_share = False
        self.kept_share: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        """Whether α is not 0: the branch still contributes."""
        if not torch.compiler.is_compiling():
            self._read_scale()
        return self._active

    def _read_scale(self) -> None:
        """Re-read the flag from α if α was replaced or written in place since it was last read."""
        scale = self.softmax_mask_scale
        if scale.device.type == "meta":  # a model being built has no values yet
            return
        if scale.is_inference():  # no version counter to consult
            self._active = bool(scale != 0)
            return
        if self._read_from[0] is not scale or self._read_from[1] != scale._version:
            self._active, self._read_from = bool(scale != 0), (scale, scale._version)

    def set_scale(self, alpha: float) -> None:
        """Set α (a float in [0, 1]) and its host-side flag, with no read back from the device."""
        self.softmax_mask_scale.fill_(alpha)
        self._active, self._read_from = alpha != 0.0, (self.softmax_mask_scale, self.softmax_mask_scale._version)

    def live_scale(self) -> torch.Tensor | None:
        """α as the tensor that enters the arithmetic while the branch contributes, None once α is 0."""
        return self.softmax_mask_scale if self.active else None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        relative_bias: tuple[torch.Tensor, torch.Tensor] | None = None,
        dropout_p: float | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """α·(M⊙S)V of `masked_softmax_attention` (token-major q, k, v; `relative_bias` as it takes it), or None at
        α = 0. `dropout_p` is the attention dropout a caller already chose for this pass (a source's attention
        module castled in place); by default the branch's own, in training."""
        if not self.active:
            self.kept_share = None
            return None
        if dropout_p is None:
            dropout_p = self.dropout_p if self.training else 0.0
        attended, self.kept_share = masked_softmax_attention(
            query,
            key,
            value,
            self.threshold,
            self.threshold_type,
            dropout_p,
            self.measure_kept_share,
            self.softmax_mask_scale,
            relative_bias,
            attention_mask,
        )
        return attended

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold}, threshold_type={self.threshold_type}, "
            f"softmax_mask_scale={self.softmax_mask_scale.item():g}"
        )


def live_softmax_mask_scale(branch: CastlingSoftmaxBranch | None) -> torch.Tensor | None:
    """α of a layer's softmax branch while it contributes; None for a spent branch or a layer without one."""
    return branch.live_scale() if branch is not None else None


def linear_branch_weight(gamma: torch.Tensor, alpha: torch.Tensor | None, blend: str) -> torch.Tensor:
    """The per-head weight of the linear term γ ⊙ (LA + DWConv):

        "additive":  γ                 (the paper: the branch is added on top, α·(M⊙S)V)
        "convex":    (1 − α)·held(γ)   (the branch and the linear term share the layer: at α = 1 the output is the
                                        branch alone, at α = 0 the linear term alone; what `castle` uses)

    held(γ) is γ in value; its gradient is exactly 0 while α > 0 and γ's own once α = 0: in the convex blend γ learns
    only once the branch is gone. Were it to learn while α > 0, a castled model would shrink γ to keep its softmax
    attention in use (and grow V to make up for the small α), which it then loses at the switch (docs/design.md §9
    measures it). γ stays in the graph with a zero gradient rather than being detached, so that every parameter takes
    part in every backward pass, as `DistributedDataParallel` without `find_unused_parameters` requires; the mask
    decay keeps it out of weight decay (`CastlingMaskDecayCallback`). `alpha` is None when the layer has no live
    branch (α = 0 or the inference form): the weight is then γ either way.
    """
    if blend not in ("additive", "convex"):
        raise ValueError(f"Unknown linear branch blend {blend!r}; expected 'additive' or 'convex'.")
    if alpha is None or blend == "additive":
        return gamma
    alpha = alpha.to(gamma.dtype)
    released = (alpha == 0).to(gamma.dtype)  # a pure function of α, so a traced graph needs no flag for it
    frozen = gamma.detach()
    return (frozen + released * (gamma - frozen)) * (1.0 - alpha)


__all__ = [
    "CastlingResidualConv",
    "CastlingSoftmaxBranch",
    "linear_angular_attention",
    "explicit_angular_rows",
    "linear_branch_weight",
    "live_softmax_mask_scale",
    "masked_linear_angular_attention",
    "masked_softmax_attention",
    "reduction_dtype",
    "rotary_position_embedding",
    "sequence_depthwise_conv",
    "softmax_mask_cutoff",
    "spatial_depthwise_conv",
]
