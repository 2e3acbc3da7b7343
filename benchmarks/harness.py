"""What the benchmarks do around what they measure, written once: their command line, side-by-side timing, the
tensors a pass holds, MACs, the spread over seeds, pools of worker processes, the examples they run, and the JSON,
markdown and plots they write.

A benchmark imports it by name from its own folder, which it puts first on `sys.path` before importing it:

    sys.path.insert(0, str(Path(__file__).parent))  # the harness and the sibling benchmarks
    import harness  # noqa: E402

That holds however the script is started: as a script, loaded by its path (`importlib`, as the tests and
`docs_tables.py` load it), or run again by its path in a spawned worker process, which also inherits `sys.path`.
"""

import argparse
import importlib.util
import json
import multiprocessing
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]

# -- the command line ----------------------------------------------------------------------------------------------


def parser(doc: str, quick: str, run_dir: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark has: where its results go, `--quick` (what the smoke run does, in `quick`), and
    for those that train through the examples, `--run_dir` for their checkpoints (default `run_dir`)."""
    options = argparse.ArgumentParser(description=doc.splitlines()[0])
    if run_dir is not None:
        options.add_argument("--run_dir", default=run_dir)
    options.add_argument("--output_dir", default="benchmarks/results")
    options.add_argument("--quick", action="store_true", help=quick)
    return options


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran the benchmark, as it is typed from the repository's root; recorded in its JSON so that
    every number can be made again."""
    return " ".join([f"python benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def machine() -> dict:
    """What a latency depends on beyond the code: threads, platform and PyTorch."""
    return {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__}


# -- timing ----------------------------------------------------------------------------------------------------------


def interleaved_medians(run: Callable, models: dict, rounds: int, progress, rotate: bool = False) -> dict[str, float]:
    """The median time of `run(model)` for each model over `rounds` rounds, after a warm-up run each.

    The models take turns within every round (A B C, A B C, ...) rather than each running all its rounds at once, so
    that a noisy machine's drifts hit them all alike; with `rotate` the order turns by one every round (A B C, B C A,
    ...), so that none always runs first, or always after the same other (the training benchmarks rotate: a step
    leaves the caches and the allocator to the next). Warm-up runs count on `progress` too (see `runs_of`)."""
    names = list(models)
    for name in names:
        run(models[name])
        progress.update(1)
    seconds = {name: [] for name in names}
    for round_index in range(rounds):
        turn = round_index % len(names) if rotate else 0
        for name in names[turn:] + names[:turn]:
            started = time.perf_counter()
            run(models[name])
            seconds[name].append(time.perf_counter() - started)
            progress.update(1)
    return {name: statistics.median(values) for name, values in seconds.items()}


def inference_medians(
    models: dict, pixel_values: torch.Tensor, rounds: int, progress, rotate: bool = False
) -> dict[str, float]:
    """`interleaved_medians` of a forward pass on `pixel_values`, in inference mode (no autograd bookkeeping)."""
    with torch.inference_mode():
        return interleaved_medians(lambda model: model(pixel_values), models, rounds, progress, rotate)


def runs_of(models: int, rounds: int) -> int:
    """How many runs `interleaved_medians` makes: for a progress bar's total."""
    return models * (rounds + 1)


# -- memory and MACs -------------------------------------------------------------------------------------------------


class TensorLifetimes(TorchDispatchMode):
    """Every storage the ops create, with the op counts at which it appeared and was freed, so that the peak can be
    taken afterwards over any subset of them (a training step's: all but the parameters' gradients)."""

    def __init__(self):
        super().__init__()
        self.clock = 0
        self.alive: dict[int, tuple[StorageWeakRef, int, int]] = {}
        self.lifetimes: list[tuple[int, int, int, int]] = []  # (pointer, bytes, born, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.clock += 1
        for pointer, (ref, nbytes, born) in list(self.alive.items()):
            if ref.expired():
                self.lifetimes.append((pointer, nbytes, born, self.clock))
                del self.alive[pointer]
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in self.alive and storage.nbytes():
                    self.alive[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes(), self.clock)
        return out

    def peak_bytes(self, excluded_pointers: Iterable[int] = ()) -> int:
        """The largest total size of the storages alive at once, those at `excluded_pointers` left out. At one op
        the frees count before the births, as they happened before its outputs were made."""
        excluded = set(excluded_pointers)
        lifetimes = self.lifetimes + [(p, n, born, self.clock + 1) for p, (_, n, born) in self.alive.items()]
        events = []
        for pointer, nbytes, born, freed in lifetimes:
            if pointer not in excluded:
                events += [(born, nbytes), (freed, -nbytes)]
        peak = total = 0
        for _, change in sorted(events, key=lambda event: (event[0], event[1])):
            total += change
            peak = max(peak, total)
        return peak


def peak_memory_bytes(model: torch.nn.Module, pixel_values: torch.Tensor) -> int:
    """The largest total size of the tensors a forward pass holds at once; the weights, made before it, are not
    counted."""
    with torch.inference_mode(), TensorLifetimes() as tracker:
        model(pixel_values)
    return tracker.peak_bytes()


def training_step(model, pixel_values, labels) -> None:
    """Forward and backward, the gradients then dropped (as an optimizer's `zero_grad` does). The optimizer's own
    step is left out: it is the same for every form of a network."""
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)


def peak_activation_bytes(model, pixel_values, labels) -> int:
    """The largest total size of the tensors a training step's forward and backward passes hold at once, the
    parameters' gradients left out (they are the same for every form of a network)."""
    model.zero_grad(set_to_none=True)
    with TensorLifetimes() as tracker:
        model(pixel_values=pixel_values, labels=labels).loss.backward()
    gradients = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return tracker.peak_bytes(gradients)


def macs(model: torch.nn.Module, pixel_values: torch.Tensor) -> int:
    """Multiply-accumulates of a forward pass, from `torch.utils.flop_counter` (a MAC is two FLOPs). The counter
    does not see the CPU SDPA kernel: count a network with eager attention."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=pixel_values)
    return counter.get_total_flops() // 2


# -- seeds -----------------------------------------------------------------------------------------------------------


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """The mean over seeds and the sample standard deviation; 0 for a single seed, which has no spread to show."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# -- other processes and scripts -------------------------------------------------------------------------------------


def one_thread() -> None:
    """A worker's initializer: one thread per job, as two jobs on two cores run faster than one on both and do not
    slow each other."""
    torch.set_num_threads(1)


def process_pool(workers: int = 2, initializer: Callable = one_thread, initargs: tuple = ()) -> ProcessPoolExecutor:
    """Worker processes started fresh (spawned, not forked: a child forked from a process whose torch thread pool
    has run can hang in it); each runs the benchmark again by its path to find the jobs' functions."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs)


def load_module(path: Path):
    """A script loaded by its path (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_arguments(values: dict) -> list[str]:
    """`--name value` for each item: how a script's `main(argv)` takes its options."""
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


# The examples' short runs on generated images that the detection and segmentation benchmarks measure: their shared
# settings, beside the data, steps and evaluation that each benchmark's options set.
EXAMPLE_RECIPE = (
    "--do_train --do_eval --learning_rate 1e-3 --weight_decay 0.05 --lr_scheduler_type cosine --warmup_steps 50 "
    "--per_device_train_batch_size 16 --per_device_eval_batch_size 64 --save_strategy no --logging_steps 25 "
    "--report_to none --seed 0"
)
# Their smoke run: a few steps on a few images, and the latency of the nano size on small ones.
QUICK_EXAMPLE_RUN = dict(
    num_generated_images=40, max_steps=4, eval_steps=2, size="nano", resolutions=[64, 128], repeats=2
)
QUICK_EXAMPLE_RUN_HELP = "40 images, 4 steps, 64/128 pixels: a smoke run"


def add_example_run_options(options: argparse.ArgumentParser, images: int, steps: int, eval_steps: int) -> None:
    """The options of an example's run on generated images: how many images, their size, steps and evaluations."""
    options.add_argument("--num_generated_images", type=int, default=images)
    options.add_argument("--image_size", type=int, default=64)
    options.add_argument("--max_steps", type=int, default=steps)
    options.add_argument("--eval_steps", type=int, default=eval_steps)


def example_run_argv(args, output_dir: Path) -> list[str]:
    """The example's command line for the run `add_example_run_options` describes, with `EXAMPLE_RECIPE`."""
    return (
        f"--output_dir {output_dir} --num_generated_images {args.num_generated_images} --image_size "
        f"{args.image_size} --max_steps {args.max_steps} --eval_strategy steps --eval_steps {args.eval_steps} "
        f"{EXAMPLE_RECIPE}"
    ).split()


def run_example(path: Path, argv: list[str], output_dir: Path, recorded: tuple[str, ...]) -> dict:
    """An example's `main(argv)` run in this process and timed, as a benchmark records it: the command a user would
    type for it, its wall time, the `recorded` items of what it returns (its metrics), how many images it held out,
    and the Trainer's log history, which it left in `output_dir`."""
    started = time.perf_counter()
    results = load_module(path).main(argv)
    seconds = time.perf_counter() - started
    return {
        "command": f"python {path.relative_to(ROOT)} " + " ".join(argv),
        "wall_seconds": seconds,
        **{name: results[name] for name in recorded},
        "held_out_images": results["eval_samples"],
        "history": json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"],
    }


# -- results ---------------------------------------------------------------------------------------------------------


def table_head(header: str) -> list[str]:
    """A markdown table's first two lines: `header` (`| a | b |`) and the rule under it, with as many columns."""
    return [header, "|---" * (header.count("|") - 1) + "|"]


def yes_no(met: bool | None) -> str:
    """A table's cell for a target met or not, or for a flag; "—" where there is nothing to say."""
    return "—" if met is None else "yes" if met else "no"


def pyplot():
    """matplotlib's pyplot, drawing to files alone (the benchmarks run where there is no display); imported only when
    a benchmark plots, so that its tables render without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_against_tokens(axis, curves: dict[str, dict[int, float]], ylabel: str, title: str) -> None:
    """One line per network: value against token count, both axes logarithmic."""
    for name, points in curves.items():
        if points:
            axis.plot(list(points), list(points.values()), marker="o", label=name)
    axis.set(xscale="log", yscale="log", xlabel="tokens", ylabel=ylabel, title=title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()


def write_results(directory: Path, name: str, results: dict, tables: list[str], figures: dict | None = None) -> None:
    """`results` as `name`.json, the non-empty `tables` as `name`.md (the tables README.md and the manual show) and
    each of `figures` (file name: figure) as a PNG, all in `directory`; the tables are printed, and what was
    written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / f"{name}.json", directory / f"{name}.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    tables = [table for table in tables if table]
    written[1].write_text("\n\n".join(tables) + "\n")
    for file_name, figure in (figures or {}).items():
        figure.tight_layout()
        figure.savefig(directory / file_name, dpi=120)
        pyplot().close(figure)  # pyplot holds every figure until it is closed
        written.append(directory / file_name)
    print(*tables, sep="\n\n")
    print("wrote " + ", ".join(map(str, written)))
