"""`evaluate` metrics for the examples, defined here because `evaluate.load("accuracy")` fetches its script from
the Hub, which these machines cannot reach. They are real `evaluate.Metric`s: `add_batch`, `compute`, and the
distributed gathering that `evaluate` does across processes all work as usual."""

import contextlib
import io

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    """The fraction of predictions equal to their references (as `evaluate`'s own "accuracy")."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy: the fraction of predictions equal to the references.",
            citation="",
            inputs_description="predictions and references: lists of integer class ids of the same length.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        # `evaluate` itself refuses predictions and references of different lengths before this is called.
        return {"accuracy": float((np.asarray(predictions) == np.asarray(references)).mean())}


class CocoDetectionMAP(evaluate.Metric):
    """COCO mean average precision, computed by pycocotools' own `COCOeval` (not a re-implementation).

    Per image, `predictions` holds `boxes` (absolute x0, y0, x1, y1), `scores` and `labels`; `references` holds
    `boxes` and `labels` in the same format. Returns `map` (AP@[.5:.95]), `map_50`, `map_75`, `map_small`,
    `map_medium`, `map_large` and `mar_100`, as COCOeval's summary lists them (-1 where a bucket has no boxes).
    """

    def _info(self) -> evaluate.MetricInfo:
        boxes = datasets.List(datasets.List(datasets.Value("float32"), length=4))
        return evaluate.MetricInfo(
            description="COCO mAP by pycocotools' COCOeval.",
            citation="Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014.",
            inputs_description="per image: boxes (x0, y0, x1, y1 pixels), scores (predictions only), labels.",
            features=datasets.Features(
                {
                    "predictions": {
                        "boxes": boxes,
                        "scores": datasets.List(datasets.Value("float32")),
                        "labels": datasets.List(datasets.Value("int64")),
                    },
                    "references": {"boxes": boxes, "labels": datasets.List(datasets.Value("int64"))},
                }
            ),
        )

    def _compute(self, predictions, references):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        def xywh(box):
            x0, y0, x1, y1 = box
            return [x0, y0, x1 - x0, y1 - y0]

        images, annotations, detections, categories = [], [], [], set()
        for image_id, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
            images.append({"id": image_id})
            for box, label in zip(reference["boxes"], reference["labels"], strict=True):
                box = xywh(box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
                categories.add(label)
            for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"], strict=True):
                detections.append({"image_id": image_id, "category_id": label, "bbox": xywh(box), "score": score})
                categories.add(label)

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            ground_truth = COCO()
            ground_truth.dataset = {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": c} for c in sorted(categories)],
            }
            ground_truth.createIndex()
            results = ground_truth.loadRes(detections) if detections else COCO()
            if not detections:
                results.dataset = {
                    "images": images,
                    "annotations": [],
                    "categories": ground_truth.dataset["categories"],
                }
                results.createIndex()
            evaluation = COCOeval(ground_truth, results, iouType="bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        names = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
        summary = {name: float(value) for name, value in zip(names, evaluation.stats[:6], strict=True)}
        summary["mar_100"] = float(evaluation.stats[8])
        return summary


class MeanIoU(evaluate.Metric):
    """Semantic segmentation: intersection over union per class and its mean, with the keys and conventions of
    `evaluate`'s own "mean_iou" (a class absent from both predictions and references has IoU NaN and is left out of
    the mean; pixels labelled `ignore_index` do not count). The pixel counts come from torchmetrics'
    `MulticlassConfusionMatrix`.

    `predictions` and `references` are label maps (lists of rows of class ids), one per image, of equal sizes.
    `compute(num_labels=..., ignore_index=255)`.
    """

    def _info(self) -> evaluate.MetricInfo:
        label_map = datasets.List(datasets.List(datasets.Value("int64")))
        return evaluate.MetricInfo(
            description="Mean intersection over union of semantic segmentation label maps.",
            citation="",
            inputs_description="predictions and references: one label map (rows of class ids) per image.",
            features=datasets.Features({"predictions": label_map, "references": label_map}),
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index: int | None = 255):
        import torch
        from torchmetrics.classification import MulticlassConfusionMatrix

        confusion = MulticlassConfusionMatrix(num_classes=num_labels, ignore_index=ignore_index)
        for index, (predicted, reference) in enumerate(zip(predictions, references, strict=True)):
            predicted, reference = torch.as_tensor(np.asarray(predicted)), torch.as_tensor(np.asarray(reference))
            if predicted.shape != reference.shape:
                raise ValueError(
                    f"Image {index}: the predicted label map is {tuple(predicted.shape)} but the reference is "
                    f"{tuple(reference.shape)}; resize the predictions to the reference's size first."
                )
            confusion.update(predicted.flatten(), reference.flatten())
        return segmentation_scores(confusion.compute().double().numpy())


def segmentation_scores(counts: np.ndarray) -> dict:
    """`MeanIoU`'s results from a confusion matrix of pixel counts (rows: reference class, columns: predicted class),
    for code that counts batch by batch."""
    intersection, referenced, predicted_total = np.diag(counts), counts.sum(axis=1), counts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_category_iou = intersection / (referenced + predicted_total - intersection)
        per_category_accuracy = intersection / referenced
    return {
        "mean_iou": float(np.nanmean(per_category_iou)),
        "mean_accuracy": float(np.nanmean(per_category_accuracy)),
        "overall_accuracy": float(intersection.sum() / counts.sum()),
        "per_category_iou": per_category_iou.tolist(),
        "per_category_accuracy": per_category_accuracy.tolist(),
    }


__all__ = ["Accuracy", "CocoDetectionMAP", "MeanIoU", "segmentation_scores"]
