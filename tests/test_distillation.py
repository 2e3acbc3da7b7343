"""Castling without labels: the distillation loss, the Trainer that minimises it, and the fidelity report."""

import copy

import pytest
import torch
import transformers
from accelerate.state import AcceleratorState
from conftest import timm_helper
from datasets import Dataset
from transformers import (
    Dinov2Config,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    TrainingArguments,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from castling_hf import (
    CastlingDistillationTrainer,
    CastlingMaskDecayCallback,
    castle,
    fidelity,
    in_place,
    switch_to_inference,
)
from castling_hf.distillation import (
    captured_features,
    castled_part,
    distillation_losses,
    pasted_images,
    relative_squared_error,
    run_model,
    soft_label_divergence,
    source_part,
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
    assert castled_part(castled) is castled.vit
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


def training_arguments(tmp_path, steps: int, **overrides) -> TrainingArguments:
    settings = dict(
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
    return TrainingArguments(**{**settings, **overrides})


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


def test_fidelity_is_exact_at_the_start_measured_at_another_resolution_and_in_eval_mode():
    # Dropout everywhere: a model left in training mode would not compute what its source computes.
    noisy = dict(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    teacher = pretrained(ViTForImageClassification(ViTConfig(**TINY, **noisy, num_labels=5))).train()
    student = castle(teacher).train()
    for size in (32, 64):  # 64: the position embeddings of both are resized
        report = fidelity(student, teacher, images(8, size))
        assert report["resolution"] == [size, size]
        assert report["feature_cosine"] == pytest.approx(1.0, abs=1e-6)
        assert report["feature_relative_error"] < 1e-5 and report["output_relative_error"] < 1e-5
        assert report["prediction_agreement"] == 1.0
    assert student.training and teacher.training  # ran in eval mode, left as they were


class ElsewhereTensor(torch.Tensor):
    """A tensor on another device than the model's, as a loader's batches are on a GPU run: moved to a device
    (`.to(device)`) it is a plain tensor; any other operation but a slice or reading its shape fails, as one mixing
    devices does (a change of dtype alone leaves it where it was)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = super().__torch_function__(func, types, args, kwargs)
        if func is torch.Tensor.to:
            moved = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])
            return result.as_subclass(torch.Tensor) if moved else result
        if func in (torch.Tensor.__getitem__, torch.Tensor.dim, torch.Tensor.size, torch.Tensor.__len__):
            return result
        if getattr(func, "__name__", "") == "__get__":  # shape, dtype, device
            return result
        raise RuntimeError(f"Expected all tensors to be on the same device, but {func} got one on another.")


def test_fidelity_reads_batches_moves_them_to_the_models_device_and_scores_labels():
    teacher = pretrained(ViTForImageClassification(ViTConfig(**TINY, num_labels=5)))
    student = castle(teacher)
    student.set_softmax_mask_scale(0.0)  # away from the source, so that the counts mean something
    pixels, labels = images(10), torch.arange(10) % 5
    with torch.no_grad():
        predicted = {
            name: model(pixel_values=pixels).logits.argmax(1)
            for name, model in (("castled", student), ("source", teacher))
        }
    elsewhere = [{"pixel_values": pixels[i : i + 4], "labels": labels[i : i + 4]} for i in range(0, 10, 4)]
    elsewhere = [{key: value.as_subclass(ElsewhereTensor) for key, value in batch.items()} for batch in elsewhere]
    with pytest.raises(RuntimeError, match="same device"):  # what the source meets with the batches as they are
        teacher(pixel_values=elsewhere[0]["pixel_values"])
    streamed = fidelity(student, teacher, elsewhere)
    whole = fidelity(student, teacher, pixels, labels, batch_size=3)
    assert streamed.pop("resolution") == whole.pop("resolution")
    assert streamed == pytest.approx(whole, rel=1e-5)
    for name, classes in predicted.items():
        assert whole[f"{name}_accuracy"] == pytest.approx((classes == labels).float().mean().item())
    agreement = (predicted["castled"] == predicted["source"]).float().mean().item()
    assert whole["prediction_agreement"] == pytest.approx(agreement) and agreement < 1


def test_the_trainer_needs_a_teacher():
    with pytest.raises(ValueError, match="needs teacher_model"):
        CastlingDistillationTrainer(model=castle(ViTModel(ViTConfig(**TINY))))


def dinov3_with_its_training_noise():
    """A DINOv3 whose training mode draws random numbers: RoPE augmentation (shift, jitter, rescale) and stochastic
    depth, which castling carries over."""
    return DINOv3ViTModel(
        DINOv3ViTConfig(
            **TINY,
            num_register_tokens=2,
            pos_embed_shift=0.2,
            pos_embed_jitter=1.5,
            pos_embed_rescale=2.0,
            drop_path_rate=0.3,
        )
    )


def test_the_student_sees_what_its_teacher_sees_so_the_loss_starts_at_zero(tmp_path):
    teacher = pretrained(dinov3_with_its_training_noise())
    student = castle(teacher)
    args = training_arguments(tmp_path, 4, learning_rate=0.0, logging_steps=1)
    trainer = CastlingDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=[{"pixel_values": pixels} for pixels in images(48)],
        callbacks=[CastlingMaskDecayCallback(start=3, end=4)],  # α = 1 in every forward pass
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and max(losses) < 1e-10  # α = 1 and the same inputs: the castled model is its source

    noisy = CastlingDistillationTrainer(
        model=castle(teacher),
        teacher_model=teacher,
        args=args,
        train_dataset=trainer.train_dataset,
        callbacks=[CastlingMaskDecayCallback(start=3, end=4)],
        training_noise=True,
    )
    noisy.train()
    assert max(entry["loss"] for entry in noisy.state.log_history if "loss" in entry) > 1e-6  # asked for: it differs


def test_gradient_accumulation_of_batches_with_labels_steps_as_the_whole_batch_does(tmp_path):
    teacher = pretrained(ViTForImageClassification(ViTConfig(**TINY, num_labels=5)))
    data = [{"pixel_values": pixels, "labels": torch.tensor(0)} for pixels in images(16)]  # labels: ignored
    start = switch_to_inference(castle(teacher), force=True)  # the linear form: away from the source, it learns
    trained, losses = {}, {}
    for accumulation in (1, 2):
        student = copy.deepcopy(start)
        args = training_arguments(
            tmp_path / str(accumulation),
            1,
            per_device_train_batch_size=16 // accumulation,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.5,
            max_grad_norm=0.0,  # clipping would hide a gradient twice as large
        )
        trainer = CastlingDistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data,
            feature_loss_weight=0.0,  # the KL is a mean over images: two halves average to the whole batch's
            mix_images=False,  # pasting draws from the batch: halves would mix other images
        )
        losses[accumulation] = trainer.train().training_loss
        trained[accumulation] = dict(student.named_parameters())
    assert max((trained[2][name] - value).abs().max().item() for name, value in start.named_parameters()) > 1e-3
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)
    for name, value in trained[1].items():
        torch.testing.assert_close(trained[2][name], value, rtol=1e-4, atol=1e-6)


def test_under_bf16_the_teacher_runs_in_the_students_autocast(tmp_path):
    teacher = pretrained(ViTForImageClassification(ViTConfig(**TINY, num_labels=5)))
    AcceleratorState._reset_state(True)  # the process's accelerate state, as a new run in its own process has it
    args = training_arguments(tmp_path, 1, bf16=True)
    trainer = CastlingDistillationTrainer(model=castle(teacher), teacher_model=teacher, args=args)
    computed = []
    first_projection = next(module for module in teacher.modules() if isinstance(module, torch.nn.Linear))
    handle = first_projection.register_forward_hook(lambda module, args, output: computed.append(output.dtype))
    run_model(trainer.teacher_model, images(2))
    handle.remove()
    assert computed == [torch.bfloat16]
    assert next(teacher.parameters()).dtype == torch.float32  # computed in bf16, kept in fp32 as the student is


def test_a_castled_timm_mvitv2_distils_and_is_scored(tmp_path):
    timm = timm_helper().import_timm()
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    teacher = pretrained(
        MultiScaleVit(
            MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=8, num_heads=1, use_cls_token=True),
            img_size=32,
            num_classes=4,
        )
    )
    assert timm and source_part(teacher) is teacher.norm  # its final tokens, as the castled base model returns them
    student = castle(teacher)
    report = fidelity(student, teacher, images(4))
    assert report["feature_relative_error"] < 1e-5 and report["prediction_agreement"] == 1.0
    trainer = CastlingDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_arguments(tmp_path, 4),
        train_dataset=[{"pixel_values": pixels} for pixels in images(64)],
    )
    trainer.train()
    assert set(student.softmax_mask_scales().values()) == {0.0}
    assert {"loss_logits_kl", "loss_features"} <= set(trainer.state.log_history[0])


def test_pasted_images_paste_a_rectangle_of_another_image_of_the_batch():
    torch.manual_seed(0)
    pixels = torch.arange(4 * 2 * 16 * 16, dtype=torch.float32).view(4, 2, 16, 16)
    mixed = pasted_images(pixels)
    assert mixed.shape == pixels.shape
    for image in range(4):
        changed = (mixed[image] != pixels[image]).any(0)  # every channel alike
        rows, columns = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        if len(rows) == 0:  # a window pasted onto itself, where it was
            continue
        # One rectangle, its sides a quarter to a half of the image's ...
        assert changed[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1].all()
        assert 1 <= len(rows) <= 8 and 1 <= len(columns) <= 8
        # ... whose pixels are some image's of the batch, a window of the same size read elsewhere.
        window = mixed[image][:, rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
        assert any(
            (pixels[other].unfold(1, window.shape[1], 1).unfold(2, window.shape[2], 1) == window[:, None, None])
            .all(0)
            .all(-1)
            .all(-1)
            .any()
            for other in range(4)
        )


def distilled_on_noise(student, source, tmp_path, images: int, steps: int, **settings) -> CastlingDistillationTrainer:
    """`student` distilled from `source` for `steps` steps on `images` random 32 px images, a loss logged each step."""
    pixels = Dataset.from_dict({"pixel_values": torch.randn(images, 3, 32, 32).numpy()}).with_format("torch")
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        remove_unused_columns=False,
        **settings,
    )
    trainer = CastlingDistillationTrainer(model=student, teacher_model=source, args=arguments, train_dataset=pixels)
    trainer.train()
    return trainer


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_a_tower_castled_in_place_distils_from_its_source_and_is_scored(family, tmp_path):
    """SigLIP and CLIP classifiers, castled in place, take the same distillation: the student starts as its teacher
    (first loss 0), ends at α = 0, and the fidelity report compares the vision towers' final hidden states."""
    configs = {"siglip": transformers.SiglipConfig, "clip": transformers.CLIPConfig}
    classes = {"siglip": transformers.SiglipForImageClassification, "clip": transformers.CLIPForImageClassification}
    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
    torch.manual_seed(0)
    config = configs[family](vision_config=dict(tower, image_size=32), text_config=dict(tower, vocab_size=16))
    source = classes[family](config).eval()
    student = castle(source)
    trainer = distilled_on_noise(student, source, tmp_path, images=16, steps=6, learning_rate=1e-3)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == 0.0 and max(losses) > 0.0
    assert set(student.softmax_mask_scales().values()) == {0.0}
    assert castled_part(student) is in_place.first_tower(student)
    report = fidelity(student, source, torch.randn(4, 3, 32, 32))
    assert 0.0 < report["feature_cosine"] < 1.0 and report["resolution"] == [32, 32]


def test_a_castled_eomt_distils_on_images_and_is_scored_by_mean_iou_of_its_queries(tmp_path):
    """EoMT castled in place: the student starts as its teacher, and the fidelity report scores the per-pixel classes
    its queries vote for (the semantic post-processing's) against label maps."""
    torch.manual_seed(0)
    config = transformers.EomtConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_queries=5,
        num_blocks=2,
        num_labels=3,
        num_upscale_blocks=1,
    )
    source = transformers.EomtForUniversalSegmentation(config).eval()
    student = castle(source)
    trainer = distilled_on_noise(student, source, tmp_path, images=8, steps=3)
    assert [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][0] == 0.0
    labels = torch.randint(0, 3, (4, 32, 32))
    pixels = torch.randn(4, 3, 32, 32)
    at_the_start = fidelity(castle(source), source, pixels, labels)
    assert at_the_start["prediction_agreement"] == 1.0
    assert at_the_start["castled_mean_iou"] == at_the_start["source_mean_iou"]
    after = fidelity(student, source, pixels, labels)
    assert after["output_relative_error"] > 0.0 and 0.0 <= after["castled_mean_iou"] <= 1.0  # the switch moved it


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_a_castled_two_tower_model_distils_on_images_and_reports_zero_shot_agreement(family, tmp_path):
    """A two-tower model distils through its image side (its forward needs texts), and the fidelity report, given
    the prompts of its zero-shot classes, says how often its zero-shot prediction is its source's."""
    configs = {"siglip": transformers.SiglipConfig, "clip": transformers.CLIPConfig}
    classes = {"siglip": transformers.SiglipModel, "clip": transformers.CLIPModel}
    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
    torch.manual_seed(0)
    text = dict(tower, vocab_size=16, max_position_embeddings=16)
    source = classes[family](configs[family](vision_config=dict(tower, image_size=32), text_config=text)).eval()
    prompts = {"input_ids": torch.tensor([[3, 4, 5, 2], [6, 7, 8, 2], [9, 10, 11, 2]])}
    pixels = torch.randn(8, 3, 32, 32)
    labels = torch.randint(0, 3, (8,))
    at_the_start = fidelity(castle(source), source, pixels, labels, prompts=prompts)
    assert at_the_start["prediction_agreement"] == 1.0
    assert at_the_start["castled_accuracy"] == at_the_start["source_accuracy"]
    student = castle(source)
    distilled_on_noise(student, source, tmp_path, images=8, steps=2)
    after = fidelity(student, source, pixels, labels, prompts=prompts)
    assert after["output_relative_error"] > 0.0 and set(student.softmax_mask_scales().values()) == {0.0}
