"""Castling-MViTv2: the pooled attention, castled; the models, the backbone under transformers' UperNet, the switch,
and checkpoints that load with their own code."""

import math

import pytest
import torch
from conftest import run_without_castling_hf
from huggingface_hub.errors import StrictDataclassClassValidationError
from model_checks import assert_builds_on_the_meta_device, assert_exports_with_a_dynamic_batch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoBackbone, AutoModelForSemanticSegmentation, UperNetConfig, UperNetForSemanticSegmentation

from castling_hf import (
    CastlingMViTv2Backbone,
    CastlingMViTv2Config,
    CastlingMViTv2ForImageClassification,
    CastlingMViTv2Model,
)
from castling_hf.models.castling_mvitv2.modeling_castling_mvitv2 import (
    CastlingMViTv2Attention,
    relative_distances,
    relative_position_bias,
    resampled_to_grid,
)


def nano(**overrides) -> CastlingMViTv2Config:
    torch.manual_seed(0)
    return CastlingMViTv2Config.from_size("nano", **{"image_size": 64, "num_labels": 3, **overrides})


def images(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(angular_normalization="l2"), "must normalise by the kernel"),
        (dict(residual_conv="sequence"), "spatial"),
        (dict(depths=(1, 1, 1)), "one entry per stage"),
        (dict(hidden_sizes=(16, 31, 64, 128)), "Stage 2: `hidden_sizes` 31 must be a positive multiple"),
        (dict(classifier_pooling="cls"), "needs `use_cls_token=True`"),
    ],
)
def test_invalid_configs_say_what_was_expected(fields, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        nano(**fields)


def test_the_stages_halve_the_grid_and_the_backbone_gives_maps_at_strides_4_to_32():
    stages = ["stem", "stage1", "stage2", "stage3", "stage4"]
    backbone = CastlingMViTv2Backbone(nano(out_features=stages)).eval()
    maps = backbone(pixel_values=images(128)).feature_maps
    assert [tuple(feature.shape[1:]) for feature in maps] == [
        (20, 32, 32),
        (20, 32, 32),
        (40, 16, 16),
        (80, 8, 8),
        (160, 4, 4),
    ]
    assert backbone.channels == [20, 20, 40, 80, 160]
    early = CastlingMViTv2Backbone(nano(out_features=["stage2"]))
    assert len(early.encoder.stages) == 2  # the stages after its last map are not built


def test_non_square_images_give_each_axis_of_the_relative_bias_its_own_table_length():
    # A model made for 64 × 128 px: its first block's grid is 16 × 32 patches, its keys pooled by 4 to 4 × 8.
    model = CastlingMViTv2ForImageClassification(nano(image_size=(64, 128), softmax_mask_threshold=None)).eval()
    attention = model.castling_mvitv2.encoder.stages[0].layers[0].attention
    branch = attention.softmax_branch
    assert branch.relative_position_rows.shape[0] == 2 * 16 - 1  # 2·max(query side, key side) − 1 per axis
    assert branch.relative_position_columns.shape[0] == 2 * 32 - 1
    # At the size it was made for, each table is read as it is, not resampled.
    query = torch.randn(1, attention.num_heads, 16 * 32, attention.head_dim)
    torch.testing.assert_close(
        branch.relative_position_bias(query, (16, 32), (4, 8), 0),
        relative_position_bias(
            query, (16, 32), (4, 8), branch.relative_position_rows, branch.relative_position_columns, 0
        ),
        rtol=0,
        atol=0,
    )
    for height, width in ((64, 128), (128, 64), (96, 160)):  # its own size, transposed, and larger on both axes
        with torch.no_grad():
            logits = model(pixel_values=torch.randn(1, 3, height, width)).logits
        assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_output_hidden_states_selects_stages_by_index_on_the_model_and_the_backbone():
    model = CastlingMViTv2Model(nano()).eval()
    backbone = CastlingMViTv2Backbone(nano(out_features=["stage2"])).eval()
    with torch.no_grad():
        every = model(pixel_values=images(), output_hidden_states=True).hidden_states
        chosen = model(pixel_values=images(), output_hidden_states=[1, -1]).hidden_states
        in_backbone = backbone(pixel_values=images(), output_hidden_states=[0]).hidden_states
    assert len(every) == len(chosen) == 5 and [state is None for state in chosen] == [True, False, True, True, False]
    torch.testing.assert_close(chosen[1], every[1])
    torch.testing.assert_close(chosen[4], every[4])
    assert len(in_backbone) == 3 and in_backbone[1:] == (None, None)  # the backbone stops after stage 2
    torch.testing.assert_close(in_backbone[0], every[0])


def test_a_spent_branch_computes_what_the_linear_form_computes_and_does_no_more_work():
    castling = CastlingMViTv2ForImageClassification(nano()).eval()
    linear = CastlingMViTv2ForImageClassification(nano(attention_mode="linear")).eval()
    linear.load_state_dict(castling.state_dict(), strict=False)
    castling.set_softmax_mask_scale(0.0)
    with torch.no_grad():
        torch.testing.assert_close(castling(pixel_values=images()).logits, linear(pixel_values=images()).logits)
    assert flops(castling, 64) == flops(linear, 64)
    castling.set_softmax_mask_scale(0.5)
    assert flops(castling, 64) > flops(linear, 64)


def flops(model, size: int) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=images(size, batch=1))
    return counter.get_total_flops()


def test_the_linear_form_grows_linearly_in_the_tokens_where_the_softmax_form_does_not():
    linear = CastlingMViTv2ForImageClassification(nano(attention_mode="linear")).eval()
    assert flops(linear, 256) / flops(linear, 128) <= 4.4  # 4× the tokens
    dense = CastlingMViTv2ForImageClassification(nano(softmax_mask_threshold=None)).eval()
    dense_ratio = flops(dense, 256) / flops(dense, 128)  # the softmax branch: Nq × Nk products
    assert dense_ratio > flops(linear, 256) / flops(linear, 128) + 0.5


def test_the_castling_attention_passes_gradcheck_in_float64_with_its_relative_bias():
    config = nano(softmax_mask_threshold=None)
    attention = CastlingMViTv2Attention(config, 16, 16, 2, (8, 8), (2, 2), (2, 2)).double()
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.normal_(0, 0.3)
    attention.softmax_branch.set_scale(0.6)  # both terms and the bias reach the output
    hidden_states = torch.randn(1, 64, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: attention(x, (8, 8))[0], (hidden_states,), fast_mode=True)


def test_relative_distances_index_the_table_as_mvitv2_does():
    # Queries on a 4-grid against keys on a 2-grid: positions scaled to the finer grid, smallest distance 0.
    assert relative_distances(4, 2, torch.device("cpu")).tolist() == [[2, 0], [3, 1], [4, 2], [5, 3]]
    assert relative_distances(2, 2, torch.device("cpu")).tolist() == [[1, 0], [2, 1]]


def test_the_residual_conv_term_is_brought_to_the_query_grid():
    tokens = torch.arange(4.0).view(1, 4, 1, 1)  # a 2 × 2 grid, one channel
    up = resampled_to_grid(tokens, (2, 2), (4, 4))
    assert up.shape == (1, 16, 1, 1) and up[0, 0, 0, 0] == 0 and up[0, -1, 0, 0] == 3
    down = resampled_to_grid(tokens, (2, 2), (1, 1))
    assert down.flatten().tolist() == [1.5]  # the mean: area
    assert resampled_to_grid(tokens, (2, 2), (2, 2)) is tokens


def test_upernet_trains_a_step_on_the_backbone_and_reloads_in_the_linear_form(tmp_path):
    backbone = nano(out_features=["stage1", "stage2", "stage3", "stage4"])
    model = UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=3, auxiliary_in_channels=80)
    )
    labels = torch.randint(0, 3, (2, 64, 64))
    loss = model(pixel_values=images(), labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.embeddings.projection.weight.grad.abs().sum() > 0
    model.backbone.set_softmax_mask_scale(0.0)
    model.backbone.switch_to_inference()
    model.config.backbone_config.attention_mode = "linear"
    model.save_pretrained(tmp_path)
    assert not [key for key in load_file(tmp_path / "model.safetensors") if "softmax" in key]
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.backbone, CastlingMViTv2Backbone)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=images()).logits, model.eval()(pixel_values=images()).logits)


def test_backbone_reloads_through_auto_backbone_config(tmp_path):
    config = nano(out_features=["stage2", "stage4"])
    backbone = AutoBackbone.from_config(config).eval()
    assert isinstance(backbone, CastlingMViTv2Backbone)
    backbone.save_pretrained(tmp_path)
    # AutoBackbone.from_pretrained asks the Hub whether a local folder is a repository (transformers 5.24): the
    # folder's config goes through AutoBackbone.from_config, its weights through the class.
    reloaded = type(AutoBackbone.from_config(CastlingMViTv2Config.from_pretrained(tmp_path)))
    reloaded = reloaded.from_pretrained(tmp_path).eval()
    assert reloaded.out_features == ["stage2", "stage4"]
    with torch.no_grad():
        for got, expected in zip(
            reloaded(pixel_values=images()).feature_maps, backbone(pixel_values=images()).feature_maps, strict=True
        ):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


REMOTE = """
import sys, torch, transformers
directory, expected_file = sys.argv[1:]
model = transformers.AutoModelForImageClassification.from_pretrained(directory, trust_remote_code=True).eval()
assert not type(model).__module__.startswith("castling_hf"), type(model).__module__
inputs, expected = torch.load(expected_file)
with torch.no_grad():
    print(type(model).__name__, model.config.attention_mode, torch.equal(model(pixel_values=inputs).logits, expected))
"""


def test_an_inference_checkpoint_loads_with_its_own_code_where_castling_hf_is_not_installed(tmp_path):
    model = CastlingMViTv2ForImageClassification(nano())
    model.set_softmax_mask_scale(0.0)
    model.save_pretrained(tmp_path / "checkpoint", inference=True)
    inputs = images()
    with torch.no_grad():
        torch.save((inputs, model.eval()(pixel_values=inputs).logits), tmp_path / "expected.pt")
    line = run_without_castling_hf(REMOTE, [tmp_path / "checkpoint", tmp_path / "expected.pt"], tmp_path)
    assert line == "CastlingMViTv2ForImageClassification linear True"


def test_the_base_model_pools_the_mean_patch_token_or_cls():
    with torch.no_grad():
        for pooling, cls in (("mean", False), ("cls", True)):
            model = CastlingMViTv2Model(nano(classifier_pooling=pooling, use_cls_token=cls)).eval()
            output = model(pixel_values=images(), output_hidden_states=True)
            expected = output.last_hidden_state[:, 0] if cls else output.last_hidden_state.mean(1)
            torch.testing.assert_close(output.pooler_output, expected)
            assert len(output.hidden_states) == 5 and output.hidden_states[-1].shape[1] == 4 + int(cls)
    assert math.isclose(nano().mlp_ratio, 4.0)


MVITV2_CLASSES = [CastlingMViTv2Model, CastlingMViTv2ForImageClassification, CastlingMViTv2Backbone]


@pytest.mark.parametrize("model_class", MVITV2_CLASSES)
def test_every_class_builds_on_the_meta_device(model_class):
    assert_builds_on_the_meta_device(model_class, nano(drop_path_rate=0.1), images())


@pytest.mark.parametrize("mode", ["castling", "linear"])
@pytest.mark.parametrize("model_class", MVITV2_CLASSES)
def test_every_class_exports_with_a_dynamic_batch_size(model_class, mode):
    assert_exports_with_a_dynamic_batch(model_class(nano(attention_mode=mode)), images(batch=2))
