#!/usr/bin/env python
"""Train a Castling-ViT image classifier with the `transformers` Trainer and the mask decay, then switch it to
linear-angular attention and save the inference checkpoint.

In the manner of `transformers`' examples/pytorch/image-classification/run_image_classification.py:

    python examples/image-classification/run_image_classification.py --do_train --do_eval --output_dir outputs/digits
    python examples/image-classification/run_image_classification.py --model_name_or_path small \\
        --dataset_name <a Hub image-classification data set> --do_train --do_eval --output_dir outputs/small

`--model_name_or_path` is a size name ("nano", "tiny", "small", "base": a new model) or a checkpoint (a
directory or a Hub name). Without `--dataset_name` the bundled scikit-learn digits are used, so it runs offline.
With `--do_train` the model trains with the mask decay and is saved (`<output_dir>`, the training form); with
`--do_eval` it is evaluated in castling mode (α has decayed to 0) and again after the switch to the inference form,
and the two accuracies agree exactly. After training, the inference checkpoint, with its image processor and model
card, goes to `<output_dir>/inference` (and to the Hub with `--push_to_hub`).
"""

import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from castling_hf import (
    CASTLING_VIT_SIZES,
    CastlingViTForImageClassification,
    image_processor_for,
)
from castling_hf.data import digits
from castling_hf.metrics import Accuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from castling_examples import (  # noqa: E402
    CastlingModelArguments,
    HubArguments,
    ImageDataArguments,
    held_out_split,
    hub_push_requested,
    leave_process_group,
    load_image_folders,
    mask_decay_callbacks,
    model_from_size_or_checkpoint,
    run_castling,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments(CastlingModelArguments):
    """The model arguments every Trainer example shares (castling_examples.py); this one adds none."""


@dataclass
class DataTrainingArguments(ImageDataArguments):
    """The images (castling_examples.py), without a data set the bundled scikit-learn digits; this example adds
    random crops for training."""

    augment: bool = field(default=True, metadata={"help": "Random crops of 80-100% of each training image."})


def load_image_dataset(data_args: DataTrainingArguments, seed: int, hub_args: HubArguments | None = None):
    dataset = load_image_folders(data_args, hub_args)
    dataset = held_out_split(digits() if dataset is None else dataset, data_args, seed)
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in dataset["train"].column_names:
            raise ValueError(f"Column {column!r} not in the data set; it has {dataset['train'].column_names}.")
    return dataset


def load_model_and_processor(model_args: ModelArguments, labels: list[str], hub_args: HubArguments | None = None):
    model = model_from_size_or_checkpoint(
        model_args, labels, CastlingViTForImageClassification, AutoModelForImageClassification, hub_args
    )
    if model_args.model_name_or_path in CASTLING_VIT_SIZES:
        return model, image_processor_for(model.config)
    loading = hub_args.loading() if hub_args is not None else {}
    return model, AutoImageProcessor.from_pretrained(model_args.model_name_or_path, **loading)


def random_crop(image: Image.Image, rng: random.Random, min_fraction: float = 0.8) -> Image.Image:
    """A random crop covering `min_fraction`..1 of each side, resized back to the image's size."""
    width, height = image.size
    crop_w, crop_h = width * rng.uniform(min_fraction, 1.0), height * rng.uniform(min_fraction, 1.0)
    left, top = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
    return image.resize((width, height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))


def make_transform(image_processor, image_column: str, label_column: str, augment: bool, seed: int):
    rng = random.Random(seed)

    def transform(batch):
        images = [image.convert("RGB") for image in batch[image_column]]
        if augment:
            images = [random_crop(image, rng) for image in images]
        return {
            "pixel_values": image_processor(images=images, return_tensors="pt")["pixel_values"],
            "labels": batch[label_column],
        }

    return transform


def collate(examples):
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def compute_metrics(prediction):
    return Accuracy().compute(predictions=np.argmax(prediction.predictions, axis=1), references=prediction.label_ids)


def argument_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, HubArguments, DataTrainingArguments, TrainingArguments))


def main(argv: list[str] | None = None) -> dict:
    model_args, hub_args, data_args, training_args = argument_parser().parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    # The transforms read the raw image and label columns, which the Trainer would otherwise drop.
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)  # before the model is built, so its initial weights are reproducible

    dataset = load_image_dataset(data_args, training_args.seed, hub_args)
    labels = dataset["train"].features[data_args.label_column_name].names
    model, image_processor = load_model_and_processor(model_args, labels, hub_args)
    push_to_hub = hub_push_requested(training_args)

    columns = (data_args.image_column_name, data_args.label_column_name)
    dataset["train"].set_transform(make_transform(image_processor, *columns, data_args.augment, training_args.seed))
    dataset["test"].set_transform(make_transform(image_processor, *columns, False, training_args.seed))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        data_collator=collate,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        callbacks=mask_decay_callbacks(model, model_args),
    )

    return run_castling(trainer, image_processor, data_args.dataset_name or "digits", push_to_hub)


if __name__ == "__main__":
    main()
    leave_process_group()
