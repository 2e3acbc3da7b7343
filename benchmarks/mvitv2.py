#!/usr/bin/env python
"""Castling-MViTv2's cost beside timm's MViTv2, side by side in one run, on the CPU in fp32.

Inference, batch 1 (median of interleaved rounds, the order rotated from round to round, after a warm-up pass each):

- `timm_mvitv2`:           timm's `mvitv2_tiny` (softmax pooling attention), built at each resolution as timm builds
                           it for another input size;
- `castling_mvitv2_linear`: Castling-MViTv2 `tiny` castled from it and switched: the inference form;
- `castling_vit_linear`:    the plain Castling-ViT `small` in the inference form, of about MViTv2-T's MACs at 224 px
                           (4.4 G against 4.7 G).

A training step (forward and backward) and its peak activation memory (the training benchmark's measure,
`harness.peak_activation_bytes`: the tensors a step holds at once, the gradients left out) of Castling-MViTv2 `tiny`
in the training form (α = 1, the default mask) beside timm's `mvitv2_tiny`, at 224 px (batch 8) and 512 px
(batch 2). MACs come from `torch.utils.flop_counter`.

    python benchmarks/mvitv2.py            # make bench-mvitv2 (in make bench)
    python benchmarks/mvitv2.py --quick    # a smoke run: nano size, small images
"""

import sys
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_outputs import ImageClassifierOutput

sys.path.insert(0, str(Path(__file__).parent))  # the harness and timm's import
import harness  # noqa: E402
from timm_without_torchvision import import_timm  # noqa: E402

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


def measure(args) -> dict:
    timm = import_timm()
    inference_plan = [(64, 3), (128, 3)] if args.quick else [(224, 9), (512, 5), (1024, 2)]
    training_plan = [(64, 2, 3)] if args.quick else [(224, 8, 7), (512, 2, 5)]
    total = sum(harness.runs_of(len(INFERENCE), rounds) for _, rounds in inference_plan)
    total += sum(harness.runs_of(len(TRAINING), rounds) for _, _, rounds in training_plan)
    results = {"inference": [], "training": []}
    with tqdm(total=total, desc="MViTv2 benchmark", unit="pass") as progress:
        for resolution, rounds in inference_plan:
            models = inference_models(timm, resolution, args.quick)
            pixels = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
            latency = harness.inference_medians(models, pixels, rounds, progress, rotate=True)
            results["inference"].append(
                {
                    "resolution": resolution,
                    "latency_s": latency,
                    "macs": {name: harness.macs(model, pixels) for name, model in models.items()},
                }
            )
        for resolution, batch, rounds in training_plan:
            models = training_models(timm, resolution, args.quick)
            pixels = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
            labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
            step = harness.interleaved_medians(
                lambda model, x=pixels, y=labels: harness.training_step(model, x, y),
                models,
                rounds,
                progress,
                rotate=True,
            )
            memory = {name: harness.peak_activation_bytes(model, pixels, labels) for name, model in models.items()}
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
    lines = harness.table_head(
        "| res | timm MViTv2-T (ms) | Castling-MViTv2-T linear (ms) | plain Castling-ViT-S linear (ms) "
        "| MViTv2 linear / timm | ViT-S linear / timm | GMACs timm / MViTv2 linear / ViT-S linear |"
    )
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
        *harness.table_head(
            "| res | batch | timm MViTv2-T step (s) | Castling-MViTv2-T training form (s) | step ratio "
            "| timm peak activations (MiB) | training form peak activations (MiB) | peak ratio |"
        ),
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
    lines = harness.table_head("| res | measure | target | measured | met |")
    for kind, resolution, measure_name, most in TARGETS:
        value = measured(results, kind, resolution, measure_name)
        if value is not None:
            lines.append(
                f"| {resolution} | {measure_name} | ≤ {most:g} | {value:.3f} | {harness.yes_no(value <= most)} |"
            )
    return "\n".join(lines)


def plot(results: dict) -> dict:
    """Inference latency against resolution, and the training step's time."""
    plt = harness.pyplot()
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
    return {"mvitv2.png": figure}


def main(argv=None):
    args = harness.parser(__doc__, "nano size, small images: a smoke run").parse_args(argv)
    results = measure(args)
    results.update(command=harness.command_line(__file__, argv), machine=harness.machine())
    tables = [markdown_table(results), targets_table(results)]
    harness.write_results(args.output_dir, "mvitv2", results, tables, plot(results))
    return results


if __name__ == "__main__":
    main()
