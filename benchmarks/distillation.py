#!/usr/bin/env python
"""Castling routes measured where they end, after the switch: with and without labels, with and without augmentation,
on a task where attention must focus and on segmentation, each against its softmax source.

Focus task: one digit anywhere on a 64 px canvas among four fragments of others (`castling_hf.data.focus_digits`,
the accuracy study's task, as a fixed set of 11,496 training and 1,440 held-out images). The source is `transformers`'
`ViTForImageClassification` (4 layers of 64, patch 8), trained with softmax attention for `--source_steps` steps: the
stand-in for a Hub checkpoint. Every route starts from its weights (`castle`) and trains at most half its steps:

- `switch_only`: castle and switch at once, no training;
- `labels`, `labels_no_augment`: `examples/image-classification/run_image_classification.py` on the castled
  checkpoint (its defaults: random crops, α → 0 at 75 %), and the same with `--augment False`;
- `no_labels`, `no_labels_augment`: `examples/distillation/run_castle_distillation.py` on the images alone (the label
  column removed; its defaults: no crops, α → 0 at 25 %, head frozen), and the same with `--augment True`;
- `fresh_reference`: a new Castling-ViT of the same size distilled from the same source's logits by the same Trainer
  (not castling: a reference for what the architecture can learn from the teacher).

Segmentation: the castling recipe's source (`castle_pretrained_upernet.py`: UperNet on a softmax Dinov2 backbone,
generated shape masks), castled and switched at once, fine-tuned with labels (`run_semantic_segmentation.py`), and
distilled without them with its head unchanged (`run_castle_distillation.py`, the annotation column ignored).

Every route is scored the same way: `castling_hf.distillation.fidelity_report` on the held-out images prepared by the
source's image processor, at the training resolution and at twice it (the task metric of both models, the feature
cosine and relative error). The jobs run two at a time, one thread each.

    python benchmarks/distillation.py            # make bench-distill
    python benchmarks/distillation.py --quick    # a smoke run: a few steps on a few images
"""

import argparse
import importlib.util
import json
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation, TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FOCUS = dict(canvas_size=64, digit_size=24, num_fragments=4, noise=0.1, train_copies=8, test_copies=4)
SOURCE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, patch_size=8)
# The optimiser settings every focus run shares, source and routes alike.
TRAINING = dict(
    per_device_train_batch_size=64,
    learning_rate=2e-3,
    weight_decay=0.05,
    warmup_steps=50,
    lr_scheduler_type="cosine",
    logging_steps=100,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
)
FOCUS_ROUTES = {  # name: (labels, augmentation)
    "switch_only": (None, None),
    "labels": (True, True),
    "labels_no_augment": (True, False),
    "no_labels": (False, False),
    "no_labels_augment": (False, True),
    "fresh_reference": (False, False),
}
SEGMENTATION_ROUTES = {"switch_only": (None, None), "labels": (True, False), "no_labels": (False, False)}
# Issue 26's targets: (task, route, least margin to the source after the switch: points of accuracy, or mean IoU).
TARGETS = [
    ("focus", "no_labels", -2.0),
    ("focus", "labels", -1.0),
    ("segmentation", "no_labels", -0.02),
]


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arguments(values: dict) -> list[str]:
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def start_worker() -> None:
    """One thread per job: two jobs on two cores run faster than one on both, and do not slow each other."""
    torch.set_num_threads(1)


# -- the focus task ----------------------------------------------------------------------------------------------


def focus_paths(run_dir: str) -> SimpleNamespace:
    root = Path(run_dir) / "focus"
    return SimpleNamespace(root=root, data=root / "data", images=root / "images", source=root / "source")


def focus_source(run_dir: str, args) -> dict:
    """Write the focus data (with labels, and the images alone) as parquet folders, and train the softmax source."""
    from castling_hf.data import focus_digits

    paths, started = focus_paths(run_dir), time.perf_counter()
    dataset = focus_digits(seed=args.seed, **{**FOCUS, **({"train_copies": 1} if args.quick else {})})
    for split, part in dataset.items():
        if args.quick:
            part = part.select(range(64))
        part.to_parquet(str(paths.data / f"{split}.parquet"))
        part.remove_columns("label").to_parquet(str(paths.images / f"{split}.parquet"))
    castle_vit = load_module(EXAMPLES / "castle_pretrained_vit.py")
    training = castle_vit.load_training_example()
    labelled = training.load_image_dataset(training.DataTrainingArguments(dataset_name=str(paths.data)), args.seed)
    names = labelled["train"].features["label"].names
    from transformers import ViTConfig

    config = ViTConfig(
        **SOURCE,
        image_size=FOCUS["canvas_size"],
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    accuracy = castle_vit.train_source_vit(
        str(paths.source), labelled, config, training, args.seed, max_steps=args.source_steps, **TRAINING
    )
    return {"task": "focus", "route": "source", "accuracy": accuracy, "seconds": time.perf_counter() - started}


def focus_route(name: str, run_dir: str, args) -> dict:
    """One castling route from the focus source, ending in a model in the inference form, scored after the switch."""
    import castling_hf

    paths, started = focus_paths(run_dir), time.perf_counter()
    steps = args.source_steps // 2
    common = {"max_steps": steps, "seed": args.seed, **TRAINING}
    if name == "switch_only":
        model = castling_hf.switch_to_inference(castling_hf.castle(str(paths.source)), force=True)
    elif name.startswith("labels"):
        castle_vit = load_module(EXAMPLES / "castle_pretrained_vit.py")
        castle_vit.castle(str(paths.source), str(paths.root / name / "castled"), {})
        example = load_module(EXAMPLES / "image-classification" / "run_image_classification.py")
        options = {
            "model_name_or_path": paths.root / name / "castled",
            "dataset_name": paths.data,
            "output_dir": paths.root / name,
            **common,
        }
        if name == "labels_no_augment":
            options["augment"] = False
        results = example.main(["--do_train", *arguments(options)])
        model = AutoModelForImageClassification.from_pretrained(results["inference_dir"])
    elif name.startswith("no_labels"):
        example = load_module(EXAMPLES / "distillation" / "run_castle_distillation.py")
        options = {"model_name_or_path": paths.source, "dataset_name": paths.images, "output_dir": paths.root / name}
        if name == "no_labels_augment":
            options["augment"] = True
        results = example.main(["--do_train", *arguments({**options, **common})])
        model = AutoModelForImageClassification.from_pretrained(results["inference_dir"])
    else:
        model = fresh_reference(paths, common, args)
    return {
        "task": "focus",
        "route": name,
        **score(model, str(paths.source), str(paths.data), "label"),
        "steps": steps,
        "seconds": time.perf_counter() - started,
    }


def fresh_reference(paths: SimpleNamespace, common: dict, args):
    """A new Castling-ViT of the source's size (its own defaults: additive blend, masked branch, α → 0 at 75 %),
    distilled from the source's logits alone (KL: a new model's features have nothing to match) on the images by
    `CastlingDistillationTrainer`."""
    import castling_hf
    from castling_hf import CastlingDistillationTrainer, CastlingViTConfig, CastlingViTForImageClassification

    source = AutoModelForImageClassification.from_pretrained(paths.source)
    config = CastlingViTConfig(
        **SOURCE, image_size=FOCUS["canvas_size"], id2label=source.config.id2label, label2id=source.config.label2id
    )
    model = CastlingViTForImageClassification(config)
    example = load_module(EXAMPLES / "distillation" / "run_castle_distillation.py")
    data_args = example.DataTrainingArguments(dataset_name=str(paths.images))
    dataset = example.load_images(data_args, args.seed)
    processor = castling_hf.source_image_processor(str(paths.source))
    dataset["train"].set_transform(example.make_transform(processor, "image", False, args.seed))
    trainer = CastlingDistillationTrainer(
        model=model,
        teacher_model=source,
        args=TrainingArguments(output_dir=str(paths.root / "fresh_reference"), remove_unused_columns=False, **common),
        train_dataset=dataset["train"],
        data_collator=example.collate,
        mask_decay_end=0.75,
        feature_loss_weight=0.0,
    )
    trainer.train()
    return castling_hf.switch_to_inference(model)


# -- segmentation --------------------------------------------------------------------------------------------------


def segmentation_options(run_dir: str, args) -> SimpleNamespace:
    """What `castle_pretrained_upernet.py --demo` takes, for its source."""
    return SimpleNamespace(
        output_dir=str(Path(run_dir) / "segmentation"),
        size="nano",
        patch_size=8,
        image_size=64,
        decode_hidden_size=128,
        num_generated_images=args.segmentation_images,
        source_steps=args.segmentation_source_steps,
        seed=args.seed,
    )


def segmentation_source(run_dir: str, args) -> dict:
    """The castling recipe's source, and its data as a parquet folder (images and annotations) for the routes."""
    upernet = load_module(EXAMPLES / "semantic-segmentation" / "castle_pretrained_upernet.py")
    segmentation = load_module(upernet.SEGMENTATION_EXAMPLE)
    options, started = segmentation_options(run_dir, args), time.perf_counter()
    data_args = segmentation.DataTrainingArguments(num_generated_images=options.num_generated_images)
    dataset = segmentation.load_segmentation_dataset(data_args, options.image_size, options.seed)
    for split, part in dataset.items():
        part.to_parquet(str(Path(options.output_dir) / "data" / f"{split}.parquet"))
    source_dir, metrics = upernet.train_source(options, segmentation)
    return {
        "task": "segmentation",
        "route": "source",
        "mean_iou": metrics["eval_mean_iou"],
        "seconds": time.perf_counter() - started,
    }


def segmentation_route(name: str, run_dir: str, args) -> dict:
    import castling_hf

    options, started = segmentation_options(run_dir, args), time.perf_counter()
    root, steps = Path(options.output_dir), options.source_steps // 2
    source_dir, data_dir = root / "source", root / "data"
    common = {
        "max_steps": steps,
        "learning_rate": 1e-3,
        "weight_decay": 0.05,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 50,
        "per_device_train_batch_size": 16,
        "logging_steps": 50,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": options.seed,
    }
    if name == "switch_only":
        model = castling_hf.switch_to_inference(castling_hf.castle(str(source_dir)), force=True)
    elif name == "labels":
        upernet = load_module(EXAMPLES / "semantic-segmentation" / "castle_pretrained_upernet.py")
        upernet.castle(str(source_dir), str(root / name / "castled"), {})
        segmentation = load_module(upernet.SEGMENTATION_EXAMPLE)
        results = segmentation.main(
            [
                "--do_train",
                *arguments(
                    {
                        "model_name_or_path": root / name / "castled",
                        "output_dir": root / name,
                        "num_generated_images": options.num_generated_images,
                        "image_size": options.image_size,
                        "mask_decay_end": 0.25,
                        **common,
                    }
                ),
            ]
        )
        model = AutoModelForSemanticSegmentation.from_pretrained(results["inference_dir"])
    else:
        example = load_module(EXAMPLES / "distillation" / "run_castle_distillation.py")
        results = example.main(
            [
                "--do_train",
                *arguments(
                    {"model_name_or_path": source_dir, "dataset_name": data_dir, "output_dir": root / name, **common}
                ),
            ]
        )
        model = AutoModelForSemanticSegmentation.from_pretrained(results["inference_dir"])
    scores = score(model, str(source_dir), str(data_dir), "annotation")
    return {"task": "segmentation", "route": name, **scores, "steps": steps, "seconds": time.perf_counter() - started}


# -- scoring, tables, plot -----------------------------------------------------------------------------------------


def score(model, source_dir: str, data_dir: str, label_column: str) -> dict:
    """`fidelity_report` of `model` against the source on the held-out split of `data_dir`, which the source's image
    processor prepares (class ids or label maps from `label_column`)."""
    from datasets import load_dataset

    import castling_hf
    from castling_hf.conversion import load_source
    from castling_hf.distillation import fidelity_report

    example = load_module(EXAMPLES / "distillation" / "run_castle_distillation.py")
    held_out = load_dataset(data_dir)["test"]
    processor = castling_hf.source_image_processor(source_dir)
    data_args = example.DataTrainingArguments(label_column_name=label_column)
    pixels, labels = example.held_out(held_out, processor, data_args, model)
    return {"fidelity": fidelity_report(model.eval(), load_source(source_dir).eval(), pixels, labels)}


def metric_of(run: dict) -> tuple[str, float, float]:
    """(metric name, castled value, source value) of a route at the training resolution."""
    entry = run["fidelity"]["1x"]
    name = "accuracy" if "castled_accuracy" in entry else "mean_iou"
    return name, entry[f"castled_{name}"], entry[f"source_{name}"]


def margin(run: dict) -> float:
    """The route's metric minus its source's after the switch: points of accuracy, or mean IoU."""
    name, castled, source = metric_of(run)
    return 100 * (castled - source) if name == "accuracy" else castled - source


def markdown_table(results: dict) -> str:
    lines = [
        "| task | route | labels | crops | steps | metric after the switch | source | castled − source "
        "| feature cosine (1× / 2× res) | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["routes"]:
        name, castled, source = metric_of(run)
        labels, crops = (FOCUS_ROUTES if run["task"] == "focus" else SEGMENTATION_ROUTES)[run["route"]]
        if name == "accuracy":
            shown, difference = (lambda value: f"{100 * value:.1f} %"), f"{margin(run):+.1f} points"
        else:
            shown, difference = (lambda value: f"{value:.3f}"), f"{margin(run):+.3f}"
        cosines = " / ".join(f"{run['fidelity'][scale]['feature_cosine']:.3f}" for scale in ("1x", "2x"))
        lines.append(
            f"| {run['task']} | {run['route']} | {yes_no(labels)} | {yes_no(crops)} "
            f"| {run['steps'] if labels is not None else 0:,} | {name.replace('_', ' ')} {shown(castled)} "
            f"| {shown(source)} | {difference} | {cosines} | {run['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def yes_no(flag: bool | None) -> str:
    return "—" if flag is None else "yes" if flag else "no"


def targets_table(results: dict) -> str:
    routes = {(run["task"], run["route"]): run for run in results["routes"]}
    lines = ["| task | route | target | measured | met |", "|---|---|---|---|---|"]
    for task, route, least in TARGETS:
        if (task, route) not in routes:
            continue
        measured = margin(routes[task, route])
        unit = " points" if task == "focus" else ""
        lines.append(
            f"| {task} | {route} | ≥ source {least:+g}{unit} | {measured:+.2f}{unit} | "
            f"{'yes' if measured >= least else 'no'} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for axis, task in zip(axes[:2], ("focus", "segmentation"), strict=True):
        runs = [run for run in results["routes"] if run["task"] == task]
        if not runs:
            continue
        name, _, source = metric_of(runs[0])
        values = [metric_of(run)[1] for run in runs]
        colors = ["tab:gray" if run["route"] in ("switch_only", "fresh_reference") else "tab:blue" for run in runs]
        axis.barh([run["route"] for run in runs], values, color=colors)
        axis.axvline(source, color="tab:orange", linestyle="--", label=f"source {source:.3f}")
        axis.set(xlabel=f"held-out {name.replace('_', ' ')} after the switch", title=task, xlim=(0, 1))
        axis.invert_yaxis()
        axis.legend(loc="lower right")
        axis.grid(True, axis="x", alpha=0.3)
    axis = axes[2]
    for scale, marker in (("1x", "o"), ("2x", "s")):
        runs = [run for run in results["routes"] if run["route"] != "fresh_reference"]
        axis.scatter(
            [run["fidelity"][scale]["feature_cosine"] for run in runs],
            [f"{run['task']}: {run['route']}" for run in runs],
            marker=marker,
            label=f"{scale} the training resolution",
        )
    axis.set(xlabel="feature cosine to the source", title="fidelity of the castled features")
    axis.invert_yaxis()
    axis.legend(fontsize=8)
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- the run -------------------------------------------------------------------------------------------------------


def run_jobs(args) -> list[dict]:
    """The two sources first, then each task's routes as soon as its source is trained; two jobs at a time."""
    context = multiprocessing.get_context("spawn")
    runs = []
    total = 2 + len(FOCUS_ROUTES) + len(SEGMENTATION_ROUTES)
    with (
        ProcessPoolExecutor(2, mp_context=context, initializer=start_worker) as pool,
        tqdm(total=total, desc="castling routes", unit="job") as progress,
    ):
        pending = {
            pool.submit(focus_source, args.run_dir, args),
            pool.submit(segmentation_source, args.run_dir, args),
        }
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                run = future.result()
                runs.append(run)
                progress.update()
                progress.write(f"{run['task']} {run['route']}: done in {run['seconds']:.0f} s")
                if run["route"] == "source":
                    job, routes = (
                        (focus_route, FOCUS_ROUTES)
                        if run["task"] == "focus"
                        else (segmentation_route, SEGMENTATION_ROUTES)
                    )
                    pending |= {pool.submit(job, name, args.run_dir, args) for name in routes}
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", default="outputs/distillation_benchmark")
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--source_steps", type=int, default=3000, help="the focus source's; every route gets half")
    parser.add_argument("--segmentation_source_steps", type=int, default=600)
    parser.add_argument("--segmentation_images", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps on a few images: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.source_steps, args.segmentation_source_steps, args.segmentation_images = 8, 8, 40
    started = time.perf_counter()
    runs = run_jobs(args)
    order = [("focus", name) for name in FOCUS_ROUTES] + [("segmentation", name) for name in SEGMENTATION_ROUTES]
    results = {
        "command": " ".join(["python benchmarks/distillation.py", *(sys.argv[1:] if argv is None else argv)]),
        "args": vars(args),
        "sources": {run["task"]: run for run in runs if run["route"] == "source"},
        "routes": sorted(
            (run for run in runs if run["route"] != "source"), key=lambda run: order.index((run["task"], run["route"]))
        ),
        "wall_seconds": time.perf_counter() - started,
    }
    directory = Path(args.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "distillation.json").write_text(json.dumps(results, indent=2))
    (directory / "distillation.md").write_text(markdown_table(results) + "\n\n" + targets_table(results) + "\n")
    plot(results, directory / "distillation.png")
    print(markdown_table(results))
    print(targets_table(results))
    print(
        f"{results['wall_seconds']:.0f} s; wrote {directory / 'distillation.json'}, distillation.md, distillation.png"
    )
    return results


if __name__ == "__main__":
    main()
