#!/usr/bin/env python
"""Object detection: what the dense detector learns in ten minutes on a CPU, and what it costs at high resolution.

1. Accuracy: `examples/object-detection/run_object_detection.py` with `harness.EXAMPLE_RECIPE` on generated
   shapes (a fresh set: `--num_generated_images` images, a fifth held out), COCO mAP (pycocotools) before and after
   the switch, the wall time of the run, and the loss and mAP during it.
2. Latency: `CastlingViTForObjectDetection` in the inference form against the same detector whose encoder attention
   is softmax attention (SDPA on the same q, k, v projections: the detector a softmax ViT would give), run
   interleaved on one image at each resolution; the median of the repeats.

    python benchmarks/detection.py            # make bench-detection
    python benchmarks/detection.py --quick    # a smoke run: a few steps, small images
"""

import sys
import types
from pathlib import Path

import torch
from tqdm.auto import tqdm

from castling_hf import CastlingViTConfig, CastlingViTForObjectDetection
from castling_hf.models.castling_vit.modeling_castling_vit import CastlingViTAttention

sys.path.insert(0, str(Path(__file__).parent))  # the harness
import harness  # noqa: E402

EXAMPLE = harness.ROOT / "examples" / "object-detection" / "run_object_detection.py"


def softmax_attention_forward(self, hidden_states, num_prefix_tokens, grid_size, rotary=None):
    """The encoder attention of a softmax ViT on Castling-ViT's projections: SDPA over q, k, v, then o_proj (the
    model has learned position embeddings, so `rotary` is always None)."""
    batch, tokens, hidden_size = hidden_states.shape
    qkv = self.qkv_proj(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    attended = torch.nn.functional.scaled_dot_product_attention(*qkv)
    return self.o_proj(attended.transpose(1, 2).reshape(batch, tokens, hidden_size))


def detectors(size: str, resolution: int) -> dict[str, torch.nn.Module]:
    config = CastlingViTConfig.from_size(size, image_size=resolution, num_labels=80, attention_mode="linear")
    castling = CastlingViTForObjectDetection(config).eval()
    softmax = CastlingViTForObjectDetection(config).eval()
    for module in softmax.modules():
        if isinstance(module, CastlingViTAttention):
            module.forward = types.MethodType(softmax_attention_forward, module)
    return {"castling_linear": castling, "softmax_encoder": softmax}


def train(args) -> dict:
    """The example's run with the recipe: its mAP before and after the switch, wall time and log history."""
    argv = harness.example_run_argv(args, args.run_dir)
    return harness.run_example(EXAMPLE, argv, args.run_dir, recorded=("castling", "linear"))


def latency(args) -> list[dict]:
    entries = []
    total = len(args.resolutions) * harness.runs_of(2, args.repeats)
    progress = tqdm(total=total, desc="detection latency", unit="run")
    for resolution in args.resolutions:
        models = detectors(args.size, resolution)
        pixel_values = torch.randn(1, 3, resolution, resolution)
        seconds = harness.inference_medians(models, pixel_values, args.repeats, progress)
        tokens = (resolution // models["castling_linear"].config.patch_size) ** 2 + 1
        entries.append({"size": args.size, "resolution": resolution, "tokens": tokens, "seconds": seconds})
    progress.close()
    return entries


def markdown_table(results: dict) -> str:
    training = results["training"]
    lines = harness.table_head("| form | mAP@[.5:.95] | mAP@.5 | held-out images | training run (wall) |")
    for form in ("castling", "linear"):
        metrics = training[form]
        lines.append(
            f"| {form} | {metrics[f'eval_{form}_map']:.3f} | {metrics[f'eval_{form}_map_50']:.3f} "
            f"| {training['held_out_images']} | {training['wall_seconds']:.0f} s |"
        )
    lines += [
        "",
        *harness.table_head(
            "| size | resolution | tokens | castling (linear) s | softmax encoder s | castling / softmax |"
        ),
    ]
    for entry in results["latency"]:
        seconds = entry["seconds"]
        lines.append(
            f"| {entry['size']} | {entry['resolution']} | {entry['tokens']} | {seconds['castling_linear']:.3f} "
            f"| {seconds['softmax_encoder']:.3f} | {seconds['castling_linear'] / seconds['softmax_encoder']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: dict) -> dict:
    """The loss and mAP along the run, and latency against tokens."""
    plt = harness.pyplot()
    history = results["training"]["history"]
    figure, (loss_axis, map_axis, latency_axis) = plt.subplots(1, 3, figsize=(16, 4.5))
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    loss_axis.plot(*zip(*losses, strict=True))
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log", title="set loss")
    maps = [(entry["step"], entry["eval_map"], entry["eval_map_50"]) for entry in history if "eval_map" in entry]
    steps, map_all, map_50 = zip(*maps, strict=True)
    map_axis.plot(steps, map_all, marker="o", label="mAP@[.5:.95]")
    map_axis.plot(steps, map_50, marker="o", label="mAP@.5")
    map_axis.set(xlabel="step", ylabel="held-out mAP", ylim=(0, 1), title="mAP during training (castling form)")
    map_axis.legend()
    entries = results["latency"]
    tokens = [entry["tokens"] for entry in entries]
    for name in ("castling_linear", "softmax_encoder"):
        latency_axis.plot(tokens, [entry["seconds"][name] for entry in entries], marker="o", label=name)
    latency_axis.set(xlabel="tokens", ylabel="seconds per image", xscale="log", yscale="log", title="latency")
    latency_axis.legend()
    for axis in (loss_axis, map_axis, latency_axis):
        axis.grid(True, alpha=0.3)
    return {"detection.png": figure}


def main(argv=None):
    parser = harness.parser(__doc__, harness.QUICK_EXAMPLE_RUN_HELP, run_dir="outputs/detection_benchmark")
    harness.add_example_run_options(parser, images=3000, steps=1500, eval_steps=300)
    parser.add_argument("--size", default="tiny", help="the detector size timed for latency")
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(harness.QUICK_EXAMPLE_RUN)

    results = {"training": train(args), "latency": latency(args)}
    harness.write_results(args.output_dir, "detection", results, [markdown_table(results)], plot(results))
    return results


if __name__ == "__main__":
    main()
