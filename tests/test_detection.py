"""CastlingViTForObjectDetection: the dense head, set loss, fitting a batch, the switch, the pipeline, bad labels."""

import json

import numpy as np
import pytest
import skimage.data
import torch
from conftest import run_without_castling_hf
from PIL import Image
from scipy.optimize import linear_sum_assignment
from transformers import AutoModelForObjectDetection, DeformableDetrImageProcessorPil, pipeline

from castling_hf import CastlingViTForObjectDetection, CastlingViTObjectDetectionOutput
from castling_hf.data import SHAPE_CLASSES, shapes
from castling_hf.models.castling_vit.modeling_castling_vit import cell_boxes

LABELS = dict(enumerate(SHAPE_CLASSES))


@pytest.fixture
def make_detector(make_config):
    def make(**overrides):
        config = make_config(
            id2label=LABELS,
            label2id={v: k for k, v in LABELS.items()},
            image_size=64,
            **overrides,
        )
        return CastlingViTForObjectDetection(config)

    return make


def processor():
    return DeformableDetrImageProcessorPil(size={"height": 64, "width": 64})


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


def test_outputs_follow_the_deformable_detr_layout_one_detection_per_cell(make_detector):
    model = make_detector().eval()
    with torch.no_grad():
        output = model(torch.randn(2, 3, 64, 64))
        wide = model(torch.randn(1, 3, 32, 64))  # any size the patches tile: an 8×16 grid
    assert isinstance(output, CastlingViTObjectDetectionOutput)
    assert output.logits.shape == (2, 16 * 16, 3) and output.pred_boxes.shape == (2, 16 * 16, 4)
    assert 0 <= output.pred_boxes.min() and output.pred_boxes.max() <= 1
    assert output.last_hidden_state.shape == (2, 1 + 16 * 16, 64)
    assert wide.logits.shape == (1, 8 * 16, 3)
    # Every cell starts at the prior score, so the many empty cells do not swamp the focal loss.
    torch.testing.assert_close(output.logits.sigmoid().mean(), torch.tensor(0.01), atol=5e-3, rtol=0)


def test_cell_boxes_decode_distances_from_each_cells_centre():
    distances = torch.zeros(1, 4, 2, 4)
    distances[0, :, 1, 2] = torch.tensor([1.0, 0.5, 0.5, 0.25])  # row 1, column 2: centre (2.5/4, 1.5/2)
    distances[0, :, 0, 0] = torch.tensor([3.0, 3.0, 0.5, 0.5])  # reaches past the top-left corner: clipped
    boxes = cell_boxes(distances)
    assert boxes.shape == (1, 8, 4)
    x0, x1, y0, y1 = (2.5 - 1.0) / 4, (2.5 + 0.5) / 4, (1.5 - 0.5) / 2, (1.5 + 0.25) / 2
    torch.testing.assert_close(boxes[0, 1 * 4 + 2], torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]))
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.5 / 4, 0.5 / 2, 1.0 / 4, 1.0 / 2]))
    torch.testing.assert_close(boxes[0, 3, 2:], torch.zeros(2))  # zero distances: an empty box at the centre

    distances.requires_grad_(True)
    cell_boxes(distances)[0, 0, 2].backward()  # the clipped box's width
    assert distances.grad[0, 0, 0, 0] == 1 / 4  # the overshooting left edge still learns: clipped in value only


def test_set_loss_falls_and_a_small_batch_is_fit(make_detector):
    records = [r for r in shapes(num_images=12, seed=1)["train"] if r["objects"]["bbox"]][:2]
    pixel_values, labels = encoded_batch(records)
    model = make_detector().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(120):
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
    for logits, boxes, target in zip(output.logits, output.pred_boxes, labels, strict=True):
        # One detection per object, no duplicates (what a head without NMS has to learn): the cells scoring above
        # 0.5 pair one-to-one with the objects, each with its class and a tight box.
        score, label = logits.sigmoid().max(-1)
        detected = (score > 0.5).nonzero().flatten()
        assert len(detected) == len(target["boxes"])
        iou = torch.tensor([[box_iou(boxes[d].tolist(), box.tolist()) for box in target["boxes"]] for d in detected])
        same_class = label[detected, None] == target["class_labels"][None, :]
        rows, columns = linear_sum_assignment(-(iou * same_class).numpy())
        assert all(iou[r, c] > 0.5 and same_class[r, c] for r, c in zip(rows, columns, strict=True)), iou


def test_auxiliary_loss_adds_a_term_per_intermediate_layer(make_detector):
    records = [r for r in shapes(num_images=12, seed=1)["train"] if r["objects"]["bbox"]][:2]
    pixel_values, labels = encoded_batch(records)
    output = make_detector(auxiliary_loss=True)(pixel_values, labels=labels)
    assert {"loss_ce_0", "loss_bbox_0", "loss_giou_0"} <= set(output.loss_dict)  # 2 layers: one intermediate
    assert len(output.auxiliary_outputs) == 1
    assert output.auxiliary_outputs[0]["logits"].shape == output.logits.shape


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
def test_pipeline_returns_the_top_scoring_cells_boxes_in_input_pixels(detection_checkpoint, image):
    picture = (
        Image.fromarray(skimage.data.coffee())
        if image == "coffee"
        else shapes(num_images=5, image_size=96, seed=2)["train"][0]["image"]
    )
    detector = pipeline("object-detection", model=str(detection_checkpoint))
    found = detector(picture, threshold=0.0)
    width, height = picture.size
    scores = [d["score"] for d in found]
    assert len(found) == 100 and scores == sorted(scores, reverse=True) and 0 <= min(scores) <= max(scores) <= 1
    assert {d["label"] for d in found} <= set(SHAPE_CLASSES)
    assert all(0 <= d["box"]["xmin"] <= d["box"]["xmax"] <= width for d in found)
    assert all(0 <= d["box"]["ymin"] <= d["box"]["ymax"] <= height for d in found)

    # The same detections from the model's own outputs: the 100 best (cell, class) scores, each cell's box.
    model = AutoModelForObjectDetection.from_pretrained(detection_checkpoint).eval()
    assert model.config.attention_mode == "linear"
    with torch.no_grad():
        output = model(**processor()(images=picture.convert("RGB"), return_tensors="pt"))
    best = output.logits[0].sigmoid().flatten().topk(100)
    cells, classes = best.indices // len(LABELS), best.indices % len(LABELS)
    assert [d["label"] for d in found] == [LABELS[int(c)] for c in classes]
    np.testing.assert_allclose(scores, best.values.tolist(), atol=1e-4)
    expected = [(int((x - bw / 2) * width), int((y - bh / 2) * height)) for x, y, bw, bh in output.pred_boxes[0, cells]]
    got = [(d["box"]["xmin"], d["box"]["ymin"]) for d in found]  # the pipeline truncates to whole pixels
    assert np.allclose(got, expected, atol=1)


REMOTE_PIPELINE = """
import json
import skimage.data
from PIL import Image
from transformers import pipeline

detector = pipeline("object-detection", model=sys.argv[1], trust_remote_code=True)
assert not type(detector.model).__module__.startswith("castling_hf"), type(detector.model).__module__
print(json.dumps(detector(Image.fromarray(skimage.data.coffee()), threshold=0.0)))
"""


def test_pipeline_with_remote_code_where_castling_hf_is_not_installed(detection_checkpoint, tmp_path_factory):
    found = json.loads(
        run_without_castling_hf(REMOTE_PIPELINE, [detection_checkpoint], tmp_path_factory.mktemp("remote"))
    )
    expected = pipeline("object-detection", model=str(detection_checkpoint))(
        Image.fromarray(skimage.data.coffee()), threshold=0.0
    )
    assert [d["label"] for d in found] == [d["label"] for d in expected]
    assert [d["box"] for d in found] == [d["box"] for d in expected]
    np.testing.assert_allclose([d["score"] for d in found], [d["score"] for d in expected], atol=1e-6)
