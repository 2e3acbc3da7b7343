#!/usr/bin/env python
"""Semantic segmentation: what UperNet on a Castling-ViT backbone learns in ten minutes on a CPU, and what the
backbone saves at high resolution.

1. Accuracy: `examples/semantic-segmentation/run_semantic_segmentation.py` with `harness.EXAMPLE_RECIPE` on
   generated shape masks (`--num_generated_images` images, a fifth held out), mean IoU before and after the switch,
   the wall time of the run, and the loss and mean IoU during it; and the same run on the multiscale Castling-MViTv2
   `nano` backbone (`--backbone_family castling_mvitv2`), same recipe and budget, for the families' comparison.
2. Latency and peak memory: `UperNetForSemanticSegmentation` on `CastlingViTBackbone` in the inference form against
   the same UperNet on `Dinov2Backbone` of the same dimensions with SDPA attention (transformers' plain ViT backbone),
   the same head configuration on both (UperNet's defaults, four maps on the patch grid), batch 1: the backbone alone
   and the whole model, run interleaved; the median of the repeats. Peak memory is the largest total of tensors that
   the forward pass holds at once (`harness.peak_memory_bytes`; the weights are not counted).

    python benchmarks/segmentation.py            # make bench-segmentation
    python benchmarks/segmentation.py --quick    # a smoke run: a few steps, small images
"""

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Dinov2Config, UperNetConfig, UperNetForSemanticSegmentation

from castling_hf import CASTLING_VIT_SIZES, CastlingViTConfig

sys.path.insert(0, str(Path(__file__).parent))  # the harness
import harness  # noqa: E402

EXAMPLE = harness.ROOT / "examples" / "semantic-segmentation" / "run_semantic_segmentation.py"
# UperNet's width for every family: the example's default for the plain nano (twice its 64 channels). Given to
# Castling-MViTv2 too (whose default would be twice its widest stage, 320), so that the backbone is all that differs.
UPERNET_WIDTH = 128


def segmenters(size: str, resolution: int) -> dict[str, UperNetForSemanticSegmentation]:
    """UperNet (defaults, 150 classes as ADE20k) on a Castling-ViT backbone in the inference form, and on a Dinov2
    backbone with the same width, depth, heads, MLP and patch size and SDPA attention; four maps a quarter of the
    depth apart, on the patch grid, for both."""
    out_indices = harness.load_module(EXAMPLE).stage_indices(CASTLING_VIT_SIZES[size]["num_hidden_layers"])
    castling = CastlingViTConfig.from_size(
        size, image_size=resolution, attention_mode="linear", out_indices=out_indices, reshape_hidden_states=True
    )
    dinov2 = Dinov2Config(
        hidden_size=castling.hidden_size,
        num_hidden_layers=castling.num_hidden_layers,
        num_attention_heads=castling.num_attention_heads,
        mlp_ratio=castling.intermediate_size // castling.hidden_size,
        image_size=resolution,
        patch_size=castling.patch_size,
        out_indices=out_indices,
        reshape_hidden_states=True,
    )
    dinov2._attn_implementation = "sdpa"
    models = {}
    for name, backbone_config in (("castling_linear", castling), ("dinov2_sdpa", dinov2)):
        config = UperNetConfig(backbone_config=backbone_config)
        models[name] = UperNetForSemanticSegmentation(config).eval()
    return models


def train(args, family: str = "castling_vit") -> dict:
    """The example's run with the recipe (and its defaults: nano's patch 4, a 16×16 grid at 64 px, the pyramid at
    strides 4-32 px, UperNet 128 wide), on a new `nano` backbone of `family`: the plain Castling-ViT (its maps through
    the simple pyramid) or Castling-MViTv2 (its four stages)."""
    run_dir = Path(args.run_dir) / family
    family_options = f"--model_name_or_path nano --backbone_family {family} --decode_hidden_size {UPERNET_WIDTH}"
    argv = harness.example_run_argv(args, run_dir) + family_options.split()
    run = harness.run_example(EXAMPLE, argv, run_dir, recorded=("castling", "linear", "labels"))
    return {**run, "steps": args.max_steps, "upernet_width": UPERNET_WIDTH}


def latency_and_memory(args) -> list[dict]:
    entries = []
    total = len(args.resolutions) * 2 * harness.runs_of(2, args.repeats)
    progress = tqdm(total=total, desc="segmentation latency", unit="run")
    for resolution in args.resolutions:
        models = segmenters(args.size, resolution)
        backbones = {name: model.backbone for name, model in models.items()}
        pixel_values = torch.randn(1, 3, resolution, resolution)
        entries.append(
            {
                "size": args.size,
                "resolution": resolution,
                "tokens": (resolution // models["castling_linear"].config.backbone_config.patch_size) ** 2,
                "backbone_seconds": harness.inference_medians(backbones, pixel_values, args.repeats, progress),
                "upernet_seconds": harness.inference_medians(models, pixel_values, args.repeats, progress),
                "backbone_peak_bytes": {n: harness.peak_memory_bytes(m, pixel_values) for n, m in backbones.items()},
                "upernet_peak_bytes": {n: harness.peak_memory_bytes(m, pixel_values) for n, m in models.items()},
            }
        )
    progress.close()
    return entries


def families_table(results: dict) -> str:
    """UperNet on each family's `nano` backbone, trained with the same recipe, head width and budget."""
    lines = harness.table_head(
        "| backbone (nano) | maps for UperNet | UperNet width | mean IoU, castling form | mean IoU after the switch "
        "| steps | training run (wall) |"
    )
    maps = {"castling_vit": "simple pyramid, strides 4-32 px", "castling_mvitv2": "its four stages, strides 4-32 px"}
    for family, training in results["families"].items():
        lines.append(
            f"| {family} | {maps[family]} | {training['upernet_width']} "
            f"| {training['castling']['eval_castling_mean_iou']:.3f} "
            f"| {training['linear']['eval_linear_mean_iou']:.3f} | {training['steps']} "
            f"| {training['wall_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def ratio(values: dict) -> float:
    return values["castling_linear"] / values["dinov2_sdpa"]


def markdown_table(results: dict) -> str:
    training = results["training"]
    lines = harness.table_head(
        "| form | mean IoU | " + " | ".join(f"IoU {label}" for label in training["labels"]) + " | overall "
        "accuracy | held-out images | training run (wall) |"
    )
    for form in ("castling", "linear"):
        metrics = training[form]
        per_class = " | ".join(f"{metrics[f'eval_{form}_iou_{label}']:.3f}" for label in training["labels"])
        lines.append(
            f"| {form} | {metrics[f'eval_{form}_mean_iou']:.3f} | {per_class} "
            f"| {metrics[f'eval_{form}_overall_accuracy']:.3f} | {training['held_out_images']} "
            f"| {training['wall_seconds']:.0f} s |"
        )
    lines += [
        "",
        *harness.table_head(
            "| size | resolution | tokens | part | castling (linear) s | Dinov2 (SDPA) s | latency ratio "
            "| castling peak MiB | Dinov2 peak MiB | memory ratio |"
        ),
    ]
    for entry in results["latency"]:
        for part in ("backbone", "upernet"):
            seconds, peak = entry[f"{part}_seconds"], entry[f"{part}_peak_bytes"]
            lines.append(
                f"| {entry['size']} | {entry['resolution']} | {entry['tokens']} | {part} "
                f"| {seconds['castling_linear']:.3f} | {seconds['dinov2_sdpa']:.3f} | {ratio(seconds):.2f} "
                f"| {peak['castling_linear'] / 2**20:.0f} | {peak['dinov2_sdpa'] / 2**20:.0f} | {ratio(peak):.2f} |"
            )
    return "\n".join(lines)


def plot(results: dict) -> dict:
    """Loss and mean IoU along each family's run; latency and peak memory against resolution."""
    plt = harness.pyplot()
    figure, (loss_axis, iou_axis, latency_axis, memory_axis) = plt.subplots(1, 4, figsize=(20, 4.5))
    for family, training in results["families"].items():
        history = training["history"]
        losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
        loss_axis.plot(*zip(*losses, strict=True), label=f"{family} nano")
        ious = [(entry["step"], entry["eval_mean_iou"]) for entry in history if "eval_mean_iou" in entry]
        iou_axis.plot(*zip(*ious, strict=True), marker="o", label=f"{family} nano")
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log", title="cross-entropy (+ auxiliary head)")
    iou_axis.set(xlabel="step", ylabel="held-out mean IoU", ylim=(0, 1), title="mean IoU during training (castling)")
    entries = results["latency"]
    resolutions = [entry["resolution"] for entry in entries]
    for axis, key, scale, unit in ((latency_axis, "seconds", 1, "s"), (memory_axis, "peak_bytes", 2**20, "MiB")):
        for part, style in (("upernet", "-"), ("backbone", "--")):
            for name, color in (("castling_linear", "tab:blue"), ("dinov2_sdpa", "tab:orange")):
                values = [entry[f"{part}_{key}"][name] / scale for entry in entries]
                axis.plot(resolutions, values, style, color=color, marker="o", label=f"{part}: {name}")
        axis.set(xlabel="resolution (px)", ylabel=unit, xscale="log", yscale="log")
        axis.set_xticks(resolutions, [str(r) for r in resolutions], minor=False)
        axis.xaxis.set_minor_locator(plt.NullLocator())
        axis.legend(fontsize=8)
    latency_axis.set_title("latency, batch 1")
    memory_axis.set_title("peak activation memory, batch 1")
    for axis in (loss_axis, iou_axis, latency_axis, memory_axis):
        axis.grid(True, alpha=0.3)
    for axis in (loss_axis, iou_axis):
        axis.legend(fontsize=8)
    return {"segmentation.png": figure}


def main(argv=None):
    parser = harness.parser(__doc__, harness.QUICK_EXAMPLE_RUN_HELP, run_dir="outputs/segmentation_benchmark")
    harness.add_example_run_options(parser, images=1500, steps=700, eval_steps=175)
    parser.add_argument("--size", default="small", help="the backbone size timed for latency and memory")
    parser.add_argument(
        "--families",
        nargs="+",
        default=["castling_vit", "castling_mvitv2"],
        choices=["castling_vit", "castling_mvitv2"],
        help="the backbones UperNet is trained on, same recipe and budget (castling_vit's run is the main table's)",
    )
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if "castling_vit" not in args.families:
        parser.error("--families needs castling_vit: its run is the benchmark's main table, the others compare to it")
    if args.quick:
        vars(args).update(harness.QUICK_EXAMPLE_RUN)

    families = {family: train(args, family) for family in args.families}
    results = {"training": families["castling_vit"], "families": families, "latency": latency_and_memory(args)}
    tables = [markdown_table(results), families_table(results)]
    harness.write_results(args.output_dir, "segmentation", results, tables, plot(results))
    return results


if __name__ == "__main__":
    main()
