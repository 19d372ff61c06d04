import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Stable-Diffusion-shaped checkpoint (VAE, PNDM) saved as a diffusers directory."""
    from negstudy.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_pixel_model_dir(tmp_path_factory):
    """A tiny pixel-space checkpoint (no VAE), laid out like the shipped shapes model."""
    from negstudy.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-pixel", pixel_space=True)
