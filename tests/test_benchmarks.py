"""The benchmark results shown in README.md are the ones the benchmarks wrote."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parents[1]


def load_readme_tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_are_rendered_from_the_benchmark_json():
    readme_tables = load_readme_tables()
    tables = readme_tables.tables()
    assert set(tables) == {"speed", "speed-base", "accuracy", "accuracy-targets", "accuracy-choices"}
    readme = (ROOT / "README.md").read_text()
    for name, table in tables.items():
        assert readme_tables.readme_table(readme, name) == table, f"README's {name} table is stale or edited by hand"
