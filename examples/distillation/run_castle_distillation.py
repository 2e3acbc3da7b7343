#!/usr/bin/env python
"""Castle a pretrained model without labels: convert it with `castling_hf.castle`, distil it from its frozen self on
images alone while the mask decay hands every layer over to linear-angular attention, switch, and write the
inference checkpoint with the source's own image processor, a fidelity report and a model card.

In the manner of `transformers`' examples (the image-distillation guide's `Trainer` with a `teacher_model`):

    python examples/distillation/run_castle_distillation.py --model_name_or_path facebook/dinov2-small \\
        --dataset_name <any image data set> --output_dir outputs/castled-dinov2 --do_train --do_eval \\
        --max_steps 2000 --per_device_train_batch_size 64 --learning_rate 2e-3

`--model_name_or_path` is anything `castle` takes, as a Hub name or a folder: an image classifier, a base model, a
Dinov2 backbone, or a task model on one (UperNet, DPT, Depth Anything, Mask2Former). `--dataset_name` is any image
data set (a Hub name or a local folder `datasets.load_dataset` reads; without it, the bundled digits): only
`--image_column_name` is read, so a label or annotation column is ignored and a set without one works; a
`--label_column_name` column, where the set has it and the model classifies, only adds accuracies to the report.
The task heads stay the source's (frozen) unless `--train_heads`. With `--do_eval` the report (`fidelity.json`,
printed, and in the model card) compares the castled model with its source on the held-out images at the training
resolution and at twice it: the cosine similarity and relative error of the castled part's features, the task
output's relative error and the share of predictions that agree.
"""

import json
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from datasets import DatasetDict, load_dataset
from PIL import Image
from transformers import HfArgumentParser, TrainingArguments, set_seed

from castling_hf import (
    CastlingDistillationTrainer,
    CastlingViTForImageClassification,
    castle,
    softmax_mask_scales,
    source_image_processor,
    switch_to_inference,
)
from castling_hf.conversion import load_source
from castling_hf.data import digits
from castling_hf.distillation import fidelity_report
from castling_hf.hub import write_inference_checkpoint
from castling_hf.model_card import distillation_card

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from castling_examples import held_out_split  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={
            "help": "The source, anything castling_hf.castle takes (Hub name or folder): a ViT, DeiT, Dinov2 or DINOv3 "
            "classifier, base model or backbone, or a task model on a Dinov2 backbone (UperNet, DPT, ...)."
        }
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "JSON object of Castling-ViT config fields for castle(), e.g. residual_conv."}
    )
    train_heads: bool = field(
        default=False, metadata={"help": "Train the task heads too (by default they stay the source's, frozen)."}
    )
    mask_decay_end: float = field(default=0.25, metadata={"help": "Where α reaches 0: fraction of the run."})
    temperature: float = field(default=1.0, metadata={"help": "Of the soft labels, for models with class logits."})
    feature_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the castled encoder's or backbone's features in the loss (0: none)."}
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub data set or local folder of images; without it, the bundled digits."}
    )
    dataset_config_name: str | None = field(default=None)
    image_column_name: str = field(default="image")
    label_column_name: str | None = field(
        default="label", metadata={"help": "Used only for the report's accuracies, where the set has it."}
    )
    eval_split_fraction: float = field(
        default=0.1, metadata={"help": "Held out from `train` when the data set has no test or validation split."}
    )
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    augment: bool = field(default=False, metadata={"help": "Random crops of 80-100% of each training image."})


def load_images(data_args: DataTrainingArguments, seed: int) -> DatasetDict:
    dataset = (
        digits()
        if data_args.dataset_name is None
        else load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    )
    dataset = held_out_split(dataset, data_args, seed)
    if data_args.image_column_name not in dataset["train"].column_names:
        raise ValueError(
            f"Column {data_args.image_column_name!r} not in the data set; it has {dataset['train'].column_names}. "
            "Name the image column with --image_column_name."
        )
    return dataset


def random_crop(image: Image.Image, rng: random.Random, min_fraction: float = 0.8) -> Image.Image:
    """A random crop covering `min_fraction`..1 of each side, resized back to the image's size."""
    width, height = image.size
    crop_w, crop_h = width * rng.uniform(min_fraction, 1.0), height * rng.uniform(min_fraction, 1.0)
    left, top = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
    return image.resize((width, height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))


def make_transform(image_processor, image_column: str, augment: bool, seed: int):
    rng = random.Random(seed)

    def transform(batch):
        images = [image.convert("RGB") for image in batch[image_column]]
        if augment:
            images = [random_crop(image, rng) for image in images]
        return {"pixel_values": image_processor(images=images, return_tensors="pt")["pixel_values"]}

    return transform


def collate(examples):
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}


def held_out(dataset, image_processor, data_args, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The held-out images as the source's processor prepares them, and their labels where the data set has a
    `--label_column_name` column that fits the model: class ids for a classifier, label maps (as the processor
    prepares them) for a segmenter."""
    images = [image.convert("RGB") for image in dataset[data_args.image_column_name]]
    column = data_args.label_column_name
    if column is None or column not in dataset.column_names:
        return image_processor(images=images, return_tensors="pt")["pixel_values"], None
    if isinstance(dataset.features[column], datasets.Image):  # label maps
        processed = image_processor(images=images, segmentation_maps=list(dataset[column]), return_tensors="pt")
        return processed["pixel_values"], processed["labels"]
    labels = torch.tensor(dataset[column]) if isinstance(model, CastlingViTForImageClassification) else None
    return image_processor(images=images, return_tensors="pt")["pixel_values"], labels


def print_report(source: str, report: dict) -> None:
    print(f"\n=== Castled {source}: fidelity to the source on held-out images ===")
    for scale, entry in report.items():
        height, width = entry["resolution"]
        line = f"{scale} ({height}×{width})  feature cosine {entry['feature_cosine']:.4f}  relative error "
        line += f"{entry['feature_relative_error']:.4f}"
        if "output_relative_error" in entry:
            line += f"  output relative error {entry['output_relative_error']:.4f}"
        if "prediction_agreement" in entry:
            line += f"  predictions agree {entry['prediction_agreement']:.2%}"
        for metric in ("accuracy", "mean_iou"):
            if f"castled_{metric}" in entry:
                line += f"  {metric} {entry[f'castled_{metric}']:.4f} (source {entry[f'source_{metric}']:.4f})"
        print(line)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if not (training_args.do_train or training_args.do_eval):
        raise ValueError(
            "Neither --do_train nor --do_eval was given, so there is nothing to run: add --do_train to distil (and "
            "write the inference checkpoint), --do_eval for the fidelity report, or both."
        )
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    training_args.remove_unused_columns = False  # the transform reads the raw image column
    set_seed(training_args.seed)

    teacher = load_source(model_args.model_name_or_path).eval()
    image_processor = source_image_processor(model_args.model_name_or_path)
    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    student = castle(teacher, **overrides).train()

    dataset = load_images(data_args, training_args.seed)
    for split, augment in (("train", data_args.augment), ("test", False)):
        transform = make_transform(image_processor, data_args.image_column_name, augment, training_args.seed)
        dataset[split].set_transform(transform)
    trainer = CastlingDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        data_collator=collate,
        temperature=model_args.temperature,
        mask_decay_end=model_args.mask_decay_end,
        train_heads=model_args.train_heads,
        feature_loss_weight=model_args.feature_loss_weight,
    )
    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results["train"] = train_result.metrics
    if not any(softmax_mask_scales(student).values()):
        switch_to_inference(student)
    if training_args.do_eval:
        results["eval"] = trainer.evaluate()
        dataset["test"].reset_format()
        pixels, labels = held_out(dataset["test"], image_processor, data_args, student)
        results["fidelity"] = fidelity_report(student, teacher, pixels, labels)
        if trainer.is_world_process_zero():
            print_report(model_args.model_name_or_path, results["fidelity"])
            with open(os.path.join(training_args.output_dir, "fidelity.json"), "w") as file:
                json.dump(results["fidelity"], file, indent=2)
    results["processes"] = training_args.world_size
    if training_args.do_train and not softmax_mask_scales(student):
        results["inference_dir"] = training_args.output_dir
        if trainer.is_world_process_zero():
            card = distillation_card(
                student, model_args.model_name_or_path, data_args.dataset_name or "digits", results.get("fidelity")
            )
            write_inference_checkpoint(student, training_args.output_dir, image_processor, card)
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as file:
            json.dump(results, file, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
