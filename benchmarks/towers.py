#!/usr/bin/env python
"""Inference speed of vision towers castled in place, at the widths and token counts they are run at (issue 32).

For each tower and token count, three networks of the same dimensions run interleaved (A B C, A B C, ...) in one
process on the CPU in fp32, batch 1, and each one's latency is the median of its repeats:

- `castled`:  the source castled in place (`castling_hf.castle`), switched to the inference form;
- `sdpa`:     the source itself, with `transformers`' SDPA attention;
- `floor`:    the source with its attention function replaced by identity on V, through the same attention
              interface: every projection, norm and MLP still runs, so this is the least any attention could cost.

Towers, with few layers so that they fit the machine (every layer is the same, so the ratios do not depend on depth):
- `siglip_so400m`: `SiglipVisionModel` at SigLIP so400m's widths (1,152 wide, MLP 4,304, 16 heads, patch 14), at
  256 to 4,096 tokens (224 to 896 px);
- `eomt_large`: EoMT-L's encoder widths (1,024 wide, MLP 4,096, 16 heads, patch 16) as a `Dinov2Model`, the network
  EoMT runs its patches through, at 1,024 to 6,400 tokens (512 to 1,280 px).

    python benchmarks/towers.py            # the study (make bench-towers)
    python benchmarks/towers.py --quick    # a smoke run: narrow towers, small images
"""

import copy
import itertools
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

import castling_hf

sys.path.insert(0, str(Path(__file__).parent))  # the harness
import harness  # noqa: E402

VARIANTS = ("castled", "sdpa", "floor")


def identity_on_values(module, query, key, value, attention_mask, **kwargs):
    """The floor's attention: each token's own value, `(batch, tokens, heads, head_dim)` as the interface returns."""
    return value.transpose(1, 2), None


AttentionInterface.register("identity_on_values", identity_on_values)

# (model class, config, patch side, grid sides): each tower's widths, and the grids it is timed at.
TOWERS = {
    "siglip_so400m": (
        SiglipVisionModel,
        dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=14, vision_use_head=False),
        [16, 27, 32, 48, 64],
    ),
    "eomt_large": (
        Dinov2Model,
        dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, patch_size=16),
        [32, 40, 60, 80],
    ),
}
QUICK = {"siglip_so400m": [4, 8], "eomt_large": [4, 8]}


def tower_config(name: str, grid: int, layers: int, quick: bool):
    model_class, fields, _ = TOWERS[name]
    fields = dict(fields, num_hidden_layers=layers, image_size=grid * fields["patch_size"])
    if quick:
        fields.update(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    config_class = SiglipVisionConfig if model_class is SiglipVisionModel else Dinov2Config
    return model_class, config_class(**fields)


def build(name: str, grid: int, layers: int, quick: bool) -> tuple[dict[str, torch.nn.Module], torch.Tensor]:
    model_class, config = tower_config(name, grid, layers, quick)
    torch.manual_seed(0)
    # Each network its own config: a model keeps the config object it is given, and the floor changes its own.
    source = model_class._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    castled = castling_hf.castle(source)
    castled.set_softmax_mask_scale(0.0)
    castled.switch_to_inference()
    floor = model_class._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    assert source.config._attn_implementation == "sdpa"
    floor.config._attn_implementation_internal = "identity_on_values"
    side = grid * config.patch_size
    return {"castled": castled, "sdpa": source, "floor": floor}, torch.randn(1, 3, side, side)


def run(args) -> dict:
    plan = [
        (name, grid)
        for name in args.towers
        for grid in (QUICK if args.quick else {n: t[2] for n, t in TOWERS.items()})[name]
    ]
    results = {"command": args.command, "machine": harness.machine(), "layers": args.layers, "inference": []}
    progress = tqdm(total=len(plan) * harness.runs_of(len(VARIANTS), args.repeats), desc="towers", unit="run")
    for name, grid in plan:
        progress.set_postfix(tower=name, tokens=grid * grid)
        models, pixel_values = build(name, grid, args.layers, args.quick)
        latency = harness.inference_medians(models, pixel_values, args.repeats, progress)
        results["inference"].append({"tower": name, "grid": grid, "tokens": grid * grid, "latency_s": latency})
    progress.close()
    return results


def ratios(entry: dict) -> dict[str, float]:
    latency = entry["latency_s"]
    return {
        "castled_over_floor": latency["castled"] / latency["floor"],
        "castled_over_sdpa": latency["castled"] / latency["sdpa"],
    }


def crossing(entries: list[dict]) -> str:
    """The token count between the last where the castled tower is slower than SDPA and the first where it is
    faster, read from the measured points (no fit)."""
    ordered = sorted(entries, key=lambda e: e["tokens"])
    for before, after in itertools.pairwise(ordered):
        if ratios(before)["castled_over_sdpa"] >= 1.0 > ratios(after)["castled_over_sdpa"]:
            return f"between {before['tokens']} and {after['tokens']} tokens"
    if ratios(ordered[0])["castled_over_sdpa"] < 1.0:
        return f"below {ordered[0]['tokens']} tokens (faster at every count measured)"
    return "not within the counts measured"


# Issue 32's targets: (what, the tower, which entries, the ratio, the bound).
TARGETS = [
    (
        "castled / floor ≤ 1.15 at ≥ 1,024 tokens",
        "siglip_so400m",
        lambda e: e["tokens"] >= 1024,
        "castled_over_floor",
        1.15,
    ),
    (
        "castled / SDPA ≤ 0.71 at 4,096 tokens",
        "siglip_so400m",
        lambda e: e["tokens"] == 4096,
        "castled_over_sdpa",
        0.71,
    ),
    (
        "castled / floor ≤ 1.15 at ≥ 1,024 tokens",
        "eomt_large",
        lambda e: e["tokens"] >= 1024,
        "castled_over_floor",
        1.15,
    ),
    ("castled / SDPA ≤ 0.57 at 6,400 tokens", "eomt_large", lambda e: e["tokens"] == 6400, "castled_over_sdpa", 0.57),
]


def markdown_table(results: dict) -> str:
    lines = harness.table_head(
        "| tower | tokens | castled (ms) | SDPA (ms) | floor (ms) | castled / floor | castled / SDPA |"
    )
    for entry in results["inference"]:
        latency, r = entry["latency_s"], ratios(entry)
        lines.append(
            f"| {entry['tower']} | {entry['tokens']} | {latency['castled'] * 1000:.0f} | {latency['sdpa'] * 1000:.0f} "
            f"| {latency['floor'] * 1000:.0f} | {r['castled_over_floor']:.3f} | {r['castled_over_sdpa']:.3f} |"
        )
    return "\n".join(lines)


def targets_table(results: dict) -> str:
    lines = harness.table_head("| tower | target | worst measured | met |")
    for text, tower, selects, ratio, bound in TARGETS:
        measured = [ratios(e)[ratio] for e in results["inference"] if e["tower"] == tower and selects(e)]
        if measured:
            worst = max(measured)
            lines.append(f"| {tower} | {text} | {worst:.3f} | {harness.yes_no(worst <= bound)} |")
    for tower in dict.fromkeys(e["tower"] for e in results["inference"]):
        where = crossing([e for e in results["inference"] if e["tower"] == tower])
        lines.append(f"| {tower} | castled / SDPA crosses 1.0 | {where} | |")
    return "\n".join(lines)


def plot(results: dict) -> dict:
    """Latency against tokens, one panel a tower."""
    plt = harness.pyplot()
    towers = list(dict.fromkeys(e["tower"] for e in results["inference"]))
    figure, axes = plt.subplots(1, len(towers), figsize=(6 * len(towers), 4.5), squeeze=False)
    for axis, tower in zip(axes[0], towers, strict=True):
        selected = [e for e in results["inference"] if e["tower"] == tower]
        curves = {name: {e["tokens"]: e["latency_s"][name] * 1000 for e in selected} for name in VARIANTS}
        harness.plot_against_tokens(axis, curves, "latency (ms), batch 1", f"{tower}, {results['layers']} layers")
    return {"towers_latency.png": figure}


def main(argv=None):
    parser = harness.parser(__doc__, "narrow towers on small grids, 2 repeats: a smoke run")
    parser.add_argument("--towers", nargs="+", default=list(TOWERS), choices=list(TOWERS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    args.command = harness.command_line(__file__, argv)
    if args.quick:
        args.repeats = 2
    results = run(args)
    tables = [markdown_table(results), targets_table(results)]
    harness.write_results(args.output_dir, "towers", results, tables, plot(results))
    return results


if __name__ == "__main__":
    main()
