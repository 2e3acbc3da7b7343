#!/usr/bin/env python
"""Label-free castling of the towers castled in place (issue 32, Build 4), beside `benchmarks/distillation.py`: a
`SiglipForImageClassification` and a `CLIPForImageClassification`, each trained with softmax attention on the focus
task as that benchmark's ViT source is (the same data, widths, recipe and steps), then castled in place and distilled
on its training images alone with `examples/distillation/run_castle_distillation.py` (required arguments only: the
example's defaults are the route's), over several seeds, and scored after the switch on the source's held-out task
by the same `fidelity_report`. `switch_only` (castle and switch at once) shows what the distillation recovers.

The jobs run two at a time, one thread each.

    python benchmarks/distillation_towers.py            # make bench-distill-towers
    python benchmarks/distillation_towers.py --quick    # a smoke run: a few steps on a few images
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification

ROOT = Path(__file__).resolve().parents[1]
ROUTES = ("switch_only", "no_labels")
TARGET = -2.0  # points of accuracy after the switch against the source


sys.path.insert(0, str(Path(__file__).parent))
import distillation as DISTILLATION  # noqa: E402  (its data, recipe, example runner and scoring: one of each)


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
    focus = DISTILLATION.focus_paths(run_dir)
    return SimpleNamespace(data=focus.data, images=focus.images, source=Path(run_dir) / family / "source")


def train_source(family: str, run_dir: str, args) -> dict:
    """Train the family's softmax classifier on the focus data (`main` wrote it)."""
    from transformers import ViTImageProcessorPil

    started, paths = time.perf_counter(), paths_of(run_dir, family)
    castle_vit = DISTILLATION.load_module(DISTILLATION.EXAMPLES / "castle_pretrained_vit.py")
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
        results = DISTILLATION.load_module(DISTILLATION.DISTILLATION).main(
            ["--do_train", *DISTILLATION.arguments(options)]
        )
        model = AutoModelForImageClassification.from_pretrained(results["inference_dir"])
    scored = DISTILLATION.score(model, str(paths.source), str(paths.data), "label")
    return {"family": family, "route": name, "seed": seed, **scored, "seconds": time.perf_counter() - started}


def run_parallel(jobs: list[tuple], args, label: str) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context, initializer=DISTILLATION.start_worker) as pool:
        futures = [pool.submit(function, *job, args.run_dir, args) for function, *job in jobs]
        done = []
        for future in tqdm(futures, desc=label, unit="job"):
            done.append(future.result())
    return done


def summarise(sources: list[dict], runs: list[dict]) -> list[dict]:
    summary = []
    for source in sources:
        for name in ROUTES:
            mine = sorted(
                (r for r in runs if (r["family"], r["route"]) == (source["family"], name)), key=lambda r: r["seed"]
            )
            values = [100 * r["fidelity"]["1x"]["castled_accuracy"] for r in mine]
            summary.append(
                {
                    "family": source["family"],
                    "route": name,
                    "values": values,
                    "mean": statistics.mean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "source": 100 * mine[0]["fidelity"]["1x"]["source_accuracy"],
                    "feature_cosine": statistics.mean(r["fidelity"]["1x"]["feature_cosine"] for r in mine),
                }
            )
    return summary


def markdown_table(results: dict) -> str:
    lines = [
        "| source | route | accuracy after the switch (mean ± std) | each seed | source | castled − source "
        "| feature cosine | within 2 points |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["summary"]:
        difference = entry["mean"] - entry["source"]
        met = "yes" if difference >= TARGET else "no"
        lines.append(
            f"| {entry['family']} | {entry['route']} | {entry['mean']:.1f} ± {entry['std']:.1f} % "
            f"| {' / '.join(f'{value:.1f}' for value in entry['values'])} | {entry['source']:.1f} % "
            f"| {difference:+.1f} | {entry['feature_cosine']:.3f} | {met if entry['route'] == 'no_labels' else ''} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["siglip", "clip"], choices=["siglip", "clip"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--source_steps", type=int, default=24000)
    parser.add_argument("--route_steps", type=int, default=1500)
    parser.add_argument("--run_dir", default="outputs/distillation_towers_benchmark")
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few images, one seed")
    args = parser.parse_args(argv)
    argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.seeds, args.source_steps, args.route_steps = [0], 12, 4
    started = time.perf_counter()
    DISTILLATION.write_focus_data(DISTILLATION.focus_paths(args.run_dir), args)
    sources = run_parallel([(train_source, family) for family in args.families], args, "sources")
    jobs = [(route, family, "switch_only", 0) for family in args.families]
    jobs += [(route, family, "no_labels", seed) for family in args.families for seed in args.seeds]
    runs = run_parallel(jobs, args, "routes")
    results = {
        "command": "python benchmarks/distillation_towers.py " + " ".join(argv),
        "args": {key: value for key, value in vars(args).items() if key not in ("run_dir", "output_dir")},
        "sources": sources,
        "runs": runs,
        "summary": summarise(sources, runs),
        "wall_seconds": time.perf_counter() - started,
    }
    directory = Path(args.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "distillation_towers.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
