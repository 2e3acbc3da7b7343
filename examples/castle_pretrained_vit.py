#!/usr/bin/env python
"""Castle a pretrained image classifier (ViT, DeiT with or without its teacher head, Dinov2, Dinov2 with registers,
SigLIP, CLIP, ...): castle it in place, so that its first forward pass is the source's, then fine-tune with the mask
decay so that it ends with linear-angular attention only.

    # convert a local directory or a Hub checkpoint and save it (with the source's image processor)
    python examples/castle_pretrained_vit.py google/vit-base-patch16-224 --output_dir outputs/castled-vit-base
    # then fine-tune it like any castled checkpoint (the mask decay, the switch, the inference checkpoint)
    python examples/image-classification/run_image_classification.py \\
        --model_name_or_path outputs/castled-vit-base --dataset_name <data set> --output_dir outputs/castled-run

    # the whole recipe offline: a softmax ViT trained on the bundled digits stands in for the Hub checkpoint
    python examples/castle_pretrained_vit.py --demo
"""

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments, ViTConfig, set_seed

import castling_hf
from castling_hf import CASTLING_VIT_SIZES, image_processor_for

EXAMPLE = Path(__file__).parent / "image-classification" / "run_image_classification.py"


def load_training_example():
    spec = importlib.util.spec_from_file_location("run_image_classification", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def castle(source: str, output_dir: str, config_overrides: dict):
    """Castle `source` (directory or Hub name) and save model and image processor."""
    model = castling_hf.castle(source, **config_overrides)
    image_processor = castling_hf.source_image_processor(source)  # the source's own, or its family's
    model.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    print(f"castled {source} -> {output_dir} (α = 1, dense branch: the first forward pass is the source's)")
    return model


def train_source_vit(
    output_dir: str,
    dataset,
    config: ViTConfig,
    training,
    seed: int,
    return_curve: bool = False,
    image_processor=None,
    **arguments,
):
    """A softmax image classifier of `config`'s family (`ViTForImageClassification` for a `ViTConfig`; any config
    `AutoModelForImageClassification` takes, e.g. SigLIP's or CLIP's, with its `image_processor`), trained with the
    `Trainer` on `dataset` (`train` and `test` splits with `image` and `label` columns) through the classification
    example's transforms (its random crops), `arguments` going to `TrainingArguments`: the stand-in for a Hub
    checkpoint. Saved with its image processor to `output_dir`; returns its test accuracy, and with `return_curve` the
    (step, accuracy) of every evaluation during training too (`eval_strategy` in `arguments`)."""
    set_seed(seed)
    model = AutoModelForImageClassification.from_config(config)
    image_processor = image_processor or image_processor_for(config)
    dataset["train"].set_transform(training.make_transform(image_processor, "image", "label", True, seed))
    dataset["test"].set_transform(training.make_transform(image_processor, "image", "label", False, seed))
    defaults = dict(
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        warmup_steps=30,
        weight_decay=0.05,
        label_smoothing_factor=0.1,
        logging_steps=100,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    args = TrainingArguments(
        output_dir=output_dir,
        remove_unused_columns=False,  # the transforms read the raw image and label columns
        **{**defaults, **arguments},
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        data_collator=training.collate,
        compute_metrics=training.compute_metrics,
    )
    trainer.train()
    accuracy = trainer.evaluate()["eval_accuracy"]
    trainer.save_model()
    image_processor.save_pretrained(output_dir)
    if not return_curve:
        return accuracy
    history = trainer.state.log_history
    return accuracy, [(entry["step"], entry["eval_accuracy"]) for entry in history if "eval_accuracy" in entry]


def digits_source_config(dataset) -> ViTConfig:
    """The demo source: ViT of the nano size, labelled as the bundled digits."""
    labels = dataset["train"].features["label"].names
    return ViTConfig(
        **CASTLING_VIT_SIZES["nano"],
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def latency_ms(model, image_size: int, repeats: int) -> float:
    """Median latency of one forward pass on one image of `image_size`² pixels (positions interpolated)."""
    pixels = torch.randn(1, model.config.num_channels, image_size, image_size)
    times = []
    with torch.inference_mode():
        model(pixel_values=pixels, interpolate_pos_encoding=True)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            model(pixel_values=pixels, interpolate_pos_encoding=True)
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def demo(args) -> dict:
    training = load_training_example()
    root = Path(args.output_dir)
    print("1/4 training the source: a softmax ViTForImageClassification on the bundled digits")
    dataset = training.load_image_dataset(training.DataTrainingArguments(), args.seed)
    for split, part in dataset.items():  # the images alone, for castling without labels (README)
        part.remove_columns("label").to_parquet(str(root / "digit-images" / f"{split}.parquet"))
    source_dir = str(root / "source-vit")
    source_accuracy = train_source_vit(
        source_dir, dataset, digits_source_config(dataset), training, args.seed, num_train_epochs=args.source_epochs
    )

    print("2/4 castling it")
    source = AutoModelForImageClassification.from_pretrained(source_dir).eval()
    castled = castle(source_dir, str(root / "castled"), {})
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        start_difference = (castled(pixel_values=pixels).logits - source(pixel_values=pixels).logits).abs().max().item()

    print("3/4 fine-tuning with the mask decay, then the switch (run_image_classification.py)")
    results = training.main(
        f"--model_name_or_path {root / 'castled'} --do_train --do_eval --output_dir {root / 'fine-tuned'} "
        f"--num_train_epochs {args.castle_epochs} --per_device_train_batch_size 32 "
        f"--learning_rate {args.castle_learning_rate} --mask_decay_end {args.mask_decay_end} --warmup_steps 30 "
        f"--weight_decay 0.05 --label_smoothing_factor 0.1 --logging_steps 100 --eval_strategy no "
        f"--save_strategy no --report_to none --seed {args.seed}".split()
    )
    castled_accuracy = results["linear"]["eval_linear_accuracy"]
    inference = AutoModelForImageClassification.from_pretrained(results["inference_dir"]).eval()

    print("4/4 inference latency, batch 1")
    latencies = {
        size: {
            "source_vit": latency_ms(source, size, args.repeats),
            "castled": latency_ms(inference, size, args.repeats),
        }
        for size in args.latency_sizes
    }
    summary = {
        "source_accuracy": source_accuracy,
        "castled_accuracy_after_switch": castled_accuracy,
        "castled_accuracy_before_switch": results["castling"]["eval_castling_accuracy"],
        "start_max_abs_logit_difference": start_difference,
        "latency_ms": latencies,
        "inference_dir": results["inference_dir"],
        "args": vars(args),
    }
    (root / "castle_demo.json").write_text(json.dumps(summary, indent=2))

    print("\n=== Castling a pretrained ViT (digits stand in for the Hub) ===")
    print(f"source ViT test accuracy             {source_accuracy:.2%}")
    print(f"castled, first forward pass          max |Δ logit| = {start_difference:.1e} against the source")
    print(f"castled after the switch             {castled_accuracy:.2%}  ({castled_accuracy - source_accuracy:+.2%})")
    for size, row in latencies.items():
        ratio = row["castled"] / row["source_vit"]
        print(
            f"latency at {size}×{size}, batch 1     source ViT {row['source_vit']:.1f} ms, castled "
            f"{row['castled']:.1f} ms (castled/source {ratio:.2f})"
        )
    print(f"inference checkpoint                 {results['inference_dir']}; summary in {root / 'castle_demo.json'}")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", help="an image classifier or encoder checkpoint: directory or Hub name")
    parser.add_argument("--output_dir", default="outputs/castled")
    parser.add_argument("--config_overrides", default=None, help="JSON object of Castling attention fields")
    parser.add_argument("--demo", action="store_true", help="the whole recipe offline on the bundled digits")
    parser.add_argument("--source_epochs", type=float, default=25)
    parser.add_argument("--castle_epochs", type=float, default=25)
    parser.add_argument("--castle_learning_rate", type=float, default=2e-3)
    parser.add_argument(
        "--mask_decay_end",
        type=float,
        default=0.25,
        help="where α reaches 0 (fraction of the fine-tune): early, see README",
    )
    parser.add_argument("--latency_sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.demo:
        return demo(args)
    if args.source is None:
        parser.error("give a source checkpoint (directory or Hub name), or --demo")
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    return castle(args.source, args.output_dir, overrides)


if __name__ == "__main__":
    main()
