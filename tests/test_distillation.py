"""Castling without labels: the distillation loss, the Trainer that minimises it, and the fidelity report."""

import pytest
import torch
from transformers import (
    Dinov2Config,
    TrainingArguments,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from castling_hf import CastlingDistillationTrainer, CastlingMaskDecayCallback, castle, fidelity, switch_to_inference
from castling_hf.conversion import source_part
from castling_hf.distillation import (
    captured_features,
    castled_part,
    distillation_losses,
    relative_squared_error,
    soft_label_divergence,
)

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)


def pretrained(model: torch.nn.Module) -> torch.nn.Module:
    """Weights far from their init, so that the softmax attention is sharp and castling has something to learn."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3)
    return model.eval()


def images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run_with_features(model, pixel_values, part):
    with torch.no_grad(), captured_features(part) as features:
        outputs = model(pixel_values=pixel_values)
    return outputs, features[0]


@pytest.mark.parametrize(
    "build, weight, terms",
    [
        (lambda: ViTForImageClassification(ViTConfig(**TINY, num_labels=5)), 1.0, {"logits_kl", "features"}),
        (lambda: ViTForImageClassification(ViTConfig(**TINY, num_labels=5)), 0.0, {"logits_kl"}),
        (lambda: ViTModel(ViTConfig(**TINY)), 0.5, {"features"}),
    ],
    ids=["classifier", "classifier_without_features", "base_model"],
)
def test_the_loss_compares_what_the_model_computes_and_is_zero_at_the_exact_start(build, weight, terms):
    teacher = pretrained(build())
    student = castle(teacher)
    pixels = images(4)
    teacher_run = run_with_features(teacher, pixels, source_part(teacher))
    student_run = run_with_features(student, pixels, castled_part(student))
    losses = distillation_losses(student_run[0], teacher_run[0], student_run[1], teacher_run[1], 1.0, weight)
    assert set(losses) == terms
    assert all(value.item() < 1e-9 for value in losses.values())  # α = 1: the castled model is its source

    student.set_softmax_mask_scale(0.0)  # the linear form, untrained: far from the source
    student_run = run_with_features(student, pixels, castled_part(student))
    losses = distillation_losses(student_run[0], teacher_run[0], student_run[1], teacher_run[1], 1.0, weight)
    assert all(value.item() > 1e-3 for value in losses.values())
    if "features" in terms:  # a weighted mean of relative squared errors over the feature maps
        expected = relative_squared_error(student_run[1][0], teacher_run[1][0]) * weight
        torch.testing.assert_close(losses["features"], expected)


def test_soft_label_divergence_is_kl_over_the_class_axis_for_images_and_pixels():
    teacher, student = torch.randn(3, 5), torch.randn(3, 5)
    expected = (teacher.softmax(1) * (teacher.log_softmax(1) - student.log_softmax(1))).sum(1).mean()
    torch.testing.assert_close(soft_label_divergence(student, teacher, 1.0), expected)
    # Per pixel: the class axis of (batch, classes, height, width) logits is 1.
    maps = teacher.view(3, 5, 1, 1).expand(3, 5, 2, 2), student.view(3, 5, 1, 1).expand(3, 5, 2, 2)
    torch.testing.assert_close(soft_label_divergence(maps[1], maps[0], 1.0), expected)
    assert soft_label_divergence(student * 2, teacher * 2, 2.0) == pytest.approx(4 * expected.item(), rel=1e-5)


def test_the_parts_compared_are_the_castled_encoder_and_the_sources_own():
    classifier = pretrained(ViTForImageClassification(ViTConfig(**TINY, num_labels=5)))
    assert isinstance(source_part(classifier), ViTModel)
    castled = castle(classifier)
    assert castled_part(castled) is castled.castling_vit
    upernet = UperNetForSemanticSegmentation(
        UperNetConfig(
            backbone_config=Dinov2Config(**TINY, out_indices=[1, 2], reshape_hidden_states=True),
            hidden_size=16,
            num_labels=3,
            auxiliary_in_channels=32,
        )
    )
    assert type(source_part(upernet)).__name__ == "Dinov2Backbone"
    castled = castle(upernet)
    assert castled_part(castled) is castled.backbone


def training_arguments(tmp_path, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )


def test_distillation_without_labels_brings_the_switched_model_close_to_its_source(tmp_path):
    teacher = pretrained(ViTForImageClassification(ViTConfig(**TINY, num_labels=5)))
    held_out = images(64, seed=1)
    untrained = switch_to_inference(castle(teacher), force=True)
    before = fidelity(untrained, teacher, held_out)

    student = castle(teacher).train()
    train = [{"pixel_values": pixels, "labels": torch.tensor(0)} for pixels in images(2048)]  # labels are ignored
    trainer = CastlingDistillationTrainer(
        model=student, teacher_model=teacher, args=training_arguments(tmp_path, 400), train_dataset=train
    )
    assert any(isinstance(callback, CastlingMaskDecayCallback) for callback in trainer.callback_handler.callbacks)
    trainer.train()
    assert set(student.softmax_mask_scales().values()) == {0.0}  # the default decay ends at a quarter of the run
    switch_to_inference(student)
    after = fidelity(student, teacher, held_out)

    assert after["feature_relative_error"] < 0.7 * before["feature_relative_error"]
    assert after["output_relative_error"] < 0.7 * before["output_relative_error"]
    assert after["feature_cosine"] > before["feature_cosine"]
    losses = [
        entry["loss"]
        for entry in trainer.state.log_history
        if entry.get("softmax_mask_scale") == 0.0 and "loss" in entry
    ]
    assert losses[-1] < 0.8 * losses[0]  # after the decay: the linear form alone learns
    assert {"loss_logits_kl", "loss_features"} <= set(trainer.state.log_history[0])


def test_evaluation_reports_the_distillation_loss_on_held_out_images(tmp_path):
    teacher = pretrained(ViTForImageClassification(ViTConfig(**TINY, num_labels=5)))
    student = castle(teacher)
    held_out = [{"pixel_values": pixels} for pixels in images(32)]
    trainer = CastlingDistillationTrainer(
        model=student, teacher_model=teacher, args=training_arguments(tmp_path, 1), eval_dataset=held_out
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(0.0, abs=1e-9)  # α = 1: the student is its teacher
    student.set_softmax_mask_scale(0.0)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_logits_kl"] + metrics["eval_features"], rel=1e-5)
    assert metrics["eval_loss"] > 1e-3


def test_fidelity_is_exact_at_the_start_and_measured_at_another_resolution():
    teacher = pretrained(ViTForImageClassification(ViTConfig(**TINY, num_labels=5)))
    student = castle(teacher)
    for size in (32, 64):  # 64: the position embeddings of both are resized
        report = fidelity(student, teacher, images(8, size))
        assert report["feature_cosine"] == pytest.approx(1.0, abs=1e-6)
        assert report["feature_relative_error"] < 1e-5 and report["output_relative_error"] < 1e-5
        assert report["prediction_agreement"] == 1.0
    assert not student.training and not teacher.training


def test_the_trainer_needs_a_teacher():
    with pytest.raises(ValueError, match="needs teacher_model"):
        CastlingDistillationTrainer(model=castle(ViTModel(ViTConfig(**TINY))))
