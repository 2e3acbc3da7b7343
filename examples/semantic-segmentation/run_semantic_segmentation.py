#!/usr/bin/env python
"""Train UperNet on a Castling-ViT backbone with the `transformers` Trainer and the mask decay, evaluate mean IoU
before and after the switch to linear-angular attention, and save the inference checkpoint with its image processor.

In the manner of `transformers`' examples/pytorch/semantic-segmentation/run_semantic_segmentation.py:

    python examples/semantic-segmentation/run_semantic_segmentation.py --do_train --do_eval --output_dir outputs/seg
    python examples/semantic-segmentation/run_semantic_segmentation.py --dataset_name <Hub name or local folder> ...

Without `--dataset_name` the generated shapes with their label maps (`castling_hf.data.shape_masks`) are used, so it
runs offline. A data set (a Hub name, or a local folder `datasets.load_dataset` reads, e.g. `train.parquet` +
`validation.parquet`) needs the layout of `scene_parse_150`: an `image` and an `annotation` (a label map: one class id
per pixel; a `label` column is read as the annotation, as transformers' example does) per example. Evaluation uses
the `validation` split, else `test`, else a fraction of `train`. The label names come from an `id2label.json`
(`{"0": "wall", ...}`, ids as the model sees them) beside the data: in the local folder, or in the Hub data set's
repository; without one, the classes are named by the ids in the training annotations. `--do_reduce_labels` maps 0
(scene_parse_150's "other") to the ignored index 255 and shifts the other ids down by one, as SegFormer's image
processor does. Annotations are checked against the classes before training starts.

`--model_name_or_path` is a size name (a new `UperNetForSemanticSegmentation` whose `backbone_config` is a
Castling-ViT config with four feature maps a quarter of the depth apart, through the simple feature pyramid at output
strides 4, 8, 16 and 32 px unless `--simple_feature_pyramid false`, and a UperNet twice the backbone's width, at most
512 channels), a Castling-ViT checkpoint (e.g. a classifier: its encoder under a new UperNet), or
a segmentation checkpoint whose backbone is Castling-ViT (e.g. this example's output).
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
from huggingface_hub.errors import RemoteEntryNotFoundError
from transformers import (
    AutoConfig,
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

from castling_hf import (
    CASTLING_MVITV2_SIZES,
    CASTLING_VIT_SIZES,
    CastlingMViTv2Backbone,
    CastlingMViTv2Config,
    CastlingViTBackbone,
    CastlingViTConfig,
    in_place,
)
from castling_hf.configuration_utils import CastlingAttentionConfig
from castling_hf.data import SEGMENTATION_CLASSES, shape_masks
from castling_hf.metrics import MeanIoU

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from castling_examples import (  # noqa: E402
    CastlingModelArguments,
    held_out_split,
    hub_push_requested,
    label_maps,
    mask_decay_callbacks,
    model_from_checkpoint,
    new_castling_config,
    run_castling,
)

logger = logging.getLogger(__name__)
IGNORE_INDEX = 255  # UperNetConfig.loss_ignore_index, and what do_reduce_labels turns class 0 into
MVITV2_STAGES = [f"stage{index}" for index in range(1, 5)]  # Castling-MViTv2's maps at strides 4-32 px


@dataclass
class ModelArguments(CastlingModelArguments):
    image_size: int = field(default=64, metadata={"help": "Images are resized to image_size × image_size."})
    simple_feature_pyramid: bool = field(
        default=True,
        metadata={"help": "Feed UperNet maps at output strides 4, 8, 16 and 32 px, whatever the patch (a new model)."},
    )
    decode_hidden_size: int | None = field(
        default=None,
        metadata={"help": "UperNet's channel width (a new model); default: twice the backbone's width, at most 512."},
    )
    use_auxiliary_head: bool = field(default=True, metadata={"help": "UperNet's FCN auxiliary head (a new model)."})
    backbone_family: str = field(
        default="castling_vit",
        metadata={
            "help": "The family of a new backbone: 'castling_vit' (plain, its maps through the simple pyramid) or "
            "'castling_mvitv2' (multiscale: its four stages are the maps at strides 4-32 px)."
        },
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub data set or a local folder; default: generated shape masks."}
    )
    num_generated_images: int = field(default=1000, metadata={"help": "Size of the generated set."})
    do_reduce_labels: bool = field(
        default=False, metadata={"help": "Ignore class 0 and shift the others down by one (scene_parse_150)."}
    )
    train_val_split: float = field(default=0.2)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)


def load_segmentation_dataset(data_args: DataTrainingArguments, image_size: int, seed: int) -> DatasetDict:
    if data_args.dataset_name is None:
        dataset = shape_masks(
            num_images=data_args.num_generated_images,
            image_size=image_size,
            seed=seed,
            test_fraction=data_args.train_val_split,
        )
    else:
        dataset = load_dataset(data_args.dataset_name)
        # transformers' own example reads `image` / `label`, or `pixel_values` / `annotation`: all become ours.
        for split in dataset:
            renames = {"pixel_values": "image", "label": "annotation"}
            dataset[split] = dataset[split].rename_columns(
                {old: new for old, new in renames.items() if old in dataset[split].column_names}
            )
        missing = {"image", "annotation"} - set(next(iter(dataset.values())).column_names)
        if missing:
            raise ValueError(
                f"{data_args.dataset_name!r} has columns {next(iter(dataset.values())).column_names}; the "
                "scene_parse_150 layout needs an 'image' and an 'annotation' (a label map; 'label' is read as one) per "
                f"example, and {sorted(missing)} is missing."
            )
    return held_out_split(dataset, data_args, seed)


def id2label_beside_the_data(dataset_name: str) -> dict[int, str] | None:
    """The `id2label.json` in the local folder `dataset_name`, or in the Hub data set's repository; None if it has
    none. (A Hub that cannot be reached is an error, not a missing file: the classes would silently change.)"""
    if os.path.isdir(dataset_name):
        path = os.path.join(dataset_name, "id2label.json")
        if not os.path.exists(path):
            return None
    else:
        try:
            path = hf_hub_download(dataset_name, "id2label.json", repo_type="dataset")
        except RemoteEntryNotFoundError:
            return None
    with open(path) as file:
        return {int(key): name for key, name in json.load(file).items()}


def class_ids(annotation, do_reduce_labels: bool) -> set[int]:
    """The model's class ids in one label map: without the ignored index, and after the reduction when asked (0 is
    ignored, the others move down by one, as SegFormer's image processor does)."""
    ids = set(np.unique(np.asarray(annotation)).tolist()) - {IGNORE_INDEX}
    return {i - 1 for i in ids if i != 0} if do_reduce_labels else ids


def label_names(dataset: DatasetDict, data_args: DataTrainingArguments) -> list[str]:
    """The model's labels: the generated set's classes, the data set's `id2label.json` (ids as the model sees them:
    after `--do_reduce_labels`), or the ids in the training annotations. Every annotation of both splits is checked
    against them here, before any training."""
    if data_args.dataset_name is None:
        return list(SEGMENTATION_CLASSES)
    seen = {
        split: set().union(*(class_ids(a, data_args.do_reduce_labels) for a in dataset[split]["annotation"]))
        for split in ("train", "test")
    }
    id2label = id2label_beside_the_data(data_args.dataset_name)
    if id2label is None:
        logger.warning("%s has no id2label.json: the classes are named by their ids.", data_args.dataset_name)
        id2label = {index: str(index) for index in range(max(seen["train"]) + 1)}
        if data_args.do_reduce_labels:  # name them by the ids in the data, before the reduction
            id2label = {index: str(index + 1) for index in id2label}
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(
            f"The id2label.json of {data_args.dataset_name!r} has ids {sorted(id2label)}; expected 0 .. "
            f"{len(id2label) - 1}, one per class, as the model's label ids."
        )
    for split, ids in seen.items():
        unknown = sorted(i for i in ids if i >= len(id2label))
        if unknown:
            raise ValueError(
                f"The {split!r} annotations of {data_args.dataset_name!r} hold class ids {unknown} (as the model "
                f"sees them{', after --do_reduce_labels' if data_args.do_reduce_labels else ''}), but there are "
                f"{len(id2label)} classes (0 .. {len(id2label) - 1}, and {IGNORE_INDEX} for ignored pixels); give an "
                "id2label.json with every class, or --do_reduce_labels if 0 means 'other'."
            )
    return [id2label[index] for index in range(len(id2label))]


def stage_indices(depth: int) -> list[int]:
    """Four stages a quarter of the depth apart, the last one the encoder's output: UperNet's four feature maps."""
    if depth < 4:
        raise ValueError(
            f"UperNet takes four feature maps, from layers a quarter of the depth apart; a backbone of {depth} "
            "layers cannot give four different ones. Give num_hidden_layers ≥ 4 (--config_overrides)."
        )
    return [depth * quarter // 4 for quarter in (1, 2, 3, 4)]


def decode_width(backbone_config, decode_hidden_size: int | None) -> int:
    """UperNet's width: as asked, else sized to the backbone (UperNet's 512 is for ViT-B's 768 channels; a narrow
    backbone's maps do not need 512-channel convs): twice its width, a multiscale backbone's widest stage."""
    width = getattr(backbone_config, "hidden_size", None) or max(backbone_config.hidden_sizes)
    return decode_hidden_size or min(512, 2 * width)


def upernet_on(backbone_config, model_args: ModelArguments, labels: list[str]) -> UperNetForSemanticSegmentation:
    config = UperNetConfig(
        backbone_config=backbone_config,
        hidden_size=decode_width(backbone_config, model_args.decode_hidden_size),
        use_auxiliary_head=model_args.use_auxiliary_head,
        loss_ignore_index=IGNORE_INDEX,
        **label_maps(labels),
    )
    return UperNetForSemanticSegmentation(config)


def new_processor(model_args: ModelArguments, data_args: DataTrainingArguments, normalisation=None):
    """SegFormer's image processor (PIL backend: resizes label maps with nearest neighbours) at `image_size`, with the
    mean and std of `normalisation` (an encoder checkpoint's image processor) when given."""
    size = {"height": model_args.image_size, "width": model_args.image_size}
    statistics = {"image_mean": normalisation.image_mean, "image_std": normalisation.image_std} if normalisation else {}
    return SegformerImageProcessorPil(size=size, do_reduce_labels=data_args.do_reduce_labels, **statistics)


def saved_image_processor(name_or_path: str):
    """The image processor saved with a checkpoint, or None (with a warning) when there is none."""
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except OSError:
        logger.warning("%s has no image processor: ImageNet's mean and std normalise the images.", name_or_path)
        return None


def load_model_and_processor(model_args: ModelArguments, data_args: DataTrainingArguments, labels: list[str]):
    """A new UperNet on a new backbone of a named size (Castling-ViT, or Castling-MViTv2 with `--backbone_family
    castling_mvitv2`); a new UperNet on the encoder of a Castling-ViT or Castling-MViTv2 checkpoint (e.g. a classifier,
    or a castled timm MViTv2); or a segmentation checkpoint with a Castling backbone (e.g. this example's)."""
    name_or_path = model_args.model_name_or_path
    if model_args.backbone_family == "castling_mvitv2" and name_or_path in CASTLING_MVITV2_SIZES:
        overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
        backbone_config = CastlingMViTv2Config.from_size(
            name_or_path, image_size=model_args.image_size, out_features=MVITV2_STAGES, **overrides
        )
        return upernet_on(backbone_config, model_args, labels), new_processor(model_args, data_args)
    if model_args.backbone_family != "castling_vit":
        raise ValueError(
            f"--backbone_family is 'castling_vit' or 'castling_mvitv2', got {model_args.backbone_family!r}."
        )
    if name_or_path in CASTLING_VIT_SIZES and model_args.backbone_family == "castling_vit":
        depth = new_castling_config(model_args).num_hidden_layers
        backbone_config = new_castling_config(
            model_args,
            image_size=model_args.image_size,
            out_indices=stage_indices(depth),
            simple_feature_pyramid=model_args.simple_feature_pyramid,
        )
        return upernet_on(backbone_config, model_args, labels), new_processor(model_args, data_args)

    config = AutoConfig.from_pretrained(name_or_path)
    if isinstance(config, CastlingViTConfig):  # an encoder checkpoint: its weights under a new UperNet
        backbone = CastlingViTBackbone.from_pretrained(
            name_or_path,
            out_indices=stage_indices(config.num_hidden_layers),
            simple_feature_pyramid=model_args.simple_feature_pyramid,
        )
        model = upernet_on(backbone.config, model_args, labels)
        model.backbone = backbone
        return model, new_processor(model_args, data_args, saved_image_processor(name_or_path))
    if isinstance(config, CastlingMViTv2Config):  # its four stages under a new UperNet
        backbone = CastlingMViTv2Backbone.from_pretrained(name_or_path, out_features=MVITV2_STAGES)
        model = upernet_on(backbone.config, model_args, labels)
        model.backbone = backbone
        return model, new_processor(model_args, data_args, saved_image_processor(name_or_path))
    backbone_config = getattr(config, "backbone_config", None)
    if not (isinstance(backbone_config, CastlingAttentionConfig) or in_place.is_castled(backbone_config)):
        raise ValueError(
            f"{name_or_path!r} is a {config.model_type!r} checkpoint without a Castling backbone. This example "
            "trains semantic segmentation on Castling-ViT or Castling-MViTv2: give a size name, a Castling-ViT or "
            "Castling-MViTv2 checkpoint (its encoder gets a new UperNet), or a segmentation checkpoint whose "
            "backbone_config is one of them or a backbone castled in place (castling_hf.castle)."
        )
    model = model_from_checkpoint(model_args, labels, AutoModelForSemanticSegmentation)
    processor = AutoImageProcessor.from_pretrained(name_or_path, do_reduce_labels=data_args.do_reduce_labels)
    return model, processor


def make_transform(image_processor):
    def transform(batch):
        images = [image.convert("RGB") for image in batch["image"]]
        # Label maps as they are: converting a palette ("P") map to "L" would turn class ids into luminances.
        encoded = image_processor(images=images, segmentation_maps=batch["annotation"], return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"], "labels": encoded["labels"]}

    return transform


def predicted_label_maps(logits, labels):
    """Keep only the argmax of UperNet's logits (already at the label maps' size) for the metric: far less to hold."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.argmax(dim=1)


def make_compute_metrics(labels: list[str]):
    """Mean IoU, mean and overall pixel accuracy, and IoU per class (`iou_<label>`). With `--batch_eval_metrics` the
    Trainer hands over one batch at a time (`compute_result=False` until the last), and the counts accumulate."""
    metric = MeanIoU()

    def compute_metrics(evaluation, compute_result: bool = True):
        metric.add_batch(predictions=list(evaluation.predictions), references=list(evaluation.label_ids))
        if not compute_result:
            return {}
        results = metric.compute(num_labels=len(labels), ignore_index=IGNORE_INDEX)
        per_class = {f"iou_{name}": iou for name, iou in zip(labels, results.pop("per_category_iou"), strict=True)}
        results.pop("per_category_accuracy")
        return {**results, **per_class}

    return compute_metrics


def argument_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = argument_parser().parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    training_args.remove_unused_columns = False  # the transform reads the raw image and annotation columns
    set_seed(training_args.seed)
    push_to_hub = hub_push_requested(training_args)

    dataset = load_segmentation_dataset(data_args, model_args.image_size, training_args.seed)
    labels = label_names(dataset, data_args)
    model, image_processor = load_model_and_processor(model_args, data_args, labels)
    for split in ("train", "test"):
        dataset[split].set_transform(make_transform(image_processor))

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
    results = run_castling(trainer, image_processor, data_args.dataset_name or "shape_masks", push_to_hub)
    return {**results, "eval_samples": len(dataset["test"]), "labels": labels}


if __name__ == "__main__":
    main()
