"""Castling timm's MViTv2: every output of the castled model equals the source's, at its resolution and at others."""

import functools
import json
import sys

import offline_hub
import pytest
import torch
import torch.nn.functional as F
from conftest import timm_helper
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

from castling_hf import (
    CastlingMViTv2Backbone,
    CastlingMViTv2ForImageClassification,
    CastlingMViTv2Model,
    castle,
    softmax_mask_scale,
    source_image_processor,
)
from castling_hf.conversion_timm import mvitv2_config

timm = timm_helper().import_timm()
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg, checkpoint_filter_fn  # noqa: E402


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved off its initialisation (norms included), so that each one reaches the outputs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


# name: (timm source builder at 64 px, a second resolution, or None where the source cannot change it)
SOURCES = {
    "mvitv2_tiny": (lambda size: timm.create_model("mvitv2_tiny", img_size=size, num_classes=5), 96),
    "cls_token_two_heads": (
        lambda size: MultiScaleVit(
            MultiScaleVitCfg(depths=(1, 1, 2, 1), embed_dim=16, num_heads=2, use_cls_token=True),
            img_size=size,
            num_classes=5,
        ),
        96,
    ),
    "widening_in_the_mlp_with_absolute_positions": (
        lambda size: MultiScaleVit(
            MultiScaleVitCfg(depths=(1, 2, 1, 2), embed_dim=16, num_heads=1, expand_attn=False, use_abs_pos=True),
            img_size=size,
            num_classes=5,
        ),
        None,  # timm's absolute position embeddings are for one input size
    ),
    "no_residual_pooling_token_pooled": (
        lambda size: MultiScaleVit(
            MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=8, num_heads=1, residual_pooling=False),
            img_size=size,
            num_classes=5,
            global_pool="avg",
        ),
        128,
    ),
}


def source_at(build, source, size: int):
    """The source as timm runs it at another input size: built for it, the checkpoint loaded through timm's own
    filter, which resizes the relative position tables."""
    other = build(size)
    other.load_state_dict(checkpoint_filter_fn(source.state_dict(), other))
    return other.eval()


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))


def assert_close_outputs(castled, source, pixels, atol=1e-4):
    with torch.no_grad():
        expected_logits = source(pixels)
        _, expected_stages = source.forward_intermediates(pixels, output_fmt="NLC")
        got = castled(pixel_values=pixels, output_hidden_states=True)
    assert (got.logits - expected_logits).abs().max() <= atol
    for index, (stage, expected) in enumerate(zip(got.hidden_states[1:], expected_stages, strict=True)):
        assert (stage - expected).abs().max() <= atol, f"stage {index + 1}"


@pytest.mark.parametrize("name", SOURCES, ids=SOURCES)
def test_castled_timm_mvitv2_computes_the_source_at_two_resolutions(name):
    build, second = SOURCES[name]
    source = perturbed(build(64))
    state = {key: value.clone() for key, value in source.state_dict().items()}
    castled = castle(source)
    assert isinstance(castled, CastlingMViTv2ForImageClassification) and castled.config.image_size == 64
    assert_close_outputs(castled, source, images(64))
    if second is not None:
        assert_close_outputs(castled, source_at(build, source, second), images(second))
    else:
        with pytest.raises(ValueError, match="absolute position embeddings are for a"):
            castled(pixel_values=images(96))
    assert all(torch.equal(value, state[key]) for key, value in source.state_dict().items())  # source untouched


def test_castled_model_starts_exactly_and_the_linear_term_enters_as_alpha_falls():
    source = perturbed(SOURCES["cls_token_two_heads"][0](64))
    castled = castle(source)
    pixels = images(64)
    with torch.no_grad():
        expected = source(pixels)
        assert set(castled.softmax_mask_scales().values()) == {1.0}
        assert (castled(pixel_values=pixels).logits - expected).abs().max() <= 1e-4  # α = 1: the source itself
        castled.set_softmax_mask_scale(0.5)
        assert (castled(pixel_values=pixels).logits - expected).abs().max() > 1e-3


@pytest.mark.parametrize("height, width", [(48, 48), (40, 40), (64, 40), (44, 52)])
def test_at_sizes_the_source_runs_below_its_own_the_castled_model_computes_what_timm_computes(height, width):
    # timm indexes its relative position tables without resizing them at inputs smaller than the size it was built
    # for, and pools any height and width (a strided conv gives ⌈n / stride⌉): the castled model does the same, so it
    # equals its source wherever the source runs, not only at multiples of the last stage's stride (32 px).
    source = perturbed(SOURCES["mvitv2_tiny"][0](64))
    castled = castle(source)
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    assert_close_outputs(castled, source, pixels)


def test_resizing_the_tables_below_the_sources_size_would_not_compute_the_source(monkeypatch):
    # The choice the castled model makes (docs/design.md §11): resized to each input's length, the tables would give
    # other logits than timm's at a size timm runs.
    from castling_hf.models.castling_mvitv2 import modeling_castling_mvitv2

    source = perturbed(SOURCES["mvitv2_tiny"][0](64))
    castled = castle(source)
    pixels = images(48)

    def always_resized(table, length):
        return table if len(table) == length else F.interpolate(table.T[None], size=length, mode="linear")[0].T

    monkeypatch.setattr(modeling_castling_mvitv2, "table_for", always_resized)
    with torch.no_grad():
        expected = source(pixels)
        difference = (castled(pixel_values=pixels).logits - expected).abs().max() / expected.abs().max()
    assert difference > 1e-2


def test_a_timm_checkpoint_folder_and_a_timm_wrapper_castle_exactly(tmp_path):
    source = perturbed(timm.create_model("mvitv2_tiny", num_classes=4))
    timm.models.save_for_hf(source, tmp_path / "timm")  # config.json (architecture) + model.safetensors
    castled = castle(str(tmp_path / "timm"))
    assert_close_outputs(castled, source, images(224, batch=1))

    timm_helper().let_transformers_use_timm()
    wrapper = TimmWrapperForImageClassification(
        TimmWrapperConfig(architecture="mvitv2_tiny", num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"})
    )
    wrapper = perturbed(wrapper)
    wrapper.save_pretrained(tmp_path / "wrapper")
    castled = castle(str(tmp_path / "wrapper"))
    assert castled.config.id2label == {0: "cat", 1: "dog", 2: "owl"}
    pixels = images(224, batch=1)
    with torch.no_grad():
        assert (castled(pixel_values=pixels).logits - wrapper(pixel_values=pixels).logits).abs().max() <= 1e-4


def test_a_timm_hub_name_castles_from_the_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub

    timm_helper().let_transformers_use_timm()
    source = perturbed(timm.create_model("mvitv2_tiny", num_classes=1000))
    save = functools.partial(offline_hub.save_timm_for_hub, source, timm=timm)
    offline_hub.cached_repository(tmp_path / "hub", "timm/mvitv2_tiny.fb_in1k", save)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    castled = castle("timm/mvitv2_tiny.fb_in1k")  # its config.json names no transformers class
    assert_close_outputs(castled, source, images(224, batch=1))
    assert castled.config.id2label[0] == "tench, Tinca tinca"  # ImageNet's names, as transformers gives them
    processor = source_image_processor("timm/mvitv2_tiny.fb_in1k")
    assert dict(processor.crop_size) == {"height": 224, "width": 224}


def test_timm_sources_keep_their_class_names_and_processing_however_they_were_built():
    # Built by create_model: ImageNet's class names where it has ImageNet's classes, its own where its config names
    # them.
    imagenet = timm.create_model("mvitv2_tiny", num_classes=1000)
    assert castle(imagenet).config.id2label[1] == "goldfish, Carassius auratus"
    named = timm.create_model("mvitv2_tiny", num_classes=3, pretrained_cfg_overlay={"label_names": ["a", "b", "c"]})
    assert castle(named).config.id2label == {0: "a", 1: "b", 2: "c"}
    # Built from its class, without a pretrained config: no relative position tables or position embeddings to tell
    # its size, so timm's default; any size runs.
    bare = perturbed(
        MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=8, num_heads=1, rel_pos_type=""), num_classes=3)
    )
    assert not hasattr(bare, "pretrained_cfg")
    castled = castle(bare)
    assert castled.config.image_size == 224 and castled.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert_close_outputs(castled, bare, images(64))
    assert dict(source_image_processor(bare).crop_size) == {"height": 224, "width": 224}
    # A transformers TimmWrapper object: its own labels, and timm's processing of its architecture.
    timm_helper().let_transformers_use_timm()
    wrapper = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="mvitv2_tiny", num_labels=2))
    processor = source_image_processor(wrapper)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and dict(processor.crop_size)["height"] == 224


def test_base_model_and_backbone_castles_give_the_source_features():
    source = perturbed(SOURCES["mvitv2_tiny"][0](64))
    pixels = images(64)
    with torch.no_grad():
        expected_features = source.forward_features(pixels)
        _, expected_maps = source.forward_intermediates(pixels)
        base = castle(source, model_class=CastlingMViTv2Model)
        assert (base(pixel_values=pixels).last_hidden_state - expected_features).abs().max() <= 1e-4
        backbone = castle(source, model_class=CastlingMViTv2Backbone, out_features=["stage1", "stage4"])
        maps = backbone(pixel_values=pixels).feature_maps
    assert [tuple(m.shape[1:]) for m in maps] == [(96, 16, 16), (768, 2, 2)]
    for got, expected in zip(maps, (expected_maps[0], expected_maps[3]), strict=True):
        assert (got - expected).abs().max() <= 1e-4


def test_a_short_fine_tune_with_the_decay_switches_and_saves_an_inference_checkpoint(tmp_path):
    source = perturbed(SOURCES["cls_token_two_heads"][0](64))
    castled = castle(source).train()
    optimizer = torch.optim.AdamW(castled.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(2)
    steps, losses = 6, []
    for step in range(steps):
        castled.set_softmax_mask_scale(softmax_mask_scale(step, steps, end=0.5))
        pixels = torch.randn(4, 3, 64, 64, generator=generator)
        loss = castled(pixel_values=pixels, labels=torch.randint(0, 5, (4,), generator=generator)).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    castled.set_softmax_mask_scale(0.0)
    assert [key for key in castled.state_dict() if "relative_position" in key]
    castled.eval().save_pretrained(tmp_path, inference=True)
    saved = load_file(tmp_path / "model.safetensors")
    assert not [key for key in saved if "softmax" in key or "relative_position" in key]  # the bias is the branch's
    assert json.loads((tmp_path / "config.json").read_text())["attention_mode"] == "linear"
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CastlingMViTv2ForImageClassification) and reloaded.config.attention_mode == "linear"
    pixels = images(64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, castled(pixel_values=pixels).logits)
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize(
    "config, named",
    [
        (dict(pool_first=True), "pool_first=True"),
        (dict(mode="max"), "mode='max'"),
    ],
)
def test_what_castling_mvitv2_cannot_express_is_refused_by_name(config, named):
    source = MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=8, num_heads=1, **config), img_size=64)
    with pytest.raises(ValueError, match=rf"{named}.*nothing was converted"):
        castle(source)
    assert mvitv2_config(MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=8), img_size=64))


def test_a_timm_source_gets_timms_image_processing(tmp_path):
    source = timm.create_model("mvitv2_tiny", num_classes=4)
    timm.models.save_for_hf(source, tmp_path)
    processor = source_image_processor(str(tmp_path))
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]
    assert (
        dict(processor.crop_size)["height"] == 224 and dict(processor.size)["shortest_edge"] == 248
    )  # ⌊224 / 0.9⌋, as timm


def test_a_timm_checkpoint_without_timm_names_the_extra(tmp_path, monkeypatch):
    timm.models.save_for_hf(timm.create_model("mvitv2_tiny", num_classes=4), tmp_path)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"castling-hf\[timm\]"):
        castle(str(tmp_path))
