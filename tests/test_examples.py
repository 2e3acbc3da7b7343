"""The examples, run as a user runs them, for a few steps on the bundled digits."""

import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import timm_helper
from datasets import Features, List, Value, load_dataset
from huggingface_hub import ModelCard
from model_checks import saved_attention_modes
from safetensors import safe_open
from transformers import AutoModelForImageClassification

from castling_hf.data import shapes

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples" / "image-classification"
DETECTION = Path(__file__).parents[1] / "examples" / "object-detection" / "run_object_detection.py"


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_inference_checkpoint(directory: Path):
    assert saved_attention_modes(json.loads((directory / "config.json").read_text())) == {"linear"}
    assert (directory / "preprocessor_config.json").exists()
    with safe_open(directory / "model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if "softmax" in name]
    model = AutoModelForImageClassification.from_pretrained(directory)
    assert model.config.id2label[3] == "3"
    card = ModelCard.load(directory / "README.md")  # the checkpoint carries its card, with the run's result
    assert [result.metric_type for result in card.data.eval_results] == ["accuracy"]
    return card


def test_trainer_example_runs_end_to_end(tmp_path):
    example = load_module(EXAMPLES / "run_image_classification.py")
    results = example.main(
        f"--output_dir {tmp_path} --do_train --do_eval --max_steps 6 --max_train_samples 96 --max_eval_samples 64 "
        "--per_device_train_batch_size 16 --learning_rate 2e-3 --logging_steps 2 --save_strategy no "
        "--report_to none --disable_tqdm true".split()
    )
    assert results["train"]["softmax_mask_scale"] == 0.0
    assert results["castling"]["eval_castling_accuracy"] == results["linear"]["eval_linear_accuracy"]
    assert results["castling"]["eval_castling_loss"] == results["linear"]["eval_linear_loss"]
    card = assert_inference_checkpoint(tmp_path / "inference")
    assert card.data.eval_results[0].metric_value == results["linear"]["eval_linear_accuracy"]
    saved_metrics = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved_metrics["eval_linear_accuracy"] == results["linear"]["eval_linear_accuracy"]
    # The Trainer's own final save keeps the training form.
    assert saved_attention_modes(json.loads((tmp_path / "config.json").read_text())) == {"castling"}


def test_trainer_example_respects_do_train_and_do_eval(tmp_path):
    example = load_module(EXAMPLES / "run_image_classification.py")
    common = "--max_train_samples 32 --max_eval_samples 16 --per_device_train_batch_size 16 --report_to none"
    trained = example.main(f"--output_dir {tmp_path / 'a'} --do_train --max_steps 2 {common}".split())
    assert "train" in trained and "castling" not in trained and "linear" not in trained  # no evaluation asked for
    assert (tmp_path / "a" / "model.safetensors").exists() and (tmp_path / "a" / "inference").is_dir()

    evaluated = example.main(
        f"--model_name_or_path {tmp_path / 'a'} --output_dir {tmp_path / 'b'} --do_eval {common}".split()
    )
    assert "train" not in evaluated and evaluated["linear"]["eval_linear_accuracy"] >= 0.0
    assert not (tmp_path / "b" / "inference").exists()  # nothing was trained, so no new checkpoint is written

    with pytest.raises(ValueError, match="Neither --do_train nor --do_eval was given"):  # not a silent no-op
        example.main(f"--output_dir {tmp_path / 'c'} {common}".split())


def test_trainer_example_refuses_config_overrides_for_a_checkpoint_and_mismatched_heads_unless_asked(tmp_path):
    example = load_module(EXAMPLES / "run_image_classification.py")
    common = f"--output_dir {tmp_path / 'out'} --do_eval --max_eval_samples 8 --report_to none"
    example.main(
        f"--output_dir {tmp_path / 'new'} --do_train --max_steps 1 --max_train_samples 8 --report_to none".split()
    )
    checkpoint = tmp_path / "new"
    with pytest.raises(ValueError, match="--config_overrides applies to a new model"):
        example.main(
            [*f"--model_name_or_path {checkpoint} {common}".split(), "--config_overrides", '{"residual_conv": null}']
        )

    config = json.loads((checkpoint / "config.json").read_text())  # the same checkpoint with a 3-way head
    config["id2label"], config["label2id"] = {str(i): str(i) for i in range(3)}, {str(i): i for i in range(3)}
    (checkpoint / "config.json").write_text(json.dumps(config))
    AutoModelForImageClassification.from_pretrained(checkpoint, ignore_mismatched_sizes=True).save_pretrained(
        checkpoint
    )
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        example.main(f"--model_name_or_path {checkpoint} {common}".split())
    results = example.main(f"--model_name_or_path {checkpoint} {common} --ignore_mismatched_sizes true".split())
    assert "linear" in results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_trainer_example_under_accelerate_launch_with_two_processes(tmp_path):
    # Two real CPU processes: `accelerate launch --multi_gpu` starts them through torchrun, `--cpu` keeps them on
    # the CPU (DDP over gloo). The launcher's own `--cpu` would start a single process without mpirun.
    command = [
        sys.executable,
        *f"-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
        f"--dynamo_backend no --main_process_port {free_port()}".split(),
        str(EXAMPLES / "run_image_classification_no_trainer.py"),
        *f"--cpu --output_dir {tmp_path} --max_train_steps 4 --max_train_samples 64 "
        "--per_device_train_batch_size 8".split(),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]

    digests = dict(re.findall(r"rank (\d) of 2: parameter digest ([0-9a-f]{16})", output))
    assert sorted(digests) == ["0", "1"], output[-3000:]
    assert digests["0"] == digests["1"]
    assert re.findall(r"rank (\d) saved the inference checkpoint", output) == ["0"]

    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["processes"], results["steps"]) == (2, 4)
    assert results["castling_accuracy"] == results["linear_accuracy"]
    assert_inference_checkpoint(tmp_path / "inference")


def test_object_detection_example_reports_coco_map_before_and_after_the_switch(tmp_path):
    example = load_module(DETECTION)
    results = example.main(
        [
            *f"--output_dir {tmp_path} --do_train --do_eval --num_generated_images 60 --max_steps 4".split(),
            *"--per_device_train_batch_size 8 --per_device_eval_batch_size 6".split(),
            *"--eval_strategy steps --eval_steps 2 --save_strategy no --report_to none".split(),
            *["--disable_tqdm", "true", "--config_overrides", '{"num_hidden_layers": 2}'],
        ]
    )
    castling, linear = results["castling"], results["linear"]
    assert {"eval_castling_map", "eval_castling_map_50", "eval_castling_mar_100"} <= set(castling)
    assert castling["eval_castling_map"] == linear["eval_linear_map"]
    assert castling["eval_castling_map_50"] == linear["eval_linear_map_50"]
    assert 0.0 <= linear["eval_linear_map_50"] <= 1.0
    assert json.loads((tmp_path / "eval_results.json").read_text())["eval_linear_map"] == linear["eval_linear_map"]
    assert (tmp_path / "training_history.png").stat().st_size > 0
    inference = tmp_path / "inference"
    assert saved_attention_modes(json.loads((inference / "config.json").read_text())) == {"linear"}
    assert "DeformableDetr" in json.loads((inference / "preprocessor_config.json").read_text())["image_processor_type"]


def test_object_detection_example_trains_on_a_local_folder_in_the_detection_layout(tmp_path):
    folder = tmp_path / "my_shapes"
    folder.mkdir()
    for split, data in shapes(num_images=30, seed=3).items():
        data.to_parquet(folder / f"{split}.parquet")
    example = load_module(DETECTION)
    common = f"--output_dir {tmp_path / 'out'} --do_eval --report_to none --disable_tqdm true"
    results = example.main(
        [
            *f"--dataset_name {folder} {common} --do_train --max_steps 1".split(),
            "--config_overrides",
            '{"num_hidden_layers": 1}',
        ]
    )
    assert results["linear"]["eval_linear_map"] >= 0.0

    for split in ("train", "test"):  # categories as plain integers: no label names to give the model
        data = load_dataset("parquet", data_files=str(folder / f"{split}.parquet"), split="train")
        plain = data.cast(
            Features({**data.features, "objects": {**data.features["objects"], "category": List(Value("int64"))}})
        )
        plain.to_parquet(folder / f"{split}.parquet")
    with pytest.raises(ValueError, match="category a list of ClassLabel"):
        example.main(f"--dataset_name {folder} {common}".split())


def test_castle_pretrained_vit_converts_a_directory_with_its_image_processor(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    source = ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    )
    source.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3]).save_pretrained(tmp_path / "vit")
    example = load_module(Path(__file__).parents[1] / "examples" / "castle_pretrained_vit.py")
    example.main(
        [
            str(tmp_path / "vit"),
            "--output_dir",
            str(tmp_path / "castled"),
            "--config_overrides",
            '{"residual_conv": "sequence"}',
        ]
    )
    config = json.loads((tmp_path / "castled" / "config.json").read_text())
    castling = config["castling"]  # castled in place: the source's config, with the Castling fields of its tower
    assert (config["model_type"], castling["linear_branch_blend"], castling["residual_conv"]) == (
        "castled_vit",
        "convex",
        "sequence",
    )
    processor = json.loads((tmp_path / "castled" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.1, 0.2, 0.3]


def test_castle_pretrained_vit_saves_a_dinov2_source_with_imagenet_normalisation_not_vits(tmp_path):
    from transformers import Dinov2Config, Dinov2ForImageClassification

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    Dinov2ForImageClassification(config).save_pretrained(tmp_path / "dinov2")  # saved without its image processor
    example = load_module(Path(__file__).parents[1] / "examples" / "castle_pretrained_vit.py")
    example.main([str(tmp_path / "dinov2"), "--output_dir", str(tmp_path / "castled")])
    processor = json.loads((tmp_path / "castled" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["image_std"] == [0.229, 0.224, 0.225]
    assert processor["crop_size"] == {"height": 224, "width": 224}  # as facebook/dinov2-* checkpoints


def test_castle_pretrained_vit_demo_runs_the_recipe(tmp_path):
    example = load_module(Path(__file__).parents[1] / "examples" / "castle_pretrained_vit.py")
    summary = example.main(
        [
            "--demo",
            "--output_dir",
            str(tmp_path),
            "--source_epochs",
            "0.1",
            "--castle_epochs",
            "0.1",
            "--latency_sizes",
            "64",
            "--repeats",
            "1",
        ]
    )
    assert summary["start_max_abs_logit_difference"] < 1e-4
    assert summary["castled_accuracy_after_switch"] == summary["castled_accuracy_before_switch"]
    assert set(summary["latency_ms"][64]) == {"source_vit", "castled"}
    assert_inference_checkpoint(Path(summary["inference_dir"]))
    assert json.loads((tmp_path / "castle_demo.json").read_text())["source_accuracy"] == summary["source_accuracy"]
    # README's command for castling without labels, on what the demo wrote, with fewer steps.
    results = load_module(DISTILLATION).main(
        f"--model_name_or_path {tmp_path / 'source-vit'} --dataset_name {tmp_path / 'digit-images'} --output_dir "
        f"{tmp_path / 'without-labels'} --do_train --do_eval --max_steps 4 --per_device_train_batch_size 64 "
        "--report_to none".split()
    )
    assert saved_attention_modes(AutoModelForImageClassification.from_pretrained(results["inference_dir"]).config) == {
        "linear"
    }


SEGMENTATION = Path(__file__).parents[1] / "examples" / "semantic-segmentation" / "run_semantic_segmentation.py"
# The nano backbone with 8×8 patches and a narrow UperNet: a fraction of a second per step on 2 cores.
SEGMENTATION_ARGS = (
    "--do_eval --report_to none --disable_tqdm true --per_device_train_batch_size 4 --decode_hidden_size 16 "
    "--save_strategy no --logging_steps 1 --learning_rate 1e-3"
)
TINY_BACKBONE = ["--config_overrides", '{"patch_size": 8}']


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("segmentation")
    example = load_module(SEGMENTATION)
    results = example.main(
        f"--output_dir {output_dir} --do_train --max_steps 3 --num_generated_images 20 {SEGMENTATION_ARGS}".split()
        + TINY_BACKBONE
    )
    return output_dir, results


def test_segmentation_example_reports_mean_iou_before_and_after_the_switch(segmentation_run):
    output_dir, results = segmentation_run
    castling, linear = results["castling"], results["linear"]
    assert results["labels"] == ["background", "circle", "square", "triangle"]
    for name in ("mean_iou", "mean_accuracy", "overall_accuracy", "iou_background", "iou_triangle", "loss"):
        assert castling[f"eval_castling_{name}"] == linear[f"eval_linear_{name}"]
    assert 0.0 <= linear["eval_linear_mean_iou"] <= 1.0
    assert results["train"]["softmax_mask_scale"] == 0.0
    saved = json.loads((output_dir / "eval_results.json").read_text())
    assert saved["eval_linear_mean_iou"] == linear["eval_linear_mean_iou"]
    losses = [
        entry["loss"]
        for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    assert len(losses) == 3 and (output_dir / "training_history.png").stat().st_size > 0


def test_segmentation_inference_checkpoint_reloads_and_segments_a_real_photo(segmentation_run):
    import skimage
    import torch
    from PIL import Image
    from transformers import AutoModelForSemanticSegmentation, pipeline

    inference = segmentation_run[0] / "inference"
    config = json.loads((inference / "config.json").read_text())
    assert config["model_type"] == "upernet" and saved_attention_modes(config) == {"linear"}
    with safe_open(inference / "model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if "softmax" in name]
    model = AutoModelForSemanticSegmentation.from_pretrained(inference).eval()
    assert saved_attention_modes(model.backbone.config) == {"linear"} and model.config.id2label[3] == "triangle"
    card = ModelCard.load(inference / "README.md")
    assert card.data.pipeline_tag == "image-segmentation"
    assert card.data.eval_results[0].metric_value == segmentation_run[1]["linear"]["eval_linear_mean_iou"]

    photo = Image.fromarray(skimage.data.coffee())  # 600×400
    segments = pipeline("image-segmentation", model=str(inference))(photo)
    assert segments and {segment["label"] for segment in segments} <= set(model.config.id2label.values())
    masks = [np.asarray(segment["mask"]) for segment in segments]
    assert all(mask.shape == (400, 600) for mask in masks)
    assert sum((mask > 0).astype(int) for mask in masks).tolist() == np.ones((400, 600), int).tolist()  # a partition
    with torch.no_grad():  # the pipeline's label map is the model's own, resized to the photo
        inputs = pipeline("image-segmentation", model=str(inference)).image_processor(photo, return_tensors="pt")
        logits = model(**inputs).logits
    resized = torch.nn.functional.interpolate(logits, size=(400, 600), mode="bilinear", align_corners=False)
    expected = {model.config.id2label[int(i)] for i in resized.argmax(1).unique()}
    assert {segment["label"] for segment in segments} == expected


def as_palette_image(example):
    """The label map as a palette ("P") image, as many data sets store them: pixel values are the class ids."""
    from PIL import Image

    palette = Image.fromarray(np.asarray(example["annotation"]), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    return {"annotation": palette}


def scene_parse_folder(folder: Path, id2label: dict | None, palette: bool = False) -> Path:
    from castling_hf.data import shape_masks

    folder.mkdir()
    for split, data in shape_masks(num_images=20, image_size=32, seed=5).items():
        (data.map(as_palette_image) if palette else data).to_parquet(folder / f"{split}.parquet")
    if id2label is not None:
        (folder / "id2label.json").write_text(json.dumps(id2label))
    return folder


def test_segmentation_example_trains_upernet_on_a_multiscale_backbone(tmp_path):
    from transformers import AutoModelForSemanticSegmentation

    example = load_module(SEGMENTATION)
    results = example.main(
        f"--output_dir {tmp_path} --do_train --max_steps 2 --num_generated_images 12 {SEGMENTATION_ARGS} "
        "--backbone_family castling_mvitv2 --image_size 64".split()
    )
    assert results["castling"]["eval_castling_mean_iou"] == results["linear"]["eval_linear_mean_iou"]
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "inference")
    assert type(model.backbone).__name__ == "CastlingMViTv2Backbone"
    assert saved_attention_modes(model.backbone.config) == {"linear"}
    card = ModelCard.load(tmp_path / "inference" / "README.md")
    assert "stage widths / depths / heads" in card.text


def test_segmentation_example_puts_upernet_on_a_castled_timm_mvitv2(tmp_path):
    from transformers import AutoModelForSemanticSegmentation

    from castling_hf import castle

    timm = timm_helper().import_timm()
    source = timm.models.mvitv2.MultiScaleVit(timm.models.mvitv2.MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16))
    castle(source.eval()).save_pretrained(tmp_path / "castled")
    example = load_module(SEGMENTATION)
    example.main(
        f"--output_dir {tmp_path / 'out'} --do_train --max_steps 1 --num_generated_images 12 {SEGMENTATION_ARGS} "
        f"--image_size 64 --model_name_or_path {tmp_path / 'castled'}".split()
    )
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "out" / "inference")
    assert type(model.backbone).__name__ == "CastlingMViTv2Backbone"
    assert model.backbone.config.hidden_sizes == [16, 32, 64, 128]


@pytest.mark.parametrize(
    "id2label, palette, expected",
    [
        ({"0": "sky", "1": "ball", "2": "box", "3": "roof"}, False, ["sky", "ball", "box", "roof"]),
        (None, False, ["0", "1", "2", "3"]),  # no id2label.json: the ids in the training annotations name the classes
        (None, True, ["0", "1", "2", "3"]),  # palette label maps: their indices, not their colours, are the ids
    ],
)
def test_segmentation_example_trains_on_a_local_folder_in_the_scene_parse_150_layout(
    tmp_path, id2label, palette, expected
):
    folder = scene_parse_folder(tmp_path / "my_masks", id2label, palette)
    example = load_module(SEGMENTATION)
    results = example.main(
        f"--dataset_name {folder} --output_dir {tmp_path / 'out'} --image_size 32 --do_train --max_steps 1 "
        f"{SEGMENTATION_ARGS}".split()
        + TINY_BACKBONE
    )
    assert results["labels"] == expected and results["eval_samples"] == 4
    reloaded = json.loads((tmp_path / "out" / "inference" / "config.json").read_text())
    assert list(reloaded["id2label"].values()) == expected


def test_segmentation_example_reads_transformers_layout_prefers_validation_and_reduces_labels(tmp_path):
    from PIL import Image

    from castling_hf.data import shape_masks

    def ignored_strip(example):  # an annotated border of ignored pixels, as ADE20k-style data sets have
        label_map = np.asarray(example["annotation"]).copy()
        label_map[:, :2] = 255
        return {"annotation": Image.fromarray(label_map)}

    folder = tmp_path / "ade_like"
    folder.mkdir()
    generated = shape_masks(num_images=30, image_size=32, seed=6)
    splits = {"train": generated["train"], "validation": generated["test"].select(range(4)), "test": generated["test"]}
    for split, data in splits.items():  # transformers' layout: `label` for the label map
        data.map(ignored_strip).rename_column("annotation", "label").to_parquet(folder / f"{split}.parquet")
    example = load_module(SEGMENTATION)
    results = example.main(
        f"--dataset_name {folder} --do_reduce_labels --output_dir {tmp_path / 'out'} --image_size 32 --do_train "
        f"--max_steps 1 {SEGMENTATION_ARGS}".split()
        + TINY_BACKBONE
    )
    # The background (0) is ignored and the shapes 1, 2, 3 become classes 0, 1, 2; 255 is not a class.
    assert results["labels"] == ["1", "2", "3"] and results["eval_samples"] == 4  # the validation split
    card = ModelCard.load(tmp_path / "out" / "inference" / "README.md")
    assert card.data.eval_results[0].dataset_split == "validation"


def test_segmentation_example_refuses_annotations_outside_the_labels_and_other_layouts(tmp_path):
    folder = scene_parse_folder(tmp_path / "masks", {"0": "background", "1": "circle"})  # squares, triangles unnamed
    example = load_module(SEGMENTATION)
    common = f"--output_dir {tmp_path / 'out'} --image_size 32 {SEGMENTATION_ARGS}".split() + TINY_BACKBONE
    with pytest.raises(ValueError, match=r"'train' annotations .* hold class ids \[2, 3\] .* but there are 2 classes"):
        example.main(["--dataset_name", str(folder), "--do_train", *common])  # refused before any training step
    assert not (tmp_path / "out").exists()

    for split in ("train", "test"):
        data = load_dataset("parquet", data_files=str(folder / f"{split}.parquet"), split="train")
        data.rename_column("annotation", "mask").to_parquet(folder / f"{split}.parquet")
    with pytest.raises(ValueError, match=r"needs an 'image' and an 'annotation'"):
        example.main(["--dataset_name", str(folder), *common])


def test_segmentation_example_evaluates_its_checkpoint_batch_by_batch_to_the_same_mean_iou(segmentation_run, tmp_path):
    output_dir, results = segmentation_run
    example = load_module(SEGMENTATION)
    evaluated = example.main(
        f"--model_name_or_path {output_dir / 'inference'} --output_dir {tmp_path} --num_generated_images 20 "
        f"--batch_eval_metrics --per_device_eval_batch_size 3 {SEGMENTATION_ARGS}".split()
    )
    assert "castling" not in evaluated  # the checkpoint is in the inference form already
    assert evaluated["linear"]["eval_linear_mean_iou"] == pytest.approx(results["linear"]["eval_linear_mean_iou"])


def test_segmentation_example_puts_a_new_upernet_on_a_castling_encoder_checkpoint_and_refuses_others(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    from castling_hf import CastlingViTConfig, CastlingViTForImageClassification, image_processor_for

    example = load_module(SEGMENTATION)
    encoder = CastlingViTForImageClassification(CastlingViTConfig.from_size("nano", patch_size=8, num_labels=10))
    encoder.save_pretrained(tmp_path / "classifier")
    arguments = example.ModelArguments(model_name_or_path=str(tmp_path / "classifier"), decode_hidden_size=16)
    model, processor = example.load_model_and_processor(arguments, example.DataTrainingArguments(), ["a", "b"])
    assert model.config.num_labels == 2 and model.backbone.out_indices == [1, 2, 3, 4]
    torch.testing.assert_close(
        model.backbone.encoder.layers[3].attention.qkv_proj.weight,
        encoder.castling_vit.encoder.layers[3].attention.qkv_proj.weight,
        rtol=0,
        atol=0,
    )
    assert (processor.size.height, processor.size.width) == (64, 64)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]  # no processor saved with it: ImageNet's
    image_processor_for(encoder.config).save_pretrained(tmp_path / "classifier")  # the encoder's own normalisation
    _, processor = example.load_model_and_processor(arguments, example.DataTrainingArguments(), ["a", "b"])
    assert list(processor.image_mean) == list(image_processor_for(encoder.config).image_mean) == [0.5] * 3

    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(
        tmp_path / "vit"
    )
    arguments.model_name_or_path = str(tmp_path / "vit")
    with pytest.raises(ValueError, match="'vit' checkpoint without a Castling backbone"):
        example.load_model_and_processor(arguments, example.DataTrainingArguments(), ["a", "b"])


DISTILLATION = Path(__file__).parents[1] / "examples" / "distillation" / "run_castle_distillation.py"
# No optimiser settings: the example's own defaults.
DISTILLATION_ARGS = (
    "--do_train --do_eval --max_steps 8 --per_device_train_batch_size 8 --logging_steps 4 --save_strategy no "
    "--report_to none --disable_tqdm true"
)


def images_folder(folder: Path, size: int = 32, labels: bool = False) -> Path:
    """Train and test splits of the bundled digits' images, and their labels only with `labels`."""
    from castling_hf.data import digits

    folder.mkdir()
    for split, data in digits().items():
        data = data.select(range(40)).map(lambda example: {"image": example["image"].resize((size, size))})
        (data if labels else data.remove_columns("label")).to_parquet(folder / f"{split}.parquet")
    return folder


def save_vit_source(folder: Path, id2label: dict) -> Path:
    """A tiny softmax ViT classifier with sharp attention, saved with an image processor of its own."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(0)
    source = ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            id2label=id2label,
            label2id={name: index for index, name in id2label.items()},
        )
    )
    with torch.no_grad():
        for parameter in source.vit.parameters():
            parameter.normal_(0.0, 0.3)
    source.save_pretrained(folder)
    ViTImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.3, 0.3]
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_source(tmp_path_factory):
    return save_vit_source(tmp_path_factory.mktemp("vit_source"), {i: f"class {i}" for i in range(4)})


def recomputed_fidelity(castled_dir: Path, source_dir: Path, data_dir: Path, auto_class, label_column=None) -> dict:
    """The fidelity report of a saved castled checkpoint against its saved source, computed here, in one process,
    from the files, on the held-out split prepared as the example prepares it."""
    from datasets import load_dataset
    from torch.utils.data import DataLoader, default_collate

    from castling_hf import source_image_processor
    from castling_hf.conversion import load_source
    from castling_hf.distillation import fidelity_report

    example = load_module(DISTILLATION)
    transform = example.make_transform(source_image_processor(str(source_dir)), "image", False, 0, label_column)
    held_out = load_dataset(str(data_dir))["test"].with_transform(transform)
    batches = DataLoader(held_out, batch_size=5, collate_fn=default_collate)
    return fidelity_report(auto_class.from_pretrained(castled_dir), load_source(str(source_dir)), batches)


def assert_same_report(report: dict, expected: dict) -> None:
    assert report.keys() == expected.keys()
    for scale, entry in expected.items():
        assert report[scale].keys() == entry.keys(), scale
        for name, value in entry.items():
            assert report[scale][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (scale, name)


def test_distillation_example_castles_a_classifier_on_images_without_labels(tmp_path, vit_source):
    import skimage
    from PIL import Image
    from transformers import pipeline

    folder = images_folder(tmp_path / "images")
    example = load_module(DISTILLATION)
    output_dir = tmp_path / "castled"
    results = example.main(
        f"--model_name_or_path {vit_source} --dataset_name {folder} --output_dir {output_dir} "
        f"{DISTILLATION_ARGS}".split()
    )
    assert results["train"]["softmax_mask_scale"] == 0.0 and results["inference_dir"] == str(output_dir)
    source_processor = json.loads((vit_source / "preprocessor_config.json").read_text())
    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    for key in ("image_processor_type", "image_mean", "image_std", "size"):
        assert processor[key] == source_processor[key]
    assert saved_attention_modes(json.loads((output_dir / "config.json").read_text())) == {"linear"}

    model = AutoModelForImageClassification.from_pretrained(output_dir)
    source = AutoModelForImageClassification.from_pretrained(vit_source)
    assert type(model).__name__ == "CastledViTForImageClassification"
    torch.testing.assert_close(model.classifier.weight, source.classifier.weight)  # the head stayed the source's
    predictions = pipeline("image-classification", model=str(output_dir))(Image.fromarray(skimage.data.coffee()))
    assert {prediction["label"] for prediction in predictions} <= {f"class {i}" for i in range(4)}

    report = json.loads((output_dir / "fidelity.json").read_text())
    assert [entry["resolution"] for entry in report.values()] == [[32, 32], [64, 64]]
    # The report is the saved model's, measured again here from the files; no accuracy without labels.
    assert_same_report(report, recomputed_fidelity(output_dir, vit_source, folder, AutoModelForImageClassification))
    assert not any("castled_accuracy" in entry for entry in report.values())
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.base_model is None  # a local folder: no Hub name to link
    assert str(vit_source) in card.text and "Fidelity to the source" in card.text
    assert f"{report['2x']['feature_cosine']:.4f}" in card.text


def test_the_distillation_examples_defaults_are_the_routes_and_it_says_what_it_lacks(tmp_path, vit_source):
    example = load_module(DISTILLATION)
    required = f"--model_name_or_path x --dataset_name y --output_dir {tmp_path} --do_train --max_steps 1500"
    *_, training_args = example.argument_parser().parse_args_into_dataclasses(args=required.split())
    assert (training_args.learning_rate, str(training_args.lr_scheduler_type.value)) == (4e-3, "cosine")
    assert (training_args.warmup_steps, training_args.weight_decay) == (0.03, 0.05)
    with pytest.raises(ValueError, match="No images to distil on: give --dataset_name"):
        example.main(f"--model_name_or_path {vit_source} --output_dir {tmp_path / 'out'} --do_train".split())


def test_distillation_example_reports_accuracy_only_for_the_models_own_classes(tmp_path, vit_source):
    folder = images_folder(tmp_path / "digits", labels=True)
    example = load_module(DISTILLATION)
    common = f"--dataset_name {folder} --max_eval_samples 20 --report_to none --disable_tqdm true --do_eval"
    foreign = example.main(f"--model_name_or_path {vit_source} --output_dir {tmp_path / 'a'} {common}".split())
    assert not any("castled_accuracy" in entry for entry in foreign["fidelity"].values())  # "0" … "9" ≠ "class 0" …
    digit_source = save_vit_source(tmp_path / "digit_source", {i: str(i) for i in range(10)})
    own = example.main(f"--model_name_or_path {digit_source} --output_dir {tmp_path / 'b'} {common}".split())
    assert all(0 <= entry["castled_accuracy"] <= 1 for entry in own["fidelity"].values())
    assert own["fidelity"]["1x"]["castled_accuracy"] == own["fidelity"]["1x"]["source_accuracy"]  # α = 1: untrained


def test_distillation_example_keeps_the_best_model_resumes_and_pushes_only_the_inference_form(
    tmp_path, vit_source, monkeypatch, caplog
):
    from huggingface_hub import HfApi

    folder = images_folder(tmp_path / "images")
    example = load_module(DISTILLATION)
    uploads = []

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        uploads.append((repo_id, {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}))

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: type("Url", (), {"repo_id": repo_id}))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    output_dir = tmp_path / "castled"
    # Evaluated every 2 steps, the decay ending at half the run: the best checkpoint's loss is measured after the
    # switch it would get, so it is not one from before the decay (α = 1 gives a loss of 0 against the source).
    arguments = (
        f"--model_name_or_path {vit_source} --dataset_name {folder} --output_dir {output_dir} --do_train "
        "--per_device_train_batch_size 8 --mask_decay_end 0.5 --eval_strategy steps --eval_steps 2 --save_steps 2 "
        "--logging_steps 2 --load_best_model_at_end true --report_to none --disable_tqdm true --push_to_hub true "
        "--hub_model_id me/castled"
    )
    results = example.main(f"{arguments} --max_steps 4".split())
    assert (output_dir / "checkpoint-2" / "preprocessor_config.json").exists()  # checkpoints carry the processor
    assert results["inference_dir"] == str(output_dir)
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evaluated = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
    assert min(evaluated.values()) > 1e-4  # the switched model's loss, never the source's own
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{min(evaluated, key=evaluated.get)}")
    (repo_id, files), *_ = uploads
    assert repo_id == "me/castled" and len(uploads) == 1  # one push, of the inference checkpoint alone
    assert saved_attention_modes(json.loads(files["config.json"])) == {"linear"} and "preprocessor_config.json" in files

    with caplog.at_level(logging.INFO):
        example.main(f"{arguments} --max_steps 6".split())  # the same folder, a longer run: it resumes
    assert f"resuming training at {output_dir / 'checkpoint-4'}" in caplog.text
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [2, 4, 6]


def test_distillation_example_keeps_a_segmenters_head_and_scores_its_label_maps(tmp_path):
    from transformers import (
        AutoModelForSemanticSegmentation,
        Dinov2Config,
        SegformerImageProcessorPil,
        UperNetConfig,
        UperNetForSemanticSegmentation,
        pipeline,
    )

    torch.manual_seed(0)
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=32,
        patch_size=8,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=True,
    )
    source = UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=4, auxiliary_in_channels=32)
    )
    source.save_pretrained(tmp_path / "source")
    SegformerImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "source")
    folder = scene_parse_folder(tmp_path / "masks", None)  # images and annotations: the annotations are not trained on
    example = load_module(DISTILLATION)
    results = example.main(
        f"--model_name_or_path {tmp_path / 'source'} --dataset_name {folder} --output_dir {tmp_path / 'castled'} "
        f"--label_column_name annotation {DISTILLATION_ARGS}".split()
    )
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "castled")
    assert saved_attention_modes(model.backbone.config) == {"linear"}
    for name, tensor in source.state_dict().items():
        if not name.startswith("backbone."):
            torch.testing.assert_close(model.state_dict()[name], tensor)  # UperNet's heads: unchanged
    expected = recomputed_fidelity(
        tmp_path / "castled", tmp_path / "source", folder, AutoModelForSemanticSegmentation, "annotation"
    )
    assert_same_report(results["fidelity"], expected)
    assert all("castled_mean_iou" in entry for entry in expected.values())
    segments = pipeline("image-segmentation", model=str(tmp_path / "castled"))(folder_image(folder))
    assert {segment["label"] for segment in segments} <= set(model.config.id2label.values())


def test_distillation_example_castles_a_timm_mvitv2_checkpoint(tmp_path):
    timm = timm_helper().import_timm()
    source = timm.create_model("mvitv2_tiny", img_size=32, num_classes=3)  # a folder timm builds: a registered model
    timm.models.save_for_hf(source, tmp_path / "timm")
    example = load_module(DISTILLATION)
    results = example.main(
        f"--model_name_or_path {tmp_path / 'timm'} --dataset_name {images_folder(tmp_path / 'images')} "
        f"--output_dir {tmp_path / 'castled'} {DISTILLATION_ARGS}".split()
    )
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "castled")
    assert type(model).__name__ == "CastlingMViTv2ForImageClassification" and model.config.attention_mode == "linear"
    assert results["fidelity"]["1x"]["resolution"] == [32, 32]


def folder_image(folder: Path):
    from datasets import load_dataset

    return load_dataset(str(folder))["test"][0]["image"]


def accelerate_launch(script: Path, arguments: str, tmp_path: Path) -> str:
    """Run `script` in two CPU processes over gloo, as `accelerate launch --multi_gpu` starts them on GPUs (through
    torchrun), with gradient checkpointing, accumulation and bf16 autocast; returns its output."""
    command = [
        sys.executable,
        *f"-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 "
        f"--dynamo_backend no --main_process_port {free_port()}".split(),
        str(script),
        *f"{arguments} --use_cpu --ddp_backend gloo --bf16 --gradient_checkpointing "
        "--gradient_accumulation_steps 2".split(),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]
    return output


def test_distillation_example_under_accelerate_launch_as_on_gpus(tmp_path, vit_source):
    from transformers import pipeline

    folder = images_folder(tmp_path / "images")
    output_dir = tmp_path / "castled"
    accelerate_launch(
        DISTILLATION,
        f"--model_name_or_path {vit_source} --dataset_name {folder} --output_dir {output_dir} {DISTILLATION_ARGS}",
        tmp_path,
    )
    results = json.loads((output_dir / "results.json").read_text())
    assert results["processes"] == 2 and results["train"]["softmax_mask_scale"] == 0.0
    assert saved_attention_modes(AutoModelForImageClassification.from_pretrained(output_dir).config) == {"linear"}
    assert json.loads((output_dir / "preprocessor_config.json").read_text())["image_mean"] == [0.1, 0.2, 0.3]
    predictions = pipeline("image-classification", model=str(output_dir))(folder_image(folder).convert("RGB"))
    assert {prediction["label"] for prediction in predictions} <= {f"class {i}" for i in range(4)}
    # Each process scored half the held-out batches under bf16 autocast, their counts gathered: the report is the
    # one process's report of the saved model, to bf16's rounding.
    report, expected = (
        results["fidelity"],
        recomputed_fidelity(output_dir, vit_source, folder, AutoModelForImageClassification),
    )
    for scale in expected:
        assert report[scale]["feature_cosine"] == pytest.approx(expected[scale]["feature_cosine"], abs=2e-2)
        assert report[scale]["prediction_agreement"] == pytest.approx(expected[scale]["prediction_agreement"], abs=0.1)


def test_classification_example_fine_tunes_a_castled_model_under_accelerate_launch_as_on_gpus(tmp_path, vit_source):
    from transformers import pipeline

    castle_vit = load_module(Path(__file__).parents[1] / "examples" / "castle_pretrained_vit.py")
    castle_vit.castle(str(vit_source), str(tmp_path / "castled"), {})  # the convex blend: γ held during the decay
    output_dir = tmp_path / "fine-tuned"
    accelerate_launch(
        EXAMPLES / "run_image_classification.py",
        f"--model_name_or_path {tmp_path / 'castled'} --ignore_mismatched_sizes true --output_dir {output_dir} "
        "--do_train --do_eval --max_steps 6 --max_train_samples 96 --max_eval_samples 32 "
        "--per_device_train_batch_size 8 --learning_rate 2e-3 --save_strategy no --report_to none --disable_tqdm true",
        tmp_path,
    )
    assert_inference_checkpoint(output_dir / "inference")
    from castling_hf.data import digits

    digit = digits()["test"][0]["image"].convert("RGB")
    labels = {
        prediction["label"]
        for prediction in pipeline("image-classification", model=str(output_dir / "inference"))(digit)
    }
    assert labels <= {str(i) for i in range(10)}


def test_a_run_that_never_evaluates_distils_on_every_image():
    from types import SimpleNamespace

    from datasets import Dataset, DatasetDict

    examples = load_module(ROOT / "examples" / "castling_examples.py")
    dataset = DatasetDict(train=Dataset.from_dict({"index": list(range(20))}))
    limits = SimpleNamespace(train_val_split=0.15, max_train_samples=None, max_eval_samples=None)
    split = examples.held_out_split(dataset, limits, seed=0)
    assert (len(split["train"]), len(split["test"])) == (17, 3)
    whole = examples.held_out_split(dataset, limits, seed=0, hold_out=False)
    assert list(whole) == ["train"] and whole["train"]["index"] == list(range(20))
