import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
    # pytest-xdist workers share the machine's cores: each worker (and what it starts) gets its share,
    # because torch jobs that oversubscribe cores slow each other several-fold
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


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
