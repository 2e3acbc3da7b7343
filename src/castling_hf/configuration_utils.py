"""What every Castling family's configuration shares: the fields of Castling attention (docs/design.md §1–§2).

A family's configuration (`CastlingViTConfig`, `CastlingMViTv2Config`) subclasses `CastlingAttentionConfig` and adds
its architecture; `transformers` makes every `PreTrainedConfig` subclass a dataclass, so these fields, their
defaults and `validate_castling_attention` are each family's own.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


def as_pair(value) -> tuple[int, int]:
    """An int or a (height, width) pair as a (height, width) tuple."""
    return (value, value) if isinstance(value, int) else tuple(value)


@strict
class CastlingAttentionConfig(PreTrainedConfig):
    r"""
    The fields of Castling attention, shared by every Castling family's configuration:

    attention_mode (`"castling"` or `"linear"`, defaults to `"castling"`):
        `"castling"` is the training form: linear-angular attention, the residual conv and the auxiliary masked
        softmax attention scaled by each layer's softmax mask scale α. `"linear"` is the inference form: the
        softmax branch is not built at all and no layer does any N×N work.
    angular_normalization (`"kernel"` or `"l2"`, defaults to `"kernel"`):
        How the linear-angular attention is normalised. `"kernel"` divides by the sum of the similarities (the
        paper's form); `"l2"` adds `0.5 * v` per token and L2-normalises each output token (the authors' public
        snippet).
    angular_eps (`float`, defaults to 1e-6):
        Epsilon of the L2 normalisation of q and k, so that a zero vector gives a finite output.
    residual_conv (`"spatial"`, `"sequence"` or `None`, defaults to `"spatial"`):
        Depthwise convolution on V that stands in for the high-order residual of the angular kernel.
        `"spatial"`: k×k over the grid of patch tokens, per channel. `"sequence"`: k×1 along the token axis, the
        heads as channels. `None`: no residual conv. The [CLS] token gets no conv term.
    residual_kernel_size (`int`, defaults to 3):
        Kernel size k of the residual conv; odd, so that the output keeps the grid.
    softmax_mask_threshold (`float` or `None`, defaults to 1.3):
        τ of the auxiliary branch: softmax probabilities not above the cutoff are masked out (see
        `softmax_mask_threshold_type`). `None` keeps them all (dense). The default 1.3 (relative) is the public
        snippet's 0.02 at 65 tokens (1.3/65), scaled with the token count; the accuracy study measured it ahead of
        1.0 and of a dense branch.
    softmax_mask_threshold_type (`"relative"` or `"absolute"`, defaults to `"relative"`):
        `"relative"`: the cutoff is τ/N, τ in units of the uniform probability 1/N over the N keys, so the branch
        keeps a share of a near-uniform softmax (as at initialisation) at every token count. `"absolute"`: the
        cutoff is τ itself, a probability (the authors' public snippet uses 0.02, which masks everything while
        the softmax is near uniform over more than 50 tokens).
    linear_branch_scale_init (`float`, defaults to 1.0):
        Initial value of the learnable per-head scale γ on the linear-angular + residual-conv term.
    linear_branch_blend (`"additive"` or `"convex"`, defaults to `"additive"`):
        How the linear term and the softmax branch share a layer in the training form. `"additive"` (the paper):
        γ ⊙ (LA + DWConv) + α·branch. `"convex"`: (1 − α)·γ ⊙ (LA + DWConv) + α·branch, γ held fixed while α > 0,
        so that at α = 1 the layer is the branch alone (a castled model's first forward pass is its source's, for any
        γ) and the linear term takes the layer over as α falls; what `castling_hf.castle` sets (docs/design.md §9:
        with the additive form and γ = 0, a castled model learns to keep its softmax attention by shrinking γ, and
        loses it at the switch). The inference form (α = 0) is γ ⊙ (LA + DWConv) either way.
    weight_init (`"fan_in"` or `"normal"`, defaults to `"fan_in"`):
        Initialisation of the linear and convolution weights (biases start at 0). `"fan_in"`: uniform in
        ±1/√fan_in, PyTorch's default for these layers, so that q·kᵀ/√d and the residual conv start at a scale
        where the softmax branch and the conv contribute from the first step, at every width. `"normal"`:
        N(0, `initializer_range`²), as ViT (at the nano width that is 3.6× smaller than fan-in; the accuracy study
        measures both). The position embeddings and [CLS] use a truncated normal of std `initializer_range` either way.
    """

    attention_mode: Literal["castling", "linear"] = "castling"
    angular_normalization: Literal["kernel", "l2"] = "kernel"
    angular_eps: float = 1e-6
    residual_conv: Literal["spatial", "sequence"] | None = "spatial"
    residual_kernel_size: int = 3
    softmax_mask_threshold: float | None = 1.3
    softmax_mask_threshold_type: Literal["relative", "absolute"] = "relative"
    linear_branch_scale_init: float | int = 1.0
    linear_branch_blend: Literal["additive", "convex"] = "additive"
    weight_init: Literal["fan_in", "normal"] = "fan_in"

    def validate_castling_attention(self):
        if self.residual_kernel_size < 1 or self.residual_kernel_size % 2 == 0:
            raise ValueError(
                f"`residual_kernel_size` must be a positive odd integer (the conv keeps the grid), "
                f"got {self.residual_kernel_size}."
            )
        threshold = self.softmax_mask_threshold
        if self.softmax_mask_threshold_type == "absolute" and threshold is not None and not 0.0 <= threshold < 1.0:
            raise ValueError(
                "`softmax_mask_threshold` of type 'absolute' must be None (dense) or a probability in [0, 1), "
                f"got {threshold}."
            )
        if self.softmax_mask_threshold_type == "relative" and threshold is not None and threshold < 0.0:
            raise ValueError(
                "`softmax_mask_threshold` of type 'relative' must be None (dense) or >= 0 (a multiple of the uniform "
                f"probability 1/N), got {threshold}."
            )
        if self.angular_eps <= 0:
            raise ValueError(f"`angular_eps` must be positive, got {self.angular_eps}.")


__all__ = ["CastlingAttentionConfig", "as_pair"]
