import pytest
import skimage.data
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    pipeline,
)

from castling_hf import CastlingViTConfig, CastlingViTForImageClassification, CastlingViTModel, image_processor_for

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
