"""What the Trainer examples share: building the model, and the end of a castling run (evaluate, switch, save).

Not part of the package: the scripts put this folder on `sys.path` and import it, as they would a helper of their own.
"""

import json
import logging
import os
from dataclasses import dataclass, field

from datasets import DatasetDict

from castling_hf import (
    CASTLING_VIT_SIZES,
    CastlingMaskDecayCallback,
    CastlingViTConfig,
    softmax_mask_scales,
    switch_to_inference,
)
from castling_hf.hub import push_inference_checkpoint, write_inference_checkpoint
from castling_hf.model_card import training_run_card


@dataclass
class CastlingModelArguments:
    """The model arguments every Trainer example takes; an example adds its own in a subclass."""

    model_name_or_path: str = field(
        default="nano",
        metadata={
            "help": f"A size name {sorted(CASTLING_VIT_SIZES)} for a new model, or a checkpoint (path or Hub name)."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "JSON object of config fields for a new model, e.g. '{\"softmax_mask_threshold\": null}'."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose heads have another number of labels (the heads start fresh)."},
    )
    mask_decay_start: float = field(default=0.0, metadata={"help": "Where α starts to fall: fraction of the run."})
    mask_decay_end: float = field(default=0.75, metadata={"help": "Where α reaches 0: fraction of the run."})
    mask_decay_schedule: str = field(default="cosine", metadata={"help": "'cosine' or 'linear'."})


def held_out_split(dataset: DatasetDict, data_args, seed: int) -> DatasetDict:
    """`DatasetDict(train=..., test=...)`: the data set's `train` split, and its `validation` split if it has one (a
    Hub set's `test` split often has no labels), else its `test` split, else `data_args.eval_split_fraction` of
    `train`; each cut to a random `data_args.max_train_samples` / `max_eval_samples` when given."""
    if "train" not in dataset:
        raise ValueError(f"The data set has splits {sorted(dataset)}; a 'train' split is needed.")
    held_out = next((name for name in ("validation", "test") if name in dataset), None)
    if held_out is None:
        dataset = dataset["train"].train_test_split(test_size=data_args.eval_split_fraction, seed=seed)
        held_out = "test"
    dataset = DatasetDict(train=dataset["train"], test=dataset[held_out])
    for split, limit in (("train", data_args.max_train_samples), ("test", data_args.max_eval_samples)):
        if limit is not None:
            dataset[split] = dataset[split].shuffle(seed=seed).select(range(min(limit, len(dataset[split]))))
    return dataset


def mask_decay_callbacks(model, model_args: CastlingModelArguments) -> list:
    """The mask-decay callback for a model in the training form; none for one already in the inference form."""
    if not softmax_mask_scales(model):
        logging.getLogger(__name__).warning(
            "The model is in the inference form already: there is no mask decay to run."
        )
        return []
    args = model_args
    return [CastlingMaskDecayCallback(args.mask_decay_start, args.mask_decay_end, args.mask_decay_schedule)]


def label_maps(labels: list[str]) -> dict:
    """`id2label` and `label2id` for a list of label names."""
    return {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}


def new_castling_config(model_args, **fields) -> CastlingViTConfig:
    """The config of a new model of the size `model_args.model_name_or_path` with `fields`, then
    `model_args.config_overrides` (a JSON object of config fields) on top."""
    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    return CastlingViTConfig.from_size(model_args.model_name_or_path, **{**fields, **overrides})


def model_from_size_or_checkpoint(model_args, labels: list[str], model_class, auto_class):
    """A new `model_class` of a named size (`CASTLING_VIT_SIZES`) with `model_args.config_overrides` (a JSON object
    of config fields), or the checkpoint `model_args.model_name_or_path` (path or Hub name) loaded with `auto_class`;
    either way with `labels` as its id2label.
    """
    if model_args.model_name_or_path in CASTLING_VIT_SIZES:
        return model_class(new_castling_config(model_args, **label_maps(labels)))
    return model_from_checkpoint(model_args, labels, auto_class)


def model_from_checkpoint(model_args, labels: list[str], auto_class):
    """The checkpoint `model_args.model_name_or_path` (path or Hub name) loaded with `auto_class`, with `labels` as its
    id2label. A checkpoint whose head has another number of labels loads only with
    `model_args.ignore_mismatched_sizes` (the head then starts fresh), as in `transformers`' examples; config
    overrides apply to new models only.
    """
    name_or_path = model_args.model_name_or_path
    if model_args.config_overrides:
        raise ValueError(
            f"--config_overrides applies to a new model (a size name: {sorted(CASTLING_VIT_SIZES)}), but "
            f"--model_name_or_path {name_or_path!r} is a checkpoint, whose config is its own. Drop the overrides, or "
            "edit the checkpoint's config.json."
        )
    return auto_class.from_pretrained(
        name_or_path, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **label_maps(labels)
    )


def plot_training_history(log_history: list[dict], path: str) -> None:
    """The training loss, and every evaluation metric logged during training (e.g. `eval_map`, `eval_accuracy`),
    against the step: a PNG at `path`, from the Trainer's `state.log_history`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    metrics = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith("eval_") and not key.endswith(("_loss", "_runtime", "_per_second")) and key != "epoch":
                metrics.setdefault(key, []).append((entry["step"], value))
    # COCOeval reports -1 for what is undefined on this data (e.g. no large objects): nothing to plot.
    metrics = {key: points for key, points in metrics.items() if min(value for _, value in points) >= 0}
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if losses:
        loss_axis.plot(*zip(*losses, strict=True), color="tab:blue")
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    for key, points in metrics.items():
        metric_axis.plot(*zip(*points, strict=True), marker="o", label=key)
    metric_axis.set(xlabel="step", title="evaluations during training")
    if metrics:
        metric_axis.legend(fontsize=8)
    for axis in (loss_axis, metric_axis):
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_castling(trainer, image_processor, dataset_name: str) -> dict:
    """A castling run with a `Trainer`, as its arguments ask:

    - with `do_train`, train (resuming from `resume_from_checkpoint` if given), save the model in its training form
      and record the training metrics and state, as `transformers`' examples do, and plot the loss and the
      evaluations during training (`training_history.png`);
    - with `do_eval`, evaluate the model as it is (`eval_castling_*`, or `eval_linear_*` for a linear model);
    - once α is 0 everywhere, switch it to the inference form in memory, and with `do_eval` evaluate it again
      (`eval_linear_*`: equal to the castling numbers);
    - with `do_train`, write the inference checkpoint with its image processor and a model card (the linear results on
      `dataset_name`) to `<output_dir>/inference`, and with `push_to_hub` push that same checkpoint.

    Returns the training metrics ("train"), the evaluations by form ("castling", "linear") and "inference_dir" when
    one was written.
    """
    args, model, results = trainer.args, trainer.model, {}
    if not (args.do_train or args.do_eval):
        raise ValueError(
            "Neither --do_train nor --do_eval was given, so there is nothing to run: add --do_train to train (and "
            "write the inference checkpoint), --do_eval to evaluate, or both, as in transformers' examples."
        )
    if args.do_train:
        train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        if trainer.is_world_process_zero():
            plot_training_history(trainer.state.log_history, os.path.join(args.output_dir, "training_history.png"))
        results["train"] = train_result.metrics
    evaluations = {}
    scales = softmax_mask_scales(model)  # empty for a model in the inference form
    if args.do_eval and scales:
        evaluations["castling"] = trainer.evaluate(metric_key_prefix="eval_castling")
    if not any(scales.values()):  # else the decay has not ended: the branch still counts
        switch_to_inference(model)
        if args.do_eval:
            evaluations["linear"] = trainer.evaluate(metric_key_prefix="eval_linear")
    for form, metrics in evaluations.items():
        trainer.log_metrics(f"eval_{form}", metrics)
    if evaluations:
        trainer.save_metrics("eval", {key: value for metrics in evaluations.values() for key, value in metrics.items()})
    results.update(evaluations)
    if not args.do_train or softmax_mask_scales(model):
        return results

    name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    split = str(getattr(trainer.eval_dataset, "split", None) or "test")  # as `datasets` named it, when it did
    card = training_run_card(model, name, results.get("linear", {}), "eval_linear_", dataset_name, split)
    results["inference_dir"] = os.path.join(args.output_dir, "inference")
    if trainer.is_world_process_zero():
        write_inference_checkpoint(model, results["inference_dir"], image_processor, card)
        if args.push_to_hub:
            push_inference_checkpoint(model, name, image_processor, card, token=args.hub_token)
    return results
