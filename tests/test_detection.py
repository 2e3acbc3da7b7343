"""CastlingViTForObjectDetection: set loss, overfitting, the switch, the pipeline, bad labels."""

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from transformers import AutoModelForObjectDetection, YolosImageProcessorPil, pipeline

from castling_hf import CastlingViTForObjectDetection, CastlingViTObjectDetectionOutput
from castling_hf.data import SHAPE_CLASSES, shapes

LABELS = dict(enumerate(SHAPE_CLASSES))


@pytest.fixture
def make_detector(make_config):
    def make(**overrides):
        config = make_config(
            id2label=LABELS,
            label2id={v: k for k, v in LABELS.items()},
            num_detection_tokens=8,
            image_size=64,
            **overrides,
        )
        return CastlingViTForObjectDetection(config)

    return make


def processor():
    return YolosImageProcessorPil(size={"height": 64, "width": 64})


def encoded_batch(records):
    annotations = [
        {
            "image_id": r["image_id"],
            "annotations": [
                {"image_id": r["image_id"], "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                for b, c in zip(r["objects"]["bbox"], r["objects"]["category"], strict=True)
            ],
        }
        for r in records
    ]
    encoded = processor()(images=[r["image"] for r in records], annotations=annotations, return_tensors="pt")
    return encoded["pixel_values"], encoded["labels"]


def box_iou(a, b):
    """IoU of (cx, cy, w, h) boxes."""

    def corners(box):
        return box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2, box[1] + box[3] / 2

    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = corners(a), corners(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    return inter / ((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter)


def test_outputs_follow_the_yolos_layout(make_detector):
    model = make_detector().eval()
    with torch.no_grad():
        output = model(torch.randn(2, 3, 64, 64))
    assert isinstance(output, CastlingViTObjectDetectionOutput)
    assert output.logits.shape == (2, 8, 4) and output.pred_boxes.shape == (2, 8, 4)
    assert 0 <= output.pred_boxes.min() and output.pred_boxes.max() <= 1
    assert output.last_hidden_state.shape == (2, 1 + 8 + 16 * 16, 64)


def test_set_loss_falls_and_a_small_batch_is_overfit(make_detector):
    records = [r for r in shapes(num_images=12, seed=1)["train"] if r["objects"]["bbox"]][:2]
    pixel_values, labels = encoded_batch(records)
    model = make_detector(softmax_mask_threshold=None).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(300):
        output = model(pixel_values, labels=labels)
        losses.append(output.loss.item())
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert {"loss_ce", "loss_bbox", "loss_giou"} <= set(output.loss_dict)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])

    model.eval()
    with torch.no_grad():
        output = model(pixel_values)
    for predicted, target in zip(output.pred_boxes, labels, strict=True):
        # Match each target to one detection token, as the set loss does, and require a tight box.
        cost = -np.array([[box_iou(p.tolist(), t.tolist()) for t in target["boxes"]] for p in predicted])
        rows, columns = linear_sum_assignment(cost)
        assert all(-cost[r, c] > 0.5 for r, c in zip(rows, columns, strict=True)), -cost[rows, columns]


def test_auxiliary_loss_adds_a_term_per_intermediate_layer(make_detector):
    records = [r for r in shapes(num_images=12, seed=1)["train"] if r["objects"]["bbox"]][:2]
    pixel_values, labels = encoded_batch(records)
    output = make_detector(auxiliary_loss=True)(pixel_values, labels=labels)
    assert {"loss_ce_0", "loss_bbox_0", "loss_giou_0"} <= set(output.loss_dict)  # 2 layers: one intermediate
    assert len(output.auxiliary_outputs) == 1


@pytest.mark.parametrize(
    "labels, message",
    [
        (
            [{"class_labels": torch.tensor([5]), "boxes": torch.rand(1, 4)}] * 2,
            r"class id 5, outside the model's 3 classes",
        ),
        ([{"class_labels": torch.tensor([1]), "boxes": torch.rand(1, 3)}] * 2, r"boxes of shape \(1, 3\)"),
        ([{"boxes": torch.rand(1, 4)}] * 2, r"must have 'class_labels' and 'boxes'"),
        ([{"class_labels": torch.tensor([1]), "boxes": torch.rand(1, 4)}], r"1 label dicts for a batch of 2"),
    ],
)
def test_bad_labels_get_a_clear_error(make_detector, labels, message):
    with pytest.raises(ValueError, match=message):
        make_detector()(torch.randn(2, 3, 64, 64), labels=labels)


@pytest.fixture
def detection_checkpoint(make_detector, tmp_path):
    model = make_detector()
    model.set_softmax_mask_scale(0.0)
    model.save_pretrained(tmp_path, inference=True)
    processor().save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("image", ["coffee", "shapes"])  # a 600×400 photo; a generated 96×96 image
def test_pipeline_returns_boxes_in_input_pixels(detection_checkpoint, image):
    picture = (
        Image.fromarray(skimage.data.coffee())
        if image == "coffee"
        else shapes(num_images=5, image_size=96, seed=2)["train"][0]["image"]
    )
    detector = pipeline("object-detection", model=str(detection_checkpoint))
    found = detector(picture, threshold=0.0)
    assert len(found) == 8 and {d["label"] for d in found} <= set(SHAPE_CLASSES)

    model = AutoModelForObjectDetection.from_pretrained(detection_checkpoint).eval()
    assert model.config.attention_mode == "linear"
    with torch.no_grad():
        boxes = model(**processor()(images=picture.convert("RGB"), return_tensors="pt")).pred_boxes[0]
    width, height = picture.size
    # The pipeline truncates to whole pixels.
    expected = sorted((int((cx - w / 2) * width), int((cy - h / 2) * height)) for cx, cy, w, h in boxes.tolist())
    got = sorted((d["box"]["xmin"], d["box"]["ymin"]) for d in found)
    assert np.allclose(got, expected, atol=1)
