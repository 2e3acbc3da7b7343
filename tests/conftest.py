import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from castling_hf import CastlingViTConfig


@pytest.fixture
def make_config():
    """A `nano` config (32×32 images, 4×4 patches, 64 wide, 4 heads) with overrides; seeds torch for repeatability."""

    def make(**overrides) -> CastlingViTConfig:
        torch.manual_seed(0)
        return CastlingViTConfig.from_size("nano", **{"num_hidden_layers": 2, "num_labels": 3, **overrides})

    return make


# Prepended to a script run by `run_without_castling_hf`: after it, any `import castling_hf` raises ImportError.
BLOCK_CASTLING_HF = """
import sys
sys.modules["castling_hf"] = None
try:
    import castling_hf  # noqa: F401
    raise SystemExit("castling_hf is importable; the test would prove nothing")
except ImportError:
    pass
"""


def run_without_castling_hf(script: str, args: list[str], work_dir) -> str:
    """Run `script` in a new Python where `castling_hf` cannot be imported, offline, with this process's thread count
    (so that equal results mean bit-equal); returns its last line of output."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(work_dir / "modules"),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    finished = subprocess.run(
        [sys.executable, "-c", BLOCK_CASTLING_HF + script, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=work_dir,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr[-3000:]
    return finished.stdout.strip().splitlines()[-1]


def timm_helper():
    """benchmarks/timm_without_torchvision.py as a module: `import_timm()` gives timm where torchvision does not
    import beside this machine's PyTorch, `let_transformers_use_timm()` lets transformers' TimmWrapper use it."""
    path = Path(__file__).parents[1] / "benchmarks" / "timm_without_torchvision.py"
    spec = importlib.util.spec_from_file_location("timm_without_torchvision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
