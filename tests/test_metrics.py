import math

import pytest

from castling_hf.metrics import Accuracy, MeanIoU


def test_accuracy_matches_counting():
    assert Accuracy().compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}


def test_accuracy_accumulates_batches():
    metric = Accuracy()
    metric.add_batch(predictions=[0, 1], references=[0, 0])
    metric.add_batch(predictions=[3], references=[3])
    assert metric.compute()["accuracy"] == pytest.approx(2 / 3)


def detections(boxes, labels, scores=None):
    return {"boxes": boxes, "labels": labels, "scores": scores if scores is not None else [0.9] * len(boxes)}


def test_coco_map_is_one_for_perfect_detections_and_falls_with_misses():
    from castling_hf.metrics import CocoDetectionMAP

    truth = [
        {"boxes": [[10, 10, 30, 30], [40, 40, 60, 62]], "labels": [0, 1]},
        {"boxes": [[5, 5, 25, 20]], "labels": [2]},
    ]
    perfect = CocoDetectionMAP().compute(
        predictions=[detections(t["boxes"], t["labels"]) for t in truth], references=truth
    )
    assert perfect["map"] == pytest.approx(1.0) and perfect["map_50"] == pytest.approx(1.0)

    shifted = [detections([[12, 12, 32, 32], [40, 40, 60, 62]], [0, 1]), detections([[5, 5, 25, 20]], [1])]
    partial = CocoDetectionMAP().compute(predictions=shifted, references=truth)
    assert 0.0 < partial["map"] < partial["map_50"] < 1.0  # one box loose (IoU 0.68), one of the wrong class

    nothing = CocoDetectionMAP().compute(predictions=[detections([], []), detections([], [])], references=truth)
    assert nothing["map"] == 0.0


@pytest.mark.parametrize("part", ["boxes", "scores", "labels"])
def test_coco_map_refuses_boxes_scores_and_labels_of_different_lengths(part):
    from castling_hf.metrics import CocoDetectionMAP

    truth = [{"boxes": [[10, 10, 30, 30]], "labels": [0]}]
    prediction = detections([[10, 10, 30, 30], [1, 1, 5, 5]], [0, 0], [0.9, 0.5])
    prediction[part] = prediction[part][:1]  # one of the three lists is short: nothing may be silently dropped
    with pytest.raises(ValueError, match="shorter|longer"):
        CocoDetectionMAP().compute(predictions=[prediction], references=truth)
    short_truth = [{"boxes": [[10, 10, 30, 30], [40, 40, 50, 50]], "labels": [0]}]
    with pytest.raises(ValueError, match="shorter|longer"):
        CocoDetectionMAP().compute(predictions=[detections([[10, 10, 30, 30]], [0])], references=short_truth)


def test_mean_iou_matches_a_hand_worked_case():
    # Class 0: 1 pixel, found. Class 1: 2 reference pixels, 1 predicted, 1 shared (IoU 1/2). Class 2: 1 reference
    # pixel, 2 predicted, 1 shared (IoU 1/2). Class 3 appears nowhere: NaN, left out of the mean. The 255 pixel is
    # ignored whatever is predicted there.
    metric = MeanIoU()
    metric.add_batch(predictions=[[[0, 1, 3], [2, 2, 3]]], references=[[[0, 1, 255], [1, 2, 255]]])
    result = metric.compute(num_labels=4, ignore_index=255)
    assert result["per_category_iou"][:3] == [1.0, 0.5, 0.5] and math.isnan(result["per_category_iou"][3])
    assert result["mean_iou"] == pytest.approx(2 / 3)
    assert result["per_category_accuracy"][:3] == [1.0, 0.5, 1.0]
    assert result["overall_accuracy"] == pytest.approx(3 / 4)


def test_mean_iou_refuses_maps_of_different_sizes():
    metric = MeanIoU()
    metric.add_batch(predictions=[[[0, 1]]], references=[[[0, 1], [1, 1]]])
    with pytest.raises(ValueError, match=r"Image 0: the predicted label map is \(1, 2\) but the reference is \(2, 2\)"):
        metric.compute(num_labels=2)
