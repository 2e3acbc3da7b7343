#!/usr/bin/env python
"""Castle a pretrained segmenter on a Dinov2 backbone: a UperNet (or any `transformers` task model whose backbone is
a Dinov2 backbone) whose first forward pass is the source's, fine-tuned with the mask decay until it runs on
linear-angular attention alone.

    # convert a local directory or a Hub checkpoint and save it with the source's image processor
    python examples/semantic-segmentation/castle_pretrained_upernet.py <UperNet on Dinov2> --output_dir outputs/castled
    # then fine-tune it like any segmentation checkpoint, its Dinov2 backbone castled in place
    python examples/semantic-segmentation/run_semantic_segmentation.py --model_name_or_path outputs/castled \\
        --dataset_name <data set> --do_train --do_eval --output_dir outputs/castled-run

    # the whole recipe offline: a softmax UperNet on Dinov2 trained on the generated shape masks stands in for the Hub
    python examples/semantic-segmentation/castle_pretrained_upernet.py --demo

The demo trains the source with the `transformers` Trainer, castles it (checking the exact start), fine-tunes the
castled model with `run_semantic_segmentation.py` (the mask decay, the switch, the inference checkpoint), reloads the
inference checkpoint with `AutoModelForSemanticSegmentation`, runs `pipeline("image-segmentation")` on it, and times
both models and both backbones at `--latency_sizes`. Mean IoU is the mean over the classes of
|predicted ∩ true| / |predicted ∪ true| in pixels, on the held-out fifth of the generated images.
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForSemanticSegmentation,
    Dinov2Config,
    Trainer,
    TrainingArguments,
    pipeline,
    set_seed,
)

import castling_hf
from castling_hf import CASTLING_VIT_SIZES

EXAMPLES = Path(__file__).resolve().parents[1]
SEGMENTATION_EXAMPLE = EXAMPLES / "semantic-segmentation" / "run_semantic_segmentation.py"


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def castle(source: str, output_dir: str, overrides: dict):
    """Convert `source` (directory or Hub name) and save the castled model with the source's image processor."""
    model = castling_hf.castle(source, **overrides)
    model.save_pretrained(output_dir)
    castling_hf.source_image_processor(source).save_pretrained(output_dir)
    print(f"castled {source} -> {output_dir} (α = 1, dense branch: the first forward pass is the source's)")
    return model


def dinov2_like(size: str, patch_size: int, image_size: int) -> Dinov2Config:
    """A Dinov2 backbone config of a Castling-ViT size (width, depth, heads, MLP), four maps a quarter of the depth
    apart on the patch grid, with SDPA attention: the architecture of a `facebook/dinov2-*` backbone, small."""
    dims = CASTLING_VIT_SIZES[size]
    depth = dims["num_hidden_layers"]
    config = Dinov2Config(
        hidden_size=dims["hidden_size"],
        num_hidden_layers=depth,
        num_attention_heads=dims["num_attention_heads"],
        mlp_ratio=dims["intermediate_size"] // dims["hidden_size"],
        patch_size=patch_size,
        image_size=image_size,
        out_indices=[depth * quarter // 4 for quarter in (1, 2, 3, 4)],
        reshape_hidden_states=True,
    )
    config._attn_implementation = "sdpa"
    return config


def train_source(args, segmentation) -> tuple[str, dict]:
    """The stand-in for a Hub checkpoint: UperNet on a softmax Dinov2 backbone trained on the shape masks."""
    model_args = segmentation.ModelArguments(image_size=args.image_size, decode_hidden_size=args.decode_hidden_size)
    data_args = segmentation.DataTrainingArguments(num_generated_images=args.num_generated_images)
    dataset = segmentation.load_segmentation_dataset(data_args, args.image_size, args.seed)
    labels = segmentation.label_names(dataset, data_args)
    set_seed(args.seed)
    model = segmentation.upernet_on(dinov2_like(args.size, args.patch_size, args.image_size), model_args, labels)
    processor = segmentation.new_processor(model_args, data_args)
    for split in ("train", "test"):
        dataset[split].set_transform(segmentation.make_transform(processor))
    output_dir = str(Path(args.output_dir) / "source")
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.source_steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=1e-3,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=50,
        logging_steps=50,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # the transform reads the raw image and annotation columns
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        compute_metrics=segmentation.make_compute_metrics(labels),
        preprocess_logits_for_metrics=segmentation.predicted_label_maps,
        processing_class=processor,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    processor.save_pretrained(output_dir)
    return output_dir, metrics


def start_difference(source_dir: str, castled) -> float:
    """Max |Δ logit| between the source and the castled model on the same images: 0 up to rounding."""
    source = AutoModelForSemanticSegmentation.from_pretrained(source_dir).eval()
    pixels = torch.randn(2, 3, source.config.backbone_config.image_size, source.config.backbone_config.image_size)
    with torch.no_grad():
        return (castled.eval()(pixel_values=pixels).logits - source(pixel_values=pixels).logits).abs().max().item()


def latency_ms(models: dict, resolution: int, repeats: int) -> dict[str, float]:
    """The median latency (ms) of one forward pass of each model on one `resolution`² image, the models run in turn
    so that the machine's drift touches all alike."""
    pixels = torch.randn(1, 3, resolution, resolution)
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(pixel_values=pixels)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                started = time.perf_counter()
                model(pixel_values=pixels)
                times[name].append(time.perf_counter() - started)
    return {name: 1000 * sorted(values)[len(values) // 2] for name, values in times.items()}


def demo(args) -> dict:
    segmentation = load_module(SEGMENTATION_EXAMPLE)
    root = Path(args.output_dir)
    started = time.perf_counter()
    print("1/5 training the source: UperNet on a softmax Dinov2 backbone, on the generated shape masks")
    source_dir, source_metrics = train_source(args, segmentation)

    print("2/5 castling it")
    castled = castle(source_dir, str(root / "castled"), {})
    difference = start_difference(source_dir, castled)

    print("3/5 fine-tuning with the mask decay, then the switch (run_semantic_segmentation.py)")
    results = segmentation.main(
        f"--model_name_or_path {root / 'castled'} --output_dir {root / 'fine-tuned'} --do_train --do_eval "
        f"--num_generated_images {args.num_generated_images} --image_size {args.image_size} "
        f"--max_steps {args.castle_steps} --mask_decay_end {args.mask_decay_end} --learning_rate "
        f"{args.castle_learning_rate} --weight_decay 0.05 --lr_scheduler_type cosine --warmup_steps 50 "
        "--per_device_train_batch_size 16 --per_device_eval_batch_size 64 --logging_steps 50 --save_strategy no "
        f"--report_to none --seed {args.seed}".split()
    )

    print("4/5 the inference checkpoint through AutoModelForSemanticSegmentation and the pipeline")
    inference = AutoModelForSemanticSegmentation.from_pretrained(results["inference_dir"]).eval()
    segmenter = pipeline("image-segmentation", model=results["inference_dir"])
    image = segmentation.load_segmentation_dataset(
        segmentation.DataTrainingArguments(num_generated_images=10), args.image_size, args.seed + 1
    )["train"][0]["image"]
    segments = segmenter(image)
    wall_seconds = time.perf_counter() - started

    print("5/5 latency, batch 1: the source and the castled model, whole and backbone alone")
    source = AutoModelForSemanticSegmentation.from_pretrained(source_dir).eval()
    latencies = {}
    for resolution in args.latency_sizes:
        models = {"source": source, "castled": inference}
        latencies[resolution] = {
            "upernet": latency_ms(models, resolution, args.repeats),
            "backbone": latency_ms({name: model.backbone for name, model in models.items()}, resolution, args.repeats),
        }
    summary = {
        "source_mean_iou": source_metrics["eval_mean_iou"],
        "castled_mean_iou_before_switch": results["castling"]["eval_castling_mean_iou"],
        "castled_mean_iou_after_switch": results["linear"]["eval_linear_mean_iou"],
        "start_max_abs_logit_difference": difference,
        "pipeline_labels": sorted(segment["label"] for segment in segments),
        "recipe_wall_seconds": wall_seconds,
        "held_out_images": results["eval_samples"],
        "latency_ms": latencies,
        "inference_dir": results["inference_dir"],
        "args": vars(args),
    }
    (root / "castle_demo.json").write_text(json.dumps(summary, indent=2))

    print("\n=== Castling a pretrained UperNet on Dinov2 (shape masks stand in for the Hub) ===")
    print(f"source mean IoU                    {summary['source_mean_iou']:.3f}")
    print(f"castled, first forward pass        max |Δ logit| = {difference:.1e} against the source")
    print(f"castled after the switch           {summary['castled_mean_iou_after_switch']:.3f}")
    print(f"pipeline('image-segmentation')     {summary['pipeline_labels']}")
    for resolution, parts in latencies.items():
        for part, row in parts.items():
            print(
                f"latency at {resolution} px, {part:8s}  source {row['source']:.0f} ms, castled {row['castled']:.0f} "
                f"ms (castled/source {row['castled'] / row['source']:.2f})"
            )
    print(f"inference checkpoint               {results['inference_dir']}; summary in {root / 'castle_demo.json'}")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", help="a task model on a Dinov2 backbone: local directory or Hub name")
    parser.add_argument("--output_dir", default="outputs/castled-upernet")
    parser.add_argument("--config_overrides", default=None, help="JSON object of Castling attention fields")
    parser.add_argument("--demo", action="store_true", help="the whole recipe offline on the generated shape masks")
    parser.add_argument("--size", default="nano", help="the demo source's dimensions (a Castling-ViT size)")
    parser.add_argument("--patch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--decode_hidden_size", type=int, default=128)
    parser.add_argument("--num_generated_images", type=int, default=1500)
    parser.add_argument("--source_steps", type=int, default=600)
    parser.add_argument("--castle_steps", type=int, default=400)
    parser.add_argument("--castle_learning_rate", type=float, default=1e-3)
    parser.add_argument("--mask_decay_end", type=float, default=0.25, help="where α reaches 0 (fraction of the run)")
    parser.add_argument("--latency_sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.demo:
        return demo(args)
    if args.source is None:
        parser.error("give a source checkpoint (directory or Hub name), or --demo")
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    return castle(args.source, args.output_dir, overrides)


if __name__ == "__main__":
    main()
