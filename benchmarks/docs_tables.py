#!/usr/bin/env python
"""Write the benchmark tables of README.md and the manual (docs/) from the benchmark JSON, and the README's headline
figure, so that no number in them is typed by hand.

    python benchmarks/docs_tables.py    # after any benchmark run

Each table sits between `<!-- table: NAME -->` and `<!-- end table: NAME -->` in README.md or a page under docs/;
`tests/test_docs.py` checks that every page holds exactly what this script would write.
"""

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the harness and the benchmarks whose tables it renders
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HEADLINE_FIGURE = RESULTS / "headline.png"
FAMILIES = {"siglip": "SigLIP", "clip": "CLIP", "eomt": "EoMT (mean IoU)"}
FEW_DIFFERENT = "ViT, 600 unlike images, no labels"


def documents() -> list[Path]:
    """README.md and the manual's pages (docs/results is the benchmarks' own output, linked in for the figures)."""
    pages = sorted(path for path in (ROOT / "docs").rglob("*.md") if "results" not in path.relative_to(ROOT).parts[1:2])
    return [ROOT / "README.md", *pages]


def _benchmark(name: str):
    return harness.load_module(ROOT / "benchmarks" / f"{name}.py")


def _json(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def mechanisms_table(study: dict) -> str:
    """Castling in place against the deleted conversion into Castling-ViT (`benchmarks/mechanisms.py` at e4bb627)."""
    rows = harness.table_head(
        "| source | tokens | max abs diff at α = 1 (conversion / in place) | conversion (ms) | in place (ms) "
        "| in place / conversion |"
    )
    for source in study["sources"]:
        difference = source["max_abs_difference_at_alpha_1"]
        for tokens, latency in source["latency_s"].items():
            rows.append(
                f"| {source['source']} | {tokens} | {difference['conversion']:.1e} / {difference['in_place']:.1e} "
                f"| {latency['conversion'] * 1e3:.0f} | {latency['in_place'] * 1e3:.0f} "
                f"| {latency['in_place'] / latency['conversion']:.3f} |"
            )
    return "\n".join(rows)


def sizes_table() -> str:
    from castling_hf import CASTLING_VIT_SIZES

    rows = harness.table_head("| name | hidden | layers | heads | MLP | image | patch |")
    for name, size in CASTLING_VIT_SIZES.items():
        fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size")
        rows.append(f"| `{name}` | " + " | ".join(str(size[field]) for field in (*fields, "patch_size")) + " |")
    return "\n".join(rows)


def headline_rows(speed: dict, mvitv2: dict, distillation: dict, towers: dict) -> dict[str, list]:
    """The front page's numbers: inference time against the softmax model by resolution (batch 1), and every castled
    source's score after the switch against its own (castled − source, in points; mean IoU × 100)."""
    speedups = {}
    for entry in speed["inference"]:
        if entry["batch"] == 1:
            label = f"Castling-ViT-{entry['size'][0].upper()} / ViT-{entry['size'][0].upper()} (SDPA)"
            speedups.setdefault(label, []).append((entry["resolution"], entry["ratios"]["linear_over_vit"]))
    label = "Castling-MViTv2-T / timm MViTv2-T"
    for entry in mvitv2["inference"]:
        latency = entry["latency_s"]
        speedups.setdefault(label, []).append(
            (entry["resolution"], latency["castling_mvitv2_linear"] / latency["timm_mvitv2"])
        )
    scale = {"accuracy": 1.0, "mean_iou": 100.0}
    focus_routes = {"labels": "ViT, with labels", "no_labels": "ViT, no labels", "few_different": FEW_DIFFERENT}
    castled = [
        (focus_routes[entry["route"]], entry)
        for entry in distillation["summary"]
        if entry["task"] == "focus" and entry["route"] in focus_routes
    ]
    castled += [(f"{FAMILIES[e['family']]}, no labels", e) for e in towers["summary"] if e["route"] == "no_labels"]
    differences = [
        (label, (entry["mean"] - entry["source"]) * scale[entry["metric"]], entry["std"] * scale[entry["metric"]])
        for label, entry in castled
    ]
    return {"speed": speedups, "castled": differences}


def headline() -> dict[str, list] | None:
    studies = [_json(name) for name in ("speed.json", "mvitv2.json", "distillation.json", "distillation_towers.json")]
    return headline_rows(*studies) if all(studies) else None


def headline_table(rows: dict) -> str:
    resolutions = sorted({resolution for points in rows["speed"].values() for resolution, _ in points})
    lines = harness.table_head("| inference time, batch 1 | " + " | ".join(f"{r} px" for r in resolutions) + " |")
    for label, points in rows["speed"].items():
        ratio = dict(points)
        lines.append(f"| {label} | " + " | ".join(f"{ratio[r]:.2f}×" if r in ratio else "" for r in resolutions) + " |")
    lines += [
        "",
        *harness.table_head("| castled, after the switch | castled − source (points, mean ± std of 3 seeds) |"),
    ]
    lines += [f"| {label} | {difference:+.1f} ± {std:.1f} |" for label, difference, std in rows["castled"]]
    return "\n".join(lines)


def plot_headline(rows: dict, path: Path = HEADLINE_FIGURE) -> None:
    plt = harness.pyplot()
    figure, (speed_axis, castled_axis) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for label, points in rows["speed"].items():
        speed_axis.plot(*zip(*points, strict=True), marker="o", label=label)
    speed_axis.axhline(1.0, color="grey", linewidth=0.8)
    speed_axis.set(xlabel="image size (px)", ylabel="time / softmax model's", title="Inference time, batch 1, CPU")
    speed_axis.legend(fontsize=8)
    labels, differences, stds = zip(*rows["castled"], strict=True)
    castled_axis.barh(labels, differences, xerr=stds, color="tab:green")
    castled_axis.axvline(0.0, color="grey", linewidth=0.8)
    castled_axis.invert_yaxis()
    castled_axis.set(xlabel="castled − source after the switch (points)", title="Accuracy after castling")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def tables() -> dict[str, str]:
    """Every table of README and the manual, rendered by its benchmark's own functions from the JSON it wrote."""
    rendered = {"sizes": sizes_table()}
    if speed := _json("speed.json"):
        rendered["speed"] = _benchmark("speed").markdown_table(speed)
        rendered["speed-targets"] = _benchmark("speed").targets_table(speed)
    if training := _json("training.json"):
        module = _benchmark("training")
        rendered["training"] = module.markdown_table(training)
        rendered["training-targets"] = module.targets_table(training)
        rendered["training-tiles"] = module.tile_table(training)
    for path in sorted(RESULTS.glob("*/speed.json")):  # further runs, e.g. benchmarks/results/base
        rendered[f"speed-{path.parent.name}"] = _benchmark("speed").markdown_table(json.loads(path.read_text()))
    if accuracy := _json("accuracy.json"):
        module = _benchmark("accuracy")
        rendered["accuracy"] = module.markdown_table(accuracy["summary"])
        rendered["accuracy-targets"] = module.targets_table(accuracy["summary"])
        rendered["accuracy-choices"] = module.choices_table(accuracy["choices"])
    for name in ("detection", "segmentation", "castle"):
        if study := _json(f"{name}.json"):
            rendered[name] = _benchmark(name).markdown_table(study)
    if "families" in (segmentation := _json("segmentation.json") or {}):
        rendered["segmentation-families"] = _benchmark("segmentation").families_table(segmentation)
    if mvitv2 := _json("mvitv2.json"):
        rendered["mvitv2"] = _benchmark("mvitv2").markdown_table(mvitv2)
        rendered["mvitv2-targets"] = _benchmark("mvitv2").targets_table(mvitv2)
    if accuracy_mvitv2 := _json("mvitv2/accuracy.json"):
        rendered["accuracy-mvitv2"] = _benchmark("accuracy").markdown_table(accuracy_mvitv2["summary"])
    if towers := _json("towers.json"):
        rendered["towers"] = _benchmark("towers").markdown_table(towers)
        rendered["towers-targets"] = _benchmark("towers").targets_table(towers)
    if distillation_towers := _json("distillation_towers.json"):
        rendered["distillation-towers"] = _benchmark("distillation_towers").markdown_table(distillation_towers)
    if distillation := _json("distillation.json"):
        rendered["distillation"] = _benchmark("distillation").markdown_table(distillation)
        rendered["distillation-targets"] = _benchmark("distillation").targets_table(distillation)
    if mechanisms := _json("mechanisms.json"):
        rendered["mechanisms"] = mechanisms_table(mechanisms)
    if rows := headline():
        rendered["headline"] = headline_table(rows)
    return rendered


# A table's markers stand on lines of their own (a page may quote them in its prose).
MARKER = re.compile(r"^<!-- table: ([\w-]+) -->$", re.M)


def block(name: str) -> re.Pattern:
    return re.compile(rf"^(<!-- table: {name} -->\n)(.*?)(\n<!-- end table: {name} -->)$", re.S | re.M)


def marked_table(text: str, name: str) -> str | None:
    """The table now between the markers `name` in a page's `text`, or None if the markers are missing."""
    found = block(name).search(text)
    return found.group(2) if found else None


def placed_tables() -> dict[str, list[tuple[Path, str]]]:
    """Where each marked table sits now: name -> [(page, the table's text there)]."""
    placed = {}
    for page in documents():
        text = page.read_text()
        for name in MARKER.findall(text):
            if (table := marked_table(text, name)) is None:
                raise SystemExit(f"{page}: the table block {name} has no end marker or no line between its markers.")
            placed.setdefault(name, []).append((page, table))
    return placed


def update() -> list[str]:
    rendered = tables()
    placed = placed_tables()
    if missing := sorted(set(rendered) - set(placed)):
        raise SystemExit(f"no page has a <!-- table: NAME --> ... <!-- end table: NAME --> block for {missing}.")
    if unknown := sorted(set(placed) - set(rendered)):
        raise SystemExit(f"pages hold table blocks no benchmark JSON renders: {unknown}.")
    for page in {page for places in placed.values() for page, _ in places}:
        text = page.read_text()
        for name in MARKER.findall(text):
            text = block(name).sub(lambda match, table=rendered[name]: match.group(1) + table + match.group(3), text)
        page.write_text(text)
    if rows := headline():
        plot_headline(rows)
    return sorted(rendered)


if __name__ == "__main__":
    print(f"updated tables: {', '.join(update())}")
