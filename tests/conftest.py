import pytest
import torch

from castling_hf import CastlingViTConfig


@pytest.fixture
def make_config():
    """A `nano` config (32×32 images, 4×4 patches, 64 wide, 4 heads) with overrides; seeds torch for repeatability."""

    def make(**overrides) -> CastlingViTConfig:
        torch.manual_seed(0)
        return CastlingViTConfig.from_size("nano", **{"num_hidden_layers": 2, "num_labels": 3, **overrides})

    return make
