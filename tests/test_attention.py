"""The attention against explicit N×N computations of docs/design.md §1."""

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_module_tensor_to_device
from torch.utils.flop_counter import FlopCounterMode

from castling_hf import CastlingViTForImageClassification
from castling_hf.attention import linear_angular_attention, masked_linear_angular_attention, masked_softmax_attention
from castling_hf.models.castling_vit.modeling_castling_vit import CastlingViTAttention

BATCH, HEADS, HEAD_DIM = 2, 4, 16


def random_qkv(tokens, seed=0):
    """Token-major (batch, tokens, heads, head_dim), the layout of the attention functions."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, tokens, HEADS, HEAD_DIM, generator=generator) for _ in range(3)]


def head_major(*tensors):
    return [tensor.transpose(1, 2) for tensor in tensors]


def explicit_angular_similarity(query, key):
    """Sim_lin(q_i, k_j) = 1/2 + cos θ(q_i, k_j) / π as a full N×N matrix (head-major inputs)."""
    cosine = F.cosine_similarity(query.unsqueeze(-2), key.unsqueeze(-3), dim=-1)
    return 0.5 + cosine / math.pi


def explicit_linear_angular(query, key, value, normalization):
    query, key, value = head_major(query, key, value)
    similarity = explicit_angular_similarity(query, key)
    if normalization == "kernel":
        out = (similarity @ value) / similarity.sum(-1, keepdim=True)
    else:  # "l2": 0.5·v_i + Σ_j (q̂_i·k̂_j)/π v_j, then each token L2-normalised.
        unnormalised = 0.5 * value + (similarity - 0.5) @ value
        out = unnormalised / unnormalised.norm(dim=-1, keepdim=True)
    return out.transpose(1, 2)


def explicit_spatial_conv(value, weight, num_prefix_tokens, grid_size):
    """Depthwise 'same' convolution written as a sum of shifted grids, zero for prefix tokens."""
    value = value.transpose(1, 2)
    batch, heads, _, head_dim = value.shape
    rows, columns = grid_size
    size = weight.shape[-1]
    grid = value[:, :, num_prefix_tokens:].transpose(-2, -1).reshape(batch, heads * head_dim, rows, columns)
    padded = F.pad(grid, (size // 2,) * 4)
    out = torch.zeros_like(grid)
    for a in range(size):
        for b in range(size):
            out += weight[:, 0, a, b].view(1, -1, 1, 1) * padded[:, :, a : a + rows, b : b + columns]
    out = out.reshape(batch, heads, head_dim, rows * columns).transpose(-2, -1)
    prefix = torch.zeros(batch, heads, num_prefix_tokens, head_dim)
    return torch.cat([prefix, out], dim=2).transpose(1, 2)


def explicit_sequence_conv(value, weight, num_prefix_tokens):
    size = weight.shape[-2]
    patches = value[:, num_prefix_tokens:]
    padded = F.pad(patches, (0, 0, 0, 0, size // 2, size // 2))
    out = sum(weight[:, 0, a, 0].view(1, 1, -1, 1) * padded[:, a : a + patches.shape[1]] for a in range(size))
    return F.pad(out, (0, 0, 0, 0, num_prefix_tokens, 0))


@pytest.mark.parametrize("normalization", ["kernel", "l2"])
@pytest.mark.parametrize("tokens", [1, 17, 65])
def test_linear_angular_equals_the_explicit_angular_kernel(normalization, tokens):
    query, key, value = random_qkv(tokens)
    fast = linear_angular_attention(query, key, value, normalization)
    assert torch.allclose(fast, explicit_linear_angular(query, key, value, normalization), atol=1e-5, rtol=0)


@pytest.mark.parametrize("queries, keys", [(64, 16), (16, 64), (1, 7)])
def test_linear_angular_over_pooled_keys_equals_the_explicit_kernel(queries, keys):
    # MViTv2 pools queries and keys apart: the normalisation must count the keys, not the queries.
    query, (key, value) = random_qkv(queries)[0], random_qkv(keys)[1:]
    fast = linear_angular_attention(query, key, value, "kernel")
    assert fast.shape == query.shape
    assert torch.allclose(fast, explicit_linear_angular(query, key, value, "kernel"), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="as many queries as keys"):
        linear_angular_attention(query, key, value, "l2")


def test_linear_angular_is_not_a_plain_average():
    # Guards the test above: with the similarity replaced by a constant the outputs must differ.
    query, key, value = random_qkv(33)
    fast = linear_angular_attention(query, key, value, "kernel")
    assert not torch.allclose(fast, value.mean(1, keepdim=True).expand_as(value), atol=1e-3)


def explicit_masked_linear_angular(query, key, value, allowed):
    """Σ_j m_ij Sim_lin(q_i, k_j) v_j / Σ_j m_ij Sim_lin(q_i, k_j) from the N×N kernel (token-major in and out)."""
    query, key, value = head_major(query, key, value)
    similarity = explicit_angular_similarity(query, key) * allowed
    return ((similarity @ value) / similarity.sum(-1, keepdim=True)).transpose(1, 2)


def padding_and_query_rows(tokens: int, padded: int, restricted: int, seed: int = 0) -> torch.Tensor:
    """A mask (batch, 1, N, N) as SigLIP2's padding (the last `padded` keys of the second image masked for every row)
    and EoMT's queries (the first `restricted` rows attend to a random subset of the patches) make them."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.ones(BATCH, 1, tokens, tokens, dtype=torch.bool)
    allowed[1, ..., tokens - padded :] = False
    allowed[:, :, :restricted, restricted:] = (
        torch.rand(BATCH, 1, restricted, tokens - restricted, generator=generator) > 0.5
    )
    return allowed


@pytest.mark.parametrize("padded, restricted", [(5, 0), (0, 3), (5, 3), (0, 0)])
def test_masked_linear_angular_equals_the_explicit_masked_kernel(padded, restricted):
    query, key, value = random_qkv(40)
    allowed = padding_and_query_rows(40, padded, restricted)
    fast = masked_linear_angular_attention(query, key, value, allowed)
    torch.testing.assert_close(fast, explicit_masked_linear_angular(query, key, value, allowed), atol=1e-5, rtol=0)
    if padded or restricted:  # guards the equality: the mask moves the output
        assert not torch.allclose(fast, linear_angular_attention(query, key, value), atol=1e-3)


def test_masked_linear_angular_gives_zero_to_a_row_with_no_key_and_passes_finite_gradients():
    query, key, value = (tensor.requires_grad_() for tensor in random_qkv(12))
    allowed = padding_and_query_rows(12, 2, 2)
    allowed[0, 0, 0] = False
    out = masked_linear_angular_attention(query, key, value, allowed, head_scale=torch.full((HEADS,), 0.5))
    assert torch.equal(out[0, 0], torch.zeros(HEADS, HEAD_DIM))
    out.sum().backward()
    assert all(torch.isfinite(tensor.grad).all() for tensor in (query, key, value))


@pytest.mark.parametrize("threshold, threshold_type, cutoff", [(0.03, "absolute", 0.03), (1.2, "relative", 1.2 / 40)])
def test_masked_softmax_equals_explicit_masked_probabilities(threshold, threshold_type, cutoff):
    query, key, value = random_qkv(40)
    q, k, v = head_major(query, key, value)
    probabilities = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM), dim=-1)
    mask = probabilities > cutoff
    assert 0 < mask.float().mean() < 1  # the threshold really masks something
    expected = ((probabilities * mask) @ v).transpose(1, 2)
    attended, kept_share = masked_softmax_attention(
        query, key, value, threshold, threshold_type, measure_kept_share=True
    )
    assert torch.allclose(attended, expected, atol=1e-5, rtol=0)
    assert kept_share.item() == pytest.approx(mask.float().mean().item())
    assert masked_softmax_attention(query, key, value, threshold, threshold_type)[1] is None  # not measured
    dense, kept_share = masked_softmax_attention(query, key, value, None, measure_kept_share=True)
    assert torch.allclose(dense, (probabilities @ v).transpose(1, 2), atol=1e-5, rtol=0) and kept_share.item() == 1.0


def test_relative_threshold_keeps_a_share_of_a_near_uniform_softmax_at_any_token_count():
    for tokens in (65, 197, 1025, 4097):
        generator = torch.Generator().manual_seed(tokens)
        # Initialisation-like scores: q·kᵀ/√d spread by about 0.1 around a constant.
        query, key, value = (0.2 * torch.randn(1, tokens, 1, 16, generator=generator) for _ in range(3))
        _, relative = masked_softmax_attention(query, key, value, 1.0, "relative", measure_kept_share=True)
        _, absolute = masked_softmax_attention(query, key, value, 0.02, "absolute", measure_kept_share=True)
        assert 0.2 < relative.item() < 0.8
        assert absolute.item() == 0.0


def projected_heads(attention, hidden_states):
    qkv = attention.qkv_proj(hidden_states).view(*hidden_states.shape[:2], 3, HEADS, HEAD_DIM)
    return qkv.unbind(dim=2)


def merged(attention, per_head):
    return attention.o_proj(per_head.reshape(*per_head.shape[:2], -1))


@pytest.mark.parametrize("normalization", ["kernel", "l2"])
@pytest.mark.parametrize("residual_conv", ["spatial", "sequence"])
@pytest.mark.parametrize("num_prefix_tokens", [0, 1, 3])
def test_linear_mode_module_equals_explicit_computation(make_config, normalization, residual_conv, num_prefix_tokens):
    config = make_config(attention_mode="linear", angular_normalization=normalization, residual_conv=residual_conv)
    attention = CastlingViTAttention(config)
    with torch.no_grad():
        attention.residual_conv.weight.normal_()
        attention.linear_branch_scale.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    grid_size = (4, 6)
    hidden_states = torch.randn(BATCH, num_prefix_tokens + 24, config.hidden_size)

    query, key, value = projected_heads(attention, hidden_states)
    weight = attention.residual_conv.weight
    conv = (
        explicit_spatial_conv(value, weight, num_prefix_tokens, grid_size)
        if residual_conv == "spatial"
        else explicit_sequence_conv(value, weight, num_prefix_tokens)
    )
    scale = attention.linear_branch_scale.view(1, 1, -1, 1)
    expected = merged(attention, scale * (explicit_linear_angular(query, key, value, normalization) + conv))

    assert attention.softmax_branch is None
    output = attention(hidden_states, num_prefix_tokens, grid_size)
    assert torch.allclose(output, expected, atol=1e-5, rtol=0)
    if num_prefix_tokens:
        # Prefix tokens get no conv term: their rows of the module's output are the conv-free computation's, and
        # only theirs.
        no_conv = merged(attention, scale * explicit_linear_angular(query, key, value, normalization))
        assert torch.allclose(output[:, :num_prefix_tokens], no_conv[:, :num_prefix_tokens], atol=1e-5, rtol=0)
        assert not torch.allclose(output[:, num_prefix_tokens:], no_conv[:, num_prefix_tokens:], atol=1e-3)


def test_castling_mode_with_dense_softmax_equals_explicit_sum(make_config):
    config = make_config(softmax_mask_threshold=None)
    attention = CastlingViTAttention(config)
    hidden_states = torch.randn(BATCH, 1 + 64, config.hidden_size)
    query, key, value = projected_heads(attention, hidden_states)
    q, k, v = head_major(query, key, value)
    softmax = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM), dim=-1) @ v).transpose(1, 2)
    conv = explicit_spatial_conv(value, attention.residual_conv.weight, 1, (8, 8))
    expected = merged(attention, explicit_linear_angular(query, key, value, "kernel") + conv + softmax)

    assert attention.softmax_branch.softmax_mask_scale.item() == 1.0
    assert torch.allclose(attention(hidden_states, 1, (8, 8)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_convex_blend_weighs_the_linear_term_by_one_minus_alpha_and_trains_gamma_only_after(make_config, alpha):
    config = make_config(softmax_mask_threshold=None, linear_branch_blend="convex")
    attention = CastlingViTAttention(config)
    with torch.no_grad():
        attention.linear_branch_scale.uniform_(0.5, 1.5)
    attention.softmax_branch.set_scale(alpha)
    hidden_states = torch.randn(BATCH, 1 + 64, config.hidden_size)
    query, key, value = projected_heads(attention, hidden_states)
    q, k, v = head_major(query, key, value)
    softmax = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM), dim=-1) @ v).transpose(1, 2)
    gamma = attention.linear_branch_scale.detach().view(1, 1, -1, 1)
    linear = explicit_linear_angular(query, key, value, "kernel") * gamma
    linear = linear + explicit_spatial_conv(
        value, attention.residual_conv.weight * gamma.view(-1).repeat_interleave(HEAD_DIM).view(-1, 1, 1, 1), 1, (8, 8)
    )
    expected = merged(attention, (1 - alpha) * linear + alpha * softmax)

    output = attention(hidden_states, 1, (8, 8))
    assert torch.allclose(output, expected, atol=1e-5, rtol=0)
    if alpha == 1.0:  # the branch alone: softmax attention, whatever γ is
        assert torch.allclose(output, merged(attention, softmax), atol=1e-5, rtol=0)
    output.sum().backward()
    # γ is held while the branch lives: in the graph (every parameter takes part in every backward pass, as DDP
    # without find_unused_parameters needs), with a gradient of exactly 0.
    assert torch.equal(attention.linear_branch_scale.grad, torch.zeros(config.num_attention_heads))
    attention.linear_branch_scale.grad = None
    attention.softmax_branch.set_scale(0.0)
    attention(hidden_states, 1, (8, 8)).sum().backward()
    assert attention.linear_branch_scale.grad.abs().sum() > 0  # and learns once it is gone


def test_the_host_knows_whether_alpha_is_zero_after_every_way_of_setting_it(make_config, tmp_path):
    model = CastlingViTForImageClassification(make_config())
    branches = [layer.attention.softmax_branch for layer in model.castling_vit.encoder.layers]
    assert all(branch.active for branch in branches)
    model.set_softmax_mask_scale(0.0)
    assert not any(branch.active for branch in branches)
    model.save_pretrained(tmp_path)  # a checkpoint from the end of the decay
    reloaded = CastlingViTForImageClassification.from_pretrained(tmp_path)
    assert [layer.attention.softmax_branch.active for layer in reloaded.castling_vit.encoder.layers] == [False] * 2
    model.set_softmax_mask_scale(0.5)
    reloaded.load_state_dict(model.state_dict())
    assert all(layer.attention.softmax_branch.active for layer in reloaded.castling_vit.encoder.layers)

    # Writes that bypass the model's own paths: in place, and the buffer replaced (as accelerate loads big models).
    branch = branches[0]
    branch.softmax_mask_scale.fill_(0.0)
    assert not branch.active
    branch.softmax_mask_scale.copy_(torch.tensor(0.25))
    assert branch.active
    set_module_tensor_to_device(branch, "softmax_mask_scale", "cpu", value=torch.tensor(0.0))
    assert not branch.active
    set_module_tensor_to_device(branch, "softmax_mask_scale", "cpu", value=torch.tensor(0.5))
    assert branch.active
    # And what the layers compute follows: α written in place to 0 gives the linear form.
    pixel_values = torch.randn(2, 3, 32, 32)
    linear = CastlingViTForImageClassification(make_config(attention_mode="linear"))
    linear.load_state_dict(model.state_dict(), strict=False)
    for branch in branches:
        branch.softmax_mask_scale.mul_(0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, linear(pixel_values).logits, rtol=0, atol=0)


@pytest.mark.parametrize("zeroed", [0, 1])  # the query or the key third of the fused projection
@pytest.mark.parametrize("mode", ["castling", "linear"])
def test_all_zero_query_or_key_gives_finite_output(make_config, zeroed, mode):
    query, key, value = random_qkv(9)
    zero = torch.zeros_like(query)
    for normalization in ("kernel", "l2"):
        assert torch.isfinite(linear_angular_attention(zero, key, value, normalization)).all()
        assert torch.isfinite(linear_angular_attention(query, zero, value, normalization)).all()

    model = CastlingViTForImageClassification(make_config(attention_mode=mode)).eval()
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.castling_vit.encoder.layers:
            layer.attention.qkv_proj.weight[zeroed * hidden : (zeroed + 1) * hidden] = 0.0
            layer.attention.qkv_proj.bias[zeroed * hidden : (zeroed + 1) * hidden] = 0.0
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32)).logits).all()


@pytest.mark.parametrize("normalization", ["kernel", "l2"])
def test_float64_input_is_computed_in_float64(normalization):
    query, key, value = (tensor.double() for tensor in random_qkv(33))
    fast = linear_angular_attention(query, key, value, normalization)
    assert fast.dtype == torch.float64
    # fp32 arithmetic would leave errors near 1e-7; fp64 leaves them near 1e-16.
    assert (fast - explicit_linear_angular(query, key, value, normalization)).abs().max() < 1e-12


@pytest.mark.parametrize("mode", ["castling", "linear"])
def test_attention_module_passes_gradcheck_in_float64(make_config, mode):
    # The whole module, default configuration (relative τ = 1.3, spatial conv, γ = 1, α = 1): any path computed in
    # fp32 would leave the numerical and analytical Jacobians ~1e-2 apart.
    attention = CastlingViTAttention(make_config(attention_mode=mode)).double()
    hidden_states = torch.randn(1, 1 + 9, attention.qkv_proj.in_features, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: attention(x, 1, (3, 3)), (hidden_states,))
    if mode == "castling":
        branch = attention.softmax_branch
        branch.measure_kept_share = True
        attention(hidden_states, 1, (3, 3))
        assert 0 < branch.kept_share.item() < 1  # the mask kept some probabilities and dropped others


def test_a_branch_at_alpha_zero_does_no_work_and_changes_nothing(make_config):
    castling = CastlingViTForImageClassification(make_config())
    linear = CastlingViTForImageClassification(make_config(attention_mode="linear"))
    linear.load_state_dict(castling.state_dict(), strict=False)  # the same weights, without the branch's α
    castling.set_softmax_mask_scale(0.0)
    castling.measure_softmax_mask_kept_shares()
    pixel_values = torch.randn(2, 3, 32, 32)
    outputs = {}
    for name, model in (("castling", castling), ("linear", linear)):
        logits = model(pixel_values).logits
        (logits * torch.arange(logits.numel()).view_as(logits)).sum().backward()
        outputs[name] = (logits, {n: p.grad for n, p in model.named_parameters()})
    assert torch.equal(outputs["castling"][0], outputs["linear"][0])
    assert outputs["castling"][1].keys() == outputs["linear"][1].keys()
    assert all(torch.equal(outputs["castling"][1][n], outputs["linear"][1][n]) for n in outputs["linear"][1])
    # No N×N work: not one operation more than the linear form, and nothing measured.
    assert counted_flops(castling, 64) == counted_flops(linear, 64)
    assert castling.softmax_mask_kept_shares() == {}
    castling.set_softmax_mask_scale(0.5)
    assert counted_flops(castling, 64) > counted_flops(linear, 64)


@pytest.mark.parametrize("mode", ["castling", "linear"])
def test_fp32_and_bf16_autocast_give_finite_close_outputs(make_config, mode):
    model = CastlingViTForImageClassification(make_config(attention_mode=mode)).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fp32 = model(pixel_values).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(pixel_values).logits
    assert bf16.dtype == torch.bfloat16
    assert torch.isfinite(fp32).all() and torch.isfinite(bf16).all()
    assert torch.allclose(bf16.float(), fp32, atol=0.1)


def counted_flops(model, image_size):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size), interpolate_pos_encoding=True)
    return counter.get_total_flops()


def test_linear_mode_flops_grow_linearly_in_tokens(make_config):
    model = CastlingViTForImageClassification(make_config(attention_mode="linear")).eval()
    ratio = counted_flops(model, 128) / counted_flops(model, 64)  # 4× the patch tokens (256 → 1024)
    assert ratio <= 4.4
    # Guard: the masked softmax branch (explicit matmuls, which the counter sees) is quadratic.
    castling = CastlingViTForImageClassification(make_config()).eval()
    assert counted_flops(castling, 128) / counted_flops(castling, 64) > 4.4
