#!/usr/bin/env python
"""Training cost of Castling-ViT's two forms against `transformers`' ViT with SDPA, side by side.

For each size and (resolution, batch), three classifiers of the same dimensions take training steps (forward and
backward; the optimizer's step is the same for every form and left out) interleaved on the CPU in fp32, after a
warm-up step each, the order rotated from one round to the next (A B C, B C A, C A B, ...); a step's time is the
median of its rounds (25 at 224 px, 9 at 512, 5 at 1024), so that drifts of a noisy machine hit all three:

- `vit_sdpa`:          `transformers`' `ViTForImageClassification` with SDPA attention;
- `castling_training`: Castling-ViT in the training form (`attention_mode="castling"`, α = 1, the default mask), the
                       form a user trains with the mask decay;
- `castling_linear`:   Castling-ViT in the inference form, the form it trains in once α is 0.

Peak activation memory is the largest total size of the tensors a training step's forward and backward passes hold
at once, the parameters' gradients left out (they are the same for every form), measured in one more step.
A tile sweep, run after the steps, times the masked softmax branch alone (forward + backward) for several tile sizes
beside SDPA; one training-form step at 1536 px, batch 1, shows that it runs.

    python benchmarks/training.py                   # the full study (make bench)
    python benchmarks/training.py --quick           # a smoke run: nano size, small images
"""

import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from castling_hf import CastlingViTConfig, CastlingViTForImageClassification, masked_softmax
from castling_hf.attention import masked_softmax_attention

sys.path.insert(0, str(Path(__file__).parent))  # the harness and the speed benchmark
import harness  # noqa: E402
from speed import vit_for  # noqa: E402

VARIANTS = ("vit_sdpa", "castling_training", "castling_linear")
PLAN = ((224, 8), (512, 2), (1024, 1))
# Rounds per resolution: more where steps are short, so that each median rests on more than a few seconds.
REPEATS = {224: 25, 512: 9, 1024: 5}


def castling(size: str, resolution: int, mode: str) -> CastlingViTForImageClassification:
    config = CastlingViTConfig.from_size(size, image_size=resolution, num_labels=10, attention_mode=mode)
    return CastlingViTForImageClassification(config).train()


def build_models(size: str, resolution: int) -> dict[str, torch.nn.Module]:
    linear = castling(size, resolution, "linear")
    return {
        "vit_sdpa": vit_for(linear.config, "sdpa").train(),
        "castling_training": castling(size, resolution, "castling"),
        "castling_linear": linear,
    }


def run(args) -> dict:
    torch.manual_seed(0)
    plan = [(size, resolution, batch) for size in args.sizes for resolution, batch in args.plan]
    repeats = {resolution: args.repeats or REPEATS.get(resolution, 3) for _, resolution, _ in plan}
    total = sum(harness.runs_of(len(VARIANTS), repeats[resolution]) for _, resolution, _ in plan)
    results = {"command": args.command, "machine": harness.machine(), "steps": []}
    progress = tqdm(total=total, desc="training steps", unit="step")
    for size, resolution, batch in plan:
        progress.set_postfix(size=size, resolution=resolution, batch=batch)
        models = build_models(size, resolution)
        pixel_values = torch.randn(batch, 3, resolution, resolution)
        labels = torch.randint(0, 10, (batch,))
        step = harness.interleaved_medians(
            lambda model, x=pixel_values, y=labels: harness.training_step(model, x, y),
            models,
            repeats[resolution],
            progress,
            rotate=True,
        )
        memory = {name: harness.peak_activation_bytes(model, pixel_values, labels) for name, model in models.items()}
        results["steps"].append(
            {
                "size": size,
                "resolution": resolution,
                "batch": batch,
                "tokens": (resolution // models["castling_linear"].config.patch_size) ** 2 + 1,
                "step_s": step,
                "peak_activation_bytes": memory,
            }
        )
        del models
    progress.close()
    if args.tile_sweep:  # after the steps, so that they find the process's memory as a user's training run would
        results["tile_sweep"] = tile_sweep(args.tile_sweep_tiles)
    if args.largest:
        results["largest"] = largest_castling_step(args.sizes[0], args.largest)
    return results


def largest_castling_step(size: str, resolution: int) -> dict:
    """One castling-form training step at `resolution`, batch 1: that it runs, its time and its peak memory."""
    model = castling(size, resolution, "castling")
    pixel_values, labels = torch.randn(1, 3, resolution, resolution), torch.randint(0, 10, (1,))
    start = time.perf_counter()
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    seconds = time.perf_counter() - start
    return {
        "size": size,
        "resolution": resolution,
        "batch": 1,
        "step_s": seconds,
        "peak_activation_bytes": harness.peak_activation_bytes(model, pixel_values, labels),
    }


def tile_sweep(tiles: list[int], heads: int = 6, head_dim: int = 64, repeats: int = 5) -> list[dict]:
    """Forward + backward of the masked softmax branch alone for each tile size, beside SDPA on the same q, k, v."""
    default, entries = masked_softmax.SCORE_TILE, []
    for tokens, batch in ((1025, 2), (4097, 1)):
        qkv = torch.randn(batch, tokens, 3, heads, head_dim, requires_grad=True)
        grad = torch.randn(batch, tokens, heads, head_dim)

        def branch(tile, qkv=qkv):
            masked_softmax.SCORE_TILE = tile
            return masked_softmax_attention(*qkv.unbind(2), 1.3)[0]

        def sdpa(qkv=qkv):
            query, key, value = (x.transpose(1, 2) for x in qkv.unbind(2))
            return torch.nn.functional.scaled_dot_product_attention(query, key, value).transpose(1, 2)

        runs = {"sdpa": sdpa, **{str(tile): (lambda tile=tile: branch(tile)) for tile in tiles}}
        with tqdm(total=harness.runs_of(len(runs), repeats), desc=f"tile sweep, {tokens} tokens", unit="run") as bar:
            medians = harness.interleaved_medians(
                lambda forward, qkv=qkv, grad=grad: torch.autograd.grad(forward(), qkv, grad), runs, repeats, bar
            )
        masked_softmax.SCORE_TILE = default
        entries.append({"tokens": tokens, "batch": batch, "heads": heads, "head_dim": head_dim, "seconds": medians})
    return entries


def ratios(entry: dict) -> dict[str, float]:
    step, memory = entry["step_s"], entry["peak_activation_bytes"]
    return {
        "training_over_vit_step": step["castling_training"] / step["vit_sdpa"],
        "linear_over_vit_step": step["castling_linear"] / step["vit_sdpa"],
        "training_over_vit_memory": memory["castling_training"] / memory["vit_sdpa"],
        "linear_over_vit_memory": memory["castling_linear"] / memory["vit_sdpa"],
    }


def markdown_table(results: dict) -> str:
    lines = harness.table_head(
        "| size | res | tokens | batch | ViT-SDPA step (s) | training form (s) | linear form (s) | training / ViT "
        "| linear / ViT | ViT-SDPA peak (MiB) | training form peak (MiB) | linear form peak (MiB) | training / ViT "
        "peak |"
    )
    for entry in results["steps"]:
        step, memory, r = entry["step_s"], entry["peak_activation_bytes"], ratios(entry)
        mib = {name: memory[name] / 2**20 for name in VARIANTS}
        lines.append(
            f"| {entry['size']} | {entry['resolution']} | {entry['tokens']} | {entry['batch']} "
            f"| {step['vit_sdpa']:.3f} | {step['castling_training']:.3f} | {step['castling_linear']:.3f} "
            f"| {r['training_over_vit_step']:.3f} | {r['linear_over_vit_step']:.3f} | {mib['vit_sdpa']:,.0f} "
            f"| {mib['castling_training']:,.0f} | {mib['castling_linear']:,.0f} | {r['training_over_vit_memory']:.3f} |"
        )
    if "largest" in results:
        largest = results["largest"]
        lines += [
            "",
            f"Training form, `{largest['size']}`, {largest['resolution']} px, batch 1: one step (forward + backward) "
            f"in {largest['step_s']:.1f} s, peak activation memory "
            f"{largest['peak_activation_bytes'] / 2**20:,.0f} MiB.",
        ]
    return "\n".join(lines)


# Issue 21's targets: (what, size, resolution, batch, ratio, bound).
TARGETS = [
    ("training form step / ViT-SDPA step ≤ 2.2", "small", 1024, 1, "training_over_vit_step", 2.2),
    ("training form peak memory / ViT-SDPA's ≤ 1.5", "small", 1024, 1, "training_over_vit_memory", 1.5),
    ("training form step / ViT-SDPA step ≤ 1.4", "small", 512, 2, "training_over_vit_step", 1.4),
    ("training form peak memory / ViT-SDPA's ≤ 1.5", "small", 512, 2, "training_over_vit_memory", 1.5),
    ("training form step / ViT-SDPA step ≤ 1.25", "tiny", 224, 8, "training_over_vit_step", 1.25),
    ("training form step / ViT-SDPA step ≤ 1.15", "small", 224, 8, "training_over_vit_step", 1.15),
    ("linear form step / ViT-SDPA step ≤ 0.8", "small", 512, 2, "linear_over_vit_step", 0.8),
    ("linear form step / ViT-SDPA step ≤ 0.45", "small", 1024, 1, "linear_over_vit_step", 0.45),
]


def targets_table(results: dict) -> str:
    lines = harness.table_head("| size | res | batch | target | measured | met |")
    for text, size, resolution, batch, ratio, bound in TARGETS:
        for entry in results["steps"]:
            if (entry["size"], entry["resolution"], entry["batch"]) == (size, resolution, batch):
                measured = ratios(entry)[ratio]
                met = harness.yes_no(measured <= bound)
                lines.append(f"| {size} | {resolution} | {batch} | {text} | {measured:.3f} | {met} |")
    return "\n".join(lines)


def tile_table(results: dict) -> str:
    sweep = results.get("tile_sweep", [])
    if not sweep:
        return ""
    tiles = [name for name in sweep[0]["seconds"] if name != "sdpa"]
    lines = harness.table_head(
        "| tokens | batch | SDPA (ms) | " + " | ".join(f"tile {int(t):,} (ms)" for t in tiles) + " |"
    )
    for entry in sweep:
        seconds = entry["seconds"]
        cells = " | ".join(f"{seconds[t] * 1000:.0f} ({seconds[t] / seconds['sdpa']:.2f}×)" for t in tiles)
        lines.append(f"| {entry['tokens']} | {entry['batch']} | {seconds['sdpa'] * 1000:.0f} | {cells} |")
    return "\n".join(lines)


def plot(results: dict) -> dict:
    """Step time and peak activations of every form, per size."""
    plt = harness.pyplot()
    sizes = list(dict.fromkeys(entry["size"] for entry in results["steps"]))
    figure, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 8), squeeze=False)
    for column, size in enumerate(sizes):
        entries = [entry for entry in results["steps"] if entry["size"] == size]
        labels = [f"{e['resolution']} px\nbatch {e['batch']}" for e in entries]
        for row, (key, unit, scale) in enumerate((("step_s", "step (s)", 1), ("peak_activation_bytes", "MiB", 2**20))):
            axis = axes[row][column]
            width = 0.8 / len(VARIANTS)
            for index, name in enumerate(VARIANTS):
                values = [entry[key][name] / scale for entry in entries]
                positions = [i + (index - 1) * width for i in range(len(entries))]
                axis.bar(positions, values, width=width, label=name)
            axis.set_xticks(range(len(entries)), labels)
            axis.set(yscale="log", ylabel=unit, title=f"{size}: {'training step' if row == 0 else 'peak activations'}")
            axis.grid(True, axis="y", which="both", alpha=0.3)
            axis.legend()
    return {"training.png": figure}


def main(argv=None):
    parser = harness.parser(__doc__, "nano size, 32 and 64 pixels, 1 repeat: a smoke run")
    parser.add_argument("--sizes", nargs="+", default=["small", "tiny"])
    parser.add_argument("--repeats", type=int, default=None, help="Rounds per configuration (default: REPEATS).")
    parser.add_argument("--largest", type=int, default=1536, help="One training-form step at this size (0: none).")
    parser.add_argument("--no_tile_sweep", dest="tile_sweep", action="store_false", help="Skip timing tile sizes.")
    parser.add_argument("--tile_sweep_tiles", nargs="+", type=int, default=[2**19, 2**20, 2**21, 2**22])
    args = parser.parse_args(argv)
    args.command = harness.command_line(__file__, argv)
    args.plan = PLAN
    if args.quick:
        args.sizes, args.plan, args.repeats, args.largest = ["nano"], ((32, 4), (64, 2)), 1, 96
        args.tile_sweep = False

    results = run(args)
    for entry in results["steps"]:
        entry["ratios"] = ratios(entry)
    tables = [markdown_table(results), targets_table(results), tile_table(results)]
    harness.write_results(args.output_dir, "training", results, tables, plot(results))
    return results


if __name__ == "__main__":
    main()
