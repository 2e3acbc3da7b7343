import functools
import json
import warnings

import pytest
import torch
from conftest import run_without_castling_hf
from safetensors.torch import load_file, save_file
from transformers import (
    AutoBackbone,
    AutoImageProcessor,
    AutoModel,
    AutoModelForDepthEstimation,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    AutoModelForUniversalSegmentation,
    BeitConfig,
    BeitModel,
    BitImageProcessorPil,
    ConvNextConfig,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Backbone,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    DPTConfig,
    DPTForDepthEstimation,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from castling_hf import (
    CastlingViTConfig,
    CastlingViTForImageClassification,
    castle,
    set_softmax_mask_scale,
    softmax_mask_scale,
    softmax_mask_scales,
    source_image_processor,
    switch_to_inference,
)
from castling_hf.conversion import from_vit
from castling_hf.hub import write_inference_checkpoint
from castling_hf.in_place import CastlingAttentionTerms

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


def castling_terms(model: torch.nn.Module) -> list[CastlingAttentionTerms]:
    return [module for module in model.modules() if isinstance(module, CastlingAttentionTerms)]


@pytest.mark.parametrize("source_fields", SOURCES.values(), ids=SOURCES.keys())
def test_castled_classifier_logits_equal_the_source(source_fields):
    source = randomised(ViTForImageClassification(vit_config(**source_fields)))
    castled = castle(source)
    assert (
        isinstance(castled, ViTForImageClassification) and type(castled).__name__ == "CastledViTForImageClassification"
    )
    assert len(castling_terms(castled)) == source.config.num_hidden_layers
    pixels = pixels_for(source.config)
    with torch.no_grad():
        expected, got = source(pixel_values=pixels).logits, castled(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert castled.config.id2label == source.config.id2label

    # The equality rests on α = 1, where the convex blend gives the linear-angular term no weight: below it, it enters.
    castled.set_softmax_mask_scale(0.5)
    with torch.no_grad():
        assert (castled(pixel_values=pixels).logits - expected).abs().max() > 1e-3


@pytest.mark.parametrize("with_pooler", [True, False])
def test_a_castled_encoder_keeps_the_source_pooler_or_its_absence(with_pooler):
    source = randomised(ViTModel(vit_config(**SOURCES["base"]), add_pooling_layer=with_pooler))
    castled = castle(source)
    pixels = pixels_for(source.config)
    with torch.no_grad():
        expected, got = source(pixel_values=pixels), castled(pixel_values=pixels)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    if with_pooler:
        torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-4, rtol=1e-4)
    else:
        assert castled.pooler is None and got.pooler_output is None


def test_an_encoder_saved_without_pooler_castles_without_one(tmp_path):
    source = randomised(ViTModel(vit_config(**SOURCES["base"]), add_pooling_layer=False))
    source.save_pretrained(tmp_path)
    castled = castle(tmp_path)
    assert castled.pooler is None
    pixels = pixels_for(source.config)
    with torch.no_grad():
        expected, got = source(pixel_values=pixels).last_hidden_state, castled(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_classifier_from_an_encoder_checkpoint_keeps_the_encoder_and_starts_the_head_fresh(tmp_path):
    source = randomised(ViTModel(vit_config(**SOURCES["base"])))
    source.save_pretrained(tmp_path)
    castled = castle(tmp_path, model_class=ViTForImageClassification, num_labels=7)
    assert type(castled).__name__ == "CastledViTForImageClassification"
    pixels = pixels_for(source.config)
    with torch.no_grad():
        expected = source(pixel_values=pixels).last_hidden_state
        got = castled.vit(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert castled(pixel_values=pixels).logits.shape == (2, 7)


def test_a_new_label_set_loads_the_checkpoint_as_transformers_does(tmp_path):
    source = randomised(ViTForImageClassification(vit_config(**SOURCES["base"])))
    source.save_pretrained(tmp_path)
    renamed = castle(tmp_path, id2label={i: f"new {i}" for i in range(5)})  # as many labels: only the names differ
    assert renamed.config.label2id == {f"new {i}": i for i in range(5)}
    torch.testing.assert_close(renamed.classifier.weight, source.classifier.weight)
    more = castle(tmp_path, num_labels=9)  # another number: the classifier starts fresh, the tower is the source's
    assert more.classifier.weight.shape == (9, 32)
    torch.testing.assert_close(more.vit.embeddings.cls_token, source.vit.embeddings.cls_token)
    with pytest.raises(TypeError, match="a model object is castled with the head it has"):
        castle(source, num_labels=9)


def test_castling_from_a_directory_saves_and_reloads_through_the_auto_classes(tmp_path):
    source = randomised(
        ViTForImageClassification(vit_config(**SOURCES["base"], id2label={i: f"class {i}" for i in range(5)}))
    )
    source.save_pretrained(tmp_path / "vit")
    castled = castle(tmp_path / "vit")
    castled.save_pretrained(tmp_path / "castled")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "castled").eval()
    assert type(reloaded) is type(castled) and reloaded.config.model_type == "castled_vit"
    assert reloaded.config.castling["linear_branch_blend"] == "convex"
    assert reloaded.config.castling["softmax_mask_threshold"] is None
    assert reloaded.config.id2label[3] == "class 3"
    pixels = pixels_for(source.config)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values=pixels).logits, source(pixel_values=pixels).logits, atol=1e-4, rtol=1e-4
        )


def test_a_short_fine_tune_with_the_mask_decay_grows_gamma_and_ends_switchable():
    source = randomised(ViTForImageClassification(vit_config(**SOURCES["base"])))
    castled = castle(source)
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
    assert all((terms.linear_branch_scale - 1.0).abs().max() > 0 for terms in castling_terms(castled))
    assert set(castled.softmax_mask_scales().values()) == {0.0}
    castled.switch_to_inference()  # accepted: the decay has ended (the switch's exactness is tested per model class)


def test_a_castled_model_or_another_family_is_refused_by_from_vit_and_castle(tmp_path):
    castling = CastlingViTForImageClassification(CastlingViTConfig.from_size("nano", num_hidden_layers=1))
    with pytest.raises(TypeError, match="a castled model already"):
        from_vit(castling)
    castling.save_pretrained(tmp_path / "castling")
    with pytest.raises(TypeError, match="a castled model already"):
        castle(tmp_path / "castling")
    source = randomised(ViTForImageClassification(vit_config(**SOURCES["base"])))
    source.save_pretrained(tmp_path / "vit")
    castle(source).save_pretrained(tmp_path / "castled")
    with pytest.raises(TypeError, match=r"a castled model already \('castled_vit'\)"):
        castle(tmp_path / "castled")
    with pytest.raises(TypeError, match="from_vit castles a transformers ViT.*got Dinov2Model"):
        from_vit(Dinov2Model(Dinov2Config(**SOURCES["base"])))
    with pytest.raises(TypeError, match="model_class is the transformers class to load the source with"):
        castle(tmp_path / "vit", model_class=CastlingViTForImageClassification)
    with pytest.raises(TypeError, match="this ViTForImageClassification is loaded already; castle keeps its class"):
        castle(source, model_class=ViTModel)


def test_a_checkpoint_whose_weights_do_not_match_its_config_is_refused_by_name(tmp_path):
    ViTForImageClassification(vit_config(**SOURCES["base"])).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")  # saved under the Hub's ViT names
    del weights["vit.encoder.layer.1.attention.attention.key.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for kwargs in ({}, {"num_labels": 9}):  # a new head does not excuse a tower weight left random
        with pytest.raises(ValueError) as raised:
            castle(tmp_path, **kwargs)
        assert "missing keys: ['vit.layers.1.attention.k_proj.weight']" in str(raised.value)  # transformers' names
        assert "nothing was castled" in str(raised.value).lower()
    # A weight of another shape: transformers refuses it, unless a new label set asks it to skip such weights.
    weights["vit.encoder.layer.1.attention.attention.key.weight"] = torch.zeros(32, 32)
    weights["vit.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(80, 32)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"mismatched keys: .*vit\.layers\.0\.mlp\.fc1\.weight"):
        castle(tmp_path, num_labels=9)


def test_fields_other_than_castling_attention_are_refused_but_castling_fields_are_taken():
    source = ViTForImageClassification(vit_config(**SOURCES["base"]))
    with pytest.raises(TypeError, match=r"got \['hidden_size'\].*takes only the fields of Castling attention"):
        castle(source, hidden_size=64)
    castled = castle(source, residual_conv="sequence", angular_normalization="l2")
    assert (castled.config.castling["residual_conv"], castled.config.castling["angular_normalization"]) == (
        "sequence",
        "l2",
    )


# Every source family and task model, built tiny and saved as a Hub checkpoint would be: `castle` from the folder.
# The norm epsilon and the activation are not the defaults, so that castling must carry them over.
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-2,
    hidden_act="gelu_new",
)


def dinov2_backbone(**fields) -> Dinov2Config:
    return Dinov2Config(**{**TINY, "num_hidden_layers": 4}, out_indices=[1, 2, 3, 4], layerscale_value=0.7, **fields)


def depth_head(**fields) -> dict:
    return dict(neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], **fields)


# name: (source builder, Auto class that reloads the castled model, second resolution, does the source need
# `interpolate_pos_encoding=True` at it)
FAMILY_SOURCES = {
    "vit": (
        lambda: ViTForImageClassification(ViTConfig(**TINY, num_labels=3)),
        AutoModelForImageClassification,
        48,
        True,
    ),
    "deit_with_teacher": (
        lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY, num_labels=3)),
        AutoModelForImageClassification,
        48,
        True,
    ),
    "dinov2": (lambda: Dinov2Model(Dinov2Config(**TINY, layerscale_value=0.5)), AutoModel, 48, False),
    "dinov2_classifier": (
        lambda: Dinov2ForImageClassification(Dinov2Config(**TINY, layerscale_value=0.5, num_labels=3)),
        AutoModelForImageClassification,
        48,
        False,
    ),
    "dinov2_with_registers_classifier": (
        lambda: Dinov2WithRegistersForImageClassification(
            Dinov2WithRegistersConfig(**TINY, num_register_tokens=2, layerscale_value=0.5, num_labels=3)
        ),
        AutoModelForImageClassification,
        48,
        False,
    ),
    "dinov3_vit": (lambda: DINOv3ViTModel(DINOv3ViTConfig(**TINY, num_register_tokens=2)), AutoModel, 48, False),
    "dinov3_vit_without_qkv_biases_or_registers": (
        lambda: DINOv3ViTModel(
            DINOv3ViTConfig(**TINY, query_bias=False, key_bias=False, value_bias=False, num_register_tokens=0)
        ),
        AutoModel,
        48,
        False,
    ),
    # The largest sizes' MLPs, which the source keeps: its own modules are castled around them.
    "dinov2_swiglu": (lambda: Dinov2Model(Dinov2Config(**TINY, use_swiglu_ffn=True)), AutoModel, 48, False),
    "dinov3_vit_gated_mlp": (
        lambda: DINOv3ViTModel(DINOv3ViTConfig(**{**TINY, "hidden_act": "silu"}, use_gated_mlp=True)),
        AutoModel,
        48,
        False,
    ),
    "dinov2_backbone": (lambda: Dinov2Backbone(dinov2_backbone()), AutoBackbone, 64, False),
    "upernet_dinov2": (
        lambda: UperNetForSemanticSegmentation(
            UperNetConfig(backbone_config=dinov2_backbone(), hidden_size=16, num_labels=3, auxiliary_in_channels=32)
        ),
        AutoModelForSemanticSegmentation,
        64,
        False,
    ),
    "depth_anything_dinov2": (
        lambda: DepthAnythingForDepthEstimation(
            DepthAnythingConfig(
                backbone_config=dinov2_backbone(reshape_hidden_states=False),
                **depth_head(head_hidden_size=8, patch_size=8, reassemble_hidden_size=32),
            )
        ),
        AutoModelForDepthEstimation,
        64,
        False,
    ),
    "dpt_dinov2": (
        lambda: DPTForDepthEstimation(
            DPTConfig(
                backbone_config=dinov2_backbone(reshape_hidden_states=False),
                hidden_size=32,
                patch_size=8,
                image_size=32,
                **depth_head(),
            )
        ),
        AutoModelForDepthEstimation,
        64,
        False,
    ),
    "mask2former_dinov2": (
        lambda: Mask2FormerForUniversalSegmentation(
            Mask2FormerConfig(
                backbone_config=dinov2_backbone(),
                feature_size=32,
                mask_feature_size=32,
                hidden_dim=32,
                encoder_feedforward_dim=64,
                dim_feedforward=64,
                num_queries=5,
                decoder_layers=2,
                encoder_layers=1,
                num_attention_heads=4,
                num_labels=3,
            )
        ),
        AutoModelForUniversalSegmentation,
        64,
        False,
    ),
}


def pretrained(build) -> torch.nn.Module:
    """A source whose transformer (a task model's Dinov2 backbone) has weights far from their init: attention
    sharply non-uniform, LayerScale, tokens, biases and every norm's scale and shift non-trivial (so that a norm
    mapped to the wrong place shows); task heads as built."""
    torch.manual_seed(0)
    model = build()
    transformer = next((module for module in model.modules() if isinstance(module, Dinov2Backbone)), model)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            scale = "norm" in name and name.endswith("weight")
            parameter.normal_(1.0 if scale else 0.0, 0.2)
    return model.eval()


def every_tensor(output, name: str = "output"):
    """(path, tensor) for every tensor in a model output, however nested (feature maps, auxiliary logits)."""
    if isinstance(output, torch.Tensor):
        yield name, output
    elif isinstance(output, dict):
        for key, value in output.items():
            yield from every_tensor(value, f"{name}.{key}")
    elif isinstance(output, (list, tuple)):
        for index, value in enumerate(output):
            yield from every_tensor(value, f"{name}[{index}]")


def assert_same_outputs(got, expected, atol: float = 1e-5) -> None:
    got, expected = dict(every_tensor(got)), dict(every_tensor(expected))
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        difference = (got[name] - value).abs().max().item()
        assert difference <= atol, f"{name} differs by {difference:.2e}"


def run(model, resolution: int, resize: bool):
    pixels = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(resolution))
    with torch.no_grad():
        return model(pixel_values=pixels, **({"interpolate_pos_encoding": True} if resize else {}))


@pytest.mark.parametrize("name", FAMILY_SOURCES, ids=FAMILY_SOURCES)
def test_castled_checkpoint_computes_the_source_at_two_resolutions_and_reloads(name, tmp_path):
    build, auto_class, second_resolution, source_needs_resize = FAMILY_SOURCES[name]
    source = pretrained(build)
    source.save_pretrained(tmp_path / "source")
    source_state = {key: value.clone() for key, value in source.state_dict().items()}

    castled = castle(tmp_path / "source")
    for resolution in (32, second_resolution):
        resize = source_needs_resize and resolution != 32
        assert_same_outputs(run(castled, resolution, resize), run(source, resolution, resize))
    assert all(torch.equal(value, source_state[key]) for key, value in source.state_dict().items())

    castled.save_pretrained(tmp_path / "castled")
    # AutoBackbone.from_pretrained asks the Hub whether a local folder is a repository (transformers 5.24): a
    # backbone folder loads with its class.
    auto_class = type(castled) if auto_class is AutoBackbone else auto_class
    reloaded = auto_class.from_pretrained(str(tmp_path / "castled")).eval()
    # A castled task model is its source's class (with the Castling methods added), under the same name.
    assert isinstance(castled, type(reloaded)) and type(reloaded).__name__ == type(castled).__name__
    assert_same_outputs(run(reloaded, 32, False), run(source, 32, False))

    set_softmax_mask_scale(castled, 0.0)  # the decay's end: the softmax branches are spent
    # Both ways of writing the inference form, for every kind of model castle returns: the model's own
    # save_pretrained(inference=True), which transformers' save_pretrained would take in silently, and the function.
    castled.save_pretrained(tmp_path / "inference", inference=True)
    write_inference_checkpoint(reloaded, tmp_path / "inference_of_reloaded", force=True)
    for folder in ("inference", "inference_of_reloaded"):
        saved = set().union(*(load_file(path).keys() for path in (tmp_path / folder).glob("*.safetensors")))
        assert saved and not [key for key in saved if "softmax" in key]
        deployed = auto_class.from_pretrained(str(tmp_path / folder)).eval()
        assert not softmax_mask_scales(deployed)  # linear mode: no softmax branch at all
        reference = castled if folder == "inference" else switch_to_inference(reloaded, force=True)
        assert_same_outputs(run(deployed, 32, False), run(reference, 32, False))
    assert softmax_mask_scales(castled)  # saving the inference form left the model in memory as it was


def test_castle_refuses_or_names_the_overrides_that_lose_the_exact_start_or_the_linear_term():
    source = pretrained(FAMILY_SOURCES["vit"][0])
    with pytest.raises(ValueError, match=r"linear_branch_blend='additive'.*would not start as its source"):
        castle(source, linear_branch_blend="additive")
    with pytest.raises(ValueError, match=r"linear_branch_scale_init=0\) with the convex blend"):
        castle(source, linear_branch_scale_init=0.0)
    with pytest.warns(UserWarning, match=r"additive.*loses that at the switch"):
        additive = castle(source, linear_branch_blend="additive", linear_branch_scale_init=0.0)
    assert_same_outputs(run(additive, 32, False), run(source, 32, False))  # exact, as the first castling was
    with pytest.warns(UserWarning, match=r"softmax_mask_threshold=1.3\) masks .* does not start exactly"):
        masked = castle(source, softmax_mask_threshold=1.3)
    assert (run(masked, 32, False).logits - run(source, 32, False).logits).abs().max() > 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # castle's own settings, and a γ it can start from, say nothing
        castle(source)
        castle(source, linear_branch_scale_init=0.5)


def test_castle_takes_a_model_object_and_leaves_it_as_it_was():
    source = pretrained(FAMILY_SOURCES["deit_with_teacher"][0]).train()
    castled = castle(source)
    assert source.training and not castled.training
    assert not castling_terms(source) and source.config.model_type == "deit"
    source.eval()
    assert_same_outputs(run(castled, 32, False), run(source, 32, False))


def test_an_unsupported_family_or_backbone_is_refused_with_what_castle_takes():
    with pytest.raises(TypeError, match=r"castle takes .* dinov2.*; BeitModel holds none of these towers"):
        castle(BeitModel(BeitConfig(**TINY)))
    convnext = ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    upernet = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=convnext, hidden_size=16, num_labels=3))
    with pytest.raises(TypeError, match="UperNetForSemanticSegmentation holds none of these"):
        castle(upernet)


@pytest.mark.parametrize(
    "build",
    [
        lambda rate: Dinov2ForImageClassification(Dinov2Config(**TINY, drop_path_rate=rate, num_labels=3)),
        # Without DINOv3's RoPE rescaling (on by default), the only randomness in training mode is the layers' drop.
        lambda rate: DINOv3ViTModel(DINOv3ViTConfig(**TINY, drop_path_rate=rate, pos_embed_rescale=None)),
    ],
    ids=["dinov2", "dinov3_vit"],
)
def test_stochastic_depth_is_carried_over(build):
    for rate in (0.0, 0.3):
        source = pretrained(functools.partial(build, rate))
        castled = castle(source)
        assert castled.config.drop_path_rate == rate
        assert_same_outputs(run(castled, 32, False), run(source, 32, False))  # evaluation: no layer is dropped
        castled.train()
        torch.manual_seed(0)
        first, second = (next(every_tensor(run(castled, 32, False)))[1] for _ in range(2))
        assert torch.equal(first, second) == (rate == 0.0)  # training: layers dropped at random, where asked for


@pytest.mark.parametrize(
    "build, mean, size",
    [
        (lambda: ViTForImageClassification(ViTConfig(**TINY)), [0.5, 0.5, 0.5], {"height": 32, "width": 32}),
        (lambda: DeiTModel(DeiTConfig(**TINY)), [0.485, 0.456, 0.406], {"height": 256, "width": 256}),
        (lambda: Dinov2Model(Dinov2Config(**TINY)), [0.485, 0.456, 0.406], {"shortest_edge": 256}),
        (lambda: DINOv3ViTModel(DINOv3ViTConfig(**TINY)), [0.485, 0.456, 0.406], {"height": 224, "width": 224}),
        (FAMILY_SOURCES["upernet_dinov2"][0], [0.485, 0.456, 0.406], {"height": 512, "width": 512}),
    ],
    ids=["vit", "deit", "dinov2", "dinov3_vit", "upernet_dinov2"],
)
def test_a_source_saved_without_an_image_processor_gets_its_familys(build, mean, size, tmp_path):
    build().save_pretrained(tmp_path)
    processor = source_image_processor(tmp_path)
    assert list(processor.image_mean) == mean
    assert {key: value for key, value in dict(processor.size).items() if value is not None} == size


def test_the_image_processor_saved_with_a_source_is_kept_even_where_its_class_needs_torchvision(tmp_path):
    Dinov2Model(Dinov2Config(**TINY)).save_pretrained(tmp_path / "dinov2")
    saved = BitImageProcessorPil(crop_size={"height": 48, "width": 48}, image_mean=[0.1, 0.2, 0.3])
    saved.save_pretrained(tmp_path / "dinov2")
    processor = source_image_processor(tmp_path / "dinov2")
    assert processor.to_dict() == AutoImageProcessor.from_pretrained(tmp_path / "dinov2").to_dict()

    DINOv3ViTModel(DINOv3ViTConfig(**TINY)).save_pretrained(tmp_path / "dinov3")
    settings = {"image_processor_type": "DINOv3ViTImageProcessor", "size": {"height": 96, "width": 96}}
    settings.update(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.2, 0.2], do_resize=True, do_normalize=True)
    (tmp_path / "dinov3" / "preprocessor_config.json").write_text(json.dumps(settings))
    processor = source_image_processor(tmp_path / "dinov3")
    assert list(processor.image_mean) == [0.4, 0.5, 0.6] and list(processor.image_std) == [0.2, 0.2, 0.2]
    assert (processor.size.height, processor.size.width) == (96, 96)


REMOTE_SEGMENTER = """
import json, sys
import torch
from transformers import AutoModelForSemanticSegmentation
model = AutoModelForSemanticSegmentation.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(64))
with torch.no_grad():
    logits = model(pixel_values=pixel_values).logits
print(json.dumps([type(model.backbone).__name__, model.backbone.config.castling["attention_mode"], logits.tolist()]))
"""


def test_a_castled_task_model_loads_with_remote_code_where_castling_hf_is_not_installed(tmp_path):
    castled = castle(pretrained(FAMILY_SOURCES["upernet_dinov2"][0]))
    set_softmax_mask_scale(castled, 0.0)
    castled.save_pretrained(tmp_path / "castled", inference=True)
    saved = json.loads((tmp_path / "castled" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForSemanticSegmentation"] == "castled_classes.UperNetForSemanticSegmentation"
    backbone, mode, logits = json.loads(run_without_castling_hf(REMOTE_SEGMENTER, [tmp_path / "castled"], tmp_path))
    assert (backbone, mode) == ("CastledDinov2Backbone", "linear")
    expected = run(switch_to_inference(castled), 64, False).logits
    torch.testing.assert_close(torch.tensor(logits), expected, atol=1e-6, rtol=0)  # another process: the same to 1e-6
