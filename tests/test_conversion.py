import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, ViTModel

from castling_hf import (
    CastlingViTConfig,
    CastlingViTForImageClassification,
    CastlingViTModel,
    softmax_mask_scale,
)
from castling_hf.conversion import castling_key, from_vit

SOURCES = {
    "base": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
    "no_qkv_bias": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, qkv_bias=False),
    "wider_deeper": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, image_size=48, patch_size=8),
    "one_layer_rectangular": dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=(32, 48)),
}


def vit_config(**fields) -> ViTConfig:
    defaults = dict(intermediate_size=2 * fields.get("hidden_size", 32), image_size=32, patch_size=8, num_labels=5)
    return ViTConfig(**{**defaults, **fields})


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Weights far from their init, so that attention is sharply non-uniform and every tensor matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


def pixels_for(config, batch: int = 2) -> torch.Tensor:
    height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    return torch.randn(batch, config.num_channels, height, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("source_fields", SOURCES.values(), ids=SOURCES.keys())
def test_converted_classifier_logits_equal_the_source(source_fields):
    source = randomised(ViTForImageClassification(vit_config(**source_fields)))
    castled = from_vit(source)
    pixels = pixels_for(source.config)
    with torch.no_grad():
        expected, got = source(pixel_values=pixels).logits, castled(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert castled.config.id2label == source.config.id2label
    assert castled.config.qkv_bias == source.config.qkv_bias

    # The equality rests on γ = 0: the linear-angular term, once weighted, changes the logits.
    with torch.no_grad():
        for layer in castled.castling_vit.encoder.layers:
            layer.attention.linear_branch_scale.fill_(1.0)
        assert not torch.allclose(castled(pixel_values=pixels).logits, expected, atol=1e-2)


@pytest.mark.parametrize("with_pooler", [True, False])
def test_converted_encoder_mirrors_the_source_pooler(with_pooler):
    source = randomised(ViTModel(vit_config(**SOURCES["base"]), add_pooling_layer=with_pooler))
    castled = from_vit(source, CastlingViTModel)
    pixels = pixels_for(source.config)
    with torch.no_grad():
        expected, got = source(pixel_values=pixels), castled(pixel_values=pixels)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    if with_pooler:
        torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-4, rtol=1e-4)
    else:
        assert castled.pooler is None and got.pooler_output is None


def test_an_encoder_saved_without_pooler_converts_without_one(tmp_path):
    source = randomised(ViTModel(vit_config(**SOURCES["base"]), add_pooling_layer=False))
    source.save_pretrained(tmp_path)
    castled = from_vit(tmp_path, CastlingViTModel)
    assert castled.pooler is None
    pixels = pixels_for(source.config)
    with torch.no_grad():
        expected, got = source(pixel_values=pixels).last_hidden_state, castled(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_pooler_cannot_be_asked_of_a_source_without_one():
    source = ViTModel(vit_config(**SOURCES["base"]), add_pooling_layer=False)
    with pytest.raises(ValueError, match="source has no pooler"):
        from_vit(source, CastlingViTModel, add_pooling_layer=True)


def test_classifier_from_a_backbone_checkpoint_keeps_the_backbone_and_starts_the_head_fresh(tmp_path):
    source = randomised(ViTModel(vit_config(**SOURCES["base"])))
    source.save_pretrained(tmp_path)
    castled = from_vit(tmp_path, num_labels=7)
    pixels = pixels_for(source.config)
    with torch.no_grad():
        expected = source(pixel_values=pixels).last_hidden_state
        got = castled.castling_vit(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert castled(pixel_values=pixels).logits.shape == (2, 7)


def test_a_new_label_set_replaces_the_source_labels_and_starts_the_classifier_fresh():
    source = randomised(ViTForImageClassification(vit_config(**SOURCES["base"])))
    new_labels = {i: f"new {i}" for i in range(5)}  # as many labels as the source: only the names differ
    castled = from_vit(source, id2label=new_labels)
    assert castled.config.label2id == {f"new {i}": i for i in range(5)}
    assert not torch.equal(castled.classifier.weight, source.classifier.weight)
    torch.testing.assert_close(castled.castling_vit.embeddings.cls_token, source.vit.embeddings.cls_token)


def test_conversion_from_a_directory_saves_and_reloads_through_the_auto_classes(tmp_path):
    source = randomised(
        ViTForImageClassification(vit_config(**SOURCES["base"], id2label={i: f"class {i}" for i in range(5)}))
    )
    source.save_pretrained(tmp_path / "vit")
    castled = from_vit(tmp_path / "vit")
    castled.save_pretrained(tmp_path / "castled")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "castled").eval()
    assert isinstance(reloaded, CastlingViTForImageClassification)
    assert reloaded.config.linear_branch_scale_init == 0.0 and reloaded.config.softmax_mask_threshold is None
    assert reloaded.config.id2label[3] == "class 3"
    pixels = pixels_for(source.config)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values=pixels).logits, source(pixel_values=pixels).logits, atol=1e-4, rtol=1e-4
        )


def test_a_short_fine_tune_with_the_mask_decay_grows_gamma_and_ends_switchable():
    source = randomised(ViTForImageClassification(vit_config(**SOURCES["base"])))
    castled = from_vit(source)
    optimizer = torch.optim.AdamW(castled.parameters(), lr=1e-3)
    castled.train()
    generator = torch.Generator().manual_seed(2)
    steps = 8
    for step in range(steps):
        castled.set_softmax_mask_scale(softmax_mask_scale(step, steps, end=0.75))
        pixels = torch.randn(4, 3, 32, 32, generator=generator)
        castled(pixel_values=pixels, labels=torch.randint(0, 5, (4,), generator=generator)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    castled.set_softmax_mask_scale(softmax_mask_scale(steps, steps, end=0.75))
    castled.eval()
    assert all(layer.attention.linear_branch_scale.abs().max() > 0 for layer in castled.castling_vit.encoder.layers)
    assert set(castled.softmax_mask_scales().values()) == {0.0}
    castled.switch_to_inference()  # accepted: the decay has ended (the switch's exactness is tested per model class)


def test_a_source_that_is_not_a_vit_is_refused(tmp_path):
    castling = CastlingViTForImageClassification(CastlingViTConfig.from_size("nano", num_hidden_layers=1))
    with pytest.raises(TypeError, match="ViTModel or ViTForImageClassification.*got CastlingViTForImageClassification"):
        from_vit(castling)
    castling.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="model_type 'vit'.*'castling_vit'"):
        from_vit(tmp_path)


def test_a_checkpoint_whose_weights_do_not_match_its_config_is_refused_by_name(tmp_path):
    ViTForImageClassification(vit_config(**SOURCES["base"])).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")  # saved under the Hub's ViT names
    del weights["vit.encoder.layer.1.attention.attention.key.weight"]
    weights["vit.encoder.layer.2.intermediate.dense.weight"] = torch.zeros(64, 32)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as raised:
        from_vit(tmp_path)
    assert "layers.1.attention.k_proj.weight" in str(raised.value)
    assert "layer.2.intermediate.dense.weight" in str(raised.value) or "layers.2.mlp.fc1.weight" in str(raised.value)
    assert "nothing was converted" in str(raised.value).lower()


def test_a_model_whose_weights_do_not_match_its_config_is_refused_by_name():
    source = ViTForImageClassification(vit_config(**SOURCES["base"]))
    source.vit.layers[0].mlp.fc1 = torch.nn.Linear(32, 80)
    with pytest.raises(
        ValueError, match=r"castling_vit\.encoder\.layers\.0\.mlp\.fc1\.weight: source \(80, 32\), expected \(64, 32\)"
    ):
        from_vit(source)


def test_shape_fields_cannot_be_overridden_but_castling_fields_can():
    source = ViTForImageClassification(vit_config(**SOURCES["base"]))
    with pytest.raises(ValueError, match=r"Cannot override \['hidden_size'\]"):
        from_vit(source, hidden_size=64)
    castled = from_vit(source, residual_conv="sequence", angular_normalization="l2")
    assert (castled.config.residual_conv, castled.config.angular_normalization) == ("sequence", "l2")


@pytest.mark.parametrize(
    "vit_key, expected",
    [
        ("embeddings.cls_token", "embeddings.cls_token"),
        ("embeddings.mask_token", None),
        ("layers.3.attention.k_proj.bias", "encoder.layers.3.attention.qkv_proj.bias"),
        ("layers.0.attention.o_proj.weight", "encoder.layers.0.attention.o_proj.weight"),
        ("layers.11.mlp.fc2.weight", "encoder.layers.11.mlp.fc2.weight"),
        ("pooler.dense.bias", "pooler.dense.bias"),
    ],
)
def test_castling_key(vit_key, expected):
    assert castling_key(vit_key) == expected
