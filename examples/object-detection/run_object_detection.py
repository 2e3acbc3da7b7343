#!/usr/bin/env python
"""Train a Castling-ViT detector with the `transformers` Trainer and the mask decay, evaluate COCO mAP before and
after the switch to linear-angular attention, and save the inference checkpoint with its image processor.

In the manner of `transformers`' examples/pytorch/object-detection/run_object_detection.py:

    python examples/object-detection/run_object_detection.py --do_train --do_eval --output_dir outputs/shapes
    python examples/object-detection/run_object_detection.py --dataset_name <Hub name or local folder> ...

Without `--dataset_name` the generated shapes (`castling_hf.data.shapes`) are used, so it runs offline. A data set
(a Hub name, or a local folder `datasets.load_dataset` reads, e.g. `train.parquet` + `test.parquet`) needs the
layout of `transformers`' detection examples: `image_id`, `image`, and `objects` with COCO `bbox` (x, y, w, h in
pixels) and `category` (a `ClassLabel`, whose names become the model's labels). Annotations go through
`clean_coco_boxes` (boxes clipped to the image, degenerate ones dropped, unknown categories refused) and then through
Deformable DETR's image processor, which turns COCO boxes into the model's normalised targets and post-processes
its outputs; mAP comes from pycocotools' COCOeval (`castling_hf.metrics.CocoDetectionMAP`).
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, DatasetDict, load_dataset
from transformers import (
    AutoImageProcessor,
    AutoModelForObjectDetection,
    DeformableDetrImageProcessorPil,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from castling_hf import CASTLING_VIT_SIZES, CastlingViTForObjectDetection
from castling_hf.data import clean_coco_boxes, shapes
from castling_hf.metrics import CocoDetectionMAP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from castling_examples import (  # noqa: E402
    CastlingModelArguments,
    held_out_split,
    hub_push_requested,
    mask_decay_callbacks,
    model_from_size_or_checkpoint,
    run_castling,
)


@dataclass
class ModelArguments(CastlingModelArguments):
    image_size: int = field(default=64, metadata={"help": "Images are resized to image_size × image_size."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub data set or a local folder; default: generated shapes."}
    )
    num_generated_images: int = field(default=3000, metadata={"help": "Size of the generated shapes set."})
    train_val_split: float = field(default=0.2)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    score_threshold: float = field(default=0.0, metadata={"help": "Detections kept for mAP (COCO uses all)."})


def load_detection_dataset(data_args: DataTrainingArguments, image_size: int, seed: int) -> DatasetDict:
    if data_args.dataset_name is None:
        dataset = shapes(num_images=data_args.num_generated_images, image_size=image_size, seed=seed)
    else:
        dataset = load_dataset(data_args.dataset_name)
    return held_out_split(dataset, data_args, seed)


def category_names(split, dataset_name: str | None) -> list[str]:
    """The names of the `objects.category` ClassLabel: the model's labels."""
    objects = split.features.get("objects")
    category = objects.get("category") if isinstance(objects, dict) else None
    feature = getattr(category, "feature", None)
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"{dataset_name!r} needs an `objects` column with `bbox` and `category`, the category a list of "
            f"ClassLabel (whose names become the model's labels); got features {split.features}."
        )
    return feature.names


def load_model_and_processor(model_args: ModelArguments, labels: list[str]):
    model = model_from_size_or_checkpoint(
        model_args, labels, CastlingViTForObjectDetection, AutoModelForObjectDetection
    )
    if model_args.model_name_or_path in CASTLING_VIT_SIZES:
        size = {"height": model_args.image_size, "width": model_args.image_size}
        return model, DeformableDetrImageProcessorPil(size=size)
    return model, AutoImageProcessor.from_pretrained(model_args.model_name_or_path)


def make_transform(image_processor, num_labels: int):
    def transform(batch):
        annotations = []
        for image_id, image, objects in zip(batch["image_id"], batch["image"], batch["objects"], strict=True):
            boxes, categories = clean_coco_boxes(objects["bbox"], objects["category"], *image.size, num_labels)
            annotations.append(
                {
                    "image_id": image_id,
                    "annotations": [
                        {"image_id": image_id, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for b, c in zip(boxes, categories, strict=True)
                    ],
                }
            )
        images = [image.convert("RGB") for image in batch["image"]]
        encoded = image_processor(images=images, annotations=annotations, return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"], "labels": encoded["labels"]}

    return transform


def collate(examples):
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": [example["labels"] for example in examples],
    }


def corners_in_pixels(boxes: np.ndarray, height: float, width: float) -> np.ndarray:
    """Normalised (cx, cy, w, h) → absolute (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.T
    return np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)


def make_compute_metrics(image_processor, threshold: float):
    def compute_metrics(evaluation, compute_result: bool = True):
        metric = CocoDetectionMAP()
        for batch_predictions, batch_targets in zip(evaluation.predictions, evaluation.label_ids, strict=True):
            # The Trainer drops `loss` from the output tuple: (loss_dict, logits, pred_boxes, last_hidden_state).
            logits, pred_boxes = torch.as_tensor(batch_predictions[1]), torch.as_tensor(batch_predictions[2])
            sizes = [tuple(int(v) for v in target["orig_size"]) for target in batch_targets]
            outputs = type("Outputs", (), {"logits": logits, "pred_boxes": pred_boxes})
            detections = image_processor.post_process_object_detection(outputs, threshold, target_sizes=sizes)
            for detection, target, (height, width) in zip(detections, batch_targets, sizes, strict=True):
                metric.add(
                    predictions={
                        "boxes": detection["boxes"].tolist(),
                        "scores": detection["scores"].tolist(),
                        "labels": detection["labels"].tolist(),
                    },
                    references={
                        "boxes": corners_in_pixels(np.asarray(target["boxes"]).reshape(-1, 4), height, width).tolist(),
                        "labels": np.asarray(target["class_labels"]).tolist(),
                    },
                )
        return metric.compute()

    return compute_metrics


def argument_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = argument_parser().parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    training_args.remove_unused_columns = False  # the transform reads the raw image and objects columns
    training_args.eval_do_concat_batches = False  # detection targets differ in length per image
    set_seed(training_args.seed)
    push_to_hub = hub_push_requested(training_args)

    dataset = load_detection_dataset(data_args, model_args.image_size, training_args.seed)
    labels = category_names(dataset["train"], data_args.dataset_name)
    model, image_processor = load_model_and_processor(model_args, labels)
    for split in ("train", "test"):
        dataset[split].set_transform(make_transform(image_processor, len(labels)))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        data_collator=collate,
        compute_metrics=make_compute_metrics(image_processor, data_args.score_threshold),
        processing_class=image_processor,
        callbacks=mask_decay_callbacks(model, model_args),
    )
    results = run_castling(trainer, image_processor, data_args.dataset_name or "shapes", push_to_hub)
    return {**results, "eval_samples": len(dataset["test"])}


if __name__ == "__main__":
    main()
