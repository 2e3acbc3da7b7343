import json

import pytest
import torch
import torch.nn.functional as F
from model_checks import assert_builds_on_the_meta_device, assert_exports_with_a_dynamic_batch
from safetensors import safe_open
from transformers import AutoModel

from castling_hf import (
    CastlingViTBackbone,
    CastlingViTConfig,
    CastlingViTForImageClassification,
    CastlingViTForObjectDetection,
    CastlingViTModel,
)

MODEL_CLASSES = [CastlingViTModel, CastlingViTForImageClassification, CastlingViTForObjectDetection]


@pytest.fixture
def trained_like(make_config):
    """A castling-mode classifier whose softmax branch matters (dense, so nothing is masked at initialisation)."""
    return CastlingViTForImageClassification(make_config(softmax_mask_threshold=None)).eval()


def pixels(batch=2, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def saved_tensor_names(directory):
    with safe_open(directory / "model.safetensors", "pt") as weights:
        return set(weights.keys())


def build(model_class, make_config, **overrides):
    return model_class(make_config(**overrides)).eval()


def float_outputs(output) -> list[torch.Tensor]:
    """Every floating-point tensor of a model output (tuple or ModelOutput), nested tuples flattened, in order."""
    values = output.to_tuple() if hasattr(output, "to_tuple") else output
    flat = []
    for value in values:
        if isinstance(value, (tuple, list)):
            flat += float_outputs(value)
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
            flat.append(value)
    return flat


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_once_alpha_is_zero_the_switch_and_the_inference_checkpoint_change_nothing(model_class, make_config, tmp_path):
    model = build(model_class, make_config)
    with torch.no_grad():
        live = float_outputs(model(pixels()))
        model.set_softmax_mask_scale(0.0)
        expected = float_outputs(model(pixels()))
    assert not torch.allclose(live[0], expected[0], atol=1e-4)  # while α = 1 the branch counts

    model.save_pretrained(tmp_path, inference=True)
    assert not [name for name in saved_tensor_names(tmp_path) if "softmax" in name]
    assert json.loads((tmp_path / "config.json").read_text())["attention_mode"] == "linear"
    assert model.config.attention_mode == "castling" and model.softmax_mask_scales()  # the model in memory is as it was
    reloaded = model_class.from_pretrained(tmp_path).eval()
    assert reloaded.config.attention_mode == "linear" and not reloaded.softmax_mask_scales()

    assert model.switch_to_inference() is model
    assert model.config.attention_mode == "linear" and not model.softmax_mask_scales()
    with torch.no_grad():
        for form in (reloaded, model):
            assert all(torch.equal(a, b) for a, b in zip(float_outputs(form(pixels())), expected, strict=True))
    with pytest.raises(ValueError, match="has no Castling softmax branch"):
        model.set_softmax_mask_scale(0.5)


@pytest.mark.parametrize("mode", ["castling", "linear"])
@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_each_image_alone_gives_its_row_of_the_batch(model_class, mode, make_config):
    model = build(model_class, make_config, attention_mode=mode)
    batch = pixels(batch=3)
    with torch.no_grad():
        together = float_outputs(model(batch, output_hidden_states=True))
        for index in range(3):
            alone = float_outputs(model(batch[index : index + 1], output_hidden_states=True))
            for joint, single in zip(together, alone, strict=True):
                torch.testing.assert_close(joint[index : index + 1], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_tuple_and_dict_outputs_hold_the_same_tensors(model_class, make_config):
    model = build(model_class, make_config)
    labels = None
    if model_class is CastlingViTForImageClassification:
        labels = torch.tensor([0, 2])
    elif model_class is CastlingViTForObjectDetection:
        labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}] * 2
    for kwargs in ({}, {"output_hidden_states": True}, {"labels": labels} if labels is not None else {}):
        with torch.no_grad():
            as_dict = model(pixels(), **kwargs)
            as_tuple = model(pixels(), return_dict=False, **kwargs)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
        assert all(torch.equal(a, b) for a, b in zip(float_outputs(as_tuple), float_outputs(as_dict), strict=True))
    with torch.no_grad():
        hidden_states = model(pixels(), output_hidden_states=True).hidden_states
    assert len(hidden_states) == 1 + model.config.num_hidden_layers
    assert model(pixels()).hidden_states is None


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_init_weights_initialises_every_tensor(model_class, make_config):
    # What transformers' `test_can_init_all_missing_weights` guards: a tensor missing from a checkpoint gets its
    # value from `_init_weights`, not from whatever the module's constructor left. Poison every tensor, re-initialise.
    model = build(model_class, make_config)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan"))
    for module in model.modules():
        module._is_hf_initialized = False
    model.initialize_weights()
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.isnan().any()]
    assert not left


def test_inference_checkpoint_is_refused_while_alpha_is_not_zero(trained_like, tmp_path):
    trained_like.set_softmax_mask_scale(0.0)
    trained_like.castling_vit.encoder.layers[1].attention.softmax_branch.softmax_mask_scale.fill_(0.25)
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.attention\.softmax_branch.*α = 0\.25.*force=True"):
        trained_like.save_pretrained(tmp_path, inference=True)
    assert not list(tmp_path.iterdir())  # nothing half-written

    trained_like.save_pretrained(tmp_path, inference=True, force=True)
    assert json.loads((tmp_path / "config.json").read_text())["attention_mode"] == "linear"


def test_training_checkpoint_keeps_each_layers_alpha(trained_like, tmp_path):
    trained_like.set_softmax_mask_scale(0.3)
    trained_like.save_pretrained(tmp_path)
    assert sum("softmax_mask_scale" in name for name in saved_tensor_names(tmp_path)) == 2
    reloaded = CastlingViTForImageClassification.from_pretrained(tmp_path).eval()
    assert list(reloaded.softmax_mask_scales().values()) == pytest.approx([0.3, 0.3])
    with torch.no_grad():
        assert torch.equal(reloaded(pixels()).logits, trained_like(pixels()).logits)


def test_switch_with_live_branch_is_refused_unless_forced(trained_like):
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.softmax_branch.*α = 1"):
        trained_like.switch_to_inference()
    assert trained_like.config.attention_mode == "castling"
    trained_like.switch_to_inference(force=True)
    assert trained_like.config.attention_mode == "linear"


def test_alpha_outside_unit_interval_is_rejected(trained_like):
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got 1.5"):
        trained_like.set_softmax_mask_scale(1.5)


def test_other_input_resolution_with_interpolated_position_embeddings(make_config):
    model = CastlingViTModel(make_config()).eval()
    with torch.no_grad():
        output = model(pixels(size=48), interpolate_pos_encoding=True)
        wide = model(torch.randn(1, 3, 32, 64), interpolate_pos_encoding=True)
        same = model(pixels(), interpolate_pos_encoding=True).last_hidden_state
    assert output.last_hidden_state.shape == (2, 1 + 12 * 12, 64) and output.pooler_output.shape == (2, 64)
    assert wide.last_hidden_state.shape == (1, 1 + 8 * 16, 64)
    assert torch.equal(same, model(pixels()).last_hidden_state)  # no resize at the trained size
    with pytest.raises(ValueError, match=r"48×48 does not match the model's 32×32.*interpolate_pos_encoding=True"):
        model(pixels(size=48))


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.randn(2, 1, 32, 32), r"has 1 channels, but the model expects 3"),
        (torch.randn(3, 32, 32), r"4-D tensor.*got shape \(3, 32, 32\).*unsqueeze\(0\)"),
        (torch.randn(0, 3, 32, 32), r"empty batch"),
        (torch.randn(1, 3, 30, 32), r"not a multiple of the patch size 4×4"),
        (None, r"`pixel_values` is required"),
    ],
)
def test_bad_input_gets_a_clear_error(make_config, pixel_values, message):
    model = CastlingViTForImageClassification(make_config())
    with pytest.raises(ValueError, match=message):
        model(pixel_values)


@pytest.mark.parametrize(
    "problem_type, labels, reference",
    [
        ("single_label_classification", torch.tensor([0, 2]), lambda logits, y: F.cross_entropy(logits, y)),
        (
            "multi_label_classification",
            torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
            lambda logits, y: F.binary_cross_entropy_with_logits(logits, y),
        ),
    ],
)
def test_classification_losses_follow_problem_type(make_config, problem_type, labels, reference):
    model = CastlingViTForImageClassification(make_config(problem_type=problem_type))
    output = model(pixels(), labels=labels)
    assert torch.allclose(output.loss, reference(output.logits, labels))


def test_regression_loss(make_config):
    model = CastlingViTForImageClassification(make_config(num_labels=1, problem_type="regression"))
    targets = torch.tensor([0.5, -1.0])
    output = model(pixels(), labels=targets)
    assert output.logits.shape == (2, 1)
    assert torch.allclose(output.loss, F.mse_loss(output.logits.squeeze(-1), targets))


def test_gradient_checkpointing_gives_the_same_gradients(make_config):
    def gradients(checkpointing):
        model = CastlingViTForImageClassification(make_config(softmax_mask_threshold=None)).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model(pixels(), labels=torch.tensor([0, 1])).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    assert all(torch.allclose(plain[name], checkpointed[name], atol=1e-6) for name in plain)


def test_auto_model_loads_the_base_model(make_config, tmp_path):
    model = CastlingViTModel(make_config(attention_mode="linear")).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CastlingViTModel)
    with torch.no_grad():
        assert torch.equal(reloaded(pixels()).pooler_output, model(pixels()).pooler_output)


def branch_outputs(model):
    """Forward hooks that keep each layer's softmax-branch output, by layer index."""
    outputs = {}
    for index, layer in enumerate(model.encoder.layers):
        layer.attention.softmax_branch.register_forward_hook(
            lambda module, args, out, i=index: outputs.__setitem__(i, out)
        )
    return outputs


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_default_softmax_branch_is_alive_from_the_first_step_in_every_layer(size):
    torch.manual_seed(0)
    model = CastlingViTModel(CastlingViTConfig.from_size(size), add_pooling_layer=False)
    model.measure_softmax_mask_kept_shares()
    outputs = branch_outputs(model)
    for resolution in (224, 512):
        model(torch.randn(1, 3, resolution, resolution), interpolate_pos_encoding=True)
        shares = model.softmax_mask_kept_shares()
        assert len(shares) == model.config.num_hidden_layers and min(shares.values()) > 0.05, (resolution, shares)
        for index, layer in enumerate(model.encoder.layers):
            # The branch's own gradient, not one that reaches qkv_proj through later layers.
            (gradient,) = torch.autograd.grad(outputs[index].sum(), layer.attention.qkv_proj.weight, retain_graph=True)
            assert gradient.abs().sum() > 0, (resolution, index)


def test_the_earlier_defaults_left_the_branch_dead_at_initialisation():
    # The public snippet's absolute τ = 0.02 with ViT's N(0, 0.02²) weights: the softmax over 197 tokens is near
    # uniform (1/197 < 0.02), so no probability passes and the branch neither adds nor passes anything.
    torch.manual_seed(0)
    config = CastlingViTConfig.from_size(
        "tiny", softmax_mask_threshold=0.02, softmax_mask_threshold_type="absolute", weight_init="normal"
    )
    model = CastlingViTModel(config, add_pooling_layer=False)
    model.measure_softmax_mask_kept_shares()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert set(model.softmax_mask_kept_shares().values()) == {0.0}


def selection_outputs(model, selection):
    """`hidden_states` for `output_hidden_states=selection`, and for `True`."""
    with torch.no_grad():
        return model(pixels(), output_hidden_states=selection).hidden_states, model(
            pixels(), output_hidden_states=True
        ).hidden_states


@pytest.mark.parametrize("mode", ["castling", "linear"])
@pytest.mark.parametrize("model_class", [*MODEL_CLASSES, CastlingViTBackbone])
def test_output_hidden_states_selects_layers_by_index(model_class, mode, make_config):
    # transformers' `test_can_capture_specific_layers_hidden_states`: the selected ones, `None` for the others.
    model = build(model_class, make_config, attention_mode=mode, num_hidden_layers=3)
    selected, every = selection_outputs(model, [0, 2, -1])
    assert len(selected) == len(every) == 4
    assert [state is not None for state in selected] == [True, False, True, True]
    for index in (0, 2, 3):
        torch.testing.assert_close(selected[index], every[index])
    one, _ = selection_outputs(model, 1)
    assert [state is not None for state in one] == [False, True, False, False]
    none, _ = selection_outputs(model, False)
    assert none is None


@pytest.mark.parametrize("mode", ["castling", "linear"])
@pytest.mark.parametrize("model_class", [*MODEL_CLASSES, CastlingViTBackbone])
def test_output_attentions_is_refused_with_the_reason(model_class, mode, make_config):
    model = build(model_class, make_config, attention_mode=mode)
    with pytest.raises(ValueError, match="no attention maps to return.*never forms the tokens × tokens matrix"):
        model(pixels(), output_attentions=True)
    model.config.output_attentions = True
    with pytest.raises(ValueError, match="no attention maps to return"):
        model(pixels())


# Learned position embeddings, and DINOv3's layout: rotary embeddings (a buffer `_init_weights` must recompute),
# registers, LayerScale and stochastic depth.
LAYOUTS = {
    "learned": dict(drop_path_rate=0.1),
    "rope_registers": dict(
        position_embedding_type="rope", num_register_tokens=2, layerscale_value=0.5, drop_path_rate=0.1
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_class", [*MODEL_CLASSES, CastlingViTBackbone])
def test_every_class_builds_on_the_meta_device(model_class, layout, make_config):
    assert_builds_on_the_meta_device(model_class, make_config(**LAYOUTS[layout]), pixels())


@pytest.mark.parametrize("mode", ["castling", "linear"])
@pytest.mark.parametrize("model_class", [*MODEL_CLASSES, CastlingViTBackbone])
def test_every_class_exports_with_a_dynamic_batch_size(model_class, mode, make_config):
    assert_exports_with_a_dynamic_batch(model_class(make_config(attention_mode=mode)), pixels())
