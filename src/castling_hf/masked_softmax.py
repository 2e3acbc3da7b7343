"""The auxiliary masked softmax attention of the training form without an N×N tensor (docs/design.md §7).

    O = (M⊙P) V,    P = softmax(q kᵀ/√d),    M = 1[P > c]    (c from `attention.softmax_mask_cutoff`)

Three implementations of the same formula, chosen in `attention.masked_softmax_attention`:

- `BlockwiseMaskedSoftmax`: tiles of query rows, each tile's probabilities recomputed in the backward pass, so that
  memory grows as N·tile rather than N²; any device, any dtype, attention dropout;
- `flex_masked_softmax`: FlexAttention's fused kernels (CUDA), the mask written as a `score_mod` against each row's
  log-sum-exp;
- `traced_masked_softmax`: the formula in plain tensor operations, for graphs that `torch.compile` and
  `torch.export` trace (the blockwise Function writes into reused tile buffers, side effects a graph cannot hold).

Head-major tensors throughout, `(batch, heads, tokens, head_dim)`.
"""

import functools
import math
import threading

import torch

aten = torch.ops.aten

# Scores per tile: 2^21 (8 MiB in fp32). On a 2-core CPU the branch ran fastest with the largest tiles measured
# (`python benchmarks/training.py`'s tile sweep), and at 224 px a layer's scores then fit in one tile (§7).
SCORE_TILE = 2**21


def tile_rows(heads: int, queries: int, keys: int | None = None, tile: int | None = None) -> tuple[int, int]:
    """(heads, query rows) per tile of `heads × queries` query rows over `keys` keys (`queries` by default): at most
    `tile` scores (`SCORE_TILE` by default) but at least one row; whole heads at a time where a head's scores fit,
    else blocks of rows of one head."""
    tile, keys = tile or SCORE_TILE, keys or queries
    if queries * keys <= tile:
        return min(heads, tile // (queries * keys)), queries
    blocks = math.ceil(queries / max(1, tile // keys))
    return 1, math.ceil(queries / blocks)  # blocks of equal size: no sliver of a few rows at the end


def score_tiles(heads: int, queries: int, keys: int | None = None):
    """`(heads, rows)` slices of every tile (`tile_rows`), in the order both passes visit them."""
    heads_per_tile, rows = tile_rows(heads, queries, keys)
    for head in range(0, heads, heads_per_tile):
        for row in range(0, queries, rows):
            yield slice(head, min(head + heads_per_tile, heads)), slice(row, min(row + rows, queries))


def is_unit(scale: float | torch.Tensor) -> bool:
    """Whether `scale` is the number 1, known on the host: a tensor scale (α, a buffer) is never read back."""
    return not isinstance(scale, torch.Tensor) and scale == 1.0


def flat_heads(tensor: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """`(batch, heads, tokens, head_dim)` → a contiguous `(batch · heads, tokens, head_dim)` copy, times `scale`:
    one pass, so that a tile may span heads of several images."""
    batch, heads, tokens, head_dim = tensor.shape
    flat = tensor.new_empty(batch, heads, tokens, head_dim)
    flat.copy_(tensor) if is_unit(scale) else torch.mul(tensor, scale, out=flat)
    return flat.view(batch * heads, tokens, head_dim)


_workspaces = threading.local()


class _TileBuffer:
    """A flat buffer that holds the largest tile's scores, viewed as each tile's `(heads, rows, keys)`.

    Buffer `slot` (0–4: a pass uses at most five) is kept per thread, device and dtype and reused by every layer and
    step: allocating and freeing a few MiB per pass made the C allocator hand the memory back to the system and fault
    it in again, a cost of 20,000 page faults per training step of `small` at 224 px (20 % of the step).
    """

    def __init__(self, like: torch.Tensor, heads: int, queries: int, keys: int, slot: int):
        heads_per_tile, rows = tile_rows(heads, queries, keys)
        size = heads_per_tile * rows * keys
        buffers = _workspaces.__dict__.setdefault("buffers", {})
        key = (like.device, like.dtype, slot)
        if key not in buffers or buffers[key].numel() < size:
            buffers[key] = like.new_empty(size)
        self.flat = buffers[key]

    def view(self, heads: slice, rows: slice, keys: int) -> torch.Tensor:
        shape = (heads.stop - heads.start, rows.stop - rows.start, keys)
        return self.flat[: math.prod(shape)].view(shape)


class _TileDropout:
    """The dropout keep-mask Z/(1 − p) of each tile, drawn from a generator seeded once per forward pass (from torch's
    global generator, so that `torch.manual_seed` fixes it): the backward pass redraws the same masks by visiting the
    tiles in the same order."""

    def __init__(self, p: float, buffer: _TileBuffer, seed: int | None = None):
        self.p, self.seed, self.buffer = p, None, buffer
        if p > 0.0:
            self.seed = int(torch.randint(2**62, ())) if seed is None else seed
            self.generator = torch.Generator(buffer.flat.device).manual_seed(self.seed)

    def keep_mask(self, heads: slice, rows: slice, keys: int) -> torch.Tensor | None:
        """The next tile's Z/(1 − p); None without dropout."""
        if self.p == 0.0:
            return None
        keep = self.buffer.view(heads, rows, keys).bernoulli_(1.0 - self.p, generator=self.generator)
        return keep.mul_(1.0 / (1.0 - self.p) if self.p < 1.0 else 0.0)


def add_relative_bias(scores: torch.Tensor, row_bias: torch.Tensor, column_bias: torch.Tensor) -> torch.Tensor:
    """scores[..., i, P + r·C + c] += row_bias[..., i, r] + column_bias[..., i, c], in place: the decomposed relative
    position bias of the keys on an (R, C) grid that follow P prefix keys (MViTv2's). Returns `scores`."""
    rows, columns = row_bias.shape[-1], column_bias.shape[-1]
    grid = scores[..., scores.shape[-1] - rows * columns :].unflatten(-1, (rows, columns))
    grid += row_bias[..., None]
    grid += column_bias[..., None, :]
    return scores


class BlockwiseMaskedSoftmax(torch.autograd.Function):
    r"""`scale`·(M⊙P)V over tiles of query rows, with attention dropout Z on the kept probabilities and an optional
    decomposed relative position bias, in O(N·tile) memory. (`scale` is the branch's α, a float or a 0-dim tensor:
    applied to the output in place, and to dO in the backward pass's copy of it.)

    Forward, for the query rows i of a tile and every key j (`score_tiles`; Nq queries, Nk keys):

        S = q_i Kᵀ/√d + B_i,   P = softmax(S),   A = M⊙P,   M = 1[P > c],   O_i = (Z⊙A/(1 − p)) V

    B is 0 unless `row_bias` (Nq × R) and `column_bias` (Nq × C) are given: then B_ij = row_bias[i, r_j] +
    column_bias[i, c_j] for the key j at (r_j, c_j) of the keys' R × C grid, which follows any prefix keys
    (`add_relative_bias`; MViTv2's relative positions, computed from q by the caller). Z ~ Bernoulli(1 − p) per entry
    (p = `dropout_p`; Z = 1 without dropout). Only q, K, V (the caller's tensors, not copies), the biases and the seed
    of Z are saved, O(N·d). With `measure_kept_share`, Σ M / (batch · heads · Nq · Nk) is counted in the tiles.

    Backward. With dO the gradient of O, the gradient reaching P is

        G = Z⊙M⊙(dO Vᵀ)/(1 − p)                       (M and Z are constant almost everywhere: no term of their own)

    and through the softmax's Jacobian, ∂P_ij/∂S_ik = P_ij(δ_jk − P_ik),

        dS = P⊙(G − D),   D_i = Σ_j P_ij G_ij = dO_i · O_i

    (D_i is dO_i·O_i because Σ_j P_ij G_ij = Σ_j (Z⊙A)_ij (dO_i·v_j)/(1 − p)). So each tile recomputes S, P, M
    and Z, and

        dV += (Z⊙A/(1 − p))ᵀ dO_i,   dq_i = dS K/√d,   dK += dSᵀ q_i/√d,
        d row_bias[i, r] = Σ_{j: r_j = r} dS_ij,   d column_bias[i, c] = Σ_{j: c_j = c} dS_ij    (B is a sum).

    The kernels: `_softmax_backward_data(G, P)` is exactly P⊙(G − Σ_j P_ij G_ij) and `threshold_backward(x, P, c)`
    is M⊙x, so a tile's backward is five products and four elementwise passes, in reused tile buffers
    (`_TileBuffer`). Where one tile holds the whole layer (small N) the forward pass keeps its P, and the backward
    pass skips the first product and the softmax. Tensors are `(batch, heads, tokens, head_dim)` (the biases
    `(batch, heads, Nq, R or C)`); each pass copies q, K, V (and dO) to a contiguous `(batch · heads, tokens,
    head_dim)` layout for the products, O(N·d).
    """

    @staticmethod
    def forward(
        ctx,
        query,
        key,
        value,
        cutoff: float,
        dropout_p: float,
        measure_kept_share: bool,
        scale=1.0,
        row_bias=None,
        column_bias=None,
    ):
        batch, heads, queries, head_dim = query.shape
        keys = key.shape[-2]
        scaled_query, key_flat, value_flat = flat_heads(query, head_dim**-0.5), flat_heads(key), flat_heads(value)
        biases = flat_biases(row_bias, column_bias)
        out = torch.empty_like(scaled_query)
        tiles = list(score_tiles(batch * heads, queries, keys))
        # A layer whose scores fit in one tile keeps them (and the copies of q, K, V) for the backward pass, which
        # then recomputes nothing: memory stays within one tile per layer.
        keep_scores = len(tiles) == 1 and any(ctx.needs_input_grad[:3] + ctx.needs_input_grad[7:])
        kept_probabilities = scaled_query.new_empty(batch * heads, queries, keys) if keep_scores else None
        scores, kept = (_TileBuffer(query, batch * heads, queries, keys, slot) for slot in range(2))
        dropout_buffer = _TileBuffer(query, batch * heads, queries, keys, 4) if dropout_p > 0.0 else scores
        dropout = _TileDropout(dropout_p, dropout_buffer)
        kept_count = query.new_zeros((), dtype=torch.float64) if measure_kept_share else None
        for head_slice, row_slice in tiles:
            p = kept_probabilities if kept_probabilities is not None else scores.view(head_slice, row_slice, keys)
            a = kept.view(head_slice, row_slice, keys)
            tile_probabilities(
                p, scaled_query[head_slice, row_slice], key_flat[head_slice], biases, head_slice, row_slice
            )
            aten.threshold.out(p, cutoff, 0.0, out=a)  # A = M⊙P
            if kept_count is not None:
                kept_count += a.sign().sum(dtype=torch.float64)  # A ≥ 0: sign is M
            keep = dropout.keep_mask(head_slice, row_slice, keys)
            if keep is not None:
                a.mul_(keep)
            torch.bmm(a, value_flat[head_slice], out=out[head_slice, row_slice])
        if kept_probabilities is not None:  # and the contiguous copies, as large as the scores
            ctx.save_for_backward(scaled_query, key_flat, value_flat, kept_probabilities, *biases)
        else:
            ctx.save_for_backward(query, key, value, None, *biases)
        ctx.cutoff, ctx.dropout_p, ctx.dropout_seed, ctx.scale = cutoff, dropout_p, dropout.seed, scale
        ctx.query_shape, ctx.key_shape = query.shape, key.shape
        kept_share = kept_count / (batch * heads * queries * keys) if kept_count is not None else None
        if kept_share is not None:
            ctx.mark_non_differentiable(kept_share)
        if not is_unit(scale):
            out.mul_(scale)
        return out.view(query.shape), kept_share

    @staticmethod
    def backward(ctx, grad_out, _grad_kept_share):
        query, key, value, kept_probabilities, *biases = ctx.saved_tensors
        batch, heads, queries, head_dim = ctx.query_shape
        keys = ctx.key_shape[-2]
        scale = head_dim**-0.5
        if kept_probabilities is not None:
            scaled_query, key_flat, value_flat = query, key, value
        else:
            scaled_query, key_flat, value_flat = flat_heads(query, scale), flat_heads(key), flat_heads(value)
        grad_out = flat_heads(grad_out, ctx.scale)  # the output's scale, applied to its gradient in the copy
        grad_query = torch.empty_like(scaled_query)
        grad_key, grad_value = torch.empty_like(key_flat), torch.empty_like(value_flat)
        grad_biases = [torch.empty_like(bias) for bias in biases]
        buffers = [_TileBuffer(query, batch * heads, queries, keys, slot) for slot in range(4)]
        probabilities, kept, grad_kept, grad_scores = buffers
        dropout_buffer = _TileBuffer(query, batch * heads, queries, keys, 4)
        dropout = _TileDropout(ctx.dropout_p, dropout_buffer, seed=ctx.dropout_seed)
        for head_slice, row_slice in score_tiles(batch * heads, queries, keys):
            a, g, ds = (buffer.view(head_slice, row_slice, keys) for buffer in (kept, grad_kept, grad_scores))
            query_tile, grad_out_tile = scaled_query[head_slice, row_slice], grad_out[head_slice, row_slice]
            key_tile, value_tile = key_flat[head_slice], value_flat[head_slice]
            grad_keys, grad_values = grad_key[head_slice], grad_value[head_slice]
            if kept_probabilities is not None:
                p = kept_probabilities
            else:
                p = probabilities.view(head_slice, row_slice, keys)
                tile_probabilities(p, query_tile, key_tile, biases, head_slice, row_slice)
            aten.threshold.out(p, ctx.cutoff, 0.0, out=a)  # A = M⊙P
            keep = dropout.keep_mask(head_slice, row_slice, keys)  # the forward pass's Z/(1 − p) for this tile
            if keep is not None:
                a.mul_(keep)
            torch.bmm(grad_out_tile, value_tile.mT, out=g)  # dO Vᵀ
            aten.threshold_backward.grad_input(g, p, ctx.cutoff, grad_input=g)  # M⊙(dO Vᵀ)
            if keep is not None:
                g.mul_(keep)  # G
            aten._softmax_backward_data.out(g, p, -1, p.dtype, grad_input=ds)  # dS = P⊙(G − D)
            torch.bmm(ds, key_tile, out=grad_query[head_slice, row_slice])  # times 1/√d below
            if grad_biases:  # the sums of dS over the key grid's columns and rows
                rows, columns = biases[0].shape[-1], biases[1].shape[-1]
                grid = ds[..., keys - rows * columns :].unflatten(-1, (rows, columns))
                torch.sum(grid, dim=-1, out=grad_biases[0][head_slice, row_slice])
                torch.sum(grid, dim=-2, out=grad_biases[1][head_slice, row_slice])
            if row_slice.start == 0:  # a head's first tile writes its key and value gradients, the others add
                torch.bmm(a.mT, grad_out_tile, out=grad_values)
                torch.bmm(ds.mT, query_tile, out=grad_keys)
            else:
                grad_values.baddbmm_(a.mT, grad_out_tile)
                grad_keys.baddbmm_(ds.mT, query_tile)
        grad_query.mul_(scale)
        grad_row_bias, grad_column_bias = (
            (bias.view(batch, heads, queries, -1) for bias in grad_biases) if grad_biases else (None, None)
        )
        return (
            grad_query.view(ctx.query_shape),
            grad_key.view(ctx.key_shape),
            grad_value.view(ctx.key_shape),
            None,
            None,
            None,
            None,
            grad_row_bias,
            grad_column_bias,
        )


def flat_biases(row_bias, column_bias) -> list[torch.Tensor]:
    """The relative-position biases `(batch, heads, Nq, R or C)` as contiguous `(batch · heads, Nq, R or C)`; [] for
    none."""
    if row_bias is None:
        return []
    return [bias.reshape(-1, *bias.shape[-2:]).contiguous() for bias in (row_bias, column_bias)]


def tile_probabilities(p, query_tile, key_tile, biases, head_slice, row_slice) -> None:
    """P = softmax(q Kᵀ/√d + B) of one tile into `p` (the query already scaled by 1/√d)."""
    torch.bmm(query_tile, key_tile.mT, out=p)
    if biases:
        add_relative_bias(p, biases[0][head_slice, row_slice], biases[1][head_slice, row_slice])
    aten._softmax.out(p, -1, False, out=p)


def traced_masked_softmax(
    query,
    key,
    value,
    cutoff: float,
    dropout_p: float,
    measure_kept_share: bool,
    scale=1.0,
    row_bias=None,
    column_bias=None,
):
    """`scale`·(Z⊙M⊙P)V/(1 − p) with the Nq × Nk probabilities formed, as autograd differentiates it; returns the
    output and the kept share (or None) as `BlockwiseMaskedSoftmax` does. Only for traced graphs: it holds the
    scores."""
    scores = query @ key.mT * query.shape[-1] ** -0.5
    if row_bias is not None:
        scores = add_relative_bias(scores, row_bias, column_bias)
    probabilities = torch.softmax(scores, dim=-1)
    kept = probabilities > cutoff
    weights = torch.nn.functional.dropout(probabilities * kept, dropout_p) if dropout_p > 0.0 else probabilities * kept
    kept_share = kept.to(torch.float64).mean() if measure_kept_share else None
    return (weights @ value) * scale, kept_share


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once per process: its fused kernels exist only under `torch.compile`."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_masked_softmax(query, key, value, cutoff: float, measure_kept_share: bool, scale=1.0, flex=None):
    """`scale`·(M⊙P)V through FlexAttention, whose kernels never hold the N×N scores (forward and backward, on CUDA).

    With L_i = log Σ_j exp(s_ij), the log-sum-exp of row i's scores s_ij = q_i·k_j/√d, P_ij = exp(s_ij − L_i), so

        M_ij = 1[P_ij > c] = 1[s_ij > L_i + log c]

    is a `score_mod` that sends the dropped scores to −∞. FlexAttention then returns the softmax over the kept keys,
    O'_i = Σ_kept exp(s_ij) v_j / exp(L'_i), and its log-sum-exp L'_i, hence

        (M⊙P)V_i = O'_i · exp(L'_i − L_i)      (exp(L'_i − L_i) = Σ_j M_ij P_ij, the kept probability mass)

    Gradients flow through both passes (O', L' and L); L enters the mask only as a constant, since M is constant
    almost everywhere. A row that keeps nothing has L' = −∞ and gives 0. With `measure_kept_share`, one more pass
    without gradients counts the kept entries: its `score_mod` gives 0 for kept and −∞ for dropped scores, so that
    its log-sum-exp is log Σ_j M_ij. `flex` is the FlexAttention function (by default `compiled_flex_attention()`).
    """
    flex = flex or compiled_flex_attention()
    _, dense_lse = flex_with_lse(flex, query, key, value)
    keep_above = dense_lse.detach() + math.log(cutoff) if cutoff > 0 else torch.full_like(dense_lse, -math.inf)

    def drop_masked_scores(score, batch, head, query_index, key_index):
        return torch.where(score > keep_above[batch, head, query_index], score, -math.inf)

    attended, kept_lse = flex_with_lse(flex, query, key, value, drop_masked_scores)
    attended = attended * (scale * torch.exp(kept_lse - dense_lse)).unsqueeze(-1).to(attended.dtype)
    kept_share = None
    if measure_kept_share:

        def kept_indicator(score, batch, head, query_index, key_index):
            return torch.where(score > keep_above[batch, head, query_index], 0.0, -math.inf)

        with torch.no_grad():
            _, counted_lse = flex_with_lse(flex, query, key, value, kept_indicator)
        kept_share = counted_lse.exp().sum() / (counted_lse.numel() * key.shape[-2])
    return attended, kept_share


def flex_with_lse(flex, query, key, value, score_mod=None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's output and each row's log-sum-exp: asked for with `return_aux=AuxRequest(lse=True)` where torch
    has it (2.9 on), with `return_lse=True`, its older form, elsewhere."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return flex(query, key, value, score_mod=score_mod, return_lse=True)
    attended, aux = flex(query, key, value, score_mod=score_mod, return_aux=AuxRequest(lse=True))
    return attended, aux.lse
