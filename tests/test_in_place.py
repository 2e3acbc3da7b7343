"""Castling in place (in_place.py): every family of the `TOWERS` table castles with an exact start at two
resolutions, keeps its own classes and heads, reloads from its inference checkpoint with its Auto class, and runs
where its users run it (zero-shot pipelines, LLaVA and PaliGemma generation)."""

import json
import random

import pytest
import torch
import transformers
from conftest import run_without_castling_hf, timm_helper
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoModelForZeroShotImageClassification,
    CLIPImageProcessorPil,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
    pipeline,
)

import castling_hf
from castling_hf import in_place
from castling_hf.conversion import castling_options

TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32)
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=16)


def tower_options(family: str, seed: int) -> dict:
    """A tiny tower config with the family's options drawn at random (`seed`): activation, norm epsilon, patch size,
    and what else the family has."""
    draw = random.Random(seed)
    options = dict(TOWER, patch_size=draw.choice([4, 8]), layer_norm_eps=draw.choice([1e-6, 1e-5]))
    if family == "clip":
        options["hidden_act"] = draw.choice(["quick_gelu", "gelu"])
    if family == "siglip":
        options["hidden_act"] = draw.choice(["gelu_pytorch_tanh", "gelu"])
        options["vision_use_head"] = draw.choice([True, False])
    return options


def two_tower(config_class, family: str, seed: int, **extra):
    text = dict(TEXT, max_position_embeddings=64)  # SigLIP's pipeline pads its prompts to 64 tokens
    vision = tower_options(family, seed)
    if family == "siglip":
        vision["vision_use_head"] = True  # SigLIP's image embedding is its pooling head's
    return config_class(vision_config=vision, text_config=text, **extra)


# (name, model class, config builder, how to read its output): one case per class castle takes in place.
CASES = {
    "siglip_vision": (
        transformers.SiglipVisionModel,
        lambda seed: transformers.SiglipVisionConfig(**tower_options("siglip", seed)),
    ),
    "siglip": (transformers.SiglipModel, lambda seed: two_tower(transformers.SiglipConfig, "siglip", seed)),
    "siglip_classifier": (
        transformers.SiglipForImageClassification,
        lambda seed: two_tower(transformers.SiglipConfig, "siglip", seed, num_labels=3),
    ),
    "clip_vision": (
        transformers.CLIPVisionModel,
        lambda seed: transformers.CLIPVisionConfig(**tower_options("clip", seed)),
    ),
    "clip_vision_projection": (
        transformers.CLIPVisionModelWithProjection,
        lambda seed: transformers.CLIPVisionConfig(**tower_options("clip", seed), projection_dim=16),
    ),
    "clip": (transformers.CLIPModel, lambda seed: two_tower(transformers.CLIPConfig, "clip", seed, projection_dim=16)),
    "clip_classifier": (
        transformers.CLIPForImageClassification,
        lambda seed: two_tower(transformers.CLIPConfig, "clip", seed, num_labels=3),
    ),
    "ijepa_classifier": (
        transformers.IJepaForImageClassification,
        lambda seed: transformers.IJepaConfig(**tower_options("ijepa", seed), num_labels=3),
    ),
}
TEXT_IDS = torch.tensor([[3, 4, 5, 6, 7, 2], [8, 9, 10, 11, 2, 0]])


def outputs(model, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor a model returns (a two-tower model run on `TEXT_IDS` too), by name."""
    inputs = {"pixel_values": pixel_values, "interpolate_pos_encoding": True}
    if isinstance(model, transformers.SiglipModel | transformers.CLIPModel):
        inputs["input_ids"] = TEXT_IDS
    result = model(**inputs)
    return {name: value for name, value in result.items() if isinstance(value, torch.Tensor)}


def build(case: str, seed: int):
    model_class, config = CASES[case]
    torch.manual_seed(seed)
    return model_class(config(seed)).eval()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_castled_in_place_computes_the_source_at_two_resolutions_and_keeps_its_class(case, seed):
    source = build(case, seed)
    castled = castling_hf.castle(source)
    assert isinstance(castled, type(source)) and type(castled).__name__ == f"Castled{type(source).__name__}"
    assert castled.config.model_type == f"castled_{source.config.model_type}"
    terms = [module for module in castled.modules() if isinstance(module, in_place.CastlingAttentionTerms)]
    assert len(terms) == TOWER["num_hidden_layers"]  # the vision tower's layers, not the text tower's
    for size in (32, 48):
        pixel_values = torch.randn(2, 3, size, size)
        expected, got = outputs(source, pixel_values), outputs(castled, pixel_values)
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=0, msg=name)
    castled.set_softmax_mask_scale(0.0)  # the linear term takes the layers over: the output moves
    pixel_values = torch.randn(2, 3, 32, 32)
    name = next(iter(outputs(source, pixel_values)))
    assert not torch.allclose(outputs(castled, pixel_values)[name], outputs(source, pixel_values)[name], atol=1e-3)


@pytest.mark.parametrize(
    "model_class, config",
    [
        (transformers.ViTModel, transformers.ViTConfig(**TOWER, patch_size=8)),
        (transformers.Dinov2Model, transformers.Dinov2Config(**TOWER, patch_size=8, layerscale_value=0.5)),
        (
            transformers.Dinov2WithRegistersModel,
            transformers.Dinov2WithRegistersConfig(**TOWER, patch_size=8, num_register_tokens=2),
        ),
        (transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig(**TOWER, patch_size=8, num_register_tokens=2)),
    ],
    ids=["vit", "dinov2", "dinov2_registers", "dinov3"],
)
def test_the_families_castle_converts_castle_in_place_too(model_class, config):
    """The table covers the families `castle` converts into Castling-ViT, RoPE included (docs/design.md §10)."""
    torch.manual_seed(0)
    source = model_class(config).eval()
    castled = in_place.castle_in_place(source, castling_options({}))
    for size in (32, 48):
        pixel_values = torch.randn(2, 3, size, size)
        kwargs = {"interpolate_pos_encoding": True} if model_class is transformers.ViTModel else {}
        expected = source(pixel_values, **kwargs).last_hidden_state
        torch.testing.assert_close(castled(pixel_values, **kwargs).last_hidden_state, expected, atol=1e-4, rtol=0)


def decayed(castled, alpha: float):
    castled.set_softmax_mask_scale(alpha)
    return castled


@pytest.mark.parametrize("case", ["siglip", "clip", "siglip_classifier", "clip_vision"])
def test_inference_checkpoint_reloads_with_its_auto_class_in_the_linear_form(case, tmp_path):
    castled = decayed(castling_hf.castle(build(case, 0)), 0.0)
    castled.save_pretrained(tmp_path, inference=True)
    with safe_open(tmp_path / "model.safetensors", "pt") as files:
        assert not [name for name in files.keys() if "softmax_branch" in name]
        assert [name for name in files.keys() if "castling.linear_branch_scale" in name]
    auto = {
        "siglip": AutoModelForZeroShotImageClassification,
        "clip": AutoModelForZeroShotImageClassification,
        "siglip_classifier": AutoModelForImageClassification,
        "clip_vision": AutoModel,
    }[case]
    reloaded = auto.from_pretrained(tmp_path)
    assert type(reloaded) is type(castled) and not reloaded.softmax_mask_scales()
    pixel_values = torch.randn(2, 3, 40, 40)
    for name, value in outputs(castled, pixel_values).items():
        torch.testing.assert_close(outputs(reloaded, pixel_values)[name], value, msg=name)


def test_a_checkpoint_taken_during_the_decay_reloads_with_its_alpha(tmp_path):
    castled = decayed(castling_hf.castle(build("siglip_classifier", 0)), 0.25)
    castled.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert set(reloaded.softmax_mask_scales().values()) == {0.25}
    with pytest.raises(ValueError, match="still has softmax mask scale"):
        reloaded.save_pretrained(tmp_path / "inference", inference=True)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[PAD]", "[UNK]", "a", "photo", "of", "this", "is", "square", "circle", "triangle", "."]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", model_max_length=16, do_lower_case=True
    )


@pytest.mark.parametrize("case", ["siglip", "clip"])
def test_zero_shot_pipeline_reads_a_reloaded_castled_two_tower_model(case, tmp_path):
    castled = decayed(castling_hf.castle(build(case, 0)), 0.0)
    castled.save_pretrained(tmp_path, inference=True)
    processor = (
        SiglipImageProcessorPil(size={"height": 32, "width": 32})
        if case == "siglip"
        else CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    )
    images = castling_hf.data.shapes(num_images=8, image_size=48)["train"]["image"][:2]
    labels = ["square", "circle", "triangle"]
    scores = []
    for model in (castled, AutoModelForZeroShotImageClassification.from_pretrained(tmp_path)):
        classify = pipeline(
            "zero-shot-image-classification", model=model, tokenizer=tiny_tokenizer(), image_processor=processor
        )
        scores.append([[round(entry["score"], 5) for entry in result] for result in classify(images, labels)])
    assert scores[0] == scores[1] and len(scores[0]) == 2


def vision_language_models():
    text = dict(TEXT, vocab_size=120, num_key_value_heads=2, max_position_embeddings=64)
    tower = dict(TOWER, patch_size=8)
    yield transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(**tower),
            text_config=transformers.LlamaConfig(**text),
            image_token_id=100,
        )
    )
    yield transformers.PaliGemmaForConditionalGeneration(
        transformers.PaliGemmaConfig(
            vision_config=transformers.SiglipVisionConfig(**tower, projection_dim=32),
            text_config=transformers.GemmaConfig(**text, head_dim=8),
            image_token_id=100,
            projection_dim=32,
        )
    )


@pytest.mark.parametrize("index", [0, 1], ids=["llava_clip", "paligemma_siglip"])
def test_a_vision_language_model_with_a_castled_tower_generates_its_sources_tokens(index, tmp_path):
    torch.manual_seed(0)
    source = list(vision_language_models())[index].eval()
    castled = castling_hf.castle(source)
    assert type(castled) is not type(source) and isinstance(castled, type(source))  # castling methods only
    assert type(castled.model.vision_tower).__name__.startswith("Castled")
    pixel_values = torch.randn(1, 3, 32, 32)
    input_ids = torch.cat([torch.full((1, 16), 100), torch.randint(0, 99, (1, 5))], dim=1)
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values)
    torch.testing.assert_close(castled(**inputs).logits, source(**inputs).logits, atol=1e-4, rtol=0)
    generate = dict(inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(castled.generate(**generate), source.generate(**generate))
    decayed(castled, 0.0).save_pretrained(tmp_path / "castled", inference=True)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "castled").eval()
    assert reloaded.model.vision_tower.config.castling["attention_mode"] == "linear"
    torch.testing.assert_close(reloaded(**inputs).logits, castled(**inputs).logits)
    tokens = castled.generate(**generate)
    assert torch.equal(reloaded.generate(**generate), tokens)
    # Where castling_hf is not installed: the checkpoint's own code registers the castled tower type.
    torch.save(inputs, tmp_path / "inputs.pt")
    tower, mode, remote_tokens = json.loads(
        run_without_castling_hf(REMOTE_GENERATE, [tmp_path / "castled", tmp_path / "inputs.pt"], tmp_path)
    )
    assert (tower, mode) == (type(castled.model.vision_tower).__name__, "linear")
    assert torch.equal(torch.tensor(remote_tokens), tokens)


REMOTE_GENERATE = """
import json, sys
import torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
inputs = torch.load(sys.argv[2])
tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
tower = model.model.vision_tower
print(json.dumps([type(tower).__name__, tower.config.castling["attention_mode"], tokens.tolist()]))
"""


def test_a_held_gamma_gets_a_zero_gradient_while_the_castling_terms_learn():
    castled = castling_hf.castle(build("siglip_classifier", 0)).train()
    decayed(castled, 0.5)
    loss = castled(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2])).loss
    loss.backward()
    terms = [module for module in castled.modules() if isinstance(module, in_place.CastlingAttentionTerms)]
    assert all(torch.equal(term.linear_branch_scale.grad, torch.zeros(4)) for term in terms)
    assert all(term.residual_conv.weight.grad.abs().sum() > 0 for term in terms)
    assert castling_hf.training.held_linear_branch_scales(castled) == [term.linear_branch_scale for term in terms]


def test_castled_in_place_refuses_what_it_cannot_honour():
    castled = castling_hf.castle(build("siglip_vision", 0))
    with pytest.raises(TypeError, match="takes only the fields of Castling attention"):
        castling_hf.castle(build("siglip_vision", 0), hidden_size=64)
    with pytest.raises(TypeError, match="castled with the head it has"):
        castling_hf.castle(build("siglip_vision", 0), num_labels=5)
    with pytest.raises(ValueError, match="silently skip"):
        castled.set_attn_implementation("sdpa")
    attention = next(module for module in castled.modules() if type(module).__name__ == "SiglipAttention")
    tokens = (32 // castled.config.patch_size) ** 2
    hidden = torch.randn(1, tokens, 32)
    with pytest.raises(RuntimeError, match="before its tower's patch embeddings ran"):
        attention(hidden)
    castled(torch.randn(1, 3, 32, 32))
    bias = torch.randn(1, 1, tokens, tokens)
    with pytest.raises(ValueError, match="an attention bias"):
        attention(hidden, attention_mask=bias)
    with pytest.raises(ValueError, match="no attention maps to return"):
        castled(torch.randn(1, 3, 32, 32), output_attentions=True)
    plain = build("siglip_vision", 0)
    plain.config._attn_implementation_internal = "castling"
    with pytest.raises(ValueError, match="has no Castling terms"):
        plain(torch.randn(1, 3, 32, 32))


def eomt(image_size: int) -> transformers.EomtForUniversalSegmentation:
    torch.manual_seed(0)
    config = transformers.EomtConfig(
        **dict(TOWER, image_size=image_size, num_hidden_layers=4, patch_size=8),
        num_queries=5,
        num_blocks=2,
        num_labels=3,
        num_register_tokens=2,
        num_upscale_blocks=1,
    )
    return transformers.EomtForUniversalSegmentation(config).eval()


EOMT_OUTPUTS = ("masks_queries_logits", "class_queries_logits", "last_hidden_state")


@pytest.mark.parametrize("image_size", [32, 48])  # EoMT runs at the size it was built for: two sources
def test_eomt_castles_exactly_with_its_query_masks_in_training_and_evaluation(image_size):
    source = eomt(image_size)
    castled = castling_hf.castle(source)
    assert type(castled).__name__ == "CastledEomtForUniversalSegmentation"
    pixel_values = torch.randn(2, 3, image_size, image_size)
    for mode in ("eval", "train"):  # masks on the query rows in both (attn_mask_probs = 1)
        getattr(source, mode)(), getattr(castled, mode)()
        torch.manual_seed(1)
        expected = source(pixel_values)
        torch.manual_seed(1)
        got = castled(pixel_values)
        for name in EOMT_OUTPUTS:
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-4, rtol=0, msg=name)


def test_eomt_mask_annealing_reaches_the_linear_term_after_the_switch():
    castled = decayed(castling_hf.castle(eomt(32)), 0.0)
    pixel_values = torch.randn(2, 3, 32, 32)
    masked = castled(pixel_values).masks_queries_logits
    castled.attn_mask_probs.fill_(0.0)  # the annealing done: no mask on the query rows
    unmasked = castled(pixel_values).masks_queries_logits
    assert not torch.allclose(masked, unmasked, atol=1e-4)


def segments(results) -> list:
    return [[(entry["label"], entry["score"], entry["mask"].tobytes()) for entry in result] for result in results]


def test_a_reloaded_castled_eomt_segments_through_the_pipeline(tmp_path):
    castled = decayed(castling_hf.castle(eomt(32)), 0.0)
    castled.save_pretrained(tmp_path, inference=True)
    reloaded = transformers.AutoModelForUniversalSegmentation.from_pretrained(tmp_path)
    assert type(reloaded) is type(castled) and not reloaded.softmax_mask_scales()
    processor = transformers.EomtImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 32}, do_split_image=False)
    images = castling_hf.data.shapes(num_images=8, image_size=48)["train"]["image"][:2]
    for subtask, options in (("semantic", {}), ("panoptic", {"threshold": 0.0})):
        found = [
            segments(
                pipeline("image-segmentation", model=model, image_processor=processor)(
                    images, subtask=subtask, **options
                )
            )
            for model in (castled, reloaded)
        ]
        assert found[0] == found[1] and all(found[0]), subtask


def naflex_inputs(shapes: list[tuple[int, int]], max_patches: int, patch_size: int = 4) -> dict:
    """SigLIP2's NaFlex inputs: each image its own grid of patches, padded to `max_patches`."""
    mask = torch.zeros(len(shapes), max_patches, dtype=torch.long)
    for image, (rows, columns) in enumerate(shapes):
        mask[image, : rows * columns] = 1
    pixel_values = torch.randn(len(shapes), max_patches, 3 * patch_size**2)
    return dict(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=torch.tensor(shapes))


def siglip2(model_class, seed: int):
    draw = random.Random(seed)
    vision = dict(TOWER, patch_size=4, num_patches=64, hidden_act=draw.choice(["gelu_pytorch_tanh", "gelu"]))
    vision["layer_norm_eps"] = draw.choice([1e-6, 1e-5])
    torch.manual_seed(seed)
    if model_class is transformers.Siglip2VisionModel:
        return model_class(transformers.Siglip2VisionConfig(**vision)).eval()
    text = dict(TEXT, max_position_embeddings=16)
    return model_class(transformers.Siglip2Config(vision_config=vision, text_config=text, num_labels=3)).eval()


SIGLIP2_CLASSES = [
    transformers.Siglip2VisionModel,
    transformers.Siglip2Model,
    transformers.Siglip2ForImageClassification,
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("model_class", SIGLIP2_CLASSES, ids=lambda cls: cls.__name__)
def test_siglip2_naflex_castles_exactly_at_two_sets_of_shapes_and_never_reads_its_padding(model_class, seed):
    source = siglip2(model_class, seed)
    castled = castling_hf.castle(source)
    extra = {"input_ids": TEXT_IDS} if model_class is transformers.Siglip2Model else {}
    for shapes, max_patches in (([(8, 8), (4, 6)], 64), ([(5, 7), (6, 6)], 40)):
        inputs = dict(naflex_inputs(shapes, max_patches), **extra)
        expected, got = source(**inputs), castled(**inputs)
        for name, value in expected.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(got[name], value, atol=1e-4, rtol=0, msg=name)
    decayed(castled, 0.0)
    inputs = dict(naflex_inputs([(5, 7), (6, 6)], 40), **extra)
    before = castled(**inputs)
    inputs["pixel_values"][0, 35:] = 100.0  # the first image's padding
    after = castled(**inputs)
    name = "logits" if model_class is transformers.Siglip2ForImageClassification else "pooler_output"
    if model_class is transformers.Siglip2Model:
        name = "logits_per_image"
    torch.testing.assert_close(after[name], before[name])
    assert not torch.allclose(before[name], source(**inputs)[name], atol=1e-4)  # the linear term is in use


def test_siglip2_inference_checkpoint_reloads_with_its_auto_class(tmp_path):
    castled = decayed(castling_hf.castle(siglip2(transformers.Siglip2Model, 0)), 0.0)
    castled.save_pretrained(tmp_path, inference=True)
    reloaded = AutoModelForZeroShotImageClassification.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "CastledSiglip2Model" and not reloaded.softmax_mask_scales()
    inputs = dict(naflex_inputs([(5, 7), (6, 6)], 40), input_ids=TEXT_IDS)
    torch.testing.assert_close(reloaded(**inputs).logits_per_image, castled(**inputs).logits_per_image)


REMOTE_ZERO_SHOT = """
import json, sys
import torch
from transformers import AutoModelForZeroShotImageClassification
model = AutoModelForZeroShotImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
torch.manual_seed(0)
pixel_values = torch.randn(2, 3, 40, 40)
input_ids = torch.tensor([[3, 4, 5, 6, 7, 2], [8, 9, 10, 11, 2, 0]])
with torch.no_grad():
    logits = model(pixel_values=pixel_values, input_ids=input_ids, interpolate_pos_encoding=True).logits_per_image
print(json.dumps([type(model).__name__, model.config.vision_config.castling["attention_mode"], logits.tolist()]))
"""


@pytest.mark.parametrize("case", ["siglip", "clip"])
def test_an_inference_checkpoint_loads_with_remote_code_where_castling_hf_is_not_installed(case, tmp_path):
    castled = decayed(castling_hf.castle(build(case, 0)), 0.0)
    castled.save_pretrained(tmp_path / "castled", inference=True)
    name, mode, logits = json.loads(run_without_castling_hf(REMOTE_ZERO_SHOT, [tmp_path / "castled"], tmp_path))
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = castled(pixel_values=pixel_values, input_ids=TEXT_IDS, interpolate_pos_encoding=True)
    assert (name, mode) == (type(castled).__name__, "linear")
    assert torch.equal(torch.tensor(logits), expected.logits_per_image)


TIMM_OPTIONS = {  # timm VisionTransformer options: class token or not, pooling, registers, layer scale, norms
    "token_pool": dict(global_pool="token"),
    "avg_pool_registers_no_class_token": dict(global_pool="avg", class_token=False, reg_tokens=2),
    "map_pool_qk_norm_layer_scale": dict(global_pool="map", qk_norm=True, init_values=0.1, reg_tokens=1),
    "pre_norm_fc_norm_no_embed_class": dict(pre_norm=True, no_embed_class=True, fc_norm=True, global_pool="avg"),
}


def timm_vit(**options):
    timm = timm_helper().import_timm()
    timm_helper().let_transformers_use_timm()
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        num_classes=3,
        dynamic_img_size=True,
        **options,
    )
    with torch.no_grad():  # every weight off its initialisation, so that each one reaches the logits
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


@pytest.mark.parametrize("options", TIMM_OPTIONS.values(), ids=TIMM_OPTIONS)
def test_a_timm_vision_transformer_castles_in_place_exactly_and_reloads_its_inference_form(options, tmp_path):
    source = timm_vit(**options)
    castled = castling_hf.castle(source)
    assert type(castled).__name__ == "CastledTimmWrapperForImageClassification"
    for size in (32, 48):
        pixel_values = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(
                castled(pixel_values=pixel_values).logits, source(pixel_values), atol=1e-4, rtol=0
            )
    decayed(castled, 0.0).save_pretrained(tmp_path, inference=True)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(reloaded) is type(castled) and not reloaded.softmax_mask_scales()
    pixel_values = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        linear = castled(pixel_values=pixel_values).logits
        torch.testing.assert_close(reloaded(pixel_values=pixel_values).logits, linear)
        assert not torch.allclose(linear, source(pixel_values), atol=1e-3)  # the linear term is in use


def test_timm_models_castling_does_not_take_are_refused_by_name():
    timm = timm_helper().import_timm()
    timm_helper().let_transformers_use_timm()
    eva = timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=1, num_classes=3)
    with pytest.raises(TypeError, match="EvaAttention: EVA-02's rotary attention"):
        castling_hf.castle(eva)
    differential = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3, attn_layer="diff")
    with pytest.raises(TypeError, match="DiffAttention: differential attention"):
        castling_hf.castle(differential)


def test_a_timm_hub_name_castles_in_place_from_the_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub

    timm = timm_helper().import_timm()
    timm_helper().let_transformers_use_timm()
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=5).eval()
    snapshot = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k" / "snapshots" / ("0" * 40)
    timm.models.save_for_hf(source, snapshot)
    config = json.loads((snapshot / "config.json").read_text())
    del config["model_args"]  # what create_model was given here; the Hub's timm repositories carry none
    config["num_classes"] = 5
    (snapshot / "config.json").write_text(json.dumps(config))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    castled = castling_hf.castle("timm/vit_tiny_patch16_224.augreg_in21k")
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(castled(pixel_values=pixel_values).logits, source(pixel_values), atol=1e-4, rtol=0)


@pytest.mark.parametrize("alpha", [0.5, 0.0])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "query_rows_masked"])
def test_the_castling_terms_pass_gradcheck_in_float64(alpha, masked):
    torch.manual_seed(0)
    options = in_place.CastlingAttentionConfig(linear_branch_blend="convex", softmax_mask_threshold=None)
    terms = in_place.CastlingAttentionTerms(options, 8, 2, in_place.PatchGrid(size=(3, 3))).double()
    terms.softmax_branch.set_scale(alpha)
    query, key, value = (torch.randn(1, 11, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = None
    if masked:  # as EoMT: the first rows see a part of the patches only
        mask = torch.ones(1, 1, 11, 11, dtype=torch.bool)
        mask[..., :2, 5:] = False
    assert torch.autograd.gradcheck(lambda q, k, v: terms(q, k, v, None, 0.0, mask), (query, key, value))
