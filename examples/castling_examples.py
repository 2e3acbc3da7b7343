"""What the Trainer examples share: building the model, and the end of a castling run (evaluate, switch, save).

Not part of the package: the scripts put this folder on `sys.path` and import it, as they would a helper of their own.
"""

import json
import logging
import os
from dataclasses import dataclass, field

from datasets import DatasetDict, load_dataset
from transformers.trainer_utils import get_last_checkpoint

from castling_hf import (
    CASTLING_VIT_SIZES,
    CastlingMaskDecayCallback,
    CastlingViTConfig,
    softmax_mask_scales,
    switch_to_inference,
)
from castling_hf.hub import push_inference_checkpoint, write_inference_checkpoint
from castling_hf.model_card import training_run_card

logger = logging.getLogger(__name__)


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


@dataclass
class HubArguments:
    """How a checkpoint is read from the Hub, as `transformers`' examples take it."""

    cache_dir: str | None = field(default=None, metadata={"help": "Where models and data sets from the Hub are kept."})
    model_revision: str = field(default="main", metadata={"help": "The branch, tag or commit of the checkpoint."})
    token: str | None = field(default=None, metadata={"help": "A Hub token, for private repositories."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run a checkpoint's own modeling code from the Hub (read it first)."}
    )

    def loading(self) -> dict:
        """The keywords `from_pretrained` takes."""
        return dict(
            cache_dir=self.cache_dir,
            revision=self.model_revision,
            token=self.token,
            trust_remote_code=self.trust_remote_code,
        )


@dataclass
class ImageDataArguments:
    """Images, as `transformers`' image-classification example takes them: a data set (Hub name or local folder
    `datasets` reads), or folders of images."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hub data set, or a local folder of one."})
    dataset_config_name: str | None = field(default=None)
    train_dir: str | None = field(default=None, metadata={"help": "A folder of training images (imagefolder)."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder of held-out images."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Held out from `train` when the data set has no validation or test split."}
    )
    image_column_name: str = field(default="image")
    label_column_name: str = field(default="label")
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)


def load_image_folders(data_args: ImageDataArguments, hub_args: HubArguments | None = None):
    """The data set `data_args` names (`dataset_name`), or the image folders it names (`train_dir`,
    `validation_dir`), as `datasets` reads them; None when it names neither."""
    cache_dir = hub_args.cache_dir if hub_args is not None else None
    if data_args.dataset_name is not None:
        token = hub_args.token if hub_args is not None else None
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir, token=token)
    folders = {
        split: folder
        for split, folder in (("train", data_args.train_dir), ("validation", data_args.validation_dir))
        if folder
    }
    if not folders:
        return None
    files = {split: os.path.join(folder, "**") for split, folder in folders.items()}
    return load_dataset("imagefolder", data_files=files, cache_dir=cache_dir)


def held_out_split(dataset: DatasetDict, data_args, seed: int, hold_out: bool = True) -> DatasetDict:
    """`DatasetDict(train=..., test=...)`: the data set's `train` split, and its `validation` split if it has one (a
    Hub set's `test` split often has no labels), else its `test` split, else `data_args.train_val_split` of `train`;
    each cut to a random `data_args.max_train_samples` / `max_eval_samples` when given. Without `hold_out` (a run
    that never evaluates), `train` alone, whole."""
    if "train" not in dataset:
        raise ValueError(f"The data set has splits {sorted(dataset)}; a 'train' split is needed.")
    held_out = next((name for name in ("validation", "test") if name in dataset), None)
    if held_out is None and hold_out:
        dataset = dataset["train"].train_test_split(test_size=data_args.train_val_split, seed=seed)
        held_out = "test"
    dataset = DatasetDict(train=dataset["train"], **({"test": dataset[held_out]} if hold_out else {}))
    for split, limit in (("train", data_args.max_train_samples), ("test", data_args.max_eval_samples)):
        if limit is not None and split in dataset:
            dataset[split] = dataset[split].shuffle(seed=seed).select(range(min(limit, len(dataset[split]))))
    return dataset


def last_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: `--resume_from_checkpoint` where given, else the last one in `output_dir` (as
    `transformers`' examples resume), said in the log."""
    if training_args.resume_from_checkpoint is not None or not os.path.isdir(training_args.output_dir):
        return training_args.resume_from_checkpoint
    found = get_last_checkpoint(training_args.output_dir) if training_args.do_train else None
    if found is not None:
        logger.info(f"Checkpoint detected, resuming training at {found}; change --output_dir to train from the start.")
    return found


def leave_process_group() -> None:
    """Leave the process group that `accelerate launch` started, in every process, once the work is done: left to the
    interpreter's exit, gloo's threads are torn down in no set order, and now and then a process aborts there
    ("terminate called without an active exception") after writing everything, failing the launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def hub_push_requested(training_args) -> bool:
    """Whether `--push_to_hub` was given, taken from the Trainer: it would push the training form at every save, and
    these examples push the inference checkpoint instead, once, at the end."""
    requested, training_args.push_to_hub = training_args.push_to_hub, False
    return requested


def switch_after_training(trainer) -> bool:
    """Switch the trained model (`trainer.model`) to the inference form as the run left it: once α is 0 in every
    layer; or, for the best checkpoint loaded at the end (`--load_best_model_at_end`, early stopping), whose
    evaluations measured the model its switch gives (`CastlingMaskDecayCallback(evaluate_switched=True)`), even
    where α is not 0 there. Returns whether the model is in the inference form, and says why where it is not."""
    model = trainer.model
    alphas = [alpha for alpha in softmax_mask_scales(model).values() if alpha != 0]
    if not alphas:
        switch_to_inference(model)
        return True
    best = trainer.state.best_model_checkpoint
    switched_evaluations = any(
        isinstance(callback, CastlingMaskDecayCallback) and callback.evaluate_switched
        for callback in trainer.callback_handler.callbacks
    )
    if trainer.args.load_best_model_at_end and best is not None and switched_evaluations:
        logger.warning(
            f"The best checkpoint ({best}) is from within the mask decay (α up to {max(alphas):g}); its evaluation "
            "measured the model its switch gives, so that is the model switched and saved."
        )
        switch_to_inference(model, force=True)
        return True
    logger.warning(
        f"The mask decay has not ended (α up to {max(alphas):g} after the run), so no inference checkpoint is written: "
        "let it end within the run (--mask_decay_end at most the fraction of the steps run)."
    )
    return False


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


def model_from_size_or_checkpoint(model_args, labels: list[str], model_class, auto_class, hub_args=None):
    """A new `model_class` of a named size (`CASTLING_VIT_SIZES`) with `model_args.config_overrides` (a JSON object
    of config fields), or the checkpoint `model_args.model_name_or_path` (path or Hub name) loaded with `auto_class`;
    either way with `labels` as its id2label.
    """
    if model_args.model_name_or_path in CASTLING_VIT_SIZES:
        return model_class(new_castling_config(model_args, **label_maps(labels)))
    return model_from_checkpoint(model_args, labels, auto_class, hub_args)


def model_from_checkpoint(model_args, labels: list[str], auto_class, hub_args: HubArguments | None = None):
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
    loading = hub_args.loading() if hub_args is not None else {}
    return auto_class.from_pretrained(
        name_or_path, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **label_maps(labels), **loading
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


def run_castling(trainer, image_processor, dataset_name: str, push_to_hub: bool = False) -> dict:
    """A castling run with a `Trainer`, as its arguments ask:

    - with `do_train`, train (resuming from `--resume_from_checkpoint`, else from the last checkpoint in
      `output_dir`), save the model in its training form and record the training metrics and state, as `transformers`'
      examples do, and plot the loss and the evaluations during training (`training_history.png`);
    - with `do_eval`, evaluate the model as it is (`eval_castling_*`, or `eval_linear_*` for a linear model);
    - switch it to the inference form (`switch_after_training`), and with `do_eval` evaluate it again (`eval_linear_*`:
      equal to the castling numbers once α is 0);
    - with `do_train`, write the inference checkpoint with its image processor and a model card (the linear results on
      `dataset_name`) to `<output_dir>/inference`, and with `push_to_hub` (`hub_push_requested`) push that same
      checkpoint.

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
        train_result = trainer.train(resume_from_checkpoint=last_checkpoint(args))
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        if trainer.is_world_process_zero():
            plot_training_history(trainer.state.log_history, os.path.join(args.output_dir, "training_history.png"))
        results["train"] = train_result.metrics
    evaluations = {}
    if args.do_eval and softmax_mask_scales(model):  # empty for a model in the inference form
        evaluations["castling"] = trainer.evaluate(metric_key_prefix="eval_castling")
    switched = switch_after_training(trainer)
    if switched and args.do_eval:
        evaluations["linear"] = trainer.evaluate(metric_key_prefix="eval_linear")
    for form, metrics in evaluations.items():
        trainer.log_metrics(f"eval_{form}", metrics)
    if evaluations:
        trainer.save_metrics("eval", {key: value for metrics in evaluations.values() for key, value in metrics.items()})
    results.update(evaluations)
    if not args.do_train or not switched:
        return results

    name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    split = str(getattr(trainer.eval_dataset, "split", None) or "test")  # as `datasets` named it, when it did
    card = training_run_card(model, name, results.get("linear", {}), "eval_linear_", dataset_name, split)
    results["inference_dir"] = os.path.join(args.output_dir, "inference")
    if trainer.is_world_process_zero():
        write_inference_checkpoint(model, results["inference_dir"], image_processor, card)
        if push_to_hub:
            push_inference_checkpoint(model, name, image_processor, card, token=args.hub_token)
    return results
