#!/usr/bin/env python
"""Inference speed of Castling-ViT against `transformers`' ViT and the attention-free floor, side by side.

For each size and resolution, three networks of the same dimensions run interleaved (A B C, A B C, ...) on the
CPU in fp32, and each one's latency is the median of its repeats, so that drifts of a noisy machine hit all three:

- `castling_linear`:   Castling-ViT in the inference form (`attention_mode="linear"`);
- `vit_sdpa`:          `transformers`' `ViTForImageClassification` with SDPA attention;
- `floor`:             the Castling-ViT network with its whole attention (linear-angular attention and residual
                       conv) replaced by identity on V: the q/k/v and output projections still run, so this is the
                       least that any attention could cost.

MACs are counted with `torch.utils.flop_counter` (FLOPs / 2; ViT with its eager attention, since the counter does
not see the CPU SDPA kernel); peak memory is the largest total size of the tensors alive during one forward pass.
What the training form costs is `benchmarks/training.py`'s study.

    python benchmarks/speed.py                      # the full study (make bench)
    python benchmarks/speed.py --quick              # a smoke run: nano size, two small resolutions
"""

import sys
import types
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification

from castling_hf import CastlingViTConfig, CastlingViTForImageClassification
from castling_hf.models.castling_vit.modeling_castling_vit import CastlingViTAttention

sys.path.insert(0, str(Path(__file__).parent))  # the harness
import harness  # noqa: E402

VARIANTS = ("castling_linear", "vit_sdpa", "floor")


def identity_attention_forward(self, hidden_states, num_prefix_tokens, grid_size, rotary=None):
    """The floor's attention: project q, k, v as Castling-ViT does, return o_proj(v)."""
    batch, tokens, hidden_size = hidden_states.shape
    value = self.qkv_proj(hidden_states).view(batch, tokens, 3, hidden_size)[:, :, 2]
    return self.o_proj(value)


def vit_for(castling: CastlingViTConfig, attention: str) -> ViTForImageClassification:
    """`transformers`' ViT with Castling-ViT's dimensions."""
    config = ViTConfig(
        hidden_size=castling.hidden_size,
        num_hidden_layers=castling.num_hidden_layers,
        num_attention_heads=castling.num_attention_heads,
        intermediate_size=castling.intermediate_size,
        image_size=castling.image_size,
        patch_size=castling.patch_size,
        num_labels=castling.num_labels,
        attn_implementation=attention,
    )
    return ViTForImageClassification(config)


def build_models(size: str, resolution: int, num_labels: int = 1000) -> dict[str, torch.nn.Module]:
    def castling():
        config = CastlingViTConfig.from_size(
            size, image_size=resolution, num_labels=num_labels, attention_mode="linear"
        )
        return CastlingViTForImageClassification(config)

    floor = castling()
    for module in floor.modules():
        if isinstance(module, CastlingViTAttention):
            module.forward = types.MethodType(identity_attention_forward, module)
    models = {"castling_linear": castling(), "vit_sdpa": vit_for(floor.config, "sdpa"), "floor": floor}
    return {name: model.eval() for name, model in models.items()}


def run(args) -> dict:
    torch.manual_seed(0)
    plan = [
        (size, resolution, batch)
        for size in args.sizes
        for resolution in args.resolutions
        for batch in args.batch_sizes
    ]
    results = {"command": args.command, "machine": harness.machine(), "inference": []}
    progress = tqdm(total=len(plan) * harness.runs_of(len(VARIANTS), args.repeats), desc="benchmark", unit="run")
    for size in args.sizes:
        for resolution in args.resolutions:
            models = build_models(size, resolution)
            config = models["castling_linear"].config
            eager_vit = vit_for(config, "eager").eval()  # FlopCounterMode does not see the CPU SDPA kernel
            one_image = torch.randn(1, 3, resolution, resolution)
            macs = {
                name: harness.macs(eager_vit if name == "vit_sdpa" else model, one_image)
                for name, model in models.items()
            }
            for batch in args.batch_sizes:
                progress.set_postfix(size=size, resolution=resolution, batch=batch)
                pixel_values = torch.randn(batch, 3, resolution, resolution)
                latency = harness.inference_medians(models, pixel_values, args.repeats, progress)
                memory = {name: harness.peak_memory_bytes(model, pixel_values) for name, model in models.items()}
                results["inference"].append(
                    {
                        "size": size,
                        "resolution": resolution,
                        "tokens": (resolution // config.patch_size) ** 2 + 1,
                        "batch": batch,
                        "latency_s": latency,
                        "macs_per_image": macs,
                        "peak_memory_bytes": memory,
                    }
                )
            del models, eager_vit
    progress.close()
    return results


def ratios(entry: dict) -> dict[str, float]:
    latency, macs = entry["latency_s"], entry["macs_per_image"]
    out = {
        "linear_over_floor": latency["castling_linear"] / latency["floor"],
        "linear_over_vit": latency["castling_linear"] / latency["vit_sdpa"],
        "vit_over_floor": latency["vit_sdpa"] / latency["floor"],
        "linear_macs_over_vit": macs["castling_linear"] / macs["vit_sdpa"],
    }
    return out


def plot(results: dict) -> dict:
    """Latency against tokens for every size and batch, and MACs against tokens for every size."""
    plt = harness.pyplot()
    figures = {}
    entries = results["inference"]
    sizes = sorted({e["size"] for e in entries}, key=[e["size"] for e in entries].index)
    batches = sorted({e["batch"] for e in entries})
    figure, axes = plt.subplots(len(sizes), len(batches), figsize=(6 * len(batches), 4.5 * len(sizes)), squeeze=False)
    for row, size in enumerate(sizes):
        for column, batch in enumerate(batches):
            axis = axes[row][column]
            selected = [e for e in entries if e["size"] == size and e["batch"] == batch]
            latency = {
                name: {e["tokens"]: e["latency_s"][name] * 1000 for e in selected if name in e["latency_s"]}
                for name in VARIANTS
            }
            harness.plot_against_tokens(axis, latency, "latency (ms)", f"{size}, batch {batch}")
    figures["speed_latency.png"] = figure
    figure, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for column, size in enumerate(sizes):
        axis = axes[0][column]
        selected = [e for e in entries if e["size"] == size and e["batch"] == batches[0]]
        macs = {name: {e["tokens"]: e["macs_per_image"][name] / 1e9 for e in selected} for name in VARIANTS}
        harness.plot_against_tokens(axis, macs, "GMACs per image", f"{size}: MACs")
    figures["speed_macs.png"] = figure
    return figures


def markdown_table(results: dict) -> str:
    lines = harness.table_head(
        "| size | res | tokens | batch | linear (ms) | ViT-SDPA (ms) | floor (ms) "
        "| linear / floor | linear / ViT | ViT / floor | MACs linear / ViT |"
    )
    for entry in results["inference"]:
        latency, r = entry["latency_s"], ratios(entry)
        lines.append(
            f"| {entry['size']} | {entry['resolution']} | {entry['tokens']} | {entry['batch']} "
            f"| {latency['castling_linear'] * 1000:.1f} | {latency['vit_sdpa'] * 1000:.1f} "
            f"| {latency['floor'] * 1000:.1f} | {r['linear_over_floor']:.3f} | {r['linear_over_vit']:.3f} "
            f"| {r['vit_over_floor']:.3f} | {r['linear_macs_over_vit']:.3f} |"
        )
    return "\n".join(lines)


# Issue 16's targets: (what, the entries it reads, the ratio, the bound, whether the bound is strict).
TARGETS = [
    ("linear / floor ≤ 1.06, every resolution, batch 1 and 8", lambda e: True, "linear_over_floor", 1.06, False),
    ("linear / ViT-SDPA < 1.0 at 224, batch 1 and 8", lambda e: e["resolution"] == 224, "linear_over_vit", 1.0, True),
    (
        "linear / ViT-SDPA ≤ 0.70 at 512, batch 1",
        lambda e: (e["resolution"], e["batch"]) == (512, 1),
        "linear_over_vit",
        0.70,
        False,
    ),
    (
        "linear / ViT-SDPA ≤ 0.40 at 1024, batch 1",
        lambda e: (e["resolution"], e["batch"]) == (1024, 1),
        "linear_over_vit",
        0.40,
        False,
    ),
]


def targets_table(results: dict) -> str:
    """Each target against the worst ratio measured for it, per size."""
    lines = harness.table_head("| size | target | worst measured | met |")
    sizes = list(dict.fromkeys(entry["size"] for entry in results["inference"]))
    for size in sizes:
        for text, selects, ratio, bound, strict in TARGETS:
            measured = [ratios(e)[ratio] for e in results["inference"] if e["size"] == size and selects(e)]
            if not measured:
                continue
            worst = max(measured)
            met = worst < bound if strict else worst <= bound
            lines.append(f"| {size} | {text} | {worst:.3f} | {harness.yes_no(met)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = harness.parser(__doc__, "nano size, 32 and 64 pixels, 2 repeats: a smoke run")
    parser.add_argument("--sizes", nargs="+", default=["small", "tiny"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[224, 384, 512, 768, 1024])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    args.command = harness.command_line(__file__, argv)
    if args.quick:
        args.sizes, args.resolutions, args.repeats = ["nano"], [32, 64], 2

    results = run(args)
    for entry in results["inference"]:
        entry["ratios"] = ratios(entry)
    tables = [markdown_table(results), targets_table(results)]
    harness.write_results(args.output_dir, "speed", results, tables, plot(results))
    return results


if __name__ == "__main__":
    main()
