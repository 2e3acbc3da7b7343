import copy
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from castling_hf import (
    CastlingMaskDecayCallback,
    CastlingViTForImageClassification,
    softmax_mask_scale,
    switch_to_inference,
)
from castling_hf.modeling_utils import softmax_branches

TOTAL_STEPS = 8


def as_buffer(alpha: float) -> float:
    """α as the fp32 buffer holds it."""
    return torch.tensor(alpha, dtype=torch.float32).item()


# -- the schedule --------------------------------------------------------------------------------------------------


def test_cosine_schedule_values():
    assert softmax_mask_scale(0, 100) == 1.0
    assert softmax_mask_scale(75, 100) == 0.0 and softmax_mask_scale(100, 100) == 0.0
    assert softmax_mask_scale(37.5, 100) == pytest.approx(0.5)
    assert softmax_mask_scale(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    values = [softmax_mask_scale(step, 100) for step in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_linear_schedule_with_step_numbers_and_a_late_start():
    assert softmax_mask_scale(10, None, start=10, end=30, schedule="linear") == 1.0
    assert softmax_mask_scale(15, None, start=10, end=30, schedule="linear") == pytest.approx(0.75)
    assert softmax_mask_scale(30, None, start=10, end=30, schedule="linear") == 0.0
    # Mixed: a fraction and a step number.
    assert softmax_mask_scale(50, 200, start=0.1, end=60, schedule="linear") == pytest.approx(0.25)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(schedule="exponential"),
            r"Unknown mask-decay schedule 'exponential'; expected one of \['cosine', 'linear'\]",
        ),
        (dict(start=0.5, end=0.5), r"must start before it ends, got start=0.5 and end=0.5"),
        (dict(start=40, end=10), r"must start before it ends"),
        (dict(end=1.5), r"fraction of the run \(a float\) and must lie in \[0, 1\], got 1.5"),
        (dict(start=-3, end=10), r"step number and must be >= 0"),
        (dict(end="half"), r"must be a float .* or an int"),
    ],
)
def test_bad_schedule_arguments_fail_early(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CastlingMaskDecayCallback(**kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        softmax_mask_scale(0, 100, **kwargs)


def test_step_numbers_outside_the_run_and_mixed_windows_are_rejected():
    with pytest.raises(ValueError, match=r"`end`=500 lies outside the run of 100 steps"):
        softmax_mask_scale(0, 100, start=0, end=500)
    with pytest.raises(ValueError, match=r"start=0.9 \(step 90\) and end=50 \(step 50\)"):
        softmax_mask_scale(0, 100, start=0.9, end=50)


def test_fractions_without_a_known_run_length_ask_for_step_numbers(make_config):
    with pytest.raises(ValueError, match=r"total number of training steps is not known.*as step numbers \(ints\)"):
        softmax_mask_scale(3, None)
    # A run whose length the callback cannot know (TrainerState.max_steps unset), e.g. from a custom loop.
    model = CastlingViTForImageClassification(make_config())
    with pytest.raises(ValueError, match="as step numbers"):
        CastlingMaskDecayCallback().on_train_begin(None, TrainerState(), None, model=model)
    CastlingMaskDecayCallback(start=0, end=10).on_train_begin(None, TrainerState(global_step=4), None, model=model)
    assert set(model.softmax_mask_scales().values()) == {as_buffer(softmax_mask_scale(4, None, start=0, end=10))}


def test_the_callback_refuses_a_model_without_castling_layers():
    with pytest.raises(TypeError, match="needs a Castling-ViT model.*got Linear"):
        CastlingMaskDecayCallback().on_train_begin(None, TrainerState(max_steps=10), None, model=torch.nn.Linear(2, 2))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_callback_reaches_a_ddp_wrapped_model(make_config):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = CastlingViTForImageClassification(make_config())
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        CastlingMaskDecayCallback().on_step_begin(None, TrainerState(global_step=3, max_steps=8), None, model=wrapped)
    finally:
        dist.destroy_process_group()
    assert set(model.softmax_mask_scales().values()) == {as_buffer(softmax_mask_scale(3, 8))}


# -- with the Trainer ----------------------------------------------------------------------------------------------


class RandomImages(torch.utils.data.Dataset):
    """Fixed random images whose label is which third of the channels is brightest: learnable in a few steps."""

    def __init__(self, size=64):
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 3, (size,), generator=generator)
        self.images = torch.randn(size, 3, 32, 32, generator=generator)
        self.images[torch.arange(size), self.labels] += 1.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


class RecordAlpha(TrainerCallback):
    """Records α as the model sees it at the start of every step (runs after the decay callback), and the steps on
    which the branches count what their masks keep."""

    def __init__(self):
        self.seen, self.measured = {}, set()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.seen[state.global_step] = set(model.softmax_mask_scales().values())
        measuring = {branch.measure_kept_share for branch in softmax_branches(model).values()}
        assert len(measuring) == 1
        if measuring.pop():
            self.measured.add(state.global_step)


def train(make_config, output_dir, resume_from_checkpoint=None, save_steps=None, logging_steps=1):
    model = CastlingViTForImageClassification(make_config())
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=TOTAL_STEPS,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or TOTAL_STEPS,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    recorder = RecordAlpha()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomImages(),
        callbacks=[CastlingMaskDecayCallback(start=0.0, end=0.75, schedule="cosine"), recorder],
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return model, trainer, recorder


def test_trainer_run_follows_the_schedule_logs_alpha_and_ends_at_zero(make_config, tmp_path):
    model, trainer, recorder = train(make_config, tmp_path / "run")

    assert sorted(recorder.seen) == list(range(TOTAL_STEPS))
    for step, alphas in recorder.seen.items():
        assert alphas == {as_buffer(softmax_mask_scale(step, TOTAL_STEPS))}, step
    assert recorder.seen[0] == {1.0} and 0 < min(recorder.seen[3]) < 1

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == TOTAL_STEPS
    for entry in logged:
        assert entry["softmax_mask_scale"] == softmax_mask_scale(entry["step"], TOTAL_STEPS)
        if softmax_mask_scale(entry["step"] - 1, TOTAL_STEPS) > 0:  # α of the step's own forward pass
            # The relative threshold keeps part of the probabilities, from the first step on: the branch is alive.
            assert 0 < entry["softmax_mask_kept_share"] < 1
        else:  # a branch at α = 0 does no work, so there is nothing to count
            assert "softmax_mask_kept_share" not in entry
    assert logged[-1]["loss"] < logged[0]["loss"]

    assert set(model.softmax_mask_scales().values()) == {0.0}


def test_the_masks_count_what_they_keep_only_on_the_steps_that_are_logged(make_config, tmp_path):
    _, trainer, recorder = train(make_config, tmp_path / "run", logging_steps=3)
    assert recorder.measured == {2, 5}  # the steps whose end is logged: global steps 3 and 6
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [3, 6]
    assert all(0 < entry["softmax_mask_kept_share"] < 1 for entry in logged)


def test_resuming_in_the_middle_of_the_decay_matches_an_uninterrupted_run(make_config, tmp_path):
    full_model, _, full_record = train(make_config, tmp_path / "full", save_steps=3)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert 0 < softmax_mask_scale(3, TOTAL_STEPS) < 1  # the checkpoint lies inside the decay

    resumed_model, _, resumed_record = train(make_config, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint))

    assert sorted(resumed_record.seen) == list(range(3, TOTAL_STEPS))
    assert all(resumed_record.seen[step] == full_record.seen[step] for step in resumed_record.seen)
    full, resumed = full_model.state_dict(), resumed_model.state_dict()
    assert full.keys() == resumed.keys()
    assert all(torch.allclose(full[name], resumed[name], atol=1e-5) for name in full)


def test_a_held_gamma_leaves_the_optimizers_step_untouched_weight_decay_included(make_config, tmp_path):
    # The convex blend (what castle sets) holds γ while α > 0: in the graph, with a zero gradient, which AdamW would
    # still decay. The callback drops that gradient before the step, so γ stays exactly as it was until α is 0.
    model = CastlingViTForImageClassification(make_config(linear_branch_blend="convex"))
    seen = {}

    class RecordGamma(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = torch.cat([p.detach().clone() for p in gammas(model)])

    def gammas(model):
        return [layer.attention.linear_branch_scale for layer in model.castling_vit.encoder.layers]

    start = torch.cat([p.detach().clone() for p in gammas(model)])
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=TOTAL_STEPS,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        weight_decay=0.5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=RandomImages(),
        callbacks=[CastlingMaskDecayCallback(end=0.5, schedule="linear"), RecordGamma()],
    ).train()
    # α is 0 from step 4 on: γ is held through the optimizer steps of steps 1 … 4 (α of their forward passes > 0).
    for step in range(1, 5):
        assert torch.equal(seen[step], start), step
    assert not torch.equal(seen[TOTAL_STEPS], start)  # released, it learns


def test_evaluations_during_training_measure_the_switched_model_and_restore_alpha(make_config, tmp_path):
    model = CastlingViTForImageClassification(make_config())
    evaluated = {}

    class CompareWithTheSwitch(TrainerCallback):
        """Before each evaluation the decay callback has run: the loss a switched copy gives is what is measured."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_evaluate:
                alphas = model.softmax_mask_scales()
                switched = switch_to_inference(copy.deepcopy(model).eval(), force=True)
                data = RandomImages()
                with torch.no_grad():
                    loss = switched(pixel_values=data.images, labels=data.labels).loss.item()
                evaluated[state.global_step] = {"alphas": set(alphas.values()), "switched_loss": loss}

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            evaluated[state.global_step]["metrics"] = dict(metrics)
            evaluated[state.global_step]["alpha_after"] = set(model.softmax_mask_scales().values())

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=TOTAL_STEPS,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=64,
        learning_rate=3e-3,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    decay = CastlingMaskDecayCallback(start=0.0, end=0.75)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomImages(),
        eval_dataset=RandomImages(),
        callbacks=[decay, CompareWithTheSwitch()],
    )
    trainer.train()
    assert sorted(evaluated) == [2, 4, 6, 8]
    for step, record in evaluated.items():
        # Evaluated at α = 0 in every layer, whatever α the training had reached; α as it was afterwards.
        assert record["metrics"]["eval_loss"] == pytest.approx(record["switched_loss"], rel=1e-5)
        assert record["metrics"]["softmax_mask_scale"] == 0.0
        assert record["alpha_after"] == {as_buffer(softmax_mask_scale(step, TOTAL_STEPS, end=0.75))}
    assert 0 < softmax_mask_scale(2, TOTAL_STEPS, end=0.75) < 1  # the first evaluation lies inside the decay


FULLY_SHARDED = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from castling_hf import CastlingViTConfig, CastlingViTForImageClassification, clear_held_gradients
from castling_hf import set_softmax_mask_scale, softmax_mask_scale

dist.init_process_group("gloo")
torch.manual_seed(0)
model = CastlingViTForImageClassification(
    CastlingViTConfig.from_size("nano", num_hidden_layers=2, num_labels=3, linear_branch_blend="convex")
)
for layer in model.castling_vit.encoder.layers:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
gammas = lambda: torch.cat([l.attention.linear_branch_scale.full_tensor() for l in model.castling_vit.encoder.layers])
start, held = gammas().clone(), []
generator = torch.Generator().manual_seed(dist.get_rank())
for step in range(6):
    set_softmax_mask_scale(model, softmax_mask_scale(step, 6, end=0.5))
    pixel_values = torch.randn(4, 3, 32, 32, generator=generator)
    model(pixel_values=pixel_values, labels=torch.randint(0, 3, (4,), generator=generator)).loss.backward()
    clear_held_gradients(model)
    optimizer.step()
    optimizer.zero_grad()
    held.append(torch.equal(gammas(), start))
print(f"rank {dist.get_rank()}: gamma held {held}", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_under_fsdp2_a_held_gamma_is_left_as_it_is_and_released_after(tmp_path):
    # accelerate shards with FSDP only on accelerators (on CPUs it runs DDP); torch's own fully_shard, which it uses
    # there, runs on CPUs over gloo: the parameters become DTensors, and γ is held and released as without sharding.
    (tmp_path / "sharded.py").write_text(FULLY_SHARDED)
    command = [
        sys.executable,
        *f"-m torch.distributed.run --nproc_per_node 2 --master_port {free_port()}".split(),
        str(tmp_path / "sharded.py"),
    ]
    finished = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
    # α > 0 in the forward passes of steps 0 … 2 (the decay ends at step 3): γ unchanged through their steps, then it
    # learns.
    expected = "gamma held [True, True, True, False, False, False]"
    reports = re.findall(r"rank (\d): (gamma held \[[^]]*\])", finished.stdout)
    assert sorted(reports) == [("0", expected), ("1", expected)]
