#!/usr/bin/env python
"""The two ways to castle a source, measured on the sources castled by conversion (issue 32, Build 1):

- `conversion`: `castle` converts ViT / Dinov2 / DINOv3 into the project's Castling-ViT family (conversion.py's tables);
- `in_place`:   `castle_in_place` keeps the source's own classes and gives its attention modules the Castling terms,
                selected through `transformers`' attention interface (in_place.py's `TOWERS` table).

For each: the largest difference from the source at α = 1 at two resolutions (the exact start), and the latency of
the inference form, both forms of the same source interleaved in one process (median of the repeats, batch 1, fp32).

    python benchmarks/mechanisms.py            # base widths (768, 12 heads), 2 layers, 1,024 and 4,096 tokens
    python benchmarks/mechanisms.py --quick    # a smoke run
"""

import argparse
import functools
import json
import platform
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Dinov2Config, Dinov2Model, DINOv3ViTConfig, DINOv3ViTModel, ViTConfig, ViTModel

import castling_hf
from castling_hf.conversion import castling_options
from castling_hf.distillation import run_model
from castling_hf.in_place import castle_in_place
from castling_hf.modeling_utils import with_castling_methods

sys.path.insert(0, str(Path(__file__).parent))
from speed import time_interleaved  # noqa: E402

SOURCES = {
    "vit": (ViTModel, ViTConfig, {}),
    "dinov2": (Dinov2Model, Dinov2Config, {"layerscale_value": 0.5}),
    "dinov3": (DINOv3ViTModel, DINOv3ViTConfig, {"num_register_tokens": 4}),
}


def source_model(name: str, width: int, heads: int, layers: int, image_size: int):
    model_class, config_class, extra = SOURCES[name]
    config = config_class(
        hidden_size=width,
        intermediate_size=4 * width,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        image_size=image_size,
        patch_size=16,
        **extra,
    )
    torch.manual_seed(0)
    return model_class._from_config(config, attn_implementation="sdpa").eval()


def castled_both_ways(source) -> dict:
    return {
        "conversion": castling_hf.castle(source),
        "in_place": with_castling_methods(castle_in_place(source, castling_options({}))),
    }


def last_hidden_state(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return run_model(model, pixel_values).last_hidden_state


def exact_start(source, castled: dict, image_size: int) -> dict:
    """The largest |castled − source| of the final hidden states at α = 1, at the source's size and 1.5× it."""
    differences = {}
    for name, model in castled.items():
        worst = 0.0
        for side in (image_size, image_size * 3 // 2):
            pixel_values = torch.randn(2, 3, side, side)
            difference = last_hidden_state(model, pixel_values) - last_hidden_state(source, pixel_values)
            worst = max(worst, difference.abs().max().item())
        differences[name] = worst
    return differences


def inference_forms(castled: dict) -> dict:
    for model in castled.values():
        model.set_softmax_mask_scale(0.0)
        model.switch_to_inference()
    return castled


def run(args) -> dict:
    results = {
        "command": "python benchmarks/mechanisms.py " + " ".join(args.argv),
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "width": args.width,
        "layers": args.layers,
        "sources": [],
    }
    progress = tqdm(total=len(SOURCES) * len(args.grids) * 2 * args.repeats, desc="mechanisms", unit="run")
    for name in SOURCES:
        source = source_model(name, args.width, args.heads, args.layers, 16 * args.grids[0])
        castled = castled_both_ways(source)
        entry = {"source": name, "max_abs_difference_at_alpha_1": exact_start(source, castled, 16 * args.grids[0])}
        inference_forms(castled)
        entry["latency_s"] = {}
        for grid in args.grids:
            progress.set_postfix(source=name, tokens=grid * grid)
            pixel_values = torch.randn(1, 3, 16 * grid, 16 * grid)
            # At a size other than its own, a ViT resizes its position table only when asked.
            resizing = {key: functools.partial(run_model, model) for key, model in castled.items()}
            latency = time_interleaved(resizing, pixel_values, args.repeats, progress)
            entry["latency_s"][str(grid * grid)] = latency
        results["sources"].append(entry)
    progress.close()
    return results


def markdown_table(results: dict) -> str:
    lines = [
        "| source | tokens | max abs diff at α = 1 (conversion / in place) | conversion (ms) | in place (ms) "
        "| in place / conversion |",
        "|---|---|---|---|---|---|",
    ]
    for entry in results["sources"]:
        start = entry["max_abs_difference_at_alpha_1"]
        for tokens, latency in entry["latency_s"].items():
            lines.append(
                f"| {entry['source']} | {tokens} | {start['conversion']:.1e} / {start['in_place']:.1e} "
                f"| {latency['conversion'] * 1000:.0f} | {latency['in_place'] * 1000:.0f} "
                f"| {latency['in_place'] / latency['conversion']:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--grids", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="64 wide, 4 heads, small grids, 2 repeats")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.width, args.heads, args.grids, args.repeats = 64, 4, [4, 8], 2
    results = run(args)
    directory = Path(args.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mechanisms.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
