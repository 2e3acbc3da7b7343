"""Checks every Castling family's model classes must pass, as `transformers`' common model tests make them: built on
the meta device (big models, `device_map`), exported with a dynamic batch size."""

import torch


def first_tensor(output) -> torch.Tensor:
    """The first tensor of a model's output: logits, last hidden state, or the first feature map."""
    value = output[0]
    return value[0] if isinstance(value, tuple) else value


def meta_device() -> torch.device:
    """`torch.device("meta")` as a context that sends every tensor factory there. torch builds the set of factories
    it redirects once, on first use; if that is inside `transformers`' `from_pretrained`, which swaps `torch.linspace`
    for a CPU-bound wrapper while it builds a model, the set keeps the wrapper and the real `torch.linspace` escapes
    every later meta context: a test run after any `from_pretrained` would pass on a constructor that fails there."""
    torch.utils._device._device_constructors.cache_clear()
    return torch.device("meta")


def assert_builds_on_the_meta_device(model_class, config, pixel_values: torch.Tensor) -> None:
    """Built on the meta device, every tensor stays there; materialised and initialised, the model has the buffers a
    model built on the CPU has, and runs: no tensor was a plain attribute left behind on the meta device."""
    with meta_device():
        assert torch.linspace(0, 1, 2).device.type == "meta"  # every tensor factory is sent to the meta device
        model = model_class(config)
    assert all(tensor.device.type == "meta" for tensor in [*model.parameters(), *model.buffers()])
    model.to_empty(device="cpu")
    model.init_weights()
    reference = model_class(config)
    assert dict(model.named_buffers()).keys() == dict(reference.named_buffers()).keys()
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    with torch.no_grad():
        assert torch.isfinite(first_tensor(model.eval()(pixel_values=pixel_values))).all()


def assert_exports_with_a_dynamic_batch(model, pixel_values: torch.Tensor) -> None:
    """`torch.export` with a dynamic batch dimension, run at two batch sizes other than the traced one: equal to
    eager at each (a batch size read as a Python int would fix it at the traced one)."""
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        exported = torch.export.export(
            model, (), {"pixel_values": pixel_values}, dynamic_shapes={"pixel_values": {0: batch}}
        )
        for size in (3, 5):
            images = pixel_values[:1].expand(size, -1, -1, -1) + torch.randn(size, *pixel_values.shape[1:])
            torch.testing.assert_close(
                first_tensor(exported.module()(pixel_values=images)), first_tensor(model(pixel_values=images))
            )


def saved_attention_modes(config) -> set[str]:
    """Every `attention_mode` a saved config records, however nested: a Castling family's own field, the `castling`
    fields of a tower castled in place, a task model's `backbone_config` or a two-tower model's `vision_config`."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        return set()
    modes = {config["attention_mode"]} if "attention_mode" in config else set()
    for value in config.values():
        modes |= saved_attention_modes(value)
    return modes
