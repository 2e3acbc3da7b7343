#!/usr/bin/env python
"""Castle a pretrained model without labels: castle it with `castling_hf.castle`, distil it from its frozen self on
images alone while the mask decay hands every layer over to linear-angular attention, switch, and write the
inference checkpoint with the source's own image processor, a fidelity report and a model card.

In the manner of `transformers`' examples (the image-distillation guide's `Trainer` with a `teacher_model`, and
run_image_classification.py's arguments):

    python examples/distillation/run_castle_distillation.py --model_name_or_path facebook/dinov2-small \\
        --dataset_name <any image data set> --output_dir outputs/castled-dinov2 --do_train --do_eval \\
        --max_steps 2000 --per_device_train_batch_size 64

`--model_name_or_path` is anything `castle` takes, as a Hub name or a folder: an image classifier, a base model, a
Dinov2 backbone, a task model on one (UperNet, DPT, Depth Anything, Mask2Former), or timm's MViTv2. The images come
from `--dataset_name` (a Hub name or a local folder `datasets` reads) or from folders of images (`--train_dir`,
`--validation_dir`): only `--image_column_name` is read, so a label or annotation column is ignored and a set without
one works; a `--label_column_name` column whose classes are the model's (class names equal to its `id2label`), or
whose label maps a segmenter reads, only adds each model's accuracy or mean IoU to the report.

The optimiser's defaults are this route's (`ROUTE_DEFAULTS`: learning rate 4e-3, cosine schedule with 3 % warm-up,
weight decay 0.05): with `TrainingArguments`' own (5e-5, linear) a castled model ends far below its source after the
switch. The task heads stay the source's (frozen) unless `--train_heads`. With `--do_eval` the report
(`fidelity.json`, printed, and in the model card) compares the castled model with its source on the held-out images
at the training resolution and at twice it (where the source runs there: not timm's MViTv2): the cosine similarity
and relative error of the castled part's features, the task output's relative error and the share of predictions
that agree. Training resumes from the last checkpoint in `--output_dir`; `--push_to_hub` pushes the inference
checkpoint (never the training form).
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
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from transformers import AutoImageProcessor, HfArgumentParser, IntervalStrategy, TrainingArguments, set_seed

from castling_hf import CastlingDistillationTrainer, castle, source_image_processor
from castling_hf.conversion import load_source
from castling_hf.conversion_timm import timm_model_of
from castling_hf.distillation import fidelity_report
from castling_hf.hub import push_inference_checkpoint, write_inference_checkpoint
from castling_hf.model_card import distillation_card

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from castling_examples import (  # noqa: E402
    HubArguments,
    ImageDataArguments,
    held_out_split,
    hub_push_requested,
    last_checkpoint,
    leave_process_group,
    load_image_folders,
    switch_after_training,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={
            "help": "The source, anything castling_hf.castle takes (Hub name or folder): a ViT, DeiT, Dinov2, DINOv3, "
            "SigLIP, CLIP or EoMT model, classifier or backbone, a task model on one (UperNet, DPT, ...), timm's "
            "VisionTransformer or MViTv2."
        }
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "The processor to prepare images with; default: the source's own."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "JSON object of Castling attention fields for castle(), e.g. residual_conv."}
    )
    train_heads: bool = field(
        default=False, metadata={"help": "Train the task heads too (by default they stay the source's, frozen)."}
    )
    mask_decay_end: float = field(default=0.25, metadata={"help": "Where α reaches 0: fraction of the run."})
    temperature: float = field(default=1.0, metadata={"help": "Of the soft labels, for models with class logits."})
    feature_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the castled encoder's or backbone's features in the loss (0: none)."}
    )
    training_noise: bool = field(
        default=False,
        metadata={
            "help": "Keep the student's dropout, stochastic depth and position augmentation (its teacher has none)."
        },
    )


@dataclass
class DataTrainingArguments(ImageDataArguments):
    """The images (castling_examples.py); this example adds random crops (off by default) and pastes a rectangle of
    another image into each training image (on by default)."""

    augment: bool = field(default=False, metadata={"help": "Random crops of 80-100% of each training image."})
    mix_images: bool = field(
        default=True,
        metadata={"help": "Paste a rectangle of another image into each training image (CutMix; the source labels)."},
    )


# `TrainingArguments`' defaults that castling without labels replaces: measured on the focus task (docs/design.md §9),
# and what `make bench-distill` runs this example with. Each can still be given. The rate was chosen at the nano
# width, where a castled model has to move far from its source's weights within the run; wider models often want less.
ROUTE_DEFAULTS = dict(
    learning_rate=4e-3,
    lr_scheduler_type="cosine",
    warmup_steps=0.03,  # a fraction of the run
    weight_decay=0.05,
    remove_unused_columns=False,  # the transforms read the raw image column
)


def argument_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, HubArguments, DataTrainingArguments, TrainingArguments))
    parser.set_defaults(**ROUTE_DEFAULTS)
    return parser


def load_images(
    data_args: DataTrainingArguments, hub_args: HubArguments, seed: int, evaluates: bool
) -> datasets.DatasetDict:
    """`train` and, where the run `evaluates`, `test`: held-out images as `held_out_split` finds or cuts them. A run
    that never evaluates distils on every image it was given: a user's own images are often few, and each counts."""
    dataset = load_image_folders(data_args, hub_args)
    if dataset is None:
        raise ValueError(
            "No images to distil on: give --dataset_name (a Hub data set, or a local folder datasets reads) or "
            "--train_dir (a folder of images), images like those the castled model will see."
        )
    dataset = held_out_split(dataset, data_args, seed, hold_out=evaluates)
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


def make_transform(image_processor, image_column: str, augment: bool, seed: int, label_column: str | None = None):
    """The images as `image_processor` prepares them, randomly cropped with `augment`; with `label_column`, their
    labels too: class ids as they are, label maps as the processor prepares them."""
    rng = random.Random(seed)

    def transform(batch):
        images = [image.convert("RGB") for image in batch[image_column]]
        if augment:
            images = [random_crop(image, rng) for image in images]
        if label_column is None:
            return {"pixel_values": image_processor(images=images, return_tensors="pt")["pixel_values"]}
        if isinstance(batch[label_column][0], Image.Image):  # label maps
            return dict(image_processor(images=images, segmentation_maps=batch[label_column], return_tensors="pt"))
        processed = image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": processed, "labels": torch.tensor(batch[label_column])}

    return transform


def collate(examples):
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}


def fitting_label_column(dataset, data_args: DataTrainingArguments, model) -> str | None:
    """`--label_column_name` where its labels are the model's own: class ids whose names are the model's `id2label`
    in order (a classifier), or label maps (a segmenter's, whose classes have no names to check); else None, and the
    log says why no accuracy is reported."""
    column = data_args.label_column_name
    if column is None or column not in dataset.column_names:
        return None
    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):  # label maps, of the classes the segmenter was trained on
        return column
    names = getattr(feature, "names", None)
    id2label = getattr(model.config, "id2label", None) or {}
    model_names = [id2label[index] for index in sorted(id2label)] if id2label else None
    if names is not None and names == model_names:
        return column
    logger.warning(
        f"The {column!r} column's classes ({names[:5] if names else feature}...) are not the model's "
        f"({model_names[:5] if model_names else 'none'}...): the report gives no accuracy."
    )
    return None


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
    model_args, hub_args, data_args, training_args = argument_parser().parse_args_into_dataclasses(args=argv)
    if not (training_args.do_train or training_args.do_eval):
        raise ValueError(
            "Neither --do_train nor --do_eval was given, so there is nothing to run: add --do_train to distil (and "
            "write the inference checkpoint), --do_eval for the fidelity report, or both."
        )
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    set_seed(training_args.seed)
    push_to_hub = hub_push_requested(training_args)

    teacher = load_source(model_args.model_name_or_path, **hub_args.loading()).eval()
    if model_args.image_processor_name is not None:
        image_processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name, **hub_args.loading())
    else:
        image_processor = source_image_processor(model_args.model_name_or_path, **hub_args.loading())
    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    student = castle(teacher, **overrides).train()

    evaluates = training_args.do_eval or training_args.eval_strategy != IntervalStrategy.NO
    with training_args.main_process_first():
        dataset = load_images(data_args, hub_args, training_args.seed, evaluates)
    dataset["train"].set_transform(
        make_transform(image_processor, data_args.image_column_name, data_args.augment, training_args.seed)
    )
    held_out = None
    if evaluates:
        held_out = dataset["test"].with_transform(
            make_transform(image_processor, data_args.image_column_name, False, training_args.seed)
        )
    trainer = CastlingDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=held_out,
        data_collator=collate,
        processing_class=image_processor,
        temperature=model_args.temperature,
        mask_decay_end=model_args.mask_decay_end,
        train_heads=model_args.train_heads,
        feature_loss_weight=model_args.feature_loss_weight,
        training_noise=model_args.training_noise,
        mix_images=data_args.mix_images,
    )
    results = {"processes": training_args.world_size}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=last_checkpoint(training_args))
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results["train"] = train_result.metrics
    switched = switch_after_training(trainer)
    if training_args.do_eval:
        results["eval"] = trainer.evaluate()
        label_column = fitting_label_column(dataset["test"], data_args, student)
        scored = dataset["test"].with_transform(
            make_transform(image_processor, data_args.image_column_name, False, training_args.seed, label_column)
        )
        batches = DataLoader(scored, batch_size=training_args.per_device_eval_batch_size, collate_fn=default_collate)
        # timm's MViTv2 reads its relative position tables without resizing them, so it runs at most at its own size.
        scales = (1,) if timm_model_of(teacher) is not None else (1, 2)
        results["fidelity"] = fidelity_report(
            student, trainer.teacher_model, batches, scales=scales, accelerator=trainer.accelerator
        )
        if trainer.is_world_process_zero():
            print_report(model_args.model_name_or_path, results["fidelity"])
            with open(os.path.join(training_args.output_dir, "fidelity.json"), "w") as file:
                json.dump(results["fidelity"], file, indent=2)
    if training_args.do_train and switched:
        results["inference_dir"] = training_args.output_dir
        if trainer.is_world_process_zero():
            dataset_name = data_args.dataset_name or data_args.train_dir
            card = distillation_card(student, model_args.model_name_or_path, dataset_name, results.get("fidelity"))
            write_inference_checkpoint(student, training_args.output_dir, image_processor, card)
            if push_to_hub:
                name = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
                push_inference_checkpoint(student, name, image_processor, card, token=training_args.hub_token)
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as file:
            json.dump(results, file, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
    leave_process_group()
