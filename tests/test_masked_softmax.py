"""The masked softmax branch without an N×N tensor, against the materialised formula (docs/design.md §1, §7)."""

import math
import warnings

import pytest
import torch

from castling_hf import masked_softmax
from castling_hf.masked_softmax import BlockwiseMaskedSoftmax, flex_masked_softmax, score_tiles, tile_rows

HEADS, HEAD_DIM = 3, 16
# The cutoff c of M = 1[P > c] that keeps nothing (P ≤ 1), about a fifth of a random softmax, and everything.
CUTOFFS = {"nothing": lambda tokens: 1.0, "some": lambda tokens: 1.3 / tokens, "everything": lambda tokens: 0.0}


def materialised(query, key, value, cutoff):
    """(M⊙P)V with the N×N probabilities formed, as autograd differentiates it; head-major tensors."""
    probabilities = torch.softmax(query @ key.mT / math.sqrt(query.shape[-1]), dim=-1)
    mask = probabilities > cutoff
    return (probabilities * mask) @ value, mask.double().mean()


def random_qkv(tokens, dtype=torch.float32, seed=0, batch=2):
    """Head-major views of a token-major fused projection, as the attention module hands them over."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, HEADS, HEAD_DIM, generator=generator, dtype=dtype, requires_grad=True)
    return qkv, [tensor.transpose(1, 2) for tensor in qkv.unbind(2)]


def relative_error(actual, expected):
    """max |actual − expected| / max |expected|; the absolute error where the expected tensor is all zeros."""
    scale = expected.abs().max()
    return ((actual - expected).abs().max() / (scale if scale > 0 else 1.0)).item()


@pytest.fixture(params=["default tiles", "small tiles"])
def tiles(request, monkeypatch):
    """The default tile (the whole layer in one tile at these sizes) and 4,096-score tiles (blocks of rows)."""
    if request.param == "small tiles":
        monkeypatch.setattr(masked_softmax, "SCORE_TILE", 2**12)
    return request.param


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("tokens", [65, 197, 1025])
@pytest.mark.parametrize("keeps", list(CUTOFFS))
def test_blockwise_branch_and_its_gradients_equal_the_materialised_formula(tiles, keeps, tokens, dtype, tolerance):
    cutoff = CUTOFFS[keeps](tokens)
    qkv, (query, key, value) = random_qkv(tokens, dtype)
    grad = torch.randn(2, HEADS, tokens, HEAD_DIM, dtype=dtype, generator=torch.Generator().manual_seed(1))

    attended, kept_share = BlockwiseMaskedSoftmax.apply(query, key, value, cutoff, 0.0, True)
    (gradient,) = torch.autograd.grad(attended, qkv, grad)
    expected, expected_share = materialised(query, key, value, cutoff)
    (expected_gradient,) = torch.autograd.grad(expected, qkv, grad)

    assert attended.dtype == dtype and gradient.dtype == dtype
    assert kept_share.item() == pytest.approx(expected_share.item(), abs=1e-12)
    assert {"nothing": 0.0, "everything": 1.0}.get(keeps, kept_share.item()) == kept_share.item()
    assert relative_error(attended, expected) <= tolerance
    for q_k_or_v in range(3):  # the gradients of q, k and v
        assert relative_error(gradient[:, :, q_k_or_v], expected_gradient[:, :, q_k_or_v]) <= tolerance
    if keeps == "nothing":
        assert not attended.any() and not gradient.any()


@pytest.mark.parametrize("tiles_kind", ["one tile", "many tiles"])
def test_the_scale_multiplies_the_output_and_its_gradients(monkeypatch, tiles_kind):
    if tiles_kind == "many tiles":
        monkeypatch.setattr(masked_softmax, "SCORE_TILE", 2**10)
    qkv, (query, key, value) = random_qkv(40, torch.float64)
    grad = torch.randn(2, HEADS, 40, HEAD_DIM, dtype=torch.float64)
    scaled, _ = BlockwiseMaskedSoftmax.apply(query, key, value, 1.3 / 40, 0.0, False, 0.3)
    (gradient,) = torch.autograd.grad(scaled, qkv, grad)
    expected = 0.3 * materialised(query, key, value, 1.3 / 40)[0]
    (expected_gradient,) = torch.autograd.grad(expected, qkv, grad)
    assert relative_error(scaled, expected) <= 1e-12 and relative_error(gradient, expected_gradient) <= 1e-12


def biased_materialised(query, key, value, cutoff, row_bias, column_bias):
    """(M⊙P)V with P = softmax(q Kᵀ/√d + B), B_ij = row_bias[i, r_j] + column_bias[i, c_j] on the keys' grid after the
    prefix keys, every N_q × N_k tensor formed."""
    rows, columns = row_bias.shape[-1], column_bias.shape[-1]
    prefix = key.shape[-2] - rows * columns
    grid = (row_bias[..., :, None] + column_bias[..., None, :]).flatten(-2)
    bias = torch.cat([grid.new_zeros(*grid.shape[:-1], prefix), grid], dim=-1)
    probabilities = torch.softmax(query @ key.mT / math.sqrt(query.shape[-1]) + bias, dim=-1)
    return (probabilities * (probabilities > cutoff)) @ value


@pytest.mark.parametrize("keeps", ["dense", "some"])
@pytest.mark.parametrize("queries, grid, prefix", [(64, (4, 4), 0), (17, (8, 8), 1), (257, (8, 8), 0)])
def test_fewer_or_more_queries_than_keys_with_a_relative_bias_equal_the_materialised_formula(
    tiles, keeps, queries, grid, prefix
):
    # MViTv2: queries pooled apart from the keys, a decomposed relative position bias on the keys' grid, [CLS] first.
    generator = torch.Generator().manual_seed(3)
    keys = prefix + grid[0] * grid[1]

    def draw(*shape):
        return torch.randn(2, HEADS, *shape, dtype=torch.float64, generator=generator, requires_grad=True)

    query, key, value = draw(queries, HEAD_DIM), draw(keys, HEAD_DIM), draw(keys, HEAD_DIM)
    row_bias, column_bias = draw(queries, grid[0]), draw(queries, grid[1])
    cutoff = -1.0 if keeps == "dense" else 1.3 / keys
    inputs = (query, key, value, row_bias, column_bias)
    attended, kept_share = BlockwiseMaskedSoftmax.apply(
        query, key, value, cutoff, 0.0, True, 1.0, row_bias, column_bias
    )
    expected = biased_materialised(query, key, value, cutoff, row_bias, column_bias)
    grad = torch.randn_like(expected)
    gradients = torch.autograd.grad(attended, inputs, grad)
    expected_gradients = torch.autograd.grad(expected, inputs, grad)
    assert relative_error(attended, expected) <= 1e-10
    for name, got, want in zip(("q", "k", "v", "row bias", "column bias"), gradients, expected_gradients, strict=True):
        assert relative_error(got, want) <= 1e-10, name
    assert (kept_share.item() == 1.0) == (keeps == "dense")


def test_blockwise_branch_passes_gradcheck_with_dropout_across_tiles(monkeypatch):
    monkeypatch.setattr(masked_softmax, "SCORE_TILE", 2**7)  # 4 tiles per head: each redraws its dropout mask
    _, (query, key, value) = random_qkv(20, torch.float64, batch=1)

    def branch(query, key, value):
        torch.manual_seed(0)  # the branch draws its dropout seed from torch's generator
        return BlockwiseMaskedSoftmax.apply(query, key, value, 1.3 / 20, 0.3, False)[0]

    assert torch.autograd.gradcheck(branch, (query, key, value), fast_mode=True)


def test_dropout_drops_kept_probabilities_and_rescales_the_rest():
    # With V the identity (head_dim = tokens), the output is the dropped, rescaled probabilities Z⊙A/(1 − p).
    tokens, p = 48, 0.5
    query, key = (torch.randn(1, HEADS, tokens, tokens, dtype=torch.float64) for _ in range(2))
    identity = torch.eye(tokens, dtype=torch.float64).expand(1, HEADS, tokens, tokens)
    cutoff = 1.3 / tokens
    kept = materialised(query, key, identity, cutoff)[0]
    torch.manual_seed(0)
    dropped = BlockwiseMaskedSoftmax.apply(query, key, identity, cutoff, p, False)[0]
    survived = dropped != 0
    assert not (survived & (kept == 0)).any()  # only kept probabilities survive
    assert torch.allclose(dropped[survived], kept[survived] / (1 - p), rtol=1e-12, atol=0)
    assert 0.4 < 1 - survived.sum() / (kept != 0).sum() < 0.6  # about p of the kept ones are dropped
    torch.manual_seed(0)
    assert torch.equal(BlockwiseMaskedSoftmax.apply(query, key, identity, cutoff, p, False)[0], dropped)


def test_tiles_cover_every_query_row_once_within_the_score_budget():
    for heads, tokens in ((6, 197), (48, 197), (12, 1025), (6, 4097), (1, 70000)):
        heads_per_tile, rows = tile_rows(heads, tokens)
        assert heads_per_tile * rows * tokens <= max(masked_softmax.SCORE_TILE, tokens)
        covered = torch.zeros(heads, tokens, dtype=torch.long)
        for head_slice, row_slice in score_tiles(heads, tokens):
            covered[head_slice, row_slice] += 1
        assert (covered == 1).all()
    assert tile_rows(6, 4097) == (1, 456)  # 9 blocks of nearly equal size (8 × 456 + 449), at most 511 rows
    assert tile_rows(64, 197) == (54, 197)  # whole heads


def test_the_branch_holds_one_tile_of_scores_not_n_squared():
    # N = 2,049: one layer's N×N probabilities would be 48 MiB in fp32 (3 heads); the tiles hold 8 MiB at a time.
    tokens = 2049
    qkv, (query, key, value) = random_qkv(tokens, batch=1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        attended, _ = BlockwiseMaskedSoftmax.apply(query, key, value, 1.3 / tokens, 0.0, False)
    assert all(tensor.numel() <= tokens * HEADS * HEAD_DIM * 3 for tensor in saved)  # views of q, k, v only
    attended.sum().backward()
    assert qkv.grad.abs().sum() > 0


@pytest.mark.parametrize("torch_release", ["with AuxRequest", "before AuxRequest (torch < 2.9)"])
def test_flex_attention_formulation_equals_the_materialised_formula(torch_release, monkeypatch):
    # FlexAttention runs eagerly (unfused) on a CPU, forward only: enough to check the score_mod and the
    # kept-mass factor exp(L' − L); its fused kernels and their backward pass are checked on CUDA below.
    from torch.nn.attention import flex_attention as flex_module
    from torch.nn.attention.flex_attention import flex_attention

    if torch_release.startswith("before"):  # the log-sum-exp then comes from `return_lse=True`
        monkeypatch.delattr(flex_module, "AuxRequest")

    for keeps in CUTOFFS:
        query, key, value = (tensor.detach() for tensor in random_qkv(65)[1])
        cutoff = CUTOFFS[keeps](65)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the eager-mode warning
            attended, kept_share = flex_masked_softmax(query, key, value, cutoff, True, flex=flex_attention)
            expected, expected_share = materialised(query, key, value, cutoff)
        assert relative_error(attended, expected) <= 1e-5, keeps
        assert kept_share.item() == pytest.approx(expected_share.item(), abs=1e-6), keeps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's fused kernels need CUDA")
@pytest.mark.parametrize("tokens", [197, 1025])
def test_cuda_branch_runs_through_flex_attention_and_equals_the_cpu_path(tokens):
    from castling_hf.attention import masked_softmax_attention

    qkv, (query, key, value) = random_qkv(tokens)
    grad = torch.randn(2, HEADS, tokens, HEAD_DIM)
    expected = BlockwiseMaskedSoftmax.apply(query, key, value, 1.3 / tokens, 0.0, True)
    (expected_gradient,) = torch.autograd.grad(expected[0], qkv, grad)
    qkv_cuda = qkv.detach().cuda().requires_grad_()
    query, key, value = qkv_cuda.unbind(2)  # token-major, as masked_softmax_attention takes them
    attended, kept_share = masked_softmax_attention(query, key, value, 1.3, measure_kept_share=True)
    (gradient,) = torch.autograd.grad(attended, qkv_cuda, grad.transpose(1, 2).cuda())
    assert relative_error(attended.transpose(1, 2).cpu(), expected[0]) <= 1e-4
    assert relative_error(gradient.cpu(), expected_gradient) <= 1e-3
    assert kept_share.item() == pytest.approx(expected[1].item(), abs=1e-4)
