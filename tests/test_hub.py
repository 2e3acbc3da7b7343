import importlib.util
import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from safetensors import safe_open

from castling_hf import CastlingViTForImageClassification, image_processor_for

PUSH_EXAMPLE = Path(__file__).parents[1] / "examples" / "push_inference_checkpoint.py"
UPLOADED = {
    "README.md",
    "attention.py",
    "config.json",
    "configuration_castling_vit.py",
    "configuration_utils.py",
    "hub.py",
    "masked_softmax.py",
    "model.safetensors",
    "modeling_castling_vit.py",
    "modeling_utils.py",
    "preprocessor_config.json",
}


def push_example():
    spec = importlib.util.spec_from_file_location("push_inference_checkpoint", PUSH_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def trained_run(make_config, tmp_path):
    """A training-form checkpoint as the Trainer examples leave it: the model, its processor, and its evaluation."""
    model = CastlingViTForImageClassification(
        make_config(id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    )
    model.set_softmax_mask_scale(0.0)
    run = tmp_path / "run"
    model.save_pretrained(run)
    image_processor_for(model.config).save_pretrained(run)
    (run / "eval_results.json").write_text(json.dumps({"eval_linear_accuracy": 0.625, "eval_linear_loss": 1.0}))
    return run


@pytest.fixture
def offline_hub(monkeypatch):
    """The Hub is unreachable here: record what `HfApi` is asked to create and commit."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = repo_id
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["commit"] = {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}
        calls["commit_message"] = kwargs.get("commit_message")
        return "committed"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_dry_run_writes_the_inference_folder_with_card_code_and_processor(trained_run, tmp_path, offline_hub):
    folder = tmp_path / "dry-run"
    push_example().main(
        [str(trained_run), "--repo_id", "org/castling-vit-nano", "--dataset_name", "digits", "--dry_run", str(folder)]
    )
    assert {path.name for path in folder.iterdir()} == UPLOADED
    config = json.loads((folder / "config.json").read_text())
    assert config["attention_mode"] == "linear"
    assert (
        config["auto_map"]["AutoModelForImageClassification"]
        == "modeling_castling_vit.CastlingViTForImageClassification"
    )
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if "softmax" in name]
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "transformers"
    assert [(r.metric_type, r.metric_value, r.dataset_name) for r in card.data.eval_results] == [
        ("accuracy", 0.625, "digits")
    ]
    assert 'attention_mode="linear"' in card.text
    assert offline_hub == {}  # a dry run talks to no one


def test_push_uploads_exactly_the_dry_run_folder_with_hfapi_upload_folder(trained_run, tmp_path, offline_hub):
    example = push_example()
    arguments = [str(trained_run), "--repo_id", "org/castling-vit-nano", "--dataset_name", "digits"]
    example.main([*arguments, "--dry_run", str(tmp_path / "dry-run")])
    assert example.main(arguments) == "committed"
    assert offline_hub["repo"] == "org/castling-vit-nano"
    assert set(offline_hub["commit"]) == UPLOADED
    for name, content in offline_hub["commit"].items():
        assert content == (tmp_path / "dry-run" / name).read_bytes(), name


def test_model_push_to_hub_with_inference_is_the_same_push(trained_run, offline_hub):
    model = CastlingViTForImageClassification.from_pretrained(trained_run)
    assert model.push_to_hub("org/castling-vit-nano", inference=True, commit_message="linear form") == "committed"
    assert offline_hub["repo"] == "org/castling-vit-nano" and offline_hub["commit_message"] == "linear form"
    assert set(offline_hub["commit"]) == UPLOADED - {"README.md", "preprocessor_config.json"}
    assert json.loads(offline_hub["commit"]["config.json"])["attention_mode"] == "linear"
    assert model.config.attention_mode == "castling"  # the model in memory keeps its form
    with pytest.raises(TypeError, match="takes repo_id, commit_message, private, token and force"):
        model.push_to_hub("org/castling-vit-nano", inference=True, max_shard_size="1GB")


def test_push_refuses_a_live_softmax_branch_before_contacting_the_hub(trained_run, offline_hub):
    from castling_hf.hub import push_inference_checkpoint

    model = CastlingViTForImageClassification.from_pretrained(trained_run)
    model.set_softmax_mask_scale(0.5)
    with pytest.raises(ValueError, match="α = 0.5"):
        push_inference_checkpoint(model, "org/castling-vit-nano")
    assert offline_hub == {}  # no repository was created


def test_dry_run_refuses_a_folder_that_is_not_empty(trained_run):
    with pytest.raises(SystemExit):
        push_example().main([str(trained_run), "--repo_id", "org/x"])  # results found, but on which data set?
    with pytest.raises(ValueError, match="not empty"):
        push_example().main(
            [str(trained_run), "--repo_id", "org/x", "--dataset_name", "digits", "--dry_run", str(trained_run)]
        )


def test_a_task_model_around_a_castling_backbone_is_written_in_its_inference_form(make_config, tmp_path):
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    from castling_hf import set_softmax_mask_scale, softmax_mask_scales
    from castling_hf.hub import write_inference_checkpoint

    backbone_config = make_config(num_hidden_layers=4, out_indices=[1, 2, 3, 4])
    model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone_config, hidden_size=16, num_labels=3))
    set_softmax_mask_scale(model, 0.5)
    with pytest.raises(ValueError, match=r"α = 0.5 \(4 of 4 layers"):
        write_inference_checkpoint(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # nothing half-written

    def written_linear(folder):
        config = json.loads((folder / "config.json").read_text())
        with safe_open(folder / "model.safetensors", "pt") as weights:
            return config["backbone_config"]["attention_mode"] == "linear" and not [
                name for name in weights.keys() if "softmax" in name
            ]

    write_inference_checkpoint(model, tmp_path / "forced", force=True)
    set_softmax_mask_scale(model, 0.0)
    write_inference_checkpoint(model, tmp_path / "decayed")
    assert written_linear(tmp_path / "forced") and written_linear(tmp_path / "decayed")
    assert len(softmax_mask_scales(model)) == 4 and model.config.backbone_config.attention_mode == "castling"
