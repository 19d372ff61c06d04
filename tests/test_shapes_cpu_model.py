"""The CPU-trained shapes model shipped beside the default (builtin:shapes_cpu): small, described by
its measured card, loaded by the same path as every checkpoint, and drawing what it is asked for."""

import json

from omegaconf import OmegaConf

from negstudy.config import ModelConfig
from negstudy.models import builtin_model_dir, load_pipeline, pick_device
from negstudy.records import to_uint8
from negstudy.sampler import Batch, NegativeSampler
from negstudy.schedules import Never
from negstudy.shapes import oracle

MODEL = builtin_model_dir("shapes_cpu")


def test_directory_is_small_safetensors_with_its_card_curve_and_quality():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 30 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pkl")]
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["negstudy"]["world"] == "shapes" and index["vae"] == [None, None]
    assert index["negstudy"]["offset_noise"] == 0.2 and index["negstudy"]["zero_snr"] is False
    quality = json.loads((MODEL / "quality.json").read_text())
    card = (MODEL / "README.md").read_text()
    assert f"{quality['object_recall']:.1%}" in card and f"{quality['background_right']:.1%}" in card
    assert (MODEL / "probe.png").is_file() and len((MODEL / "probe.csv").read_text().splitlines()) >= 3


def test_named_object_appears_with_the_sd2_scheduler():
    cfg = OmegaConf.structured(ModelConfig(name="shapes", path="builtin:shapes_cpu"))
    pipe = load_pipeline(cfg, pick_device("cpu"))
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.prediction_type == "epsilon"
    sampler = NegativeSampler(pipe, steps=30, fixed_rows=0)
    assert sampler.n_calls == 31
    plan = Never().plan(sampler.n_calls)
    images = to_uint8(sampler.generate(Batch(["a tree on the sand"] * 4, [""] * 4, [0, 1, 2, 3], [plan] * 4)))
    verdicts = oracle.inspect_batch(images)
    assert sum(v.present("tree") for v in verdicts) >= 3
    assert sum(v.background == "sand" for v in verdicts) >= 3
