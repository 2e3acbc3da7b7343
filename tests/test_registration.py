import os

import pytest
import skimage.data
import torch
from conftest import run_without_castling_hf
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    DeformableDetrImageProcessorPil,
    SegformerImageProcessorPil,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    pipeline,
)
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

from castling_hf import (
    CastlingViTConfig,
    CastlingViTForImageClassification,
    CastlingViTForObjectDetection,
    CastlingViTModel,
    image_processor_for,
)

LABELS = {0: "cat", 1: "astronaut", 2: "camera"}


@pytest.fixture
def inference_checkpoint(make_config, tmp_path):
    config = make_config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = CastlingViTForImageClassification(config)
    model.set_softmax_mask_scale(0.0)
    model.save_pretrained(tmp_path, inference=True)
    image_processor_for(config).save_pretrained(tmp_path)
    return tmp_path


def test_auto_classes_resolve_castling_vit(make_config):
    settings = {k: v for k, v in make_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("castling_vit", **settings)
    assert isinstance(config, CastlingViTConfig)
    assert isinstance(AutoModel.from_config(config), CastlingViTModel)
    assert isinstance(AutoModelForImageClassification.from_config(config), CastlingViTForImageClassification)


def test_image_processor_reloads_through_auto_class(inference_checkpoint):
    processor = AutoImageProcessor.from_pretrained(inference_checkpoint)
    batch = processor(images=Image.fromarray(skimage.data.coffee()), return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("photo", ["astronaut", "camera"])  # RGB, and grayscale (2-D array → "L" image)
def test_pipeline_labels_a_real_photo(inference_checkpoint, photo):
    classifier = pipeline("image-classification", model=str(inference_checkpoint))
    image = Image.fromarray(getattr(skimage.data, photo)())
    predictions = classifier(image, top_k=3)
    assert {p["label"] for p in predictions} == set(LABELS.values())
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)

    model = AutoModelForImageClassification.from_pretrained(inference_checkpoint).eval()
    processor = AutoImageProcessor.from_pretrained(inference_checkpoint)
    with torch.no_grad():
        logits = model(**processor(images=image.convert("RGB"), return_tensors="pt")).logits[0]
    assert predictions[0]["label"] == LABELS[int(logits.argmax())]


# Only the checkpoint's own code can build the models here. One process for every load: each new Python spends
# seconds importing torch and transformers.
REMOTE_LOAD = """
import torch
import transformers

results = []
for directory, auto_class, expected_file in zip(*[iter(sys.argv[1:])] * 3):
    model = getattr(transformers, auto_class).from_pretrained(directory, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("castling_hf"), type(model).__module__
    inputs, expected = torch.load(expected_file)
    with torch.no_grad():
        output = model(pixel_values=inputs)
    got = output.logits if hasattr(output, "logits") else output.last_hidden_state
    results.append(f"{type(model).__name__} {model.config.attention_mode} {torch.equal(got, expected)}")
print(" | ".join(results))
"""


def test_checkpoints_load_with_remote_code_where_castling_hf_is_not_installed(
    inference_checkpoint, make_config, tmp_path_factory
):
    import json

    from castling_hf import CastlingViTForObjectDetection

    tmp_path = tmp_path_factory.mktemp("remote")  # beside the checkpoint, not inside it

    assert {"modeling_castling_vit.py", "attention.py", "configuration_castling_vit.py"} <= set(
        os.listdir(inference_checkpoint)
    )
    auto_map = json.loads((inference_checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "modeling_castling_vit.CastlingViTForImageClassification"
    inputs = torch.randn(2, 3, 32, 32)
    classifier = AutoModelForImageClassification.from_pretrained(inference_checkpoint).eval()
    detector = CastlingViTForObjectDetection(make_config()).eval()
    detector.save_pretrained(tmp_path / "detector")
    with torch.no_grad():
        expected = {
            "AutoModelForImageClassification": classifier(pixel_values=inputs).logits,
            # The base model from the same checkpoint, as `AutoModel.from_pretrained` on a ViT classifier gives.
            "AutoModel": classifier.castling_vit(pixel_values=inputs).last_hidden_state,
            "AutoModelForObjectDetection": detector(pixel_values=inputs).logits,
        }
    loads = []
    for auto_class, outputs in expected.items():
        torch.save((inputs, outputs), tmp_path / f"{auto_class}.pt")
        directory = tmp_path / "detector" if auto_class == "AutoModelForObjectDetection" else inference_checkpoint
        loads += [directory, auto_class, tmp_path / f"{auto_class}.pt"]
    assert run_without_castling_hf(REMOTE_LOAD, loads, tmp_path).split(" | ") == [
        "CastlingViTForImageClassification linear True",
        "CastlingViTModel linear True",
        "CastlingViTForObjectDetection castling True",
    ]


def segmentation_checkpoint(make_config, folder):
    backbone = make_config(num_hidden_layers=4, out_indices=[1, 2, 3, 4], simple_feature_pyramid=True)
    UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=64, **LABEL_MAPS)
    ).save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)


def detection_checkpoint(make_config, folder):
    CastlingViTForObjectDetection(make_config(**LABEL_MAPS)).save_pretrained(folder)
    DeformableDetrImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)


def classification_checkpoint(make_config, folder):
    config = make_config(**LABEL_MAPS)
    CastlingViTForImageClassification(config).save_pretrained(folder)
    image_processor_for(config).save_pretrained(folder)


LABEL_MAPS = dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})


@pytest.mark.parametrize(
    "task, save",
    [
        ("image-classification", classification_checkpoint),
        ("object-detection", detection_checkpoint),
        ("image-segmentation", segmentation_checkpoint),
    ],
)
def test_pipelines_take_our_checkpoints_without_logging_an_error(task, save, make_config, tmp_path):
    # The pipelines check the model's class against transformers' static name tables and log an error (then run
    # anyway) for a class they do not find there.
    save(make_config, tmp_path)
    with CaptureLogger(hf_logging.get_logger("transformers.pipelines.base")) as captured:
        results = pipeline(task, model=str(tmp_path))(Image.fromarray(skimage.data.astronaut()))
    assert isinstance(results, list) and "not supported" not in captured.out, captured.out[:300]
