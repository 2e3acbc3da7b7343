"""README.md and the manual (docs/): the tables are the benchmarks' JSON rendered, the site builds strictly, and every
code snippet runs as written."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import offline_hub
import pytest

ROOT = Path(__file__).parents[1]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SHELL = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
COMMAND = re.compile(r"^(?:python|accelerate launch.*?)\s+(examples/[\w./-]+\.py)(.*)$")


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def docs_tables():
    return load_module(ROOT / "benchmarks" / "docs_tables.py")


def documents() -> list[Path]:
    return docs_tables().documents()


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_table_is_rendered_from_the_benchmark_json():
    module = docs_tables()
    rendered, placed = module.tables(), module.placed_tables()
    assert set(placed) == set(rendered), "a table block without its JSON, or a JSON table no page shows"
    for name, places in placed.items():
        for page, table in places:
            assert table == rendered[name], f"{page.relative_to(ROOT)}'s {name} table is stale or edited by hand"


def test_the_manual_builds_strictly(tmp_path):
    # --strict turns every warning into a failure: a broken link or anchor, a page missing from the navigation, an
    # API reference to a name that does not exist.
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    built = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=quiet_mkdocs(), timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "castling" / "index.html").read_text().count("castle") > 10


def quiet_mkdocs() -> dict:
    """This environment, without Material's notice about MkDocs 2 on every build."""
    return dict(os.environ, NO_MKDOCS_2_WARNING="1")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, script, arguments) for every example command line in the documents' shell blocks."""
    commands = []
    for page in documents():
        for block in SHELL.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                if found := COMMAND.search(line.split(" # ")[0]):
                    commands.append((str(page.relative_to(ROOT)), found.group(1), shlex.split(found.group(2))))
    return commands


@pytest.mark.parametrize(("page", "script", "arguments"), documented_commands())
def test_every_documented_command_line_parses_with_its_script(page, script, arguments, monkeypatch):
    # What the examples accept changes with them: a command line in the manual that names an option they no longer
    # have fails here, without running the hour-long recipe it starts.
    assert (ROOT / script).is_file(), f"{page} runs {script}, which does not exist"
    monkeypatch.syspath_prepend(str((ROOT / script).parent))  # as when it runs: its folder's modules import
    module = load_module(ROOT / script)
    if hasattr(module, "argument_parser"):  # the Trainer examples: HfArgumentParser refuses unknown options
        module.argument_parser().parse_args_into_dataclasses(args=arguments)
    else:
        module.parse_args(arguments)


RUNNER = """
import json, sys
from pathlib import Path

blocks = json.loads(Path(sys.argv[1]).read_text())
if any("timm" in block for block in blocks):  # timm where torchvision does not import, as the tests import it
    sys.path.insert(0, sys.argv[2])
    from timm_without_torchvision import import_timm, let_transformers_use_timm

    import_timm(), let_transformers_use_timm()
namespace = {"__name__": "__main__"}
for number, block in enumerate(blocks, 1):
    print(f"--- snippet {number}", flush=True)
    exec(compile(block, f"snippet {number}", "exec"), namespace)
"""


def pages_with_snippets() -> list[str]:
    return [str(page.relative_to(ROOT)) for page in documents() if SNIPPET.search(page.read_text())]


def prepared_folder(work: Path, hub_cache: Path, timm) -> None:
    """What the snippets read besides the Hub: a photo, and the inference checkpoints the task pages' examples
    write (`outputs/shapes/inference`, `outputs/segmentation/inference`), here of untrained nano models."""
    from PIL import Image
    from skimage import data as photos

    Image.fromarray(photos.chelsea()).save(work / "photo.jpg")
    offline_hub.fill(hub_cache, timm=timm)
    task_checkpoints(work / "outputs")


def task_checkpoints(outputs: Path) -> None:
    from transformers import (
        DeformableDetrImageProcessorPil,
        SegformerImageProcessorPil,
        UperNetConfig,
        UperNetForSemanticSegmentation,
    )

    import castling_hf
    from castling_hf import CastlingViTConfig, CastlingViTForObjectDetection

    shapes = {0: "circle", 1: "square", 2: "triangle"}
    detector = CastlingViTForObjectDetection(CastlingViTConfig.from_size("nano", id2label=shapes, image_size=64))
    detector.set_softmax_mask_scale(0.0)
    detector.save_pretrained(outputs / "shapes" / "inference", inference=True)
    DeformableDetrImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(outputs / "shapes" / "inference")
    backbone = CastlingViTConfig.from_size("nano", out_indices=[1, 2, 3, 4], image_size=64)
    segmenter = UperNetForSemanticSegmentation(
        UperNetConfig(
            backbone_config=backbone, num_labels=4, id2label={0: "background", **{k + 1: v for k, v in shapes.items()}}
        )
    )
    castling_hf.set_softmax_mask_scale(segmenter, 0.0)
    castling_hf.switch_to_inference(segmenter)
    segmenter.save_pretrained(outputs / "segmentation" / "inference")
    SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(outputs / "segmentation" / "inference")


@pytest.mark.parametrize("page", pages_with_snippets())
def test_the_snippets_run_as_written(page, tmp_path):
    # Each page's snippets run in order in one namespace (a later one may use what an earlier one made), in a fresh
    # process that has only the Hub cache above: offline, as a reader's first run would be without the network.
    from conftest import timm_helper

    blocks = SNIPPET.findall((ROOT / page).read_text())
    timm = timm_helper().import_timm() if any("timm" in block for block in blocks) else None
    work = tmp_path / "work"
    work.mkdir()
    prepared_folder(work, tmp_path / "hub", timm)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), TRANSFORMERS_VERBOSITY="error")
    command = [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json"), str(ROOT / "benchmarks")]
    ran = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert ran.returncode == 0, f"{page}:\n{ran.stdout[-2000:]}\n{ran.stderr[-4000:]}"
