"""The shipped shapes model: it loads through the same from_pretrained path as real checkpoints
and draws what it is asked for, as the oracle reads it."""

import json

import pytest
from omegaconf import OmegaConf

from negstudy.config import ModelConfig
from negstudy.models import builtin_model_dir
from negstudy.models import load_pipeline, pick_device
from negstudy.records import to_uint8
from negstudy.sampler import Batch, NegativeSampler
from negstudy.schedules import Never
from negstudy.shapes import oracle

MODEL = builtin_model_dir("shapes")


@pytest.fixture(scope="module")
def sampler():
    cfg = OmegaConf.structured(ModelConfig(name="shapes", path="builtin:shapes"))
    # fixed_rows=0: quality bounds need no batch-size independence, and 64-image batches run 2x faster unblocked
    return NegativeSampler(load_pipeline(cfg, pick_device("cpu")), steps=30, fixed_rows=0)


def test_shipped_directory_is_small_safetensors_and_described():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 30 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pkl")]
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["negstudy"]["world"] == "shapes" and index["vae"] == [None, None]
    card = (MODEL / "README.md").read_text()
    assert "caption-exact" in card and "removed by negative" in card and "H200" in card


def test_named_object_appears(sampler):
    seeds = [0, 1, 2, 3]
    plan = Never().plan(sampler.n_calls)
    images = to_uint8(sampler.generate(Batch(["a tree on the sand"] * 4, [""] * 4, seeds, [plan] * 4)))
    verdicts = oracle.inspect_batch(images)
    assert images.shape == (4, 32, 32, 3)
    assert sum(v.present("tree") for v in verdicts) >= 3


@pytest.mark.slow
def test_measured_quality_holds(sampler):
    """Re-measure on a small sample; bounds sit well below the model card's numbers."""
    from negstudy.shapes.quality import measure

    r = measure(sampler, n=64, seed=1, batch_size=64, progress=False)
    assert r["object_recall"] >= 0.25  # card: 42 % (n = 1065)
    assert r["caption_exact"] >= 0.05  # card: 14 %
    assert r["object_removal"] >= 0.45  # card: 75 % (n = 418)
