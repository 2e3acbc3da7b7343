"""CastlingViTBackbone: feature maps per stage, AutoBackbone, and transformers' own task heads on top of it."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors import safe_open
from transformers import (
    AutoBackbone,
    AutoModelForSemanticSegmentation,
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DPTConfig,
    DPTForDepthEstimation,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    RTDetrConfig,
    RTDetrForObjectDetection,
    TrainerState,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from castling_hf import (
    CastlingMaskDecayCallback,
    CastlingViTBackbone,
    CastlingViTModel,
    set_softmax_mask_scale,
    softmax_mask_scale,
    softmax_mask_scales,
    switch_to_inference,
)


@pytest.mark.parametrize(
    "selection, expected_stages",
    [
        ({}, ["stage2"]),
        ({"out_indices": [0, 1, 2]}, ["stem", "stage1", "stage2"]),
        ({"out_features": ["stage1"]}, ["stage1"]),
    ],
)
@pytest.mark.parametrize("reshape", [True, False])
def test_feature_maps_are_the_chosen_stages_on_the_patch_grid(make_config, selection, expected_stages, reshape):
    backbone = CastlingViTBackbone(make_config(reshape_hidden_states=reshape, **selection)).eval()
    assert backbone.out_features == expected_stages and backbone.channels == [64] * len(expected_stages)
    with torch.no_grad():
        output = backbone(torch.randn(2, 3, 32, 48), output_hidden_states=True)  # an 8×12 grid
    expected_shape = (2, 64, 8, 12) if reshape else (2, 1 + 8 * 12, 64)
    assert [tuple(feature.shape) for feature in output.feature_maps] == [expected_shape] * len(expected_stages)
    assert len(output.hidden_states) == 1 + backbone.config.num_hidden_layers


def test_the_last_stage_is_the_encoders_output_on_the_grid(make_config):
    backbone = CastlingViTBackbone(make_config()).eval()
    encoder = CastlingViTModel(backbone.config, add_pooling_layer=False).eval()
    encoder.load_state_dict(backbone.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        (feature_map,) = backbone(pixels).feature_maps
        tokens = encoder(pixels).last_hidden_state
    torch.testing.assert_close(feature_map, tokens[:, 1:].transpose(1, 2).reshape(2, 64, 8, 8), rtol=0, atol=0)


def test_batch_members_do_not_affect_each_other(make_config):
    backbone = CastlingViTBackbone(make_config(out_indices=[1, 2])).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        together = backbone(pixels).feature_maps
        for index in range(3):
            for joint, alone in zip(together, backbone(pixels[index : index + 1]).feature_maps, strict=True):
                torch.testing.assert_close(joint[index : index + 1], alone, atol=1e-5, rtol=1e-5)


def test_auto_backbone_builds_it_from_the_config(make_config):
    backbone = AutoBackbone.from_config(make_config(out_indices=[1, 2]))
    assert isinstance(backbone, CastlingViTBackbone) and backbone.out_indices == [1, 2]


def upernet(make_config, **overrides) -> UperNetForSemanticSegmentation:
    backbone_config = make_config(num_hidden_layers=4, out_indices=[1, 2, 3, 4], **overrides)
    config = UperNetConfig(
        backbone_config=backbone_config, hidden_size=32, auxiliary_in_channels=64, auxiliary_channels=16, num_labels=3
    )
    return UperNetForSemanticSegmentation(config)


def test_upernet_trains_on_it_and_reloads_through_its_auto_class(make_config, tmp_path):
    model = upernet(make_config).train()
    pixels, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    output = model(pixel_values=pixels, labels=labels)
    assert output.logits.shape == (2, 3, 32, 32)
    output.loss.backward()
    gradients = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None for g in gradients) and any(g.abs().sum() > 0 for g in gradients)

    model.eval().save_pretrained(tmp_path)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.backbone, CastlingViTBackbone)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, model(pixels).logits, rtol=0, atol=0)


def test_the_decay_and_the_switch_reach_a_castling_backbone_inside_upernet(make_config, tmp_path):
    model = upernet(make_config).eval()
    callback = CastlingMaskDecayCallback(start=0, end=10)
    callback.on_train_begin(None, TrainerState(global_step=4), None, model=model)
    midway = torch.tensor(softmax_mask_scale(4, None, start=0, end=10)).item()  # as the float32 buffer holds it
    assert len(softmax_mask_scales(model)) == 4 and set(softmax_mask_scales(model).values()) == {midway}
    callback.on_step_end(None, TrainerState(global_step=10), None, model=model)
    assert set(softmax_mask_scales(model).values()) == {0.0}
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(pixels).logits
    assert switch_to_inference(model) is model and softmax_mask_scales(model) == {}
    assert model.config.backbone_config.attention_mode == model.backbone.config.attention_mode == "linear"
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, before, rtol=0, atol=0)  # α = 0: dropping the branch

    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if "softmax" in name]
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert reloaded.backbone.config.attention_mode == "linear" and softmax_mask_scales(reloaded) == {}
    with torch.no_grad():
        # The same weights, loaded: in one thread UperNet's reloaded convolutions round differently (≤ 4e-9).
        torch.testing.assert_close(reloaded(pixels).logits, before, rtol=0, atol=1e-7)


def test_the_switch_refuses_while_the_branch_still_counts(make_config):
    model = upernet(make_config)
    set_softmax_mask_scale(model, 0.5)
    with pytest.raises(ValueError, match=r"α = 0.5 \(4 of 4 layers"):
        switch_to_inference(model)
    with pytest.raises(ValueError, match="must lie in"):
        set_softmax_mask_scale(model, 1.5)


@pytest.mark.parametrize(
    "fields, input_size, expected",
    [
        # nano's 4×4 patches, a 16×8 grid: strides 4, 8, 16, 32 px are the grid, ½, ¼ and ⅛ of it
        ({}, (64, 32), [(16, 8), (8, 4), (4, 2), (2, 1)]),
        # 16×16 patches, a 4×8 grid: 4×, 2×, 1×, ½× the grid, as ViTDet
        ({"patch_size": 16, "image_size": 64}, (64, 128), [(16, 32), (8, 16), (4, 8), (2, 4)]),
        ({"simple_feature_pyramid_strides": [1, 2, 4, 8]}, (64, 32), [(64, 32), (32, 16), (16, 8), (8, 4)]),
    ],
)
def test_the_simple_feature_pyramid_gives_maps_at_its_output_strides(make_config, fields, input_size, expected):
    config = make_config(num_hidden_layers=4, out_indices=[1, 2, 3, 4], simple_feature_pyramid=True, **fields)
    backbone = CastlingViTBackbone(config).eval()
    with torch.no_grad():
        feature_maps = backbone(torch.randn(2, 3, *input_size)).feature_maps
    assert [tuple(f.shape[-2:]) for f in feature_maps] == expected
    assert {f.shape[1] for f in feature_maps} == {64}


def test_upernet_trains_on_the_pyramid(make_config):
    model = upernet(make_config, simple_feature_pyramid=True).train()
    model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.randint(0, 3, (2, 32, 32))).loss.backward()


def test_pyramid_strides_that_are_not_the_patch_times_a_power_of_two_are_refused(make_config):
    with pytest.raises(StrictDataclassClassValidationError, match=r"patch size 4 times or divided by a power of two"):
        make_config(
            num_hidden_layers=4,
            out_indices=[1, 2, 3, 4],
            simple_feature_pyramid=True,
            simple_feature_pyramid_strides=[4, 8, 12, 32],
        )


@pytest.mark.parametrize(
    "fields", [{"out_indices": [2, 3, 4]}, {"out_indices": [1, 2, 3, 4], "reshape_hidden_states": False}]
)
def test_the_pyramid_refuses_anything_but_four_maps_on_the_grid(make_config, fields):
    with pytest.raises(StrictDataclassClassValidationError, match="needs four `out_features`"):
        make_config(num_hidden_layers=4, simple_feature_pyramid=True, **fields)


def backbone_config(make_config, **fields):
    return make_config(num_hidden_layers=4, **fields)


BOXES = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2


def mask2former(make_config):
    config = Mask2FormerConfig(
        backbone_config=backbone_config(make_config, out_indices=[1, 2, 3, 4], simple_feature_pyramid=True),
        **dict(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64, dim_feedforward=64),
        **dict(num_queries=5, decoder_layers=2, encoder_layers=1, num_attention_heads=4, num_labels=3),
    )
    masks = [torch.randint(0, 2, (2, 64, 64)).float()] * 2
    return Mask2FormerForUniversalSegmentation(config), dict(mask_labels=masks, class_labels=[torch.tensor([0, 1])] * 2)


def deformable_detr(make_config):
    config = DeformableDetrConfig(
        backbone_config=backbone_config(make_config, out_indices=[2, 3, 4]),
        **dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5),
        **dict(num_feature_levels=3, encoder_attention_heads=4, decoder_attention_heads=4, num_labels=3),
    )
    return DeformableDetrForObjectDetection(config), dict(labels=BOXES)


def rt_detr(make_config):
    # RT-DETR's hybrid encoder steps by true 2× scales: the simple feature pyramid's four maps.
    config = RTDetrConfig(
        backbone_config=backbone_config(make_config, out_indices=[1, 2, 3, 4], simple_feature_pyramid=True),
        **dict(encoder_in_channels=[64] * 4, feat_strides=[4, 8, 16, 32], num_feature_levels=4, encode_proj_layers=[3]),
        **dict(decoder_in_channels=[32] * 4, encoder_hidden_dim=32, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64),
        **dict(num_queries=5, decoder_layers=2, num_labels=3, encoder_attention_heads=4, decoder_attention_heads=4),
    )
    return RTDetrForObjectDetection(config), dict(labels=BOXES)


@pytest.mark.parametrize("build", [mask2former, deformable_detr, rt_detr])
def test_transformers_task_heads_train_on_it(make_config, build):
    model, targets = build(make_config)
    loss = model(pixel_values=torch.randn(2, 3, 64, 64), **targets).loss
    assert torch.isfinite(loss)
    loss.backward()
    backbone = next(module for module in model.modules() if isinstance(module, CastlingViTBackbone))
    assert backbone.encoder.layers[0].attention.qkv_proj.weight.grad.abs().sum() > 0


def test_mask2former_fits_a_batch_while_alpha_decays_to_zero(make_config):
    # The paper's segmentation head: a few optimiser steps with the mask decay lower its loss on a fixed batch.
    model, _ = mask2former(make_config)
    model.train()
    left = torch.zeros(64, 64)
    left[:, :32] = 1
    targets = dict(mask_labels=[torch.stack([left, 1 - left])] * 2, class_labels=[torch.tensor([0, 1])] * 2)
    pixels = torch.randn(2, 3, 64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    callback, losses = CastlingMaskDecayCallback(start=0, end=8), []
    for step in range(10):
        callback.on_step_begin(None, TrainerState(global_step=step), None, model=model)
        loss = model(pixel_values=pixels, **targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert set(softmax_mask_scales(model).values()) == {0.0}
    assert losses[-1] < 0.8 * losses[0], losses


def test_dpt_estimates_depth_from_its_token_sequences(make_config):
    # DPT reassembles the token sequences itself: feature maps without the reshape, [CLS] included.
    config = DPTConfig(
        backbone_config=backbone_config(make_config, out_indices=[1, 2, 3, 4], reshape_hidden_states=False),
        **dict(hidden_size=64, patch_size=4, image_size=32, neck_hidden_sizes=[16, 32, 64, 64]),
        **dict(fusion_hidden_size=32, reassemble_factors=[4, 2, 1, 0.5]),
    )
    model = DPTForDepthEstimation(config)
    depth = model(pixel_values=torch.randn(2, 3, 32, 32)).predicted_depth
    assert depth.shape[0] == 2 and torch.isfinite(depth).all()
    depth.mean().backward()
    assert model.backbone.encoder.layers[0].attention.qkv_proj.weight.grad.abs().sum() > 0
