#!/usr/bin/env python
"""Castling-MViTv2's cost beside timm's MViTv2, side by side in one run, on the CPU in fp32.

Inference, batch 1 (median of interleaved rounds, the order rotated from round to round, after a warm-up pass each):

- `timm_mvitv2`:           timm's `mvitv2_tiny` (softmax pooling attention), built at each resolution as timm builds
                           it for another input size;
- `castling_mvitv2_linear`: Castling-MViTv2 `tiny` castled from it and switched: the inference form;
- `castling_vit_linear`:    the plain Castling-ViT `small` in the inference form, of about MViTv2-T's MACs at 224 px
                           (4.4 G against 4.7 G).

A training step (forward and backward) and its peak activation memory (`training.py`'s measure: the tensors a step
holds at once, the gradients left out) of Castling-MViTv2 `tiny` in the training form (α = 1, the default mask)
beside timm's `mvitv2_tiny`, at 224 px (batch 8) and 512 px (batch 2). MACs come from `torch.utils.flop_counter`.

    python benchmarks/mvitv2.py            # make bench-mvitv2 (in make bench)
    python benchmarks/mvitv2.py --quick    # a smoke run: nano size, small images
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from transformers.modeling_outputs import ImageClassifierOutput

sys.path.insert(0, str(Path(__file__).parent))
from timm_without_torchvision import import_timm  # noqa: E402
from training import peak_activation_bytes, training_step  # noqa: E402

import castling_hf  # noqa: E402
from castling_hf import CastlingMViTv2Config, CastlingMViTv2ForImageClassification  # noqa: E402

INFERENCE = ("timm_mvitv2", "castling_mvitv2_linear", "castling_vit_linear")
TRAINING = ("timm_mvitv2", "castling_mvitv2_training")
# Issue 27's targets: (kind, resolution, measure, the most the ratio may be).
TARGETS = [
    ("inference", 224, "castling_mvitv2_linear / timm_mvitv2 latency", 0.90),
    ("inference", 512, "castling_mvitv2_linear / timm_mvitv2 latency", 0.45),
    ("inference", 1024, "castling_mvitv2_linear / timm_mvitv2 latency", 0.15),
    ("training", 512, "castling_mvitv2_training / timm_mvitv2 step", 1.3),
    ("training", 512, "castling_mvitv2_training / timm_mvitv2 peak activation memory", 1.3),
]


class TimmClassifier(nn.Module):
    """A timm classifier read as the `transformers` models are: `pixel_values` in, `.logits` (and `.loss` with
    labels) out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, labels=None) -> ImageClassifierOutput:
        logits = self.model(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def timm_mvitv2(timm, size: str, resolution: int, quick: bool) -> nn.Module:
    if quick:
        from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

        torch.manual_seed(0)
        return MultiScaleVit(MultiScaleVitCfg(depths=(1, 2, 5, 2), embed_dim=16), img_size=resolution, num_classes=10)
    torch.manual_seed(0)
    return timm.create_model(f"mvitv2_{size}", img_size=resolution, num_classes=10)


def inference_models(timm, resolution: int, quick: bool) -> dict[str, nn.Module]:
    source = timm_mvitv2(timm, "tiny", resolution, quick).eval()
    castled = castling_hf.switch_to_inference(castling_hf.castle(source), force=True).eval()
    plain = castling_hf.CastlingViTConfig.from_size(
        "nano" if quick else "small", image_size=resolution, attention_mode="linear", num_labels=10
    )
    return {
        "timm_mvitv2": TimmClassifier(source).eval(),
        "castling_mvitv2_linear": castled,
        "castling_vit_linear": castling_hf.CastlingViTForImageClassification(plain).eval(),
    }


def training_models(timm, resolution: int, quick: bool) -> dict[str, nn.Module]:
    config = CastlingMViTv2Config.from_size("nano" if quick else "tiny", image_size=resolution, num_labels=10)
    return {
        "timm_mvitv2": TimmClassifier(timm_mvitv2(timm, "tiny", resolution, quick)).train(),
        "castling_mvitv2_training": CastlingMViTv2ForImageClassification(config).train(),
    }


def interleaved_medians(run, models: dict, rounds: int, progress) -> dict[str, float]:
    """The median time of `run(model)` for each model over `rounds` rounds, the order rotated every round."""
    names = list(models)
    for name in names:
        run(models[name])  # warm-up
    times = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            started = time.perf_counter()
            run(models[name])
            times[name].append(time.perf_counter() - started)
            progress.update()
    return {name: statistics.median(values) for name, values in times.items()}


def macs(model: nn.Module, pixel_values: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=pixel_values)
    return counter.get_total_flops() // 2


def measure(args) -> dict:
    timm = import_timm()
    inference_plan = [(64, 3), (128, 3)] if args.quick else [(224, 9), (512, 5), (1024, 2)]
    training_plan = [(64, 2, 3)] if args.quick else [(224, 8, 7), (512, 2, 5)]
    total = sum(rounds * len(INFERENCE) for _, rounds in inference_plan)
    total += sum(rounds * len(TRAINING) for _, _, rounds in training_plan)
    results = {"inference": [], "training": []}
    with tqdm(total=total, desc="MViTv2 benchmark", unit="pass") as progress:
        for resolution, rounds in inference_plan:
            models = inference_models(timm, resolution, args.quick)
            pixels = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                latency = interleaved_medians(lambda model, x=pixels: model(pixel_values=x), models, rounds, progress)
            results["inference"].append(
                {
                    "resolution": resolution,
                    "latency_s": latency,
                    "macs": {name: macs(model, pixels) for name, model in models.items()},
                }
            )
        for resolution, batch, rounds in training_plan:
            models = training_models(timm, resolution, args.quick)
            pixels = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
            labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
            step = interleaved_medians(
                lambda model, x=pixels, y=labels: training_step(model, x, y), models, rounds, progress
            )
            memory = {name: peak_activation_bytes(model, pixels, labels) for name, model in models.items()}
            results["training"].append(
                {"resolution": resolution, "batch": batch, "step_s": step, "peak_activation_bytes": memory}
            )
    return results


def ratio(entry: dict, key: str, numerator: str) -> float:
    return entry[key][numerator] / entry[key]["timm_mvitv2"]


def measured(results: dict, kind: str, resolution: int, measure_name: str) -> float | None:
    entries = [entry for entry in results[kind] if entry["resolution"] == resolution]
    if not entries:
        return None
    numerator = measure_name.split(" / ")[0]
    key = {"latency": "latency_s", "step": "step_s", "peak activation memory": "peak_activation_bytes"}[
        measure_name.split("timm_mvitv2 ")[1]
    ]
    return ratio(entries[0], key, numerator)


def markdown_table(results: dict) -> str:
    lines = [
        "| res | timm MViTv2-T (ms) | Castling-MViTv2-T linear (ms) | plain Castling-ViT-S linear (ms) "
        "| MViTv2 linear / timm | ViT-S linear / timm | GMACs timm / MViTv2 linear / ViT-S linear |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in results["inference"]:
        latency, counted = entry["latency_s"], entry["macs"]
        lines.append(
            f"| {entry['resolution']} | {1000 * latency['timm_mvitv2']:,.0f} | "
            f"{1000 * latency['castling_mvitv2_linear']:,.0f} | {1000 * latency['castling_vit_linear']:,.0f} | "
            f"{ratio(entry, 'latency_s', 'castling_mvitv2_linear'):.3f} | "
            f"{ratio(entry, 'latency_s', 'castling_vit_linear'):.3f} | "
            + " / ".join(f"{counted[name] / 1e9:.2f}" for name in INFERENCE)
            + " |"
        )
    lines += [
        "",
        "| res | batch | timm MViTv2-T step (s) | Castling-MViTv2-T training form (s) | step ratio "
        "| timm peak activations (MiB) | training form peak activations (MiB) | peak ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["training"]:
        step, memory = entry["step_s"], entry["peak_activation_bytes"]
        lines.append(
            f"| {entry['resolution']} | {entry['batch']} | {step['timm_mvitv2']:.2f} | "
            f"{step['castling_mvitv2_training']:.2f} | {ratio(entry, 'step_s', 'castling_mvitv2_training'):.3f} | "
            f"{memory['timm_mvitv2'] / 2**20:,.0f} | {memory['castling_mvitv2_training'] / 2**20:,.0f} | "
            f"{ratio(entry, 'peak_activation_bytes', 'castling_mvitv2_training'):.3f} |"
        )
    return "\n".join(lines)


def targets_table(results: dict) -> str:
    lines = ["| res | measure | target | measured | met |", "|---|---|---|---|---|"]
    for kind, resolution, measure_name, most in TARGETS:
        value = measured(results, kind, resolution, measure_name)
        if value is not None:
            lines.append(
                f"| {resolution} | {measure_name} | ≤ {most:g} | {value:.3f} | {'yes' if value <= most else 'no'} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency_axis, training_axis) = plt.subplots(1, 2, figsize=(11, 4))
    resolutions = [entry["resolution"] for entry in results["inference"]]
    for name, color in zip(INFERENCE, ("tab:orange", "tab:blue", "tab:green"), strict=True):
        latency_axis.plot(
            resolutions, [1000 * e["latency_s"][name] for e in results["inference"]], "o-", color=color, label=name
        )
    latency_axis.set(xlabel="resolution (px)", ylabel="ms, batch 1", yscale="log", title="inference latency")
    labels = [f"{e['resolution']} px ×{e['batch']}" for e in results["training"]]
    positions = range(len(labels))
    for offset, name, color in ((-0.2, "timm_mvitv2", "tab:orange"), (0.2, "castling_mvitv2_training", "tab:blue")):
        training_axis.bar(
            [p + offset for p in positions],
            [e["step_s"][name] for e in results["training"]],
            0.4,
            color=color,
            label=name,
        )
    training_axis.set_xticks(list(positions), labels)
    training_axis.set(ylabel="s per training step", title="training step (forward + backward)")
    for axis in (latency_axis, training_axis):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="nano size, small images: a smoke run")
    args = parser.parse_args(argv)
    results = measure(args)
    results.update(
        command=" ".join(["python benchmarks/mvitv2.py", *(sys.argv[1:] if argv is None else argv)]),
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    )
    directory = Path(args.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mvitv2.json").write_text(json.dumps(results, indent=2))
    (directory / "mvitv2.md").write_text(markdown_table(results) + "\n\n" + targets_table(results) + "\n")
    plot(results, directory / "mvitv2.png")
    print(markdown_table(results))
    print(targets_table(results))
    print(f"wrote {directory / 'mvitv2.json'}, mvitv2.md, mvitv2.png")
    return results


if __name__ == "__main__":
    main()
