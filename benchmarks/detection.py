#!/usr/bin/env python
"""Object detection: what the dense detector learns in ten minutes on a CPU, and what it costs at high resolution.

1. Accuracy: `examples/object-detection/run_object_detection.py` with the recipe below on generated shapes (a fresh
   set: `--num_generated_images` images, a fifth held out), COCO mAP (pycocotools) before and after the switch,
   the wall time of the run, and the loss and mAP during it.
2. Latency: `CastlingViTForObjectDetection` in the inference form against the same detector whose encoder attention
   is softmax attention (SDPA on the same q, k, v projections: the detector a softmax ViT would give), run
   interleaved on one image at each resolution; the median of the repeats.

    python benchmarks/detection.py            # make bench-detection
    python benchmarks/detection.py --quick    # a smoke run: a few steps, small images
"""

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch
from tqdm.auto import tqdm

from castling_hf import CastlingViTConfig, CastlingViTForObjectDetection
from castling_hf.models.castling_vit.modeling_castling_vit import CastlingViTAttention

sys.path.insert(0, str(Path(__file__).parent))
from speed import time_interleaved  # noqa: E402

EXAMPLE = Path(__file__).parents[1] / "examples" / "object-detection" / "run_object_detection.py"
RECIPE = (
    "--do_train --do_eval --learning_rate 1e-3 --weight_decay 0.05 --lr_scheduler_type cosine --warmup_steps 50 "
    "--per_device_train_batch_size 16 --per_device_eval_batch_size 64 --save_strategy no --logging_steps 25 "
    "--report_to none --seed 0"
)


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
    spec = importlib.util.spec_from_file_location("run_object_detection", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    command = (
        f"--output_dir {args.run_dir} --num_generated_images {args.num_generated_images} --image_size "
        f"{args.image_size} --max_steps {args.max_steps} --eval_strategy steps --eval_steps {args.eval_steps} "
        f"{RECIPE}"
    ).split()
    started = time.perf_counter()
    results = example.main(command)
    seconds = time.perf_counter() - started
    history = json.loads((Path(args.run_dir) / "trainer_state.json").read_text())["log_history"]
    return {
        "command": f"python {EXAMPLE.relative_to(EXAMPLE.parents[2])} " + " ".join(command),
        "wall_seconds": seconds,
        "castling": results["castling"],
        "linear": results["linear"],
        "held_out_images": results["eval_samples"],
        "history": history,
    }


def latency(args) -> list[dict]:
    entries = []
    progress = tqdm(total=len(args.resolutions) * 2 * args.repeats, desc="detection latency", unit="run")
    for resolution in args.resolutions:
        models = detectors(args.size, resolution)
        pixel_values = torch.randn(1, 3, resolution, resolution)
        seconds = time_interleaved(models, pixel_values, args.repeats, progress)
        tokens = (resolution // models["castling_linear"].config.patch_size) ** 2 + 1
        entries.append({"size": args.size, "resolution": resolution, "tokens": tokens, "seconds": seconds})
    progress.close()
    return entries


def markdown_table(results: dict) -> str:
    training = results["training"]
    lines = [
        "| form | mAP@[.5:.95] | mAP@.5 | held-out images | training run (wall) |",
        "|---|---|---|---|---|",
    ]
    for form in ("castling", "linear"):
        metrics = training[form]
        lines.append(
            f"| {form} | {metrics[f'eval_{form}_map']:.3f} | {metrics[f'eval_{form}_map_50']:.3f} "
            f"| {training['held_out_images']} | {training['wall_seconds']:.0f} s |"
        )
    lines += [
        "",
        "| size | resolution | tokens | castling (linear) s | softmax encoder s | castling / softmax |",
        "|---|---|---|---|---|---|",
    ]
    for entry in results["latency"]:
        seconds = entry["seconds"]
        lines.append(
            f"| {entry['size']} | {entry['resolution']} | {entry['tokens']} | {seconds['castling_linear']:.3f} "
            f"| {seconds['softmax_encoder']:.3f} | {seconds['castling_linear'] / seconds['softmax_encoder']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_generated_images", type=int, default=3000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--max_steps", type=int, default=1500)
    parser.add_argument("--eval_steps", type=int, default=300)
    parser.add_argument("--size", default="tiny", help="the detector size timed for latency")
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run_dir", default="outputs/detection_benchmark")
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="40 images, 4 steps, 64/128 pixels: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_generated_images, args.max_steps, args.eval_steps = 40, 4, 2
        args.size, args.resolutions, args.repeats = "nano", [64, 128], 2

    results = {"training": train(args), "latency": latency(args)}
    directory = Path(args.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "detection.json").write_text(json.dumps(results, indent=2))
    (directory / "detection.md").write_text(markdown_table(results) + "\n")
    plot(results, directory / "detection.png")
    print(markdown_table(results))
    print(f"wrote {directory / 'detection.json'}, {directory / 'detection.md'}, {directory / 'detection.png'}")
    return results


if __name__ == "__main__":
    main()
