"""OWLv2 evaluator (negstudy.evaluators.owl): the code path on a tiny random OWLv2 saved to disk."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from negstudy.config import OwlConfig, register_configs
from negstudy.errors import ConfigError, ModelNotFoundError
from negstudy.checks import build
from negstudy.evaluators.owl import OwlEvaluator, box_mask, preprocess, query
from negstudy.shapes.world import OBJECT_NAMES

SIDE = 32  # the tiny model's input size (4 x 4 patches of 8 px)


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    """A tiny random Owlv2ForObjectDetection + Owlv2Processor written by save_pretrained."""
    from negstudy.tiny import save_tiny_owl

    return save_tiny_owl(tmp_path_factory.mktemp("owl") / "tiny-owlv2", side=SIDE)


def owl_cfg(path, **overrides):
    cfg = OmegaConf.structured(OwlConfig)
    cfg.merge_with({"path": str(path), "labels": "shapes", "local_files_only": True, "device": "cpu", **overrides})
    return cfg


def images(b=3, h=24, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)


def test_loads_from_its_directory_and_detects_with_threshold_zero(owl_dir):
    owl = OwlEvaluator.from_config(owl_cfg(owl_dir, threshold=0.0))
    assert owl.name == "owl" and owl.locates and owl.labels == OBJECT_NAMES
    batch = images()
    found = owl.objects(batch, OBJECT_NAMES)
    assert len(found) == len(batch)
    for per_image, detections in zip(found, owl.detect(batch, [OBJECT_NAMES] * len(batch))):
        assert per_image and set(per_image) <= set(OBJECT_NAMES)
        assert 0 < len(detections) <= (SIDE // 8) ** 2  # the 4 x 4 grid's boxes, less those in the padding
        for label, mask in per_image.items():
            assert mask.dtype == bool and mask.shape == (24, 40) and mask.any()
            boxes = [d.box for d in detections if d.label == label]
            assert np.array_equal(mask, box_mask(boxes, 24, 40))
            inside = np.zeros((24, 40), bool)
            for x0, y0, x1, y1 in boxes:
                assert 0 <= x0 <= x1 <= 40 and 0 <= y0 <= y1 <= 24  # clipped to the image
                inside[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
            assert not (mask & ~inside).any()  # the mask never leaves its boxes
        assert all(0 < d.score <= 1 for d in detections)
    assert owl.present(batch, ["ball", "tree", "kite"]) == [True, True, True]
    square = images(1, SIDE, SIDE)
    assert len(owl.detect(square, [OBJECT_NAMES])[0]) == (SIDE // 8) ** 2  # no padding: every box scores above 0


def test_a_threshold_above_one_detects_nothing(owl_dir):
    owl = OwlEvaluator.from_config(owl_cfg(owl_dir, threshold=1.5))
    batch = images(2, SIDE, SIDE)
    assert owl.objects(batch) == [{}, {}]
    assert owl.present(batch, ["ball", "box"]) == [False, False]
    items = [SimpleNamespace(prompt="a ball", negative="tree", category="object"),
             SimpleNamespace(prompt="a ball", negative="red", category="attribute")]
    rows = owl.evaluate(batch, items)
    assert rows[0]["objects"] == "" and rows[0]["n_objects"] == 0
    assert rows[0]["negative_present"] is False and 0 < rows[0]["negative_score"] <= 1
    assert rows[1]["negative_present"] is None and rows[1]["negative_score"] is None  # attributes are not objects


def test_evaluate_columns_with_detections(owl_dir):
    owl = OwlEvaluator.from_config(owl_cfg(owl_dir, threshold=0.0, batch_size=2))
    batch = images(3, SIDE, SIDE, seed=1)
    items = [SimpleNamespace(prompt="p", negative=n, category="object") for n in ("ball", "", "kite")]
    rows = owl.evaluate(batch, items)
    assert len(rows) == 3 and all(set(r) == {"objects", "n_objects", "negative_present", "negative_score"} for r in rows)
    assert all(r["n_objects"] == len(r["objects"].split(",")) >= 1 for r in rows)
    assert rows[0]["negative_present"] is True and rows[1]["negative_present"] is None


def test_built_from_the_composed_config(owl_dir):
    register_configs()
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["evaluator=owl", f"evaluator.path={owl_dir}",
                                                       "evaluator.labels=shapes", "evaluator.device=cpu"])
    assert cfg.evaluator.name == "owl" and cfg.evaluator.threshold == 0.3
    assert isinstance(build(cfg.evaluator, "evaluator", world=None), OwlEvaluator)


def test_missing_model_says_how_to_fetch_it(tmp_path):
    for path, local in [(tmp_path / "nowhere", False), ("negstudy-tests/no-such-owlv2", True)]:
        with pytest.raises(ModelNotFoundError) as err:
            OwlEvaluator.from_config(owl_cfg(path, local_files_only=local))
        message = str(err.value)
        assert "\n" not in message and message.startswith("evaluator.path=")
        assert "hf download google/owlv2-base-patch16-ensemble --local-dir" in message
    assert issubclass(ModelNotFoundError, ConfigError)


def test_torch_preprocessing_matches_the_processor_geometry(owl_dir):
    from transformers import Owlv2Processor

    ip = Owlv2Processor.from_pretrained(owl_dir, local_files_only=True).image_processor
    batch = np.full((1, 8, 16, 3), 255, np.uint8)
    x = preprocess(batch, ip)
    assert x.shape == (1, 3, SIDE, SIDE)
    white = (1 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    black = -torch.tensor(ip.image_mean) / torch.tensor(ip.image_std)
    assert torch.allclose(x[0, :, 2, 16], white, atol=1e-5)  # the image: top half
    assert torch.allclose(x[0, :, 28, 16], black, atol=1e-5)  # the padding below it: zeros
    try:
        reference = ip(images=list(batch), return_tensors="pt")["pixel_values"]
    except ImportError:
        pytest.skip("neither torchvision nor scipy here: the processor's own path cannot run")
    assert torch.allclose(x, reference, atol=0.05)


def test_queries_and_box_masks():
    assert query("dog") == query("a dog") == "a photo of a dog"
    assert query("hot dog") == "a photo of a hot dog"
    mask = box_mask([(1.5, 0.2, 3.0, 2.0), (10, 10, 40, 40)], 12, 12)
    assert mask.sum() == 2 * 2 + 2 * 2 and mask[0:2, 1:3].all() and mask[10:, 10:].all()


def test_objects_come_most_confident_first(owl_dir):
    owl = OwlEvaluator.from_config(owl_cfg(owl_dir, threshold=0.0))
    batch = images(1, SIDE, SIDE, seed=2)
    detections = owl.detect(batch, [OBJECT_NAMES])[0]
    best = {}
    for d in detections:
        best[d.label] = max(best.get(d.label, 0.0), d.score)
    order = list(owl.objects(batch)[0])
    assert set(order) == set(best) and all(best[a] >= best[b] for a, b in itertools.pairwise(order))
