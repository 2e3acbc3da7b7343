#!/usr/bin/env python
"""Label-free castling of the towers castled in place (issue 32, Build 4), beside `benchmarks/distillation.py`: a
`SiglipForImageClassification` and a `CLIPForImageClassification`, each trained with softmax attention on the focus
task as that benchmark's ViT source is (the same data, widths, recipe and steps), then castled in place and distilled
on its training images alone with `examples/distillation/run_castle_distillation.py` (required arguments only: the
example's defaults are the route's), over several seeds, and scored after the switch on the source's held-out task
by the same `fidelity_report`. `switch_only` (castle and switch at once) shows what the distillation recovers.

`eomt`: an `EomtForUniversalSegmentation` trained with its own loss on the bundled shape masks
(`castling_hf.data.shape_masks`, its query masks on), castled in place and distilled on the images alone the same
way; scored by the mean IoU of the classes its queries vote for per pixel (the semantic post-processing's).

The jobs run two at a time, one thread each.

    python benchmarks/distillation_towers.py            # make bench-distill-towers
    python benchmarks/distillation_towers.py --quick    # a smoke run: a few steps on a few images
"""

import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification, AutoModelForUniversalSegmentation

sys.path.insert(0, str(Path(__file__).parent))  # the harness and the distillation benchmark
import distillation as DISTILLATION  # noqa: E402  (its data, recipe, example runner and scoring: one of each)
import harness  # noqa: E402

ROUTES = ("switch_only", "no_labels")
TARGETS = {"accuracy": -2.0, "mean_iou": -0.02}  # after the switch, against the source (accuracy in points)
FAMILIES = ("siglip", "clip", "eomt")
SHAPES = dict(num_images=600, image_size=64)
EOMT = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    patch_size=8,
    num_queries=8,
    num_blocks=1,
    num_upscale_blocks=1,
)
# EoMT's own recipe on the shapes: its loss (Hungarian matching of the queries to the classes' masks).
EOMT_TRAINING = dict(
    DISTILLATION.TRAINING, per_device_train_batch_size=16, learning_rate=1e-3, remove_unused_columns=False
)


def source_config(family: str, names: list[str]):
    """The family's classifier at the ViT source's widths (`distillation.SOURCE`), its text tower as small as it
    goes (a classifier does not run it)."""
    from transformers import CLIPConfig, SiglipConfig

    vision = dict(DISTILLATION.SOURCE, image_size=DISTILLATION.FOCUS["canvas_size"])
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=16)
    labels = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    config_class = {"siglip": SiglipConfig, "clip": CLIPConfig}[family]
    return config_class(vision_config=vision, text_config=text, **labels)


def paths_of(run_dir: str, family: str) -> SimpleNamespace:
    if family == "eomt":
        root = Path(run_dir) / "shapes"
        return SimpleNamespace(data=root / "data", images=root / "images", source=Path(run_dir) / family / "source")
    focus = DISTILLATION.focus_paths(run_dir)
    return SimpleNamespace(data=focus.data, images=focus.images, source=Path(run_dir) / family / "source")


def write_shape_data(run_dir: str, args) -> None:
    """The shape masks (image and label map) and their images alone, as parquet folders."""
    from castling_hf.data import shape_masks

    paths = paths_of(run_dir, "eomt")
    for split, part in shape_masks(**{**SHAPES, **({"num_images": 40} if args.quick else {})}).items():
        part.to_parquet(str(paths.data / f"{split}.parquet"))
        part.remove_columns("annotation").to_parquet(str(paths.images / f"{split}.parquet"))


def eomt_processor():
    from transformers import EomtImageProcessorPil

    side = SHAPES["image_size"]
    return EomtImageProcessorPil(size={"shortest_edge": side, "longest_edge": side}, do_split_image=False)


def train_eomt_source(run_dir: str, args) -> dict:
    """EoMT trained on the shape masks with its own loss, saved with its image processor; scored on the held-out
    masks (castled at α = 1, which computes exactly what it computes)."""
    import torch
    from datasets import load_dataset
    from transformers import EomtConfig, EomtForUniversalSegmentation, Trainer, TrainingArguments, set_seed

    import castling_hf
    from castling_hf.data import SEGMENTATION_CLASSES

    started, paths, processor = time.perf_counter(), paths_of(run_dir, "eomt"), eomt_processor()
    train = load_dataset(str(paths.data))["train"]

    def transform(batch):
        images = [image.convert("RGB") for image in batch["image"]]
        prepared = processor(images=images, segmentation_maps=batch["annotation"], return_tensors="pt")
        return {name: prepared[name] for name in ("pixel_values", "mask_labels", "class_labels")}

    def collate(examples):
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "mask_labels": [example["mask_labels"] for example in examples],
            "class_labels": [example["class_labels"] for example in examples],
        }

    train.set_transform(transform)
    set_seed(0)
    names = dict(enumerate(SEGMENTATION_CLASSES))
    config = EomtConfig(**EOMT, image_size=SHAPES["image_size"], num_labels=len(names), id2label=names)
    model = EomtForUniversalSegmentation(config)
    arguments = TrainingArguments(str(paths.source), max_steps=args.eomt_steps, seed=0, **EOMT_TRAINING)
    Trainer(model=model, args=arguments, train_dataset=train, data_collator=collate).train()
    model.save_pretrained(paths.source)
    processor.save_pretrained(paths.source)
    report = eomt_score(castling_hf.castle(str(paths.source)), run_dir)["fidelity"]["1x"]
    return {"family": "eomt", "mean_iou": report["source_mean_iou"], "seconds": time.perf_counter() - started}


def eomt_score(model, run_dir: str) -> dict:
    """`fidelity_report` of a castled EoMT against its source on the held-out shape masks, at its training size (its
    position embeddings are for that size only)."""
    import numpy as np
    import torch
    from datasets import load_dataset

    from castling_hf.conversion import load_source
    from castling_hf.distillation import fidelity_report

    paths, processor = paths_of(run_dir, "eomt"), eomt_processor()
    held_out = load_dataset(str(paths.data))["test"]
    batches = []
    for start in range(0, len(held_out), 32):
        part = held_out[start : start + 32]
        pixels = processor(images=[image.convert("RGB") for image in part["image"]], return_tensors="pt")
        labels = torch.as_tensor(np.stack([np.array(annotation) for annotation in part["annotation"]])).long()
        batches.append({"pixel_values": pixels["pixel_values"], "labels": labels})
    source = load_source(str(paths.source)).eval()
    return {"fidelity": fidelity_report(model.eval(), source, batches, scales=(1,))}  # EoMT runs at its own size


def train_source_of(family: str, run_dir: str, args) -> dict:
    return train_eomt_source(run_dir, args) if family == "eomt" else train_source(family, run_dir, args)


def train_source(family: str, run_dir: str, args) -> dict:
    """Train the family's softmax classifier on the focus data (`main` wrote it)."""
    from transformers import ViTImageProcessorPil

    started, paths = time.perf_counter(), paths_of(run_dir, family)
    castle_vit = harness.load_module(DISTILLATION.EXAMPLES / "castle_pretrained_vit.py")
    training = castle_vit.load_training_example()
    labelled = training.load_image_dataset(training.DataTrainingArguments(dataset_name=str(paths.data)), 0)
    side = DISTILLATION.FOCUS["canvas_size"]
    accuracy, curve = castle_vit.train_source_vit(
        str(paths.source),
        labelled,
        source_config(family, labelled["train"].features["label"].names),
        training,
        0,
        return_curve=True,
        image_processor=ViTImageProcessorPil(size={"height": side, "width": side}),
        max_steps=args.source_steps,
        eval_strategy="steps",
        eval_steps=max(args.source_steps // 6, 1),
        **DISTILLATION.TRAINING,
    )
    return {"family": family, "accuracy": accuracy, "curve": curve, "seconds": time.perf_counter() - started}


def route(family: str, name: str, seed: int, run_dir: str, args) -> dict:
    import castling_hf

    started, paths = time.perf_counter(), paths_of(run_dir, family)
    if name == "switch_only":
        model = castling_hf.switch_to_inference(castling_hf.castle(str(paths.source)), force=True)
    else:
        options = {
            "model_name_or_path": paths.source,
            "dataset_name": paths.images,
            "output_dir": Path(run_dir) / family / f"{name}-{seed}",
            "max_steps": args.route_steps,
            "seed": seed,
            **DISTILLATION.REQUIRED,
        }
        results = harness.load_module(DISTILLATION.DISTILLATION).main(["--do_train", *harness.cli_arguments(options)])
        auto = AutoModelForUniversalSegmentation if family == "eomt" else AutoModelForImageClassification
        model = auto.from_pretrained(results["inference_dir"])
    if family == "eomt":
        scored = eomt_score(model, run_dir)
    else:
        scored = DISTILLATION.score(model, str(paths.source), str(paths.data), "label")
    return {"family": family, "route": name, "seed": seed, **scored, "seconds": time.perf_counter() - started}


def run_parallel(jobs: list[tuple], args, label: str) -> list[dict]:
    """Each job `(function, *arguments)` as `function(*arguments, run_dir, args)`, two at a time; their results in
    the jobs' order."""
    with harness.process_pool() as pool:
        futures = [pool.submit(function, *job, args.run_dir, args) for function, *job in jobs]
        done = []
        for future in tqdm(futures, desc=label, unit="job"):
            done.append(future.result())
    return done


def summarise(sources: list[dict], runs: list[dict]) -> list[dict]:
    """Per family and route: the metric after the switch over its seeds (accuracy in points, mean IoU as it is)."""
    summary = []
    for source in sources:
        for name in ROUTES:
            mine = [run for run in runs if (run["family"], run["route"]) == (source["family"], name)]
            mine.sort(key=lambda run: run["seed"])
            metric, _, source_value = DISTILLATION.metric_of(mine[0])
            values = [DISTILLATION.in_points(metric, DISTILLATION.metric_of(run)[1]) for run in mine]
            mean, std = harness.mean_and_std(values)
            summary.append(
                {
                    "family": source["family"],
                    "route": name,
                    "metric": metric,
                    "values": values,
                    "mean": mean,
                    "std": std,
                    "source": DISTILLATION.in_points(metric, source_value),
                    "feature_cosine": statistics.mean(run["fidelity"]["1x"]["feature_cosine"] for run in mine),
                }
            )
    return summary


def markdown_table(results: dict) -> str:
    lines = harness.table_head(
        "| source | route | metric after the switch (mean ± std) | each seed | source | castled − source "
        "| feature cosine | target met (no labels: −2 points, −0.02 mean IoU) |"
    )
    for entry in results["summary"]:
        digits, unit = (1, " %") if entry["metric"] == "accuracy" else (3, "")
        difference = entry["mean"] - entry["source"]
        met = harness.yes_no(difference >= TARGETS[entry["metric"]]) if entry["route"] == "no_labels" else ""
        seeds = " / ".join(f"{value:.{digits}f}" for value in entry["values"])
        lines.append(
            f"| {entry['family']} | {entry['route']} | {entry['metric'].replace('_', ' ')} "
            f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}{unit} | {seeds} "
            f"| {entry['source']:.{digits}f}{unit} | {difference:+.{digits}f} | {entry['feature_cosine']:.3f} | {met} |"
        )
    return "\n".join(lines)


def merged(previous: dict, results: dict) -> dict:
    """`results` with the sources and runs of the families `previous` holds and `results` did not run, in the order
    of `FAMILIES`."""
    before = previous.get("runs_by_family") or {  # a file written before runs were recorded by family
        source["family"]: {"command": previous["command"], "args": previous["args"]} for source in previous["sources"]
    }
    kept = [family for family in FAMILIES if family in before and family not in results["runs_by_family"]]

    def ordered(entries):
        return sorted(entries, key=lambda entry: FAMILIES.index(entry["family"]))

    return {
        "runs_by_family": {**{family: before[family] for family in kept}, **results["runs_by_family"]},
        "sources": ordered([source for source in previous["sources"] if source["family"] in kept] + results["sources"]),
        "runs": ordered([run for run in previous["runs"] if run["family"] in kept] + results["runs"]),
        "wall_seconds": previous.get("wall_seconds", 0.0) + results["wall_seconds"],
    }


def main(argv=None):
    quick = "a few steps on a few images, one seed"
    parser = harness.parser(__doc__, quick, run_dir="outputs/distillation_towers_benchmark")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--source_steps", type=int, default=24000)
    parser.add_argument("--route_steps", type=int, default=1500)
    parser.add_argument("--eomt_steps", type=int, default=3000, help="steps of EoMT's own training on the shapes")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.source_steps, args.route_steps, args.eomt_steps = [0], 12, 4, 4
    started = time.perf_counter()
    DISTILLATION.write_focus_data(DISTILLATION.focus_paths(args.run_dir), args)
    write_shape_data(args.run_dir, args)
    sources = run_parallel([(train_source_of, family) for family in args.families], args, "sources")
    jobs = [(route, family, "switch_only", 0) for family in args.families]
    jobs += [(route, family, "no_labels", seed) for family in args.families for seed in args.seeds]
    runs = run_parallel(jobs, args, "routes")
    command = harness.command_line(__file__, argv)
    settings = {key: value for key, value in vars(args).items() if key not in ("run_dir", "output_dir")}
    results = {
        "runs_by_family": {family: {"command": command, "args": settings} for family in args.families},
        "sources": sources,
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    path = Path(args.output_dir) / "distillation_towers.json"
    if path.exists():  # the families run before and not again keep their results
        results = merged(json.loads(path.read_text()), results)
    results["summary"] = summarise(results["sources"], results["runs"])
    harness.write_results(args.output_dir, "distillation_towers", results, [markdown_table(results)])
    return results


if __name__ == "__main__":
    main()
