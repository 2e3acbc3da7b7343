import importlib.util
import json
from pathlib import Path

import pytest
from huggingface_hub import EvalResult, ModelCard

from castling_hf import CASTLING_VIT_SIZES, CastlingViTConfig
from castling_hf.model_card import castling_model_card, eval_results_from_metrics

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_model_cards", ROOT / "model_cards" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def card_path(size: str) -> Path:
    return ROOT / "model_cards" / f"castling-vit-{size}" / "README.md"


def test_eval_results_come_from_the_trainer_metrics_that_a_card_reports():
    metrics = {"eval_linear_accuracy": 0.9, "eval_linear_loss": 0.3, "eval_castling_accuracy": 0.1}
    results = eval_results_from_metrics(metrics, "eval_linear_", "image-classification", "digits")
    assert [(r.metric_type, r.metric_value, r.dataset_name) for r in results] == [("accuracy", 0.9, "digits")]


def test_a_detection_card_has_the_detection_pipeline_and_a_card_without_results_says_so(tmp_path):
    config = CastlingViTConfig.from_size("nano", attention_mode="linear")
    card = castling_model_card(config, "det", architecture="CastlingViTForObjectDetection")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.pipeline_tag == "object-detection"
    assert "AutoModelForObjectDetection" in loaded.text and "No measurement" in loaded.text
    assert loaded.data.eval_results is None


@pytest.mark.parametrize("size", list(CASTLING_VIT_SIZES))
def test_each_size_has_a_card_with_the_hub_metadata(size):
    card = ModelCard.load(card_path(size))
    data = card.data
    assert data.pipeline_tag == "image-classification" and data.library_name == "transformers"
    assert data.license == "apache-2.0" and "castling-vit" in data.tags
    assert data.eval_results and data.metrics == sorted({r.metric_type for r in data.eval_results})
    assert "trust_remote_code=True" in card.text and 'pipeline("image-classification"' in card.text
    assert "CastlingMaskDecayCallback" in card.text and "@inproceedings{you2023castling" in card.text
    assert f"| hidden size / layers / heads | {CASTLING_VIT_SIZES[size]['hidden_size']} /" in card.text


def test_the_nano_card_reports_the_accuracy_study_of_the_default_variant():
    study = json.loads((RESULTS / "accuracy.json").read_text())
    expected = {row["task"]: row["accuracy_mean"] / 100 for row in study["summary"] if row["variant"] == "castling"}
    card = ModelCard.load(card_path("nano"))
    got = {r.dataset_type: r.metric_value for r in card.data.eval_results if r.metric_type == "accuracy"}
    assert got == {"digits": expected["digits"], "focus_digits": expected["focus"]}
    assert set(card.data.datasets) == {"digits", "focus_digits"}


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_speed_numbers_in_the_cards_are_those_of_the_speed_json(size):
    expected = {}
    for path in RESULTS.rglob("speed.json"):
        for row in json.loads(path.read_text())["inference"]:
            if row["size"] == size and row["batch"] == 1:
                expected[row["resolution"]] = 1000 * row["latency_s"]["castling_linear"]
    assert expected, f"no speed measurement of {size}"
    card = ModelCard.load(card_path(size))
    got = {
        int(r.dataset_name.split("×")[0].removeprefix("random ")): r.metric_value
        for r in card.data.eval_results
        if r.metric_type == "latency"
    }
    assert got == expected


def test_the_cards_are_exactly_what_the_script_generates(tmp_path):
    load_generator().generate(tmp_path)
    for size in CASTLING_VIT_SIZES:
        generated = (tmp_path / f"castling-vit-{size}" / "README.md").read_text()
        assert card_path(size).read_text() == generated, (
            f"model_cards/castling-vit-{size} is stale: run model_cards/generate.py"
        )


def test_eval_result_table_in_the_body_matches_the_metadata():
    card = ModelCard.load(card_path("small"))
    for result in card.data.eval_results:
        assert f"| {result.metric_value:.4g} |" in card.text
    assert isinstance(card.data.eval_results[0], EvalResult)


@pytest.mark.parametrize(
    "model_class, task, auto_class",
    [
        ("SiglipForImageClassification", "image-classification", "AutoModelForImageClassification"),
        ("SiglipModel", "zero-shot-image-classification", "AutoModelForZeroShotImageClassification"),
        ("SiglipVisionModel", "image-feature-extraction", "AutoModel"),
    ],
)
def test_the_card_of_a_model_castled_in_place_names_its_task_and_its_castling(model_class, task, auto_class):
    import torch
    import transformers

    import castling_hf
    from castling_hf.model_card import distillation_card

    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32)
    tower["patch_size"] = 8
    torch.manual_seed(0)
    if model_class == "SiglipVisionModel":
        config = transformers.SiglipVisionConfig(**tower)
    else:
        text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=16)
        config = transformers.SiglipConfig(vision_config=tower, text_config=text, num_labels=3)
    castled = castling_hf.castle(getattr(transformers, model_class)(config))
    card = distillation_card(castled, "google/siglip-base-patch16-224", "images", None)
    assert card.data.pipeline_tag == task
    assert f"{auto_class}.from_pretrained" in card.text
    assert "| hidden size / layers / heads | 32 / 2 / 4 |" in card.text and "| blend of the linear term" in card.text
