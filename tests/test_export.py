"""The linear (inference) form under torch.compile and exported to ONNX, against eager."""

import numpy as np
import onnxruntime
import pytest
import torch

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
