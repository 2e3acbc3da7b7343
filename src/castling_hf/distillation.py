"""Castling without labels (docs/design.md §9): a castled model learns from its frozen source, on images alone.

The student is what `castle` made of the teacher, so the two share their structure: the part castling converted
(a base model, or a task model's backbone) returns the same features in the same layout, and the task head, if any,
is the source's own. The loss compares what both compute:

    KL(softmax(t/T) ‖ softmax(s/T))·T²   on the class logits (image or per-pixel), for a classifier or segmenter
    + ‖s − t‖² / ‖t‖²                     on the predicted depth, for a depth estimator
    + w·‖f_s − f_t‖² / ‖f_t‖²             on the castled part's features (final hidden states or feature maps), always

`CastlingDistillationTrainer` is a `transformers.Trainer` that minimises it while the mask decay hands every layer
over to linear-angular attention; `fidelity` measures how close the castled model has come to its source.
"""

import inspect
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .conversion import source_part
from .modeling_utils import softmax_branches
from .models.castling_vit import CastlingViTBackbone, CastlingViTModel
from .training import CastlingMaskDecayCallback


def castled_part(model: nn.Module) -> nn.Module:
    """The Castling-ViT encoder or backbone inside `model` (a castled classifier, base model, backbone or task
    model): the part castling converted, whose features the distillation compares."""
    parts = [module for module in model.modules() if isinstance(module, (CastlingViTModel, CastlingViTBackbone))]
    if not parts:
        raise TypeError(
            f"{type(model).__name__} holds no Castling-ViT encoder or backbone; give the model castling_hf.castle "
            "made of the source."
        )
    return parts[0]


@contextmanager
def captured_features(part: nn.Module):
    """Within the block, `features[0]` is the output of `part`'s last forward pass: its final hidden states
    (`last_hidden_state`) or its feature maps (`feature_maps`), as a tuple of tensors."""
    features = []

    def keep(module, args, output):
        maps = getattr(output, "feature_maps", None)
        features[:] = [tuple(maps) if maps is not None else (output.last_hidden_state,)]

    handle = part.register_forward_hook(keep)
    try:
        yield features
    finally:
        handle.remove()


def relative_squared_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """‖s − t‖² / ‖t‖², summed over the whole batch: 0 for equal tensors, 1 for a student that outputs zeros."""
    return (student.float() - teacher.float()).pow(2).sum() / teacher.float().pow(2).sum().clamp_min(1e-12)


def class_logits(outputs) -> torch.Tensor | None:
    """The class logits of a classifier `(batch, classes)` or a segmenter `(batch, classes, height, width)`; None for
    a model that has none."""
    logits = getattr(outputs, "logits", None)
    return logits if isinstance(logits, torch.Tensor) and logits.dim() in (2, 4) else None


def soft_label_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T))·T² over the class axis (axis 1), averaged over images and pixels."""
    log_student = F.log_softmax(student.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    divergence = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(dim=1)
    return divergence.mean() * temperature**2


def distillation_losses(
    student_outputs,
    teacher_outputs,
    student_features,
    teacher_features,
    temperature: float = 1.0,
    feature_loss_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The terms of the distillation loss (see the module's docstring) that this kind of model has, by name:
    `logits_kl`, `depth`, `features` (the mean over feature maps, times `feature_loss_weight` w; 0 leaves it out).

    On the focus task (docs/design.md §9) the feature term at w = 1 beside a classifier's KL raised the cosine of
    the castled encoder's features to the source's from 0.74 to 0.96, for the same agreement of the logits and
    1.6–1.8 points of accuracy (two seeds): a castled model should compute what its source computes, features
    included."""
    losses = {}
    student_logits, teacher_logits = class_logits(student_outputs), class_logits(teacher_outputs)
    if student_logits is not None and teacher_logits is not None:
        losses["logits_kl"] = soft_label_divergence(student_logits, teacher_logits, temperature)
    student_depth = getattr(student_outputs, "predicted_depth", None)
    if student_depth is not None:
        losses["depth"] = relative_squared_error(student_depth, teacher_outputs.predicted_depth)
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"The student returns {len(student_features)} feature maps and the teacher {len(teacher_features)}; the "
            "student must be what castling_hf.castle made of the teacher."
        )
    if feature_loss_weight:
        feature_error = sum(
            relative_squared_error(s, t) for s, t in zip(student_features, teacher_features, strict=True)
        )
        losses["features"] = feature_loss_weight * feature_error / len(student_features)
    return losses


class CastlingDistillationTrainer(Trainer):
    """A `transformers.Trainer` that castles without labels: the model (what `castle` made of `teacher_model`) learns
    to compute what the frozen `teacher_model` computes on the training images, while the mask decay hands every
    layer over to linear-angular attention.

    The loss is `distillation_losses` summed: the KL divergence of the class logits at `temperature` (classifiers,
    segmenters), the relative squared error of the predicted depth (depth estimators), and that of the castled part's
    features times `feature_loss_weight` (always, unless 0). Labels in the batch are ignored; only `pixel_values` is
    read. Evaluation reports the same loss on the evaluation images (`eval_loss`) and its terms (`eval_logits_kl`,
    ...).

    Unless `callbacks` holds a `CastlingMaskDecayCallback`, one is added that decays α from 1 to 0 over the first
    quarter of the run (`mask_decay_end=0.25`): with the convex blend `castle` sets, the layers are then the
    linear-angular term alone for the last three quarters. Without a decay the student would stay its teacher.

    Unless `train_heads`, everything outside the castled part (a classifier, UperNet's heads, a depth head) keeps the
    source's weights and runs as in evaluation (batch-norm statistics and dropout included), so that it stays the
    head the source's users know.
    """

    def __init__(
        self,
        model=None,
        args=None,
        teacher_model=None,
        temperature=1.0,
        mask_decay_end=0.25,
        train_heads=False,
        feature_loss_weight=1.0,
        **kwargs,
    ):
        if teacher_model is None:
            raise ValueError(
                "CastlingDistillationTrainer needs teacher_model: the frozen source the model was castled from."
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        callbacks = list(kwargs.pop("callbacks", None) or [])
        decays = [c for c in callbacks if isinstance(c, CastlingMaskDecayCallback)]
        if not decays and model is not None and softmax_branches(model):
            callbacks.append(CastlingMaskDecayCallback(end=mask_decay_end))
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        self.teacher_model = teacher_model.eval().requires_grad_(False).to(self.args.device)
        self.temperature, self.feature_loss_weight = temperature, feature_loss_weight
        self.label_names = []  # no labels: the evaluation loss comes from the teacher
        self._student_part, self._teacher_part = castled_part(self.model), source_part(teacher_model)
        self._frozen_heads = [] if train_heads else heads_outside(self.model, self._student_part)
        for head in self._frozen_heads:
            head.requires_grad_(False)
        self._logged_terms: dict[str, list[float]] = {}

    def distillation_losses(self, model, pixel_values: torch.Tensor) -> tuple[dict[str, torch.Tensor], object]:
        with torch.no_grad(), captured_features(self._teacher_part) as teacher_features:
            teacher_outputs = self.teacher_model(pixel_values=pixel_values)
        with captured_features(self._student_part) as student_features:
            student_outputs = model(pixel_values=pixel_values)
        losses = distillation_losses(
            student_outputs,
            teacher_outputs,
            student_features[0],
            teacher_features[0],
            self.temperature,
            self.feature_loss_weight,
        )
        return losses, student_outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        for head in self._frozen_heads:  # the Trainer has just put the whole model in training mode
            head.eval()
        losses, outputs = self.distillation_losses(model, inputs["pixel_values"])
        for name, value in losses.items():
            self._logged_terms.setdefault(name, []).append(value.item())
        loss = sum(losses.values())
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            losses, _ = self.distillation_losses(model, inputs["pixel_values"])
        for name, value in losses.items():
            self._logged_terms.setdefault(f"eval_{name}", []).append(value.item())
        return sum(losses.values()).detach(), None, None

    def log(self, logs: dict, *args, **kwargs):
        """Adds the mean of each loss term since the last log (the evaluation's terms to an evaluation's log)."""
        evaluation = any(key.startswith("eval_") for key in logs)
        for name in list(self._logged_terms):
            if name.startswith("eval_") == evaluation:
                values = self._logged_terms.pop(name)
                logs[name if evaluation else f"loss_{name}"] = sum(values) / len(values)
        super().log(logs, *args, **kwargs)


def heads_outside(model: nn.Module, part: nn.Module) -> list[nn.Module]:
    """The outermost modules of `model` that neither hold `part` nor lie inside it: its task heads."""
    inside, holders = set(part.modules()), {module for module in model.modules() if part in set(module.modules())}
    return [child for holder in holders for child in holder.children() if child not in inside and child not in holders]


@torch.no_grad()
def fidelity(
    student: nn.Module,
    teacher: nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_size: int = 32,
) -> dict:
    """How closely `student` (a castled model) computes what `teacher` (its source) computes on `pixel_values`:

    - `feature_cosine`: the mean cosine similarity of their castled parts' features, token by token (feature maps:
      position by position), in [−1, 1], 1 when they agree;
    - `feature_relative_error`: ‖f_s − f_t‖ / ‖f_t‖ over all of them;
    - `output_relative_error` (models with class logits or depth): the same for the task output;
    - `prediction_agreement` (models with class logits): the share of images (segmenters: pixels) whose predicted
      class is the teacher's;
    - with `labels`, each model's task metric: `castled_accuracy` / `source_accuracy` for a classifier (labels: class
      ids), `castled_mean_iou` / `source_mean_iou` for a segmenter (labels: `(images, height, width)` class maps,
      255 ignored; logits resized to them).

    Both run in eval mode, at the resolution of `pixel_values` (position embeddings resized where it is not theirs).
    """
    student_part, teacher_part = castled_part(student), source_part(teacher)
    modes = (student.training, teacher.training)
    student.eval(), teacher.eval()
    totals = dict(cosine=0.0, positions=0, feature_error=0.0, feature_norm=0.0, output_error=0.0, output_norm=0.0)
    predictions = {"castled": [], "source": []}
    has_output = False
    try:
        for batch in pixel_values.split(batch_size):
            (student_outputs, student_features), (teacher_outputs, teacher_features) = (
                run_capturing(model, part, batch) for model, part in ((student, student_part), (teacher, teacher_part))
            )
            for s, t in zip(student_features, teacher_features, strict=True):
                s, t = s.float(), t.float()
                channel_axis = -1 if s.dim() == 3 else 1  # token sequences are channels-last, feature maps first
                cosine = F.cosine_similarity(s, t, dim=channel_axis)
                totals["cosine"] += cosine.sum().item()
                totals["positions"] += cosine.numel()
                totals["feature_error"] += (s - t).pow(2).sum().item()
                totals["feature_norm"] += t.pow(2).sum().item()
            student_output, teacher_output = task_output(student_outputs), task_output(teacher_outputs)
            if student_output is not None:
                has_output = True
                totals["output_error"] += (student_output.float() - teacher_output.float()).pow(2).sum().item()
                totals["output_norm"] += teacher_output.float().pow(2).sum().item()
                if class_logits(student_outputs) is not None:
                    predictions["castled"].append(predicted_classes(student_output, labels))
                    predictions["source"].append(predicted_classes(teacher_output, labels))
    finally:
        student.train(modes[0]), teacher.train(modes[1])
    report = {
        "feature_cosine": totals["cosine"] / totals["positions"],
        "feature_relative_error": math.sqrt(totals["feature_error"] / max(totals["feature_norm"], 1e-12)),
    }
    if has_output:
        report["output_relative_error"] = math.sqrt(totals["output_error"] / max(totals["output_norm"], 1e-12))
    if predictions["castled"]:
        castled, source = (torch.cat(predictions[name]) for name in ("castled", "source"))
        report["prediction_agreement"] = (castled == source).float().mean().item()
        if labels is not None:
            report.update(task_metric(castled, labels, "castled", student))
            report.update(task_metric(source, labels, "source", student))
    return report


def run_capturing(model: nn.Module, part: nn.Module, pixel_values: torch.Tensor):
    """`model`'s outputs on `pixel_values` and the features of its `part`, resizing position embeddings as needed."""
    with captured_features(part) as features:
        outputs = model(pixel_values=pixel_values, **resize_positions(model, pixel_values))
    return outputs, features[0]


def predicted_classes(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The argmax class of classifier logits `(batch, classes)`, or of segmenter logits `(batch, classes, h, w)`
    resized (bilinearly) to the label maps where those are given."""
    if logits.dim() == 4 and labels is not None and labels.shape[-2:] != logits.shape[-2:]:
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)


def task_metric(predictions: torch.Tensor, labels: torch.Tensor, name: str, model: nn.Module) -> dict:
    """Accuracy of class predictions against class ids, or mean IoU of predicted class maps against label maps (the
    model's `num_labels` classes, 255 ignored), as `{name}_accuracy` / `{name}_mean_iou`."""
    if predictions.dim() == 1:
        return {f"{name}_accuracy": (predictions == labels).float().mean().item()}
    from .metrics import MeanIoU

    result = MeanIoU().compute(
        predictions=list(predictions.numpy()),
        references=list(labels.numpy()),
        num_labels=model.config.num_labels,
        ignore_index=255,
    )
    return {f"{name}_mean_iou": float(result["mean_iou"])}


def fidelity_report(
    student: nn.Module, teacher: nn.Module, pixel_values: torch.Tensor, labels=None, scales=(1, 2)
) -> dict:
    """`fidelity` at the resolution of `pixel_values` and at each of `scales` times it (the images resized
    bicubically), keyed "1x", "2x", ...; each entry also gives its `resolution` (height, width). Label maps are
    resized with the images (nearest), class ids stay."""
    report = {}
    for scale in scales:
        pixels, scaled_labels = pixel_values, labels
        if scale != 1:
            pixels = F.interpolate(pixel_values, scale_factor=scale, mode="bicubic", align_corners=False)
            if labels is not None and labels.dim() == 3:
                scaled_labels = F.interpolate(labels[:, None].float(), scale_factor=scale, mode="nearest")[:, 0].long()
        entry = fidelity(student, teacher, pixels, scaled_labels)
        report[f"{scale}x"] = {"resolution": list(pixels.shape[-2:]), **entry}
    return report


def task_output(outputs) -> torch.Tensor | None:
    """A model's task output: class logits or predicted depth; None for a base model or a backbone."""
    logits = class_logits(outputs)
    return logits if logits is not None else getattr(outputs, "predicted_depth", None)


def resize_positions(model: nn.Module, pixel_values: torch.Tensor) -> dict:
    """`interpolate_pos_encoding=True` for a model whose forward takes it (ViT, DeiT and Castling-ViT classifiers
    refuse another resolution without it); nothing for the others, which resize on their own."""
    accepts = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    return {"interpolate_pos_encoding": True} if accepts else {}


__all__ = [
    "CastlingDistillationTrainer",
    "castled_part",
    "distillation_losses",
    "fidelity",
    "fidelity_report",
]
