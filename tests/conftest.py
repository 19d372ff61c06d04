import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
    # pytest-xdist workers share the machine's cores: each worker (and what it starts) gets its share,
    # because torch jobs that oversubscribe cores slow each other several-fold
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

# The files that take longest run first (summed test time per file, measured on a 2-core AMD EPYC, longest
# first): pytest-xdist's loadfile scheduling hands out whole files in collection order, so a long file taken
# last keeps one worker busy while the other idles (~100 s of the suite's wall time, alphabetically).
SLOW_FILES_FIRST = ("test_jobs.py", "test_removal.py", "test_shipped_model.py", "test_train_shapes.py",
                    "test_studies_any_model.py", "test_slurm.py", "test_bench.py", "test_guidance.py", "test_secrets.py",
                    "test_report.py", "test_determinism.py", "test_methods.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


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
