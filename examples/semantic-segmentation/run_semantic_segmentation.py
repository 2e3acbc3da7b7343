#!/usr/bin/env python
"""Train UperNet on a Castling-ViT backbone with the `transformers` Trainer and the mask decay, evaluate mean IoU
before and after the switch to linear-angular attention, and save the inference checkpoint with its image processor.

In the manner of `transformers`' examples/pytorch/semantic-segmentation/run_semantic_segmentation.py:

    python examples/semantic-segmentation/run_semantic_segmentation.py --do_train --do_eval --output_dir outputs/seg
    python examples/semantic-segmentation/run_semantic_segmentation.py --dataset_name <Hub name or local folder> ...

Without `--dataset_name` the generated shapes with their label maps (`castling_hf.data.shape_masks`) are used, so it
runs offline. A data set (a Hub name, or a local folder `datasets.load_dataset` reads, e.g. `train.parquet` +
`test.parquet`) needs the layout of `scene_parse_150`: an `image` and an `annotation` (a label map: one class id per
pixel) per example. The label names come from an `id2label.json` (`{"0": "wall", ...}`) beside the data: in the local
folder, or in the Hub data set's repository; without one, the classes are named by their ids, as many as the largest
id in the training annotations. `--do_reduce_labels` maps 0 (scene_parse_150's "other") to the ignored index 255 and
shifts the other ids down by one, as SegFormer's image processor does.

A new model (`--model_name_or_path` a size name) is `UperNetForSemanticSegmentation` whose `backbone_config` is a
Castling-ViT config with four feature maps (the last four quarters of the encoder), optionally through the simple
feature pyramid (`--simple_feature_pyramid`, strides 4/8/16/32 of the image for patch 16).
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import DatasetDict, load_dataset
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from transformers import (
    AutoImageProcessor,
    AutoModelForSemanticSegmentation,
    HfArgumentParser,
    SegformerImageProcessorPil,
    Trainer,
    TrainingArguments,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    set_seed,
)

from castling_hf import CASTLING_VIT_SIZES
from castling_hf.data import SEGMENTATION_CLASSES, shape_masks
from castling_hf.metrics import MeanIoU

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from castling_examples import (  # noqa: E402
    CastlingModelArguments,
    label_maps,
    mask_decay_callbacks,
    model_from_checkpoint,
    new_castling_config,
    run_castling,
)

IGNORE_INDEX = 255  # UperNetConfig.loss_ignore_index, and what do_reduce_labels turns class 0 into


@dataclass
class ModelArguments(CastlingModelArguments):
    image_size: int = field(default=64, metadata={"help": "Images are resized to image_size × image_size."})
    simple_feature_pyramid: bool = field(
        default=True, metadata={"help": "Feed UperNet maps at 4×, 2×, 1× and ½× the patch grid (a new model)."}
    )
    decode_hidden_size: int = field(default=512, metadata={"help": "UperNet's channel width (a new model)."})
    use_auxiliary_head: bool = field(default=True, metadata={"help": "UperNet's FCN auxiliary head (a new model)."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub data set or a local folder; default: generated shape masks."}
    )
    num_generated_images: int = field(default=1000, metadata={"help": "Size of the generated set."})
    do_reduce_labels: bool = field(
        default=False, metadata={"help": "Ignore class 0 and shift the others down by one (scene_parse_150)."}
    )
    eval_split_fraction: float = field(default=0.2)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)


def load_segmentation_dataset(data_args: DataTrainingArguments, image_size: int, seed: int) -> DatasetDict:
    if data_args.dataset_name is None:
        dataset = shape_masks(num_images=data_args.num_generated_images, image_size=image_size, seed=seed)
    else:
        dataset = load_dataset(data_args.dataset_name)
        if "train" not in dataset:
            raise ValueError(f"{data_args.dataset_name!r} has splits {sorted(dataset)}; a 'train' split is needed.")
        missing = {"image", "annotation"} - set(dataset["train"].column_names)
        if missing:
            raise ValueError(
                f"{data_args.dataset_name!r} has columns {dataset['train'].column_names}; the scene_parse_150 layout "
                f"needs an 'image' and an 'annotation' (a label map) per example, and {sorted(missing)} is missing."
            )
    if "test" not in dataset:
        held_out = "validation" if "validation" in dataset else None
        dataset = (
            DatasetDict(train=dataset["train"], test=dataset[held_out])
            if held_out
            else dataset["train"].train_test_split(test_size=data_args.eval_split_fraction, seed=seed)
        )
    for split, limit in (("train", data_args.max_train_samples), ("test", data_args.max_eval_samples)):
        if limit is not None:
            dataset[split] = dataset[split].select(range(min(limit, len(dataset[split]))))
    return dataset


def id2label_beside_the_data(dataset_name: str) -> dict[int, str] | None:
    """The `id2label.json` in the local folder `dataset_name`, or in the Hub data set's repository; None if neither
    has one."""
    if os.path.isdir(dataset_name):
        path = os.path.join(dataset_name, "id2label.json")
        if not os.path.exists(path):
            return None
    else:
        try:
            path = hf_hub_download(dataset_name, "id2label.json", repo_type="dataset")
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
    with open(path) as file:
        return {int(key): name for key, name in json.load(file).items()}


def label_names(dataset: DatasetDict, data_args: DataTrainingArguments) -> list[str]:
    """The model's labels: the generated set's classes, the data set's `id2label.json`, or the ids seen in training."""
    if data_args.dataset_name is None:
        return list(SEGMENTATION_CLASSES)
    id2label = id2label_beside_the_data(data_args.dataset_name)
    if id2label is None:
        largest = max(int(np.max(np.asarray(annotation))) for annotation in dataset["train"]["annotation"])
        id2label = {index: str(index) for index in range(largest + 1)}
        if data_args.do_reduce_labels:  # class 0 is ignored and the rest move down by one
            id2label = {index: str(index + 1) for index in range(largest)}
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(
            f"The id2label.json of {data_args.dataset_name!r} has ids {sorted(id2label)}; expected 0 .. "
            f"{len(id2label) - 1}, one per class, as the model's label ids."
        )
    return [id2label[index] for index in range(len(id2label))]


def new_upernet(model_args: ModelArguments, labels: list[str]) -> UperNetForSemanticSegmentation:
    """UperNet on a new Castling-ViT backbone of the named size: four feature maps, a quarter of the depth apart."""
    depth = new_castling_config(model_args).num_hidden_layers
    if depth < 4:
        raise ValueError(
            f"UperNet takes four feature maps, from layers a quarter of the depth apart; a backbone of {depth} "
            "layers cannot give four different ones. Give num_hidden_layers ≥ 4 (--config_overrides)."
        )
    backbone_config = new_castling_config(
        model_args,
        image_size=model_args.image_size,
        out_indices=[depth * quarter // 4 for quarter in (1, 2, 3, 4)],
        simple_feature_pyramid=model_args.simple_feature_pyramid,
    )
    config = UperNetConfig(
        backbone_config=backbone_config,
        hidden_size=model_args.decode_hidden_size,
        use_auxiliary_head=model_args.use_auxiliary_head,
        auxiliary_in_channels=backbone_config.hidden_size,
        loss_ignore_index=IGNORE_INDEX,
        **label_maps(labels),
    )
    return UperNetForSemanticSegmentation(config)


def load_model_and_processor(model_args: ModelArguments, data_args: DataTrainingArguments, labels: list[str]):
    if model_args.model_name_or_path in CASTLING_VIT_SIZES:
        size = {"height": model_args.image_size, "width": model_args.image_size}
        processor = SegformerImageProcessorPil(size=size, do_reduce_labels=data_args.do_reduce_labels)
        return new_upernet(model_args, labels), processor
    model = model_from_checkpoint(model_args, labels, AutoModelForSemanticSegmentation)
    processor = AutoImageProcessor.from_pretrained(
        model_args.model_name_or_path, do_reduce_labels=data_args.do_reduce_labels
    )
    return model, processor


def make_transform(image_processor, num_labels: int):
    def transform(batch):
        images = [image.convert("RGB") for image in batch["image"]]
        # Label maps as they are: converting a palette ("P") map to "L" would turn class ids into luminances.
        encoded = image_processor(images=images, segmentation_maps=batch["annotation"], return_tensors="pt")
        labels = encoded["labels"]
        unknown = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_labels))].unique()
        if len(unknown):  # the loss would fail deep inside torch, or train the wrong thing
            raise ValueError(
                f"Annotations hold class ids {unknown.tolist()}, but the model has {num_labels} classes (0 .. "
                f"{num_labels - 1}, and {IGNORE_INDEX} for ignored pixels); give an id2label.json with every class, "
                "or --do_reduce_labels if 0 means 'other'."
            )
        return {"pixel_values": encoded["pixel_values"], "labels": labels}

    return transform


def predicted_label_maps(logits, labels):
    """Keep only the argmax of UperNet's logits (already at the label maps' size) for the metric: far less to hold."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.argmax(dim=1)


def make_compute_metrics(labels: list[str]):
    def compute_metrics(evaluation):
        metric = MeanIoU()
        metric.add_batch(predictions=list(evaluation.predictions), references=list(evaluation.label_ids))
        results = metric.compute(num_labels=len(labels), ignore_index=IGNORE_INDEX)
        per_class = {f"iou_{name}": value for name, value in zip(labels, results.pop("per_category_iou"), strict=True)}
        results.pop("per_category_accuracy")
        return {**results, **per_class}

    return compute_metrics


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    training_args.remove_unused_columns = False  # the transform reads the raw image and annotation columns
    set_seed(training_args.seed)

    dataset = load_segmentation_dataset(data_args, model_args.image_size, training_args.seed)
    labels = label_names(dataset, data_args)
    model, image_processor = load_model_and_processor(model_args, data_args, labels)
    for split in ("train", "test"):
        dataset[split].set_transform(make_transform(image_processor, len(labels)))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        compute_metrics=make_compute_metrics(labels),
        preprocess_logits_for_metrics=predicted_label_maps,
        processing_class=image_processor,
        callbacks=mask_decay_callbacks(model, model_args),
    )
    results = run_castling(trainer, image_processor, data_args.dataset_name or "shape_masks")
    return {**results, "eval_samples": len(dataset["test"]), "labels": labels}


if __name__ == "__main__":
    main()
