#!/usr/bin/env python
"""Castling routes measured where they end, after the switch, each over several seeds, against their softmax source:
with and without labels, with the blend castling used to have, and in the case castling exists for, where the
user's images are few and unlike the source's training data.

Focus task: one digit anywhere on a 64 px canvas among four fragments of others (`castling_hf.data.focus_digits`,
the accuracy study's task: 11,496 training and 1,440 held-out canvases). The source is `transformers`'
`ViTForImageClassification` (4 layers of 64, patch 8) trained with softmax attention for `--source_steps` steps, near
its plateau (the JSON records its held-out accuracy along the way): the stand-in for a Hub checkpoint. Every route
starts from its weights and trains `--route_steps` steps, once per seed of `--seeds`:

- `switch_only`: castle and switch at once, no training (one run: it has no randomness);
- `labels`: `examples/image-classification/run_image_classification.py` on the castled checkpoint, with labels and
  the source's optimiser settings (its random crops);
- `no_labels`: `examples/distillation/run_castle_distillation.py` on the source's training images without their
  labels, given only the required arguments: its defaults are the route's;
- `no_labels_additive`: the same with the blend castling used before the convex one (additive, γ₀ = 0), which
  keeps leaning on the softmax branch and loses it at the switch;
- `few_different`: the distillation example on `FEW_DIFFERENT` images alone: 600 canvases drawn differently from
  the source's (two fragments instead of four, from another random stream), as a user's own images are;
- `few_different_fresh`: a new Castling-ViT of the source's size distilled the same way (the example's settings,
  the same loss) on the same 600 images: what the architecture learns from the source there without its weights.

Every route is scored on the source's own held-out task, by `castling_hf.distillation.fidelity_report` on the
held-out canvases prepared by the source's image processor, at the training resolution and at twice it.

Segmentation (for information): the castling recipe's source (`castle_pretrained_upernet.py`: UperNet on a softmax
Dinov2 backbone, generated shape masks), castled and switched at once, fine-tuned with labels
(`run_semantic_segmentation.py`) and distilled without them (`run_castle_distillation.py`, its head unchanged). On
these masks switching alone already keeps the source's mean IoU: the task is local, so it cannot tell routes apart,
and the targets are the focus task's.

The jobs run two at a time, one thread each.

    python benchmarks/distillation.py            # make bench-distill
    python benchmarks/distillation.py --quick    # a smoke run: a few steps on a few images
"""

import json
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path
from types import SimpleNamespace

from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))  # the harness
import harness  # noqa: E402

EXAMPLES = harness.ROOT / "examples"
DISTILLATION = EXAMPLES / "distillation" / "run_castle_distillation.py"
FOCUS = dict(canvas_size=64, digit_size=24, num_fragments=4, noise=0.1, train_copies=8, test_copies=4)
# The user's own images: a twentieth as many as the source's, with half the fragments, from another random stream.
FEW_DIFFERENT = dict(count=600, num_fragments=2, seed=1234)
SOURCE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, patch_size=8)
# The source's optimiser settings, and the labelled route's.
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
# What a run of each route gives the example beside the data and the output folder: no optimiser settings for the
# label-free routes, whose defaults are the example's.
REQUIRED = dict(per_device_train_batch_size=64, logging_steps=100, save_strategy="no", report_to="none")
FOCUS_ROUTES = {  # name: (labels, images)
    "switch_only": (None, None),
    "labels": (True, "source's"),
    "no_labels": (False, "source's"),
    "no_labels_additive": (False, "source's"),
    "few_different": (False, "600 different"),
    "few_different_fresh": (False, "600 different"),
}
SEGMENTATION_ROUTES = {"switch_only": (None, None), "labels": (True, "source's"), "no_labels": (False, "source's")}
ADDITIVE = {"linear_branch_blend": "additive", "linear_branch_scale_init": 0.0}
# (route, least margin of its mean to the source's after the switch, in points of accuracy) on the focus task.
TARGETS = [("no_labels", -2.0), ("labels", -1.0), ("few_different", -2.0)]


# -- the focus task ----------------------------------------------------------------------------------------------


def focus_paths(run_dir: str) -> SimpleNamespace:
    root = Path(run_dir) / "focus"
    return SimpleNamespace(
        root=root, data=root / "data", images=root / "images", few=root / "few_different", source=root / "source"
    )


def few_different_images(count: int, num_fragments: int, seed: int):
    """Canvases of the focus task drawn differently from the source's (`num_fragments` fragments, another random
    stream), from the training split's digits, without labels."""
    import numpy as np
    from datasets import Dataset, Features, Image

    from castling_hf.data import digit_ink, digits, focus_canvases

    ink = digit_ink(digits()["train"]["image"], FOCUS["digit_size"])
    rng = np.random.default_rng(seed)
    images, _ = focus_canvases(ink, count, rng, FOCUS["canvas_size"], num_fragments, FOCUS["noise"])
    return Dataset.from_dict({"image": list(images)}, features=Features({"image": Image()}))


def write_focus_data(paths: SimpleNamespace, args) -> None:
    """The focus data (with labels, the images alone, the few different images) as parquet folders under `paths`."""
    from castling_hf.data import focus_digits

    dataset = focus_digits(seed=0, **{**FOCUS, **({"train_copies": 1} if args.quick else {})})
    for split, part in dataset.items():
        if args.quick:
            part = part.select(range(64))
        part.to_parquet(str(paths.data / f"{split}.parquet"))
        part.remove_columns("label").to_parquet(str(paths.images / f"{split}.parquet"))
    few = FEW_DIFFERENT if not args.quick else {**FEW_DIFFERENT, "count": 64}
    few_different_images(**few).to_parquet(str(paths.few / "train.parquet"))


def focus_source(run_dir: str, args) -> dict:
    """Write the focus data and train the softmax source on it, evaluated along the way."""
    paths, started = focus_paths(run_dir), time.perf_counter()
    write_focus_data(paths, args)
    castle_vit = harness.load_module(EXAMPLES / "castle_pretrained_vit.py")
    training = castle_vit.load_training_example()
    labelled = training.load_image_dataset(training.DataTrainingArguments(dataset_name=str(paths.data)), 0)
    names = labelled["train"].features["label"].names
    from transformers import ViTConfig

    config = ViTConfig(
        **SOURCE,
        image_size=FOCUS["canvas_size"],
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    evaluations = max(args.source_steps // 6, 1)
    accuracy, curve = castle_vit.train_source_vit(
        str(paths.source),
        labelled,
        config,
        training,
        0,
        max_steps=args.source_steps,
        eval_strategy="steps",
        eval_steps=evaluations,
        return_curve=True,
        **TRAINING,
    )
    return {
        "task": "focus",
        "route": "source",
        "accuracy": accuracy,
        "curve": curve,
        "steps": args.source_steps,
        "seconds": time.perf_counter() - started,
    }


def focus_route(name: str, seed: int, run_dir: str, args) -> dict:
    """One castling route from the focus source with one seed, ending in a model in the inference form, scored
    after the switch on the source's held-out task."""
    import castling_hf

    paths, started = focus_paths(run_dir), time.perf_counter()
    output_dir = paths.root / f"{name}-{seed}"
    if name == "switch_only":
        model = castling_hf.switch_to_inference(castling_hf.castle(str(paths.source)), force=True)
    elif name == "labels":
        castle_vit = harness.load_module(EXAMPLES / "castle_pretrained_vit.py")
        castle_vit.castle(str(paths.source), str(output_dir / "castled"), {})
        example = harness.load_module(EXAMPLES / "image-classification" / "run_image_classification.py")
        options = {
            "model_name_or_path": output_dir / "castled",
            "dataset_name": paths.data,
            "output_dir": output_dir,
            "max_steps": args.route_steps,
            "seed": seed,
            **TRAINING,
        }
        results = example.main(["--do_train", *harness.cli_arguments(options)])
        model = AutoModelForImageClassification.from_pretrained(results["inference_dir"])
    elif name == "few_different_fresh":
        model = fresh_distilled(paths, output_dir, seed, args)
    else:
        images = paths.few if name.startswith("few_different") else paths.images
        options = {"model_name_or_path": paths.source, "dataset_name": images, "output_dir": output_dir}
        options.update(max_steps=args.route_steps, seed=seed, **REQUIRED)
        if name == "no_labels_additive":
            options["config_overrides"] = json.dumps(ADDITIVE)
        results = harness.load_module(DISTILLATION).main(["--do_train", *harness.cli_arguments(options)])
        model = AutoModelForImageClassification.from_pretrained(results["inference_dir"])
    return {
        "task": "focus",
        "route": name,
        "seed": seed,
        **score(model, str(paths.source), str(paths.data), "label"),
        "steps": 0 if name == "switch_only" else args.route_steps,
        "seconds": time.perf_counter() - started,
    }


def fresh_distilled(paths: SimpleNamespace, output_dir: Path, seed: int, args):
    """A new Castling-ViT of the source's size (its own defaults) distilled from the source as the example distils a
    castled model: its settings, loss and mask decay, on the same few different images."""
    from datasets import load_dataset
    from transformers import set_seed

    import castling_hf
    from castling_hf import CastlingDistillationTrainer, CastlingViTConfig, CastlingViTForImageClassification

    example = harness.load_module(DISTILLATION)
    source = AutoModelForImageClassification.from_pretrained(paths.source)
    set_seed(seed)
    config = CastlingViTConfig(
        **SOURCE, image_size=FOCUS["canvas_size"], id2label=source.config.id2label, label2id=source.config.label2id
    )
    model = CastlingViTForImageClassification(config)
    images = load_dataset(str(paths.few))["train"]
    processor = castling_hf.source_image_processor(str(paths.source))
    images.set_transform(example.make_transform(processor, "image", False, seed))
    settings = {**example.ROUTE_DEFAULTS, **REQUIRED, "max_steps": args.route_steps, "seed": seed}
    trainer = CastlingDistillationTrainer(
        model=model,
        teacher_model=source,
        args=TrainingArguments(output_dir=str(output_dir), disable_tqdm=True, **settings),
        train_dataset=images,
        data_collator=example.collate,
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
        seed=0,
    )


def segmentation_source(run_dir: str, args) -> dict:
    """The castling recipe's source, and its data as a parquet folder (images and annotations) for the routes."""
    upernet = harness.load_module(EXAMPLES / "semantic-segmentation" / "castle_pretrained_upernet.py")
    segmentation = harness.load_module(upernet.SEGMENTATION_EXAMPLE)
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
        "steps": options.source_steps,
        "seconds": time.perf_counter() - started,
    }


def segmentation_route(name: str, seed: int, run_dir: str, args) -> dict:
    import castling_hf

    options, started = segmentation_options(run_dir, args), time.perf_counter()
    root, steps = Path(options.output_dir), options.source_steps // 2
    source_dir, data_dir, output_dir = root / "source", root / "data", root / f"{name}-{seed}"
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
        "seed": seed,
    }
    if name == "switch_only":
        model = castling_hf.switch_to_inference(castling_hf.castle(str(source_dir)), force=True)
    elif name == "labels":
        upernet = harness.load_module(EXAMPLES / "semantic-segmentation" / "castle_pretrained_upernet.py")
        upernet.castle(str(source_dir), str(output_dir / "castled"), {})
        segmentation = harness.load_module(upernet.SEGMENTATION_EXAMPLE)
        values = {
            "model_name_or_path": output_dir / "castled",
            "output_dir": output_dir,
            "num_generated_images": options.num_generated_images,
            "image_size": options.image_size,
            "mask_decay_end": 0.25,
            **common,
        }
        results = segmentation.main(["--do_train", *harness.cli_arguments(values)])
        model = AutoModelForSemanticSegmentation.from_pretrained(results["inference_dir"])
    else:
        values = {"model_name_or_path": source_dir, "dataset_name": data_dir, "output_dir": output_dir, **common}
        results = harness.load_module(DISTILLATION).main(["--do_train", *harness.cli_arguments(values)])
        model = AutoModelForSemanticSegmentation.from_pretrained(results["inference_dir"])
    scores = score(model, str(source_dir), str(data_dir), "annotation")
    return {
        "task": "segmentation",
        "route": name,
        "seed": seed,
        **scores,
        "steps": 0 if name == "switch_only" else steps,
        "seconds": time.perf_counter() - started,
    }


# -- scoring, summary, tables, plot -------------------------------------------------------------------------------


def score(model, source_dir: str, data_dir: str, label_column: str) -> dict:
    """`fidelity_report` of `model` against the source on the held-out split of `data_dir`, which the source's image
    processor prepares (class ids or label maps from `label_column`), as the distillation example scores it."""
    from datasets import load_dataset
    from torch.utils.data import DataLoader, default_collate

    import castling_hf
    from castling_hf.conversion import load_source
    from castling_hf.distillation import fidelity_report

    example = harness.load_module(DISTILLATION)
    processor = castling_hf.source_image_processor(source_dir)
    transform = example.make_transform(processor, "image", False, 0, label_column)
    held_out = load_dataset(data_dir)["test"].with_transform(transform)
    batches = DataLoader(held_out, batch_size=64, collate_fn=default_collate)
    return {"fidelity": fidelity_report(model.eval(), load_source(source_dir).eval(), batches)}


def metric_of(run: dict, scale: str = "1x") -> tuple[str, float, float]:
    """(metric name, castled value, source value) of a run, at the training resolution by default."""
    entry = run["fidelity"][scale]
    name = "accuracy" if "castled_accuracy" in entry else "mean_iou"
    return name, entry[f"castled_{name}"], entry[f"source_{name}"]


def in_points(name: str, value: float) -> float:
    """Accuracy in points (percent), mean IoU as it is."""
    return 100 * value if name == "accuracy" else value


def summarise(runs: list[dict]) -> list[dict]:
    """Per task and route, in the order of the routes: the metric after the switch over its seeds (mean, sample
    standard deviation, each seed's), its source's, and the feature cosine at 1× and 2×."""
    summary = []
    for task, routes in (("focus", FOCUS_ROUTES), ("segmentation", SEGMENTATION_ROUTES)):
        for route in routes:
            mine = sorted(
                (run for run in runs if (run["task"], run["route"]) == (task, route)), key=lambda r: r["seed"]
            )
            if not mine:
                continue
            name, _, source = metric_of(mine[0])
            values = [in_points(name, metric_of(run)[1]) for run in mine]
            mean, std = harness.mean_and_std(values)
            cosines = {s: statistics.mean(run["fidelity"][s]["feature_cosine"] for run in mine) for s in ("1x", "2x")}
            summary.append(
                {
                    "task": task,
                    "route": route,
                    "metric": name,
                    "seeds": [run["seed"] for run in mine],
                    "values": values,
                    "mean": mean,
                    "std": std,
                    "source": in_points(name, source),
                    "feature_cosine": cosines,
                    "steps": mine[0]["steps"],
                    "seconds": statistics.mean(run["seconds"] for run in mine),
                }
            )
    return summary


def shown(entry: dict, value: float) -> str:
    return f"{value:.1f} %" if entry["metric"] == "accuracy" else f"{value:.3f}"


def markdown_table(results: dict) -> str:
    lines = harness.table_head(
        "| task | route | labels | images | steps | metric after the switch (mean ± std) | each seed | source "
        "| castled − source | feature cosine (1× / 2× res) | a run (wall) |"
    )
    for entry in results["summary"]:
        labels, images = (FOCUS_ROUTES if entry["task"] == "focus" else SEGMENTATION_ROUTES)[entry["route"]]
        spread = f"{shown(entry, entry['mean'])} ± {entry['std']:.{1 if entry['metric'] == 'accuracy' else 3}f}"
        seeds = " / ".join(shown(entry, value).removesuffix(" %") for value in entry["values"])
        difference = entry["mean"] - entry["source"]
        difference = f"{difference:+.1f} points" if entry["metric"] == "accuracy" else f"{difference:+.3f}"
        cosines = " / ".join(f"{entry['feature_cosine'][scale]:.3f}" for scale in ("1x", "2x"))
        lines.append(
            f"| {entry['task']} | {entry['route']} | {harness.yes_no(labels)} | {images or '—'} | {entry['steps']:,} "
            f"| {entry['metric'].replace('_', ' ')} {spread} | {seeds} | {shown(entry, entry['source'])} "
            f"| {difference} | {cosines} | {entry['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def targets_table(results: dict) -> str:
    focus = {entry["route"]: entry for entry in results["summary"] if entry["task"] == "focus"}
    lines = harness.table_head("| route | target | measured | met |")
    for route, least in TARGETS:
        if route in focus:
            measured = focus[route]["mean"] - focus[route]["source"]
            met = harness.yes_no(measured >= least)
            lines.append(f"| {route} | mean ≥ source {least:+g} points | {measured:+.2f} points | {met} |")
    if {"few_different", "few_different_fresh"} <= set(focus):
        castled, fresh = focus["few_different"], focus["few_different_fresh"]
        lead, spread = castled["mean"] - fresh["mean"], castled["std"] + fresh["std"]
        lines.append(
            f"| few_different − few_different_fresh | mean difference > the seeds' spread (sum of stds) "
            f"| {lead:+.2f} points against {spread:.2f} | {harness.yes_no(lead > spread)} |"
        )
    return "\n".join(lines)


def plot(results: dict) -> dict:
    """Each route's metric after the switch beside its source's, and the focus source's accuracy along its run."""
    plt = harness.pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(18, 4.8), gridspec_kw={"width_ratios": [3, 2, 2]})
    for axis, task in zip(axes[:2], ("focus", "segmentation"), strict=True):
        entries = [entry for entry in results["summary"] if entry["task"] == task]
        if not entries:
            continue
        colors = ["tab:gray" if e["route"] in ("switch_only", "few_different_fresh") else "tab:blue" for e in entries]
        colors = ["tab:red" if e["route"] == "no_labels_additive" else c for e, c in zip(entries, colors, strict=True)]
        names = [entry["route"] for entry in entries]
        axis.barh(names, [e["mean"] for e in entries], xerr=[e["std"] for e in entries], color=colors, capsize=4)
        for entry in entries:
            axis.scatter(entry["values"], [entry["route"]] * len(entry["values"]), color="black", s=10, zorder=3)
        source = entries[0]["source"]
        unit = " (%)" if entries[0]["metric"] == "accuracy" else ""
        axis.axvline(source, color="tab:orange", linestyle="--", label=f"source {source:.3g}")
        top = 100 if entries[0]["metric"] == "accuracy" else 1
        axis.set(xlabel=f"held-out {entries[0]['metric'].replace('_', ' ')}{unit} after the switch", title=task)
        axis.set_xlim(0, top)
        axis.invert_yaxis()
        axis.legend(loc="lower right")
        axis.grid(True, axis="x", alpha=0.3)
    axis = axes[2]
    curve = results["sources"]["focus"].get("curve", [])
    if curve:
        axis.plot([step for step, _ in curve], [100 * value for _, value in curve], marker="o")
    axis.set(xlabel="step", ylabel="held-out accuracy (%)", title="focus source: softmax ViT to its plateau")
    axis.grid(True, alpha=0.3)
    return {"distillation.png": figure}


# -- the run -------------------------------------------------------------------------------------------------------


def route_jobs(routes: dict, seeds: list[int]) -> list[tuple[str, int]]:
    """(route, seed) for every route and seed; switching alone once, as it has no randomness."""
    return [(name, seed) for name in routes for seed in (seeds[:1] if name == "switch_only" else seeds)]


def run_jobs(args) -> list[dict]:
    """The two sources first, then each task's routes (every seed) as soon as its source is trained; two jobs at a
    time."""
    runs = []
    focus_jobs, segmentation_jobs = (route_jobs(routes, args.seeds) for routes in (FOCUS_ROUTES, SEGMENTATION_ROUTES))
    with (
        harness.process_pool() as pool,
        tqdm(total=2 + len(focus_jobs) + len(segmentation_jobs), desc="castling routes", unit="job") as progress,
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
                progress.write(f"{run['task']} {run['route']} {run.get('seed', '')}: done in {run['seconds']:.0f} s")
                if run["route"] == "source":
                    job, jobs = (
                        (focus_route, focus_jobs) if run["task"] == "focus" else (segmentation_route, segmentation_jobs)
                    )
                    pending |= {pool.submit(job, name, seed, args.run_dir, args) for name, seed in jobs}
    return runs


def rerun_jobs(args, routes: list[str]) -> list[dict]:
    """The focus `routes` again (every seed), from the source a previous run trained in `--run_dir`."""
    if not (focus_paths(args.run_dir).source / "config.json").exists():
        raise SystemExit(f"--rerun needs the focus source a previous run trained in {args.run_dir}; none is there.")
    jobs = route_jobs({name: FOCUS_ROUTES[name] for name in routes}, args.seeds)
    runs = []
    with (
        harness.process_pool() as pool,
        tqdm(total=len(jobs), desc="castling routes again", unit="job") as progress,
    ):
        for run in pool.map(focus_route, *zip(*((name, seed, args.run_dir, args) for name, seed in jobs), strict=True)):
            runs.append(run)
            progress.update()
    return runs


def merged(previous: dict, runs: list[dict], command: str, seconds: float) -> dict:
    """`previous` with its focus runs of the rerun routes replaced by `runs`; the reruns are recorded beside its
    command."""
    rerun = {run["route"] for run in runs}
    kept = [run for run in previous["runs"] if not (run["task"] == "focus" and run["route"] in rerun)]
    results = {
        **previous,
        "runs": sorted([*kept, *runs], key=lambda run: (run["task"], run["route"], run["seed"])),
        "reruns": [*previous.get("reruns", []), {"command": command, "routes": sorted(rerun), "wall_seconds": seconds}],
    }
    results["summary"] = summarise(results["runs"])
    return results


def main(argv=None):
    quick = "a few steps on a few images: a smoke run"
    parser = harness.parser(__doc__, quick, run_dir="outputs/distillation_benchmark")
    parser.add_argument("--source_steps", type=int, default=24000, help="the focus source's: near its plateau")
    parser.add_argument("--route_steps", type=int, default=1500, help="every focus route's")
    parser.add_argument("--segmentation_source_steps", type=int, default=600, help="every route gets half")
    parser.add_argument("--segmentation_images", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--rerun",
        nargs="+",
        choices=[name for name in FOCUS_ROUTES if name != "switch_only"],
        help="after a change to these focus routes: run them again (every seed) from the source that the last run "
        "trained in --run_dir, and replace their runs in its JSON in --output_dir, which records the rerun",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.source_steps, args.route_steps, args.segmentation_source_steps, args.segmentation_images = 8, 4, 8, 40
        args.seeds = args.seeds[:2]
    started = time.perf_counter()
    command = harness.command_line(__file__, argv)
    directory = Path(args.output_dir)
    if args.rerun:
        previous = json.loads((directory / "distillation.json").read_text())
        results = merged(previous, rerun_jobs(args, args.rerun), command, time.perf_counter() - started)
    else:
        runs = run_jobs(args)
        results = {
            "command": command,
            "args": vars(args),
            "sources": {run["task"]: run for run in runs if run["route"] == "source"},
            "runs": sorted(
                (run for run in runs if run["route"] != "source"),
                key=lambda run: (run["task"], run["route"], run["seed"]),
            ),
            "wall_seconds": time.perf_counter() - started,
        }
        results["summary"] = summarise(results["runs"])
    tables = [markdown_table(results), targets_table(results)]
    harness.write_results(directory, "distillation", results, tables, plot(results))
    print(f"in {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
