#!/usr/bin/env python
"""Regenerate the model cards in this folder, one per Castling-ViT size, from the benchmark JSON.

    python model_cards/generate.py

Each card's results are read from `benchmarks/results`: the accuracy study (`accuracy.json`, whose models have the
`nano` dimensions) for `nano`, and the speed benchmark (every `speed.json` below `benchmarks/results`) for the sizes
it measured. A size with no measurement says so instead of showing a number.
"""

import json
from pathlib import Path

from huggingface_hub import EvalResult

from castling_hf import CASTLING_VIT_SIZES, CastlingViTConfig
from castling_hf.model_card import castling_model_card

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "benchmarks" / "results"
# The accuracy study's variant that uses the library defaults: the one a card for a default model reports.
DEFAULT_VARIANT = "castling"
NOTES = (
    "No weights trained on a large data set are published yet: this card describes the configuration and what the "
    "project's benchmarks measured for it. `CastlingViTConfig.from_size(...)` builds it; a trained inference "
    "checkpoint pushed with `examples/push_inference_checkpoint.py` carries a card with its own results."
)
TASK_DATASETS = {
    "digits": ("digits", "scikit-learn digits (castling_hf.data.digits)"),
    "focus": ("focus_digits", "a digit hidden on a canvas (castling_hf.data.focus_digits)"),
}


def accuracy_results(study: dict) -> list[EvalResult]:
    """Test accuracy (a fraction, as the Trainer reports it; mean over seeds) of the default Castling-ViT after the
    switch, per task of the study."""
    results = []
    for row in study["summary"]:
        if row["variant"] != DEFAULT_VARIANT:
            continue
        task = study["tasks"][row["task"]]
        dataset_type, dataset_name = TASK_DATASETS[row["task"]]
        results.append(
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset_type,
                dataset_name=f"{dataset_name}, {task['image_size']}×{task['image_size']}, patch {task['patch_size']}",
                dataset_split="test",
                metric_type="accuracy",
                metric_name=f"accuracy, mean of {row['seeds']} seeds, after the switch",
                metric_value=row["accuracy_mean"] / 100,
            )
        )
    return results


def speed_results(speed: dict, size: str) -> list[EvalResult]:
    """Inference latency (ms, batch 1) of the inference form, and its ratio to `transformers`' ViT, per resolution."""
    results = []
    for row in speed["inference"]:
        if row["size"] != size or row["batch"] != 1 or "castling_linear" not in row["latency_s"]:
            continue
        dataset = dict(
            task_type="image-classification",
            dataset_type=f"random-images-{row['resolution']}",  # model-index groups results by data set type
            dataset_name=f"random {row['resolution']}×{row['resolution']} images, batch 1, "
            f"{speed['machine']['cpu_threads']} CPU threads",
        )
        results.append(
            EvalResult(
                **dataset,
                metric_type="latency",
                metric_name=f"latency at {row['resolution']}² (ms)",
                metric_value=1000 * row["latency_s"]["castling_linear"],
            )
        )
        if "linear_over_vit" in row["ratios"]:
            results.append(
                EvalResult(
                    **dataset,
                    metric_type="latency_ratio",
                    metric_name=f"latency / ViT (SDPA) latency at {row['resolution']}²",
                    metric_value=row["ratios"]["linear_over_vit"],
                )
            )
    return results


def measurements(size: str) -> tuple[list[EvalResult], list[str], list[str]]:
    """(eval results, data sets, the commands that measured them) for one size."""
    results, datasets, commands = [], [], []
    accuracy_path = RESULTS / "accuracy.json"
    if size == "nano" and accuracy_path.exists():
        study = json.loads(accuracy_path.read_text())
        for field, choice in study["choices"].items():
            if choice["adopted"]:
                raise ValueError(
                    f"The study moved the default {field} to {choice['value']!r} ({choice['best_other_variant']}), so "
                    f"the {DEFAULT_VARIANT!r} variant no longer has the library defaults; report the matching variant."
                )
        results += accuracy_results(study)
        datasets += [TASK_DATASETS[task][0] for task in study["args"]["tasks"]]
        commands.append(study["command"])
    for speed_path in sorted(RESULTS.rglob("speed.json")):
        speed = json.loads(speed_path.read_text())
        found = speed_results(speed, size)
        if found:
            results += found
            commands.append(speed["command"])
    return results, datasets, commands


def generate(output_dir: Path = HERE) -> list[Path]:
    paths = []
    for size in CASTLING_VIT_SIZES:
        results, datasets, commands = measurements(size)
        config = CastlingViTConfig.from_size(size, attention_mode="linear")
        card = castling_model_card(
            config,
            model_name=f"castling-vit-{size}",
            eval_results=results,
            datasets=datasets,
            results_source=" and ".join(f"`{command.strip()}`" for command in commands) if commands else None,
            notes=NOTES,
        )
        path = output_dir / f"castling-vit-{size}" / "README.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        card.save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for path in generate():
        print(f"wrote {path}")
