"""The mask decay (docs/design.md §4): α, the weight of the auxiliary softmax branch, goes from 1 to 0 during training.

`softmax_mask_scale(step, total_steps, ...)` is the schedule as a plain function, for custom loops;
`CastlingMaskDecayCallback` applies it on every step of a `transformers.Trainer` run, keeps a held γ out of the
optimizer's step, and evaluates during training the model the switch would give.
"""

import math
from numbers import Integral, Real

from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import TrainerCallback

from .attention import live_softmax_mask_scale
from .modeling_utils import (
    measure_softmax_mask_kept_shares,
    set_softmax_mask_scale,
    softmax_branches,
    softmax_mask_kept_shares,
    softmax_mask_scales,
)

DECAY_SCHEDULES = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


def _is_step_number(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_decay_arguments(start, end, schedule: str) -> None:
    """Errors that do not depend on the length of the run; `decay_window` checks the rest."""
    if schedule not in DECAY_SCHEDULES:
        raise ValueError(f"Unknown mask-decay schedule {schedule!r}; expected one of {sorted(DECAY_SCHEDULES)}.")
    for name, value in (("start", start), ("end", end)):
        if _is_step_number(value):
            if value < 0:
                raise ValueError(f"`{name}` is a step number and must be >= 0, got {value}.")
        elif isinstance(value, Real) and not isinstance(value, bool):
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"`{name}` is a fraction of the run (a float) and must lie in [0, 1], got {value}; "
                    "pass an int to give a step number."
                )
        else:
            raise TypeError(f"`{name}` must be a float (fraction of the run) or an int (step number), got {value!r}.")
    if _is_step_number(start) == _is_step_number(end) and start >= end:
        raise ValueError(f"The decay must start before it ends, got start={start} and end={end}.")


def decay_window(total_steps: int | None, start=0.0, end=0.75) -> tuple[float, float]:
    """The steps at which α leaves 1 and reaches 0. Floats are fractions of `total_steps`, ints are step numbers."""

    def to_step(name, value):
        if _is_step_number(value):
            if total_steps is not None and value > total_steps:
                raise ValueError(f"`{name}`={value} lies outside the run of {total_steps} steps.")
            return float(value)
        if total_steps is None:
            raise ValueError(
                f"`{name}`={value} is a fraction of the run, but the total number of training steps is not known "
                "(an iterable data set without `max_steps`?). Give `start` and `end` as step numbers (ints), "
                "or set `max_steps`."
            )
        return value * total_steps

    start_step, end_step = to_step("start", start), to_step("end", end)
    if start_step >= end_step:
        raise ValueError(
            f"The decay must start before it ends, got start={start} (step {start_step:g}) and "
            f"end={end} (step {end_step:g}) in a run of {total_steps} steps."
        )
    return start_step, end_step


def softmax_mask_scale(step: int, total_steps: int | None, start=0.0, end=0.75, schedule: str = "cosine") -> float:
    """α at `step`: 1 until `start`, then down to 0 along `schedule` ("linear" or "cosine"), exactly 0 from `end` on.

    `start` and `end` are fractions of `total_steps` (floats) or step numbers (ints).
    """
    check_decay_arguments(start, end, schedule)
    start_step, end_step = decay_window(total_steps, start, end)
    if step <= start_step:
        return 1.0
    if step >= end_step:
        return 0.0
    return DECAY_SCHEDULES[schedule]((step - start_step) / (end_step - start_step))


def held_linear_branch_scales(model: nn.Module) -> list[nn.Parameter]:
    """γ of every Castling attention in `model` that holds it: a layer of the convex blend whose branch still lives
    (`attention.linear_branch_weight`). Its gradient is exactly 0."""
    return [
        module.linear_branch_scale
        for module in model.modules()
        if getattr(module, "linear_branch_blend", None) == "convex"
        and live_softmax_mask_scale(getattr(module, "softmax_branch", None)) is not None
    ]


def clear_held_gradients(model: nn.Module) -> None:
    """Set the gradient of every held γ in `model` to None, between the backward pass and the optimizer's step, so
    that the optimizer leaves γ as it is: PyTorch's optimizers skip a parameter without a gradient, its weight decay
    and moments included, where a zero gradient would still decay it. `CastlingMaskDecayCallback` does this in a
    `Trainer` run; call it in a custom loop (after `accelerator.backward`, before `optimizer.step()`)."""
    for scale in held_linear_branch_scales(model):
        scale.grad = None


def logs_step(args, state, step: int) -> bool:
    """Whether the Trainer writes training logs after optimizer step `step`, as its `DefaultFlowCallback` decides;
    every step under the epoch strategy, since which step ends an epoch is not known in advance, and for a custom
    loop that passes no `TrainingArguments`."""
    if args is None or (step == 1 and args.logging_first_step):
        return True
    strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
    if strategy == "steps":
        return step % state.logging_steps == 0
    return strategy == "epoch"


class CastlingMaskDecayCallback(TrainerCallback):
    """Sets every layer's α from the global step, so a resumed run gets the α of an uninterrupted one.

    α decays from 1 to 0 between `start` and `end` (floats: fractions of the run's steps; ints: step numbers) along
    `schedule` ("linear" or "cosine"), and is exactly 0 after the last step when `end` lies within the run. It is
    added to the training logs as `softmax_mask_scale`, beside `softmax_mask_kept_share`: the share of softmax
    probabilities the layers' masks kept in the last forward pass (mean over the layers whose α is not 0; per layer
    from `softmax_mask_kept_shares(model)`), which shows whether the branch is alive. The layers count what they keep
    only on the steps that are logged, so that the other steps pay nothing for it. The model may be a Castling-ViT model
    or any model holding Castling layers (e.g. `UperNetForSemanticSegmentation` on a `CastlingViTBackbone`).

    A held γ (the convex blend while α > 0) leaves the optimizer's step untouched, weight decay included
    (`clear_held_gradients`).

    With `evaluate_switched` (the default), the evaluations the Trainer runs during training measure the model the
    switch would give at that step (α = 0 in every layer, restored afterwards): what a checkpoint chosen by them
    keeps, so that `metric_for_best_model`, `load_best_model_at_end` and early stopping select the model that will be
    deployed. A checkpoint loaded as the best may then still have α ≠ 0: its switch (`switch_to_inference(model,
    force=True)`) gives exactly the model that was evaluated.
    """

    def __init__(self, start=0.0, end=0.75, schedule: str = "cosine", evaluate_switched: bool = True):
        check_decay_arguments(start, end, schedule)
        self.start, self.end, self.schedule = start, end, schedule
        self.evaluate_switched = evaluate_switched
        self.current_scale: float | None = None
        self._scales_before_evaluation: dict[str, float] | None = None

    def _apply(self, state, model) -> None:
        total_steps = state.max_steps if state.max_steps and state.max_steps > 0 else None
        alpha = softmax_mask_scale(state.global_step, total_steps, self.start, self.end, self.schedule)
        # The Trainer hands over its unwrapped model; a custom loop may pass a DDP- or compile-wrapped one. Any
        # model will do that holds Castling layers: a Castling-ViT model, or e.g. UperNet on a Castling backbone.
        castling_model = extract_model_from_parallel(model)
        if not softmax_branches(castling_model) and alpha != 0.0:
            raise TypeError(
                "CastlingMaskDecayCallback needs a Castling-ViT model, or one with Castling layers in the training "
                f"form (attention_mode='castling'), got {type(castling_model).__name__} with no softmax branch."
            )
        set_softmax_mask_scale(castling_model, alpha)
        self.current_scale = alpha

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)
        measure_softmax_mask_kept_shares(
            extract_model_from_parallel(model), logs_step(args, state, state.global_step + 1)
        )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        clear_held_gradients(extract_model_from_parallel(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # α for the next step; after the last one this is the final α (0 when `end` lies within the run).
        self._apply(state, model)
        self._switch_for_evaluation(control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._switch_for_evaluation(control, model)

    def _switch_for_evaluation(self, control, model) -> None:
        """Before an evaluation the Trainer is about to run (`DefaultFlowCallback` has just asked for it), α = 0."""
        asked = control is not None and control.should_evaluate
        if not (self.evaluate_switched and asked) or self._scales_before_evaluation is not None:
            return
        castling_model = extract_model_from_parallel(model)
        self._scales_before_evaluation = softmax_mask_scales(castling_model)
        set_softmax_mask_scale(castling_model, 0.0)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self._scales_before_evaluation is None:
            return
        branches = softmax_branches(extract_model_from_parallel(model))
        for name, alpha in self._scales_before_evaluation.items():
            branches[name].set_scale(alpha)  # before the checkpoint that may follow is saved
        self._scales_before_evaluation = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or self.current_scale is None:
            return
        # An evaluation's log is written before `on_evaluate`: one run switched reads α = 0.
        switched = self._scales_before_evaluation is not None
        added = {"softmax_mask_scale": 0.0 if switched else self.current_scale}
        kept = softmax_mask_kept_shares(extract_model_from_parallel(model)) if model is not None else {}
        if kept:
            added["softmax_mask_kept_share"] = sum(kept.values()) / len(kept)
        logs.update(added)
        # `Trainer.log` has already stored a copy of `logs` in the history; it should carry these too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)


__all__ = [
    "CastlingMaskDecayCallback",
    "DECAY_SCHEDULES",
    "clear_held_gradients",
    "decay_window",
    "softmax_mask_scale",
]
