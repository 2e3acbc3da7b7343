"""Model cards for Castling-ViT checkpoints, built with `huggingface_hub`'s `ModelCard` and `ModelCardData`.

The metadata (pipeline tag, library, tags, data sets, metrics, licence, eval results) goes in the card's YAML header,
where the Hub reads it; the body says what the model is, how to use it, how it was trained and where the numbers
came from. Every number in a card is passed in by the caller from a measurement (a benchmark JSON or an evaluation),
never written here.
"""

import os

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import in_place
from .configuration_utils import CastlingAttentionConfig
from .models.castling_mvitv2 import CastlingMViTv2PreTrainedModel
from .models.castling_vit import CastlingViTPreTrainedModel

PAPER = "https://arxiv.org/abs/2211.10526"
CITATION = """@inproceedings{you2023castling,
  title     = {Castling-ViT: Compressing Self-Attention via Switching Towards Linear-Angular Attention at Vision
               Transformer Inference},
  author    = {You, Haoran and Xiong, Yunyang and Dai, Xiaoliang and Wu, Bichen and Zhang, Peizhao and Fan, Haoqi and
               Vajda, Peter and Lin, Yingyan Celine},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}"""
TAGS = ["castling-vit", "vision", "linear-attention", "efficient-attention"]


PIPELINE_TAGS = {
    "CastlingMViTv2Model": "image-feature-extraction",
    "CastlingMViTv2Backbone": "image-feature-extraction",
    "CastlingMViTv2ForImageClassification": "image-classification",
    "CastlingViTModel": "image-feature-extraction",
    "CastlingViTBackbone": "image-feature-extraction",
    "CastlingViTForImageClassification": "image-classification",
    "CastlingViTForObjectDetection": "object-detection",
    "UperNetForSemanticSegmentation": "image-segmentation",
    "Mask2FormerForUniversalSegmentation": "image-segmentation",
    "DPTForDepthEstimation": "depth-estimation",
    "DepthAnythingForDepthEstimation": "depth-estimation",
}
# The Auto class of each model class: the inverse of the remote-code registration, and transformers' own task models
# that take Castling-ViT as their backbone (these load through the package only: their code is transformers').
AUTO_CLASSES = {
    model_class.__name__: auto_class
    for family in (CastlingViTPreTrainedModel, CastlingMViTv2PreTrainedModel)
    for auto_class, model_class in family.remote_auto_classes.items()
}
BACKBONE_TASK_AUTO_CLASSES = {
    "UperNetForSemanticSegmentation": "AutoModelForSemanticSegmentation",
    "Mask2FormerForUniversalSegmentation": "AutoModelForUniversalSegmentation",
    "DPTForDepthEstimation": "AutoModelForDepthEstimation",
    "DepthAnythingForDepthEstimation": "AutoModelForDepthEstimation",
}


def pipeline_tag_for(architecture: str) -> str:
    """The Hub pipeline tag of a Castling-ViT model class name, or of a class castled in place (its source's)."""
    castled = castled_classes().get(architecture)
    if castled is not None and in_place.pipeline_task(castled):
        return in_place.pipeline_task(castled)
    if architecture not in PIPELINE_TAGS:
        raise ValueError(
            f"Unknown Castling-ViT architecture {architecture!r}; expected one of {sorted(PIPELINE_TAGS)}."
        )
    return PIPELINE_TAGS[architecture]


def castling_model_card(
    config: CastlingAttentionConfig,
    model_name: str,
    architecture: str = "CastlingViTForImageClassification",
    eval_results: list[EvalResult] | None = None,
    datasets: list[str] | None = None,
    results_source: str | None = None,
    training_summary: str | None = None,
    notes: str | None = None,
    license: str = "apache-2.0",
    base_model: str | None = None,
    extra_sections: list[str] | None = None,
) -> ModelCard:
    """A card for a Castling-ViT checkpoint of class `architecture` with `config`.

    `eval_results` (measured) go into the YAML `model-index` and into a table in the body; `results_source` says
    where they came from (e.g. the benchmark command); `training_summary` replaces the generic training recipe;
    `notes` follow the description; `base_model` names the source a castled model was made from (YAML
    `base_model`); `extra_sections` (Markdown, each with its heading) go before the citation.
    """
    pipeline_tag = pipeline_tag_for(architecture)
    metrics = sorted({result.metric_type for result in eval_results or []}) or None
    card_data = ModelCardData(
        model_name=model_name,
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=[*TAGS, pipeline_tag],
        datasets=datasets or None,
        metrics=metrics,
        eval_results=eval_results or None,
        base_model=base_model,
    )
    sections = [
        f"# {model_name}",
        _description(config) + (f"\n\n{notes}" if notes else ""),
        _usage(architecture, pipeline_tag),
        "## Training: the mask decay\n\n" + (training_summary or _recipe(architecture)),
        _results(eval_results or [], results_source),
        *(extra_sections or []),
        f"## Citation\n\n[Castling-ViT (CVPR 2023)]({PAPER}):\n\n```bibtex\n{CITATION}\n```",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


# Trainer metric names (after the "eval_<form>_" prefix) that become card eval results, with their metric type.
CARD_METRICS = {
    "accuracy": "accuracy",
    "map": "mean_average_precision",
    "map_50": "mean_average_precision@0.5",
    "mean_iou": "mean_iou",
}


def eval_results_from_metrics(metrics: dict, prefix: str, task_type: str, dataset_name: str, split: str = "test"):
    """`EvalResult`s for the metrics in a `Trainer.evaluate()` dict whose keys start with `prefix` (e.g.
    `"eval_linear_"`), for the metrics a card reports (`CARD_METRICS`)."""
    return [
        EvalResult(
            task_type=task_type,
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric_type,
            metric_value=float(metrics[prefix + name]),
        )
        for name, metric_type in CARD_METRICS.items()
        if prefix + name in metrics
    ]


def training_run_card(
    model, model_name: str, metrics: dict, prefix: str, dataset_name: str, split: str = "test"
) -> ModelCard:
    """The card of a model at the end of a training run: its results are the run's last evaluation (`metrics`, keys
    `prefix + name`, e.g. `eval_linear_accuracy`) on the `split` of `dataset_name`."""
    architecture = type(model).__name__
    config = card_config(model)  # the Castling-ViT inside a task model, or a tower castled in place
    return castling_model_card(
        config,
        model_name=model_name,
        architecture=architecture,
        eval_results=eval_results_from_metrics(metrics, prefix, pipeline_tag_for(architecture), dataset_name, split),
        datasets=[dataset_name],
        results_source="the evaluation at the end of this training run, after the switch",
    )


def distillation_card(model, source: str, dataset_name: str, report: dict | None) -> ModelCard:
    """The card of a model castled from `source` (a Hub name or folder) without labels, by distillation from it on
    the images of `dataset_name`: it names the source (`base_model`) and gives the fidelity `report` (the
    distillation example's: per resolution, feature cosine and relative error, the task output's error, prediction
    agreement, and accuracies where labels exist)."""
    architecture = type(model).__name__
    config = card_config(model)
    eval_results = []
    if report and "castled_accuracy" in report.get("1x", {}):
        eval_results.append(
            EvalResult(
                task_type=pipeline_tag_for(architecture),
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                dataset_split="test",
                metric_type="accuracy",
                metric_value=report["1x"]["castled_accuracy"],
            )
        )
    recipe = (
        f"Castled from `{source}` with `castling_hf.castle` (its weights; the layers start as its softmax attention) "
        "and distilled from it, frozen, on images alone with `castling_hf.CastlingDistillationTrainer` while α fell "
        "from 1 to 0 (`examples/distillation/run_castle_distillation.py`): no labels were used. The task heads are "
        "the source's own. Use the source's image processor, which this checkpoint carries."
    )
    return castling_model_card(
        config,
        model_name=f"{source} (castled)",
        architecture=architecture,
        eval_results=eval_results,
        datasets=[dataset_name],
        results_source="the distillation example on the held-out images, after the switch",
        training_summary=recipe,
        base_model=source if not os.path.isdir(source) else None,
        extra_sections=[_fidelity_section(source, report)],
    )


def _fidelity_section(source: str, report: dict | None) -> str:
    if not report:
        return "## Fidelity to the source\n\nNot measured for this checkpoint."
    lines = [
        "| resolution | feature cosine | feature relative error | output relative error | predictions agree "
        "| accuracy (source) |",
        "|---|---|---|---|---|---|",
    ]
    for entry in report.values():
        height, width = entry["resolution"]
        output = f"{entry['output_relative_error']:.4f}" if "output_relative_error" in entry else "—"
        agree = f"{entry['prediction_agreement']:.2%}" if "prediction_agreement" in entry else "—"
        accuracy = (
            f"{entry['castled_accuracy']:.2%} ({entry['source_accuracy']:.2%})" if "castled_accuracy" in entry else "—"
        )
        lines.append(
            f"| {height}×{width} | {entry['feature_cosine']:.4f} | {entry['feature_relative_error']:.4f} | {output} "
            f"| {agree} | {accuracy} |"
        )
    return (
        f"## Fidelity to the source\n\nThis castled model against `{source}` on held-out images, at the training "
        "resolution and at twice it (features: the castled encoder's or backbone's outputs, token by token):\n\n"
        + "\n".join(lines)
    )


def mask_threshold_text(config: CastlingAttentionConfig) -> str:
    if config.softmax_mask_threshold is None:
        return "none (dense softmax branch)"
    if config.softmax_mask_threshold_type == "relative":
        return f"{config.softmax_mask_threshold:g} × 1/N (relative to the uniform probability over N tokens)"
    return f"{config.softmax_mask_threshold:g} (absolute)"


def architecture_rows(config: CastlingAttentionConfig) -> list[tuple[str, object]]:
    """The card's rows on a family's architecture: the plain family's width, depth and patches, or the multiscale
    family's stages."""
    if hasattr(config, "hidden_sizes"):  # Castling-MViTv2
        return [
            (
                "stage widths / depths / heads",
                f"{list(config.hidden_sizes)} / {list(config.depths)} / {list(config.num_attention_heads)}",
            ),
            ("MLP ratio", config.mlp_ratio),
            ("image size / patch stride", f"{config.image_size} / {config.patch_stride}"),
        ]
    return [
        (
            "hidden size / layers / heads",
            f"{config.hidden_size} / {config.num_hidden_layers} / {config.num_attention_heads}",
        ),
        ("MLP size", config.intermediate_size),
        ("image size / patch size", f"{config.image_size} / {config.patch_size}"),
    ]


def _description(config: CastlingAttentionConfig) -> str:
    mode = (
        '**inference form** (`attention_mode="linear"`): linear-angular attention and the residual conv only, '
        "cost linear in the number of image tokens"
        if config.attention_mode == "linear"
        else '**training form** (`attention_mode="castling"`): linear-angular attention, the residual conv and the '
        "auxiliary masked softmax attention weighted by each layer's softmax mask scale α"
    )
    rows = [
        *architecture_rows(config),
        ("angular normalisation", config.angular_normalization),
        ("residual conv", f"{config.residual_conv} (kernel {config.residual_kernel_size})"),
        ("softmax mask threshold τ (training form)", mask_threshold_text(config)),
        ("weight initialisation", config.weight_init),
    ]
    if config.linear_branch_blend != "additive":  # a castled model's training form
        rows.append(("blend of the linear term and the softmax branch (training form)", config.linear_branch_blend))
    table = "\n".join(["| field | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])
    return (
        "A [Castling-ViT](" + PAPER + ") for `transformers`: a ViT trained with linear-angular attention plus an "
        "auxiliary masked softmax attention whose weight decays to zero, which is then dropped, so that inference "
        f"runs linear-angular attention alone. This checkpoint is in the {mode}.\n\n{table}"
    )


def castled_classes() -> dict[str, type]:
    """The classes castled in place so far, by name."""
    return {cls.__name__: cls for cls in in_place.castled_model_classes()}


def card_config(model):
    """What a card describes of `model`: its Castling config (a task model's backbone config), or for a model
    castled in place its tower's architecture and Castling fields."""
    return in_place.card_fields(model) or getattr(model.config, "backbone_config", None) or model.config


def _usage(architecture: str, pipeline_tag: str) -> str:
    castled = castled_classes().get(architecture)
    if castled is not None:
        return _package_usage(in_place.auto_class_name(castled), pipeline_tag) + (
            "\n\nWithout it, the checkpoint carries the code that castles its `transformers` classes "
            "(`trust_remote_code=True`)."
        )
    if architecture in BACKBONE_TASK_AUTO_CLASSES:
        return _package_usage(BACKBONE_TASK_AUTO_CLASSES[architecture], pipeline_tag) + (
            f"\n\n`{architecture}` is `transformers`' own class with a Castling-ViT backbone "
            "(`config.backbone_config`): the package must be installed for it to load."
        )
    return (
        _package_usage(AUTO_CLASSES[architecture], pipeline_tag)
        + f"""

Without it, the checkpoint carries its modeling code:

```python
model = {AUTO_CLASSES[architecture]}.from_pretrained("<repo or directory>", trust_remote_code=True)
```"""
    )


def _package_usage(auto_class: str, pipeline_tag: str) -> str:
    return f"""## How to use

With the package (`pip install castling-hf`; `import castling_hf` registers the Auto classes):

```python
import castling_hf  # noqa: F401
from transformers import AutoImageProcessor, {auto_class}, pipeline

model = {auto_class}.from_pretrained("<repo or directory>")
image_processor = AutoImageProcessor.from_pretrained("<repo or directory>")
predictor = pipeline("{pipeline_tag}", model="<repo or directory>")
```"""


def _recipe(architecture: str) -> str:
    if architecture in BACKBONE_TASK_AUTO_CLASSES:  # transformers' class: no `inference=True` on its save_pretrained
        imports, save = (
            "CastlingMaskDecayCallback, switch_to_inference",
            (
                'switch_to_inference(model)  # attention_mode="linear" in config.backbone_config: the branch is gone\n'
                'model.save_pretrained("inference")'
            ),
        )
    else:
        imports = "CastlingMaskDecayCallback"
        save = 'model.save_pretrained("inference", inference=True)  # attention_mode="linear": the branch is gone'
    intro = (
        'Train in `attention_mode="castling"` with `castling_hf.CastlingMaskDecayCallback` (α falls from 1 to 0 over\n'
        "the first 75 % of the steps, cosine), then drop the softmax branch, which no longer contributes anything:"
    )
    return f"""{intro}

```python
from transformers import Trainer
from castling_hf import {imports}

trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[CastlingMaskDecayCallback(end=0.75)])
trainer.train()
{save}
```"""


def _results(eval_results: list[EvalResult], source: str | None) -> str:
    if not eval_results:
        return "## Results\n\nNo measurement has been made for this checkpoint yet."
    lines = ["| task | data | metric | value |", "|---|---|---|---|"]
    for result in eval_results:
        lines.append(
            f"| {result.task_type} | {result.dataset_name} | {result.metric_name or result.metric_type} "
            f"| {result.metric_value:.4g} |"
        )
    where = f"\n\nMeasured by {source}." if source else ""
    return "## Results\n\n" + "\n".join(lines) + where
