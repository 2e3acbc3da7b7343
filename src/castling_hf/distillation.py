"""Castling without labels (docs/design.md §9): a castled model learns from its frozen source, on images alone.

The student is what `castle` made of the teacher, so the two share their structure: the part castling changed (the
first vision tower, castled in place, or a timm MViTv2's stages up to its final norm) returns the same features in
the same layout, and the task head, if any, is the source's own. The loss compares what both compute:

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
from accelerate.utils import gather_object
from torch import nn
from torchmetrics.functional.classification import multiclass_confusion_matrix
from transformers import PreTrainedModel, Trainer
from transformers.modeling_outputs import ImageClassifierOutput

from .attention import CastlingSoftmaxBranch
from .in_place import CastlingAttentionTerms, first_tower
from .metrics import segmentation_scores
from .modeling_utils import CastlingDropPath, softmax_branches
from .models.castling_mvitv2 import CastlingMViTv2Backbone, CastlingMViTv2Model
from .models.castling_vit import CastlingViTBackbone, CastlingViTModel
from .models.castling_vit.modeling_castling_vit import CastlingViTRotaryEmbedding
from .training import CastlingMaskDecayCallback

# The part castling converts, in each family: the encoder or the backbone.
CASTLED_PARTS = (CastlingViTModel, CastlingViTBackbone, CastlingMViTv2Model, CastlingMViTv2Backbone)
# Modules that draw random numbers in training mode: dropout, stochastic depth, DINOv3's augmentation of the rotary
# positions, and the softmax branch (its attention dropout); a source castled in place has its family's own, named so.
RANDOM_IN_TRAINING = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    CastlingDropPath,
    CastlingViTRotaryEmbedding,
    CastlingSoftmaxBranch,
)
RANDOM_IN_TRAINING_NAMES = ("DropPath", "DINOv3ViTRopePositionEmbedding")


def random_in_training(module: nn.Module) -> bool:
    return isinstance(module, RANDOM_IN_TRAINING) or type(module).__name__.endswith(RANDOM_IN_TRAINING_NAMES)


def castled_part(model: nn.Module) -> nn.Module:
    """The Castling encoder or backbone inside `model` (a castled classifier, base model, backbone or task model, of
    either family), or the vision tower of a model castled in place: the part castling converted, whose features the
    distillation compares."""
    parts = [module for module in model.modules() if isinstance(module, CASTLED_PARTS)]
    if not parts and any(isinstance(module, CastlingAttentionTerms) for module in model.modules()):
        parts = [first_tower(model)]  # castled in place: its own vision tower
    if not parts:
        raise TypeError(
            f"{type(model).__name__} holds no Castling encoder or backbone; give the model castling_hf.castle made "
            "of the source."
        )
    return parts[0]


def source_part(source: nn.Module) -> nn.Module:
    """The part of a source whose features the distillation compares with its castled model's `castled_part`: its
    first vision tower (the module holding its embeddings), or for a timm MViTv2 its final norm, whose output is its
    final tokens (what a Castling-MViTv2 base model returns)."""
    from .conversion_timm import timm_model_of

    timm_model = timm_model_of(source)
    if timm_model is not None:
        return timm_model.norm
    tower = first_tower(source)
    if tower is None:
        raise TypeError(
            f"{type(source).__name__} holds no vision tower that castle takes; give the castled model's source."
        )
    return tower


@contextmanager
def captured_features(part: nn.Module):
    """Within the block, `features[0]` is the output of `part`'s last forward pass: its final hidden states
    (`last_hidden_state`), its feature maps (`feature_maps`), or the tensor it returns (a timm model's final norm),
    as a tuple of tensors."""
    features = []

    def keep(module, args, output):
        if isinstance(output, torch.Tensor):
            features[:] = [(output,)]
            return
        maps = getattr(output, "feature_maps", None)
        features[:] = [tuple(maps) if maps is not None else (output.last_hidden_state,)]

    handle = part.register_forward_hook(keep)
    try:
        yield features
    finally:
        handle.remove()


def run_model(model: nn.Module, pixel_values: torch.Tensor, prompts: dict | None = None):
    """`model`'s outputs on `pixel_values`: a `transformers` model's own (its position embeddings resized for a
    resolution other than its own, where its forward takes `interpolate_pos_encoding`), a timm model's logits as an
    `ImageClassifierOutput`."""
    if isinstance(model, PreTrainedModel):
        # A classifier on a vision tower (CLIP's) may take it only through its keyword arguments, for the tower.
        tower = first_tower(model)
        accepts = any(
            "interpolate_pos_encoding" in inspect.signature(module.forward).parameters
            for module in (model, *([tower] if tower is not None else []))
        )
        resize = {"interpolate_pos_encoding": True} if accepts else {}
        if prompts is not None:
            return model(pixel_values=pixel_values, **resize, **prompts)
        return image_side(model)(pixel_values=pixel_values, **resize)
    return ImageClassifierOutput(logits=model(pixel_values))


def image_side(model: nn.Module):
    """What runs a model on images alone: the model, or a two-tower model's (SigLIP's, CLIP's) `get_image_features`,
    as its forward needs texts too."""
    inner = getattr(model, "module", model)  # under DistributedDataParallel
    if hasattr(inner, "get_image_features") and hasattr(inner, "get_text_features"):
        return inner.get_image_features
    return model


def relative_squared_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """‖s − t‖² / ‖t‖², summed over the whole batch: 0 for equal tensors, 1 for a student that outputs zeros."""
    return (student.float() - teacher.float()).pow(2).sum() / teacher.float().pow(2).sum().clamp_min(1e-12)


def class_logits(outputs) -> torch.Tensor | None:
    """The class logits of a classifier `(batch, classes)`, a two-tower model run with prompts (its zero-shot logits,
    `(images, prompts)`) or a segmenter `(batch, classes, height, width)`; None for a model that has none."""
    logits = getattr(outputs, "logits", None)
    if logits is None:
        logits = getattr(outputs, "logits_per_image", None)
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
    `logits_kl`, `depth`, `features` (the mean over feature maps, times `feature_loss_weight` w; 0 leaves it out):
    a castled model should compute what its source computes, features included (docs/design.md §9)."""
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
    features times `feature_loss_weight` (always, unless 0). It is a mean over the batch: labels in the batch are
    ignored (only `pixel_values` is read), and with gradient accumulation the Trainer divides it by the accumulation
    steps. Evaluation reports the same loss on the evaluation images (`eval_loss`) and its terms (`eval_logits_kl`,
    ...); during training, of the model the switch would give (`CastlingMaskDecayCallback`'s `evaluate_switched`), so
    that `load_best_model_at_end` keeps the best castled model, not the one closest to its source while α > 0.

    Unless `callbacks` holds a `CastlingMaskDecayCallback`, one is added that decays α from 1 to 0 over the first
    quarter of the run (`mask_decay_end=0.25`): with the convex blend `castle` sets, the layers are then the
    linear-angular term alone for the last three quarters. Without a decay the student would stay its teacher.

    The student sees what its teacher sees: unless `training_noise`, its dropout, stochastic depth and position
    augmentation (DINOv3's RoPE) stay off, as they are in the teacher, which runs in evaluation mode; so at α = 1 the
    loss is 0. Unless `train_heads`, everything outside the castled part (a classifier, UperNet's heads, a depth head)
    keeps the source's weights and runs as in evaluation (batch-norm statistics included), so that it stays the head
    the source's users know. The teacher is prepared as the student is (`accelerator.prepare_model(...,
    evaluation_mode=True)`): on its device, and under `--bf16` / `--fp16` in the same autocast.

    With `mix_images` (the default) each training image gets a rectangle of another image of the batch pasted in
    (`pasted_images`) before both models see it: a user's images are often few, and the teacher labels any image.
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
        training_noise=False,
        mix_images=True,
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
        # The loss is a mean over the batch, never a sum for the Trainer to divide by a count of labels: it divides it
        # by the accumulation steps only when told that the model does not take that count.
        self.model_accepts_loss_kwargs = False
        self.temperature, self.feature_loss_weight, self.mix_images = temperature, feature_loss_weight, mix_images
        self.label_names = []  # no labels: the evaluation loss comes from the teacher
        self._student_part, self._teacher_part = castled_part(self.model), source_part(teacher_model)
        self.teacher_model = self.accelerator.prepare_model(
            teacher_model.eval().requires_grad_(False), evaluation_mode=True
        ).to(self.args.device)
        heads = [] if train_heads else heads_outside(self.model, self._student_part)
        for head in heads:
            head.requires_grad_(False)
        noise = [] if training_noise else [m for m in self.model.modules() if random_in_training(m)]
        self._kept_in_evaluation_mode = heads + noise
        self._logged_terms: dict[str, list[torch.Tensor]] = {}

    def distillation_losses(self, model, pixel_values: torch.Tensor) -> tuple[dict[str, torch.Tensor], object]:
        with torch.no_grad(), captured_features(self._teacher_part) as teacher_features:
            teacher_outputs = run_model(self.teacher_model, pixel_values)
        with captured_features(self._student_part) as student_features:
            student_outputs = image_side(model)(pixel_values=pixel_values)
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
        for module in self._kept_in_evaluation_mode:  # the Trainer has just put the whole model in training mode
            module.eval()
        pixel_values = pasted_images(inputs["pixel_values"]) if self.mix_images else inputs["pixel_values"]
        losses, outputs = self.distillation_losses(model, pixel_values)
        for name, value in losses.items():
            self._logged_terms.setdefault(name, []).append(value.detach())
        loss = sum(losses.values())
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            losses, _ = self.distillation_losses(model, inputs["pixel_values"])
        for name, value in losses.items():
            self._logged_terms.setdefault(f"eval_{name}", []).append(value.detach())
        return sum(losses.values()).detach(), None, None

    def log(self, logs: dict, *args, **kwargs):
        """Adds the mean of each loss term since the last log (the evaluation's terms to an evaluation's log), read
        back from the device here rather than at every step."""
        evaluation = any(key.startswith("eval_") for key in logs)
        for name in list(self._logged_terms):
            if name.startswith("eval_") == evaluation:
                values = self._logged_terms.pop(name)
                logs[name if evaluation else f"loss_{name}"] = torch.stack(values).float().mean().item()
        super().log(logs, *args, **kwargs)


def pasted_images(pixel_values: torch.Tensor) -> torch.Tensor:
    """CutMix without labels: each image with a rectangle of another image of the batch pasted in, its sides a quarter
    to a half of the image's, taken from and put at random places. The teacher labels the mixed image, so no label is
    mixed; the student meets more than the images it was given."""
    batch, _, height, width = pixel_values.shape

    def window(side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: the pasted extent along one axis, where it goes and where it comes from."""
        extent = torch.randint(side // 4, side // 2 + 1, (batch,))
        target = (torch.rand(batch) * (side - extent + 1)).long()
        source = (torch.rand(batch) * (side - extent + 1)).long()
        return extent, target, source

    def spans(side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and position along the axis: whether it is pasted over, and the position it is read from."""
        extent, target, source = window(side)
        positions = torch.arange(side)[None]
        inside = (positions >= target[:, None]) & (positions < (target + extent)[:, None])
        return inside, (positions - target[:, None] + source[:, None]).clamp(0, side - 1)

    (rows_inside, rows), (columns_inside, columns) = spans(height), spans(width)
    others = torch.randperm(batch)
    device = pixel_values.device
    pasted = pixel_values[others.to(device)[:, None, None], :, rows.to(device)[:, :, None], columns.to(device)[:, None]]
    inside = (rows_inside[:, :, None] & columns_inside[:, None]).to(device)
    return torch.where(inside[:, None], pasted.permute(0, 3, 1, 2), pixel_values)


def heads_outside(model: nn.Module, part: nn.Module) -> list[nn.Module]:
    """The outermost modules of `model` that neither hold `part` nor lie inside it: its task heads."""
    inside, holders = set(part.modules()), {module for module in model.modules() if part in set(module.modules())}
    return [child for holder in holders for child in holder.children() if child not in inside and child not in holders]


def image_batches(images, labels: torch.Tensor | None, batch_size: int):
    """(pixel values, labels or None) batch by batch, from a tensor of images (and its labels) or from an iterable of
    batches, each a dict with `pixel_values` and, where known, `labels` (e.g. a `DataLoader`)."""
    if isinstance(images, torch.Tensor):
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size], None if labels is None else labels[start : start + batch_size]
        return
    for batch in images:
        yield batch["pixel_values"], batch.get("labels")


@torch.no_grad()
def fidelity(
    student: nn.Module,
    teacher: nn.Module,
    images,
    labels: torch.Tensor | None = None,
    scale: float = 1,
    batch_size: int = 32,
    accelerator=None,
    prompts: dict | None = None,
) -> dict:
    """How closely `student` (a castled model) computes what `teacher` (its source) computes on `images`:

    - `feature_cosine`: the mean cosine similarity of their castled parts' features, token by token (feature maps:
      position by position), in [−1, 1], 1 when they agree;
    - `feature_relative_error`: ‖f_s − f_t‖ / ‖f_t‖ over all of them;
    - `output_relative_error` (models with class logits or depth): the same for the task output;
    - `prediction_agreement` (models with class logits, a universal segmenter's queries, or a two-tower model given
      `prompts`, the tokenised texts of its zero-shot classes): the share of images (segmenters: pixels) whose
      predicted class is the teacher's;
    - with labels, each model's task metric: `castled_accuracy` / `source_accuracy` for a classifier (labels: class
      ids), `castled_mean_iou` / `source_mean_iou` for a segmenter (labels: `(images, height, width)` class maps,
      255 ignored; logits resized to them);
    - `resolution`: the (height, width) the models ran at.

    `images` is a tensor of pixel values (its class ids or label maps in `labels`), or an iterable of batches of
    dicts with `pixel_values` and, where known, `labels` (a `DataLoader`): the images are read batch by batch, each
    moved to the student's device; `scale` ≠ 1 resizes them (bicubically, label maps with them, nearest). With
    `accelerator` every process scores its share of the batches and their counts are gathered, so that each returns
    the whole report. Both models run in eval mode (as they were afterwards), position embeddings resized where the
    resolution is not theirs.
    """
    student_part, teacher_part = castled_part(student), source_part(teacher)
    device = next(student.parameters()).device
    prompts = None if prompts is None else {name: value.to(device) for name, value in prompts.items()}
    rank, processes = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    modes = (student.training, teacher.training)
    student.eval(), teacher.eval()
    counts, batches, scored, last = {}, 0, 0, None
    try:
        for pixels, batch_labels in image_batches(images, labels, batch_size):
            batches += 1
            if (batches - 1) % processes != rank:
                continue
            batch_labels = None if batch_labels is None else batch_labels.to(device)
            pixels, batch_labels = resized(pixels.to(device), batch_labels, scale)
            add_counts(counts, score_batch(student, teacher, student_part, teacher_part, pixels, batch_labels, prompts))
            scored, last = scored + 1, (pixels, batch_labels)
        # Every process runs as many forward passes (a sharded student needs every one at each): those with a batch
        # fewer score their last one again, and throw the result away.
        if last is not None and scored < math.ceil(batches / processes):
            score_batch(student, teacher, student_part, teacher_part, *last, prompts)
    finally:
        student.train(modes[0]), teacher.train(modes[1])
    if processes > 1:
        gathered, counts = gather_object([counts]), {}
        for part in gathered:
            add_counts(counts, part)
    return report_from_counts(counts)


def resized(pixels: torch.Tensor, labels: torch.Tensor | None, scale: float):
    """Images resized by `scale` (bicubically), and label maps with them (nearest); class ids stay."""
    if scale == 1:
        return pixels, labels
    pixels = F.interpolate(pixels, scale_factor=scale, mode="bicubic", align_corners=False)
    if labels is not None and labels.dim() == 3:
        labels = F.interpolate(labels[:, None].float(), scale_factor=scale, mode="nearest")[:, 0].long()
    return pixels, labels


def score_batch(student, teacher, student_part, teacher_part, pixels, labels, prompts=None) -> dict:
    """The counts behind `fidelity` for one batch: sums over its tokens, images or pixels, and the predictions' hits
    (classifiers) or confusion matrices (segmenters) where there are labels."""
    (student_outputs, student_features), (teacher_outputs, teacher_features) = (
        run_capturing(model, part, pixels, prompts)
        for model, part in ((student, student_part), (teacher, teacher_part))
    )
    counts = {"resolution": tuple(pixels.shape[-2:]), "cosine": 0.0, "positions": 0, "error": 0.0, "norm": 0.0}
    for s, t in zip(student_features, teacher_features, strict=True):
        s, t = s.float(), t.float()
        channel_axis = -1 if s.dim() == 3 else 1  # token sequences are channels-last, feature maps first
        cosine = F.cosine_similarity(s, t, dim=channel_axis)
        counts["cosine"] += cosine.sum().item()
        counts["positions"] += cosine.numel()
        counts["error"] += (s - t).pow(2).sum().item()
        counts["norm"] += t.pow(2).sum().item()
    student_output, teacher_output = task_output(student_outputs), task_output(teacher_outputs)
    if student_output is None:
        return counts
    counts["output_error"] = (student_output.float() - teacher_output.float()).pow(2).sum().item()
    counts["output_norm"] = teacher_output.float().pow(2).sum().item()
    if class_logits(student_outputs) is None and query_segmentation(student_outputs) is None:
        return counts
    castled, source = (predicted_classes(output, labels) for output in (student_output, teacher_output))
    counts["agreeing"], counts["predictions"] = (castled == source).sum().item(), castled.numel()
    if labels is not None and castled.dim() == 1:
        counts["castled_hits"], counts["source_hits"] = ((p == labels).sum().item() for p in (castled, source))
    elif labels is not None:
        classes = student_output.shape[1]
        for name, predicted in (("castled", castled), ("source", source)):
            counts[f"{name}_confusion"] = multiclass_confusion_matrix(
                predicted, labels, classes, ignore_index=255
            ).cpu()
    return counts


def add_counts(total: dict, counts: dict) -> None:
    for name, value in counts.items():
        total[name] = value if name == "resolution" or name not in total else total[name] + value


def report_from_counts(counts: dict) -> dict:
    """`fidelity`'s report from the counts of all its batches."""
    report = {
        "resolution": list(counts["resolution"]),
        "feature_cosine": counts["cosine"] / counts["positions"],
        "feature_relative_error": math.sqrt(counts["error"] / max(counts["norm"], 1e-12)),
    }
    if "output_error" in counts:
        report["output_relative_error"] = math.sqrt(counts["output_error"] / max(counts["output_norm"], 1e-12))
    if "agreeing" in counts:
        report["prediction_agreement"] = counts["agreeing"] / counts["predictions"]
    for name in ("castled", "source"):
        if f"{name}_hits" in counts:
            report[f"{name}_accuracy"] = counts[f"{name}_hits"] / counts["predictions"]
        if f"{name}_confusion" in counts:
            report[f"{name}_mean_iou"] = segmentation_scores(counts[f"{name}_confusion"].double().numpy())["mean_iou"]
    return report


def run_capturing(model: nn.Module, part: nn.Module, pixel_values: torch.Tensor, prompts: dict | None = None):
    """`model`'s outputs on `pixel_values` (and `prompts`, `run_model`) and the features of its `part`."""
    with captured_features(part) as features:
        outputs = run_model(model, pixel_values, prompts)
    return outputs, features[0]


def predicted_classes(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The argmax class of classifier logits `(batch, classes)`, or of segmenter logits `(batch, classes, h, w)`
    resized (bilinearly) to the label maps where those are given."""
    if logits.dim() == 4 and labels is not None and labels.shape[-2:] != logits.shape[-2:]:
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)


def fidelity_report(student: nn.Module, teacher: nn.Module, images, labels=None, scales=(1, 2), **kwargs) -> dict:
    """`fidelity` at the resolution of `images` and at each of `scales` times it, keyed "1x", "2x", ...; `kwargs`
    as `fidelity` takes them (`batch_size`, `accelerator`). `images` is read once per scale."""
    return {f"{scale}x": fidelity(student, teacher, images, labels, scale, **kwargs) for scale in scales}


def query_segmentation(outputs) -> torch.Tensor | None:
    """The per-pixel class scores `(batch, classes, h, w)` of a universal segmenter's queries (EoMT's, Mask2Former's),
    as their semantic post-processing forms them: Σ_q softmax(class logits of q) without the null class ×
    sigmoid(mask logits of q); None for another model."""
    classes, masks = (getattr(outputs, name, None) for name in ("class_queries_logits", "masks_queries_logits"))
    if classes is None or masks is None:
        return None
    return torch.einsum("bqc,bqhw->bchw", classes.float().softmax(dim=-1)[..., :-1], masks.float().sigmoid())


def task_output(outputs) -> torch.Tensor | None:
    """A model's task output: class logits, a universal segmenter's per-pixel class scores, or predicted depth; None
    for a base model or a backbone."""
    for output in (class_logits(outputs), query_segmentation(outputs)):
        if output is not None:
            return output
    return getattr(outputs, "predicted_depth", None)


__all__ = [
    "CastlingDistillationTrainer",
    "castled_part",
    "query_segmentation",
    "distillation_losses",
    "fidelity",
    "fidelity_report",
]
