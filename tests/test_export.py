"""The linear (inference) form under torch.compile and exported to ONNX, against eager."""

import numpy as np
import onnxruntime
import pytest
import torch
import torch._dynamo.testing

from castling_hf import CastlingViTForImageClassification


@pytest.fixture
def linear_model(make_config):
    model = CastlingViTForImageClassification(make_config(attention_mode="linear"))
    with torch.no_grad():  # non-trivial γ and conv, so that every term reaches the output
        for layer in model.castling_vit.encoder.layers:
            layer.attention.linear_branch_scale.uniform_(0.5, 1.5)
            layer.attention.residual_conv.weight.normal_(std=0.2)
    return model.eval()


def test_torch_compile_matches_eager(linear_model):
    pixel_values = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(linear_model)
    with torch.no_grad():
        expected = linear_model(pixel_values).logits
        assert torch.allclose(compiled(pixel_values).logits, expected, atol=1e-4, rtol=1e-4)


def test_onnx_export_runs_in_onnxruntime(linear_model, tmp_path):
    pixel_values = torch.randn(2, 3, 32, 32)
    path = tmp_path / "castling_vit.onnx"
    torch.onnx.export(
        linear_model,
        (pixel_values,),
        str(path),
        input_names=["pixel_values"],
        output_names=["logits"],
        opset_version=18,
        dynamo=True,
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=64)}},
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (2, 5):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = linear_model(images).logits.numpy()
        (logits,) = session.run(["logits"], {"pixel_values": images.numpy()})
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("blend", ["additive", "convex"])  # convex: what castle sets, γ held while α > 0
@pytest.mark.parametrize("threshold", [None, 1.3], ids=["dense branch", "masked branch"])
def test_training_form_exports_and_compiles_whole_as_alpha_changes(make_config, threshold, blend):
    # α enters the graph as a tensor and its skip at 0 is a host-side flag: no data-dependent branch, so the training
    # form exports, compiles into one graph, and changing α recompiles nothing until α reaches 0 (once).
    model = CastlingViTForImageClassification(
        make_config(softmax_mask_threshold=threshold, linear_branch_blend=blend)
    ).eval()
    with torch.no_grad():  # γ away from 1, so that the held and the released γ give different gradients
        for layer in model.castling_vit.encoder.layers:
            layer.attention.linear_branch_scale.uniform_(0.5, 1.5)
    model.set_softmax_mask_scale(0.5)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        exported = torch.export.export(model, (pixel_values,))
        torch.testing.assert_close(exported.module()(pixel_values).logits, model(pixel_values).logits)

    torch._dynamo.reset()  # the parametrisations compile the same code: each counts its own graphs
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for alpha in (0.5, 0.25, 0.0):
        model.set_softmax_mask_scale(alpha)
        for run in (model, compiled):
            model.zero_grad()
            logits = run(pixel_values).logits
            logits.square().sum().backward()
            if run is model:
                expected = logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
        torch.testing.assert_close(logits.detach(), expected[0])
        for got, want in zip([p.grad for p in model.parameters() if p.grad is not None], expected[1], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert counter.frame_count == 2  # one graph for α > 0, one once the branch is off
