#!/usr/bin/env python
"""Write the benchmark tables into README.md from the benchmark JSON, so that no number in them is typed by hand.

    python benchmarks/readme_tables.py    # after make bench, bench-accuracy, bench-detection, bench-segmentation,
                                          # bench-castle, bench-distill, bench-towers

Each table sits between `<!-- table: NAME -->` and `<!-- end table: NAME -->`; `tests/test_benchmarks.py` checks that
README.md holds exactly what this script would write.
"""

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tables() -> dict[str, str]:
    """Every README table, rendered by its benchmark's own `markdown_table` from the JSON that benchmark wrote."""
    rendered = {}
    if (RESULTS / "speed.json").exists():
        speed = json.loads((RESULTS / "speed.json").read_text())
        rendered["speed"] = _benchmark("speed").markdown_table(speed)
        rendered["speed-targets"] = _benchmark("speed").targets_table(speed)
    if (RESULTS / "training.json").exists():
        training, study = _benchmark("training"), json.loads((RESULTS / "training.json").read_text())
        rendered["training"] = training.markdown_table(study)
        rendered["training-targets"] = training.targets_table(study)
        rendered["training-tiles"] = training.tile_table(study)
    for path in sorted(RESULTS.glob("*/speed.json")):  # further runs, e.g. benchmarks/results/base
        rendered[f"speed-{path.parent.name}"] = _benchmark("speed").markdown_table(json.loads(path.read_text()))
    if (RESULTS / "accuracy.json").exists():
        study, accuracy = json.loads((RESULTS / "accuracy.json").read_text()), _benchmark("accuracy")
        rendered["accuracy"] = accuracy.markdown_table(study["summary"])
        rendered["accuracy-targets"] = accuracy.targets_table(study["summary"])
        rendered["accuracy-choices"] = accuracy.choices_table(study["choices"])
    for name in ("detection", "segmentation", "castle"):
        if (RESULTS / f"{name}.json").exists():
            rendered[name] = _benchmark(name).markdown_table(json.loads((RESULTS / f"{name}.json").read_text()))
    segmentation = (
        json.loads((RESULTS / "segmentation.json").read_text()) if (RESULTS / "segmentation.json").exists() else {}
    )
    if "families" in segmentation:
        rendered["segmentation-families"] = _benchmark("segmentation").families_table(segmentation)
    if (RESULTS / "mvitv2.json").exists():
        mvitv2, study = _benchmark("mvitv2"), json.loads((RESULTS / "mvitv2.json").read_text())
        rendered["mvitv2"] = mvitv2.markdown_table(study)
        rendered["mvitv2-targets"] = mvitv2.targets_table(study)
    if (RESULTS / "mvitv2" / "accuracy.json").exists():
        study = json.loads((RESULTS / "mvitv2" / "accuracy.json").read_text())
        rendered["accuracy-mvitv2"] = _benchmark("accuracy").markdown_table(study["summary"])
    if (RESULTS / "towers.json").exists():
        towers, study = _benchmark("towers"), json.loads((RESULTS / "towers.json").read_text())
        rendered["towers"] = towers.markdown_table(study)
        rendered["towers-targets"] = towers.targets_table(study)
    if (RESULTS / "distillation_towers.json").exists():
        study = json.loads((RESULTS / "distillation_towers.json").read_text())
        rendered["distillation-towers"] = _benchmark("distillation_towers").markdown_table(study)
    if (RESULTS / "distillation.json").exists():
        distillation, study = _benchmark("distillation"), json.loads((RESULTS / "distillation.json").read_text())
        rendered["distillation"] = distillation.markdown_table(study)
        rendered["distillation-targets"] = distillation.targets_table(study)
    return rendered


def block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- table: {name} -->\n)(.*?)(\n<!-- end table: {name} -->)", re.S)


def readme_table(readme: str, name: str) -> str | None:
    """The table now between the markers `name` in `readme`, or None if the markers are missing."""
    found = block(name).search(readme)
    return found.group(2) if found else None


def update(readme_path: Path = ROOT / "README.md") -> list[str]:
    readme = readme_path.read_text()
    updated = []
    for name, table in tables().items():
        if readme_table(readme, name) is None:
            raise SystemExit(f"README.md has no <!-- table: {name} --> ... <!-- end table: {name} --> block.")
        readme = block(name).sub(lambda match, table=table: match.group(1) + table + match.group(3), readme)
        updated.append(name)
    readme_path.write_text(readme)
    return updated


if __name__ == "__main__":
    print(f"updated README.md tables: {', '.join(update())}")
