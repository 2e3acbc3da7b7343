#!/usr/bin/env python
"""The paper's claims at CPU scale: does the switch cost nothing, do the softmax branch and the residual conv make
linear-angular attention as good as softmax attention, and does it keep global context?

Two tasks, both 64 tokens per image: the bundled digits at 32×32 (patch 4), and `focus_digits` at 64×64 (patch 8),
where one digit hides among fragments of others and noise anywhere on the canvas. Every variant has the same
dimensions (4 layers, 64 wide, 4 heads), data, augmentation (random shifts), optimiser (AdamW, warm-up + cosine) and
step budget; each runs with several seeds. Castling variants decay α with `castling_hf.softmax_mask_scale` and are
evaluated before and after the switch.

    python benchmarks/accuracy.py                 # the study (make bench-accuracy)
    python benchmarks/accuracy.py --quick         # a smoke run
"""

import argparse
import json
import math
import multiprocessing
import queue
import statistics
import time
import types
from concurrent.futures import ProcessPoolExecutor, wait
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification

from castling_hf import CastlingViTConfig, CastlingViTForImageClassification, softmax_mask_scale
from castling_hf.attention import CastlingViTAttention, masked_softmax_attention
from castling_hf.data import digits, focus_digits

DIMENSIONS = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_channels=1)
TASKS = {"digits": dict(image_size=32, patch_size=4, shift=2), "focus": dict(image_size=64, patch_size=8, shift=4)}
VARIANTS = {
    "vit": dict(model="vit"),
    "softmax_conv": dict(model="softmax_conv"),
    "castling": dict(),
    "castling_dense": dict(config=dict(softmax_mask_threshold=None)),
    "linear_only": dict(config=dict(attention_mode="linear")),
    "castling_no_conv": dict(config=dict(residual_conv=None)),
    "castling_l2": dict(config=dict(angular_normalization="l2")),
    "castling_sequence": dict(config=dict(residual_conv="sequence")),
    "castling_kernel5": dict(config=dict(residual_kernel_size=5)),
    "castling_end_0.5": dict(decay_end=0.5),
    "castling_end_0.9": dict(decay_end=0.9),
}


def softmax_and_conv_forward(self, hidden_states, num_prefix_tokens, grid_size):
    """Dense softmax attention plus the same residual conv, without the linear-angular term."""
    batch, tokens, hidden_size = hidden_states.shape
    qkv = self.qkv_proj(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim)
    query, key, value = qkv.unbind(2)
    attended = masked_softmax_attention(query, key, value, None).clone()
    attended[:, num_prefix_tokens:] += self.residual_conv(value, num_prefix_tokens, grid_size, self.linear_branch_scale)
    return self.o_proj(attended.reshape(batch, tokens, hidden_size))


def build_model(variant: dict, task: dict) -> torch.nn.Module:
    size = dict(image_size=task["image_size"], patch_size=task["patch_size"], num_labels=10)
    if variant.get("model") == "vit":
        return ViTForImageClassification(ViTConfig(**DIMENSIONS, **size, attn_implementation="sdpa"))
    config = CastlingViTConfig(**DIMENSIONS, **size, **variant.get("config", {}))
    model = CastlingViTForImageClassification(config)
    if variant.get("model") == "softmax_conv":
        model.switch_to_inference(force=True)  # the linear-angular form's modules, with the forward replaced
        for module in model.modules():
            if isinstance(module, CastlingViTAttention):
                module.forward = types.MethodType(softmax_and_conv_forward, module)
    return model


def as_tensors(dataset, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.stack([np.asarray(image.resize((image_size, image_size)), dtype=np.float32) for image in dataset["image"]])
    pixels = torch.from_numpy(images / 127.5 - 1.0).unsqueeze(1)
    return pixels, torch.tensor(dataset["label"])


def shifted(pixels: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to `shift` pixels each way, the border filled with the background."""
    padded = F.pad(pixels, (shift,) * 4, value=1.0)
    offsets = torch.randint(0, 2 * shift + 1, (len(pixels), 2), generator=generator)
    size = pixels.shape[-1]
    return torch.stack([p[:, y : y + size, x : x + size] for p, (y, x) in zip(padded, offsets.tolist())])


def accuracy(model, pixels, labels) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(pixel_values=batch).logits.argmax(-1) for batch in pixels.split(256)])
    return float((predictions == labels).float().mean())


def inference_macs(model, image_size: int) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.zeros(1, 1, image_size, image_size))
    return counter.get_total_flops() // 2


@cache
def task_data(task_name: str):
    splits = digits() if task_name == "digits" else focus_digits()
    return tuple(as_tensors(splits[split], TASKS[task_name]["image_size"]) for split in ("train", "test"))


_progress_queue = None


def start_worker(progress_queue) -> None:
    """Each worker trains on one thread: these models are too small to gain from more, and two workers on two cores
    run twice as many steps as one process on both."""
    global _progress_queue
    _progress_queue = progress_queue
    torch.set_num_threads(1)


def run_one(name: str, task_name: str, seed: int, args) -> dict:
    return train_and_evaluate(name, VARIANTS[name], task_name, task_data(task_name), seed, args)


def train_and_evaluate(name, variant, task_name, data, seed, args) -> dict:
    task, steps = TASKS[task_name], steps_for(task_name, args)
    torch.manual_seed(seed)
    model = build_model(variant, task)
    castling = getattr(model.config, "attention_mode", None) == "castling" and variant.get("model") is None
    decay_end = variant.get("decay_end", args.decay_end)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.05)
    warmup = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))),
    )
    (train_x, train_y), (test_x, test_y) = data
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        if castling:
            model.set_softmax_mask_scale(softmax_mask_scale(step, steps, 0.0, decay_end, "cosine"))
        index = torch.randint(0, len(train_x), (args.batch_size,), generator=generator)
        loss = model(pixel_values=shifted(train_x[index], task["shift"], generator), labels=train_y[index]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        model.train()
        if _progress_queue is not None and ((step + 1) % 25 == 0 or step + 1 == steps):
            _progress_queue.put(step % 25 + 1)
    result = {"variant": name, "task": task_name, "seed": seed, "train_seconds": time.perf_counter() - started}
    if castling:
        model.set_softmax_mask_scale(softmax_mask_scale(steps, steps, 0.0, decay_end, "cosine"))
        result["accuracy_before_switch"] = accuracy(model, test_x, test_y)
        model.switch_to_inference()
    result["accuracy"] = accuracy(model, test_x, test_y)
    result["inference_macs"] = inference_macs(model, task["image_size"])
    return result


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for task in TASKS:
        for variant in VARIANTS:
            selected = [r for r in runs if r["task"] == task and r["variant"] == variant]
            if not selected:
                continue
            accuracies = [100 * r["accuracy"] for r in selected]
            row = {
                "task": task,
                "variant": variant,
                "seeds": len(selected),
                "accuracy_mean": statistics.mean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "inference_macs": selected[0]["inference_macs"],
            }
            if "accuracy_before_switch" in selected[0]:
                row["switch_change_max_abs"] = max(
                    abs(r["accuracy"] - r["accuracy_before_switch"]) * 100 for r in selected
                )
            rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| task | variant | test accuracy % (mean ± std) | seeds | inference MACs | switch changed accuracy by |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        change = f"{row['switch_change_max_abs']:.2f} points at most" if "switch_change_max_abs" in row else "—"
        lines.append(
            f"| {row['task']} | {row['variant']} | {row['accuracy_mean']:.1f} ± {row['accuracy_std']:.1f} "
            f"| {row['seeds']} | {row['inference_macs'] / 1e6:.2f} M | {change} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TASKS), figsize=(7 * len(TASKS), 4.5), squeeze=False)
    for axis, task in zip(axes[0], TASKS):
        selected = [r for r in rows if r["task"] == task]
        axis.barh(
            [r["variant"] for r in selected],
            [r["accuracy_mean"] for r in selected],
            xerr=[r["accuracy_std"] for r in selected],
            color=["tab:gray" if r["variant"] in ("vit", "softmax_conv") else "tab:blue" for r in selected],
        )
        axis.set(xlabel="test accuracy (%)", title=task)
        axis.invert_yaxis()
        axis.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def steps_for(task_name: str, args) -> int:
    return args.steps if task_name == "focus" else args.digits_steps


def run_plan(args) -> list[dict]:
    """Every (task, variant, seed) run, spread over `args.workers` single-threaded processes, longest runs first."""
    plan = [(variant, task, seed) for task in args.tasks for variant in args.variants for seed in args.seeds]
    plan.sort(key=lambda run: -steps_for(run[1], args))
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    progress = tqdm(total=sum(steps_for(task, args) for _, task, _ in plan), desc="accuracy study", unit="step")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=start_worker, initargs=(progress_queue,)) as pool:
        pending = {pool.submit(run_one, variant, task, seed, args) for variant, task, seed in plan}
        runs = []
        while pending:
            finished, pending = wait(pending, timeout=1.0)
            runs += [future.result() for future in finished]
            try:
                while True:
                    progress.update(progress_queue.get_nowait())
            except queue.Empty:
                pass
    progress.close()
    return sorted(runs, key=lambda run: (list(TASKS).index(run["task"]), list(VARIANTS).index(run["variant"]), run["seed"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1300, help="training steps per run on the focus task")
    parser.add_argument("--digits_steps", type=int, default=250, help="training steps per run on digits")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--decay_end", type=float, default=0.75)
    parser.add_argument("--workers", type=int, default=2, help="parallel training processes, one thread each")
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="20 steps, one seed, three variants: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.digits_steps, args.seeds = 20, 20, [0]
        args.variants = ["vit", "castling", "softmax_conv"]

    runs = run_plan(args)

    rows = summarise(runs)
    directory = Path(args.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    (directory / "accuracy.json").write_text(json.dumps({"command": command, "args": vars(args), "runs": runs, "summary": rows}, indent=2))
    (directory / "accuracy.md").write_text(markdown_table(rows) + "\n")
    plot(rows, directory / "accuracy.png")
    print(markdown_table(rows))
    print(f"wrote {directory / 'accuracy.json'}, {directory / 'accuracy.md'}, {directory / 'accuracy.png'}")


if __name__ == "__main__":
    main()
