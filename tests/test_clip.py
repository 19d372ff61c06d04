"""evaluator=clip on the shipped shapes CLIP (real weights, fresh world images) and scripts/train_clip.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from negstudy.models import builtin_model_dir
from negstudy.datasets import Pair
from negstudy.errors import ConfigError, ModelNotFoundError
from negstudy.checks import build
from negstudy.evaluators.clip import OPENAI_CLIP, ClipEvaluator, resolve_clip_path
from negstudy.evaluators.oracle import OracleEvaluator
from negstudy.shapes import world

REPO = Path(__file__).resolve().parents[1]
SHIPPED = builtin_model_dir("shapes_clip")
N_IMAGES = 400
WORLD_SEED = 77_001  # fresh images: training batches use seeds hashed from (seed, step)


def clip_cfg(**kw):
    return OmegaConf.create({"_target_": "negstudy.evaluators.clip.ClipEvaluator.build", "name": "clip", "path": "auto", "batch_size": 128, "local_files_only": False} | kw)


def auc(pos, neg) -> float:
    pos, neg = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


@pytest.fixture(scope="module")
def evaluator():
    import torch

    torch.set_num_threads(1)
    return ClipEvaluator.from_config(clip_cfg(), "shapes")


@pytest.fixture(scope="module")
def scenes():
    images, _, scenes = world.sample_dataset(N_IMAGES, WORLD_SEED)
    return images, scenes


# ------------------------------------------------------------------ resolving and configuring


def test_auto_is_the_shipped_model_on_shapes_and_openai_elsewhere():
    assert resolve_clip_path("auto", "shapes") == (str(SHIPPED), True)
    assert resolve_clip_path("builtin:shapes_clip", None) == (str(SHIPPED), True)
    assert resolve_clip_path("auto", None) == (OPENAI_CLIP, False)


@pytest.mark.parametrize("path, message", [
    ("/no/such/clip", "evaluator.path='/no/such/clip': not a CLIP model directory (no config.json there)"),
    ("builtin:nothing", "evaluator.path='builtin:nothing': no shipped CLIP model of that name (shipped: shapes_clip)"),
    ("not a hub id", "evaluator.path='not a hub id': neither an existing local directory nor a hub id"),
])
def test_a_missing_model_is_one_clear_line(path, message):
    with pytest.raises(ConfigError) as err:
        build(clip_cfg(path=path), "evaluator", world="shapes")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_an_unreachable_hub_model_says_how_to_get_it():
    with pytest.raises(ModelNotFoundError) as err:  # conftest keeps the hub offline
        build(clip_cfg(path="negstudy-test/no-such-clip", local_files_only=True), "evaluator", world=None)
    assert "hf download negstudy-test/no-such-clip" in str(err.value) and "\n" not in str(err.value)


def test_the_hydra_config_composes_and_builds_the_evaluator():
    from hydra import compose, initialize_config_module

    from negstudy.checks import validate
    from negstudy.config import register_configs
    from negstudy.generate import model_world

    register_configs()
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["evaluator=clip", "evaluator.batch_size=32"])
    validate(cfg)
    assert cfg.evaluator.name == "clip" and cfg.evaluator.path == "auto" and cfg.evaluator.batch_size == 32
    ev = build(cfg.evaluator, "evaluator", world=model_world(cfg.model))
    assert isinstance(ev, ClipEvaluator) and ev.world == "shapes" and ev.batch_size == 32


def test_the_shipped_model_loads_like_an_openai_clip():
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(SHIPPED))
    processor = CLIPProcessor.from_pretrained(str(SHIPPED))
    assert model.config.vision_config.image_size == 32 and model.config.text_config.max_position_embeddings <= 77
    images = world.sample_dataset(3, 5)[0]
    pixels = processor(images=list(images), return_tensors="pt").pixel_values
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # the training normalisation
    assert pixels.shape == (3, 3, 32, 32) and torch.allclose(pixels, expected, atol=1e-5)
    ids = processor(text=["a red circle on the grass, blurry"], return_tensors="pt").input_ids[0].tolist()
    assert len(ids) == 2 + 7 + 1  # BOS, one token per word, the comma, EOS: every world and colour/shape word is one token
    assert sum(p.numel() for p in model.parameters()) * 4 < 6e6
    assert (SHIPPED / "README.md").exists()


# ------------------------------------------------------------------ what the shipped model knows


@pytest.mark.parametrize("text, name", [("a red circle", "ball"), ("a ball", "ball"),
                                        ("a blue square", "box"), ("a tree", "tree")])
def test_a_phrase_scores_higher_on_images_with_its_object(evaluator, scenes, text, name):
    images, scenes_ = scenes
    has = np.array([name in s.object_names for s in scenes_])
    s = evaluator.score(images, [text] * len(images))
    assert s.shape == (len(images),) and np.all((s >= 0) & (s <= 100))
    assert s[has].mean() - s[~has].mean() > 5.0
    assert auc(s[has], s[~has]) > 0.8


def test_present_agrees_with_the_oracle(evaluator, scenes):
    images, _ = scenes
    names = [world.OBJECT_NAMES[i % len(world.OBJECT_NAMES)] for i in range(len(images))]
    truth = np.array(OracleEvaluator().present(images, names))
    said = evaluator.present(images, names)
    assert all(isinstance(v, bool) for v in said)
    said = np.array(said)
    accuracy = (said == truth).mean()
    balanced = 0.5 * (said[truth].mean() + (~said[~truth]).mean())
    majority = max(truth.mean(), 1 - truth.mean())  # the best constant answer
    assert balanced > 0.85 and accuracy > majority + 0.15, (accuracy, balanced, majority)
    assert evaluator.present(images[:1], ["dragon"]) == [None]  # not a world object: no answer


def test_objects_lists_the_labels_judged_present_without_masks(evaluator, scenes):
    images, _ = scenes
    images = images[:16]
    found = evaluator.objects(images, ["ball", "box", "dragon"])
    assert len(found) == 16 and all(set(f) <= {"ball", "box"} and all(m is None for m in f.values()) for f in found)
    assert [("ball" in f) for f in found] == evaluator.present(images, ["ball"] * 16)
    assert evaluator.locates is False and evaluator.name == "clip"


def test_evaluate_scores_the_prompt_and_the_negative(evaluator, scenes):
    images, _ = scenes
    items = [Pair("a ball on the grass", "tree"), Pair("a view of the sky", "")]
    rows = evaluator.evaluate(images[:2], items)
    assert set(rows[0]) == {"clip_prompt", "clip_negative"}
    assert np.isclose(rows[0]["clip_prompt"], evaluator.score(images[:1], ["a ball on the grass"])[0], atol=1e-4)
    assert np.isclose(rows[0]["clip_negative"], evaluator.score(images[:1], ["tree"])[0], atol=1e-4)
    assert math.isnan(rows[1]["clip_negative"])  # an empty negative is no caption


# ------------------------------------------------------------------ the training script


def test_train_script_runs_resumes_and_its_model_loads(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    script = REPO / "scripts" / "train_clip.py"
    tiny = ["--batch-size", "8", "--width", "32", "--vision-layers", "1", "--text-layers", "1", "--eval-images", "32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def run(*extra):
        return subprocess.run([sys.executable, str(script), "--out", str(tmp_path), *tiny, *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    first = run("--steps", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "present_accuracy" in first.stdout and (tmp_path / "model" / "zero_shot.json").exists()
    refused = run("--steps", "3")
    assert refused.returncode != 0 and "--resume" in refused.stdout + refused.stderr
    second = run("--steps", "3", "--resume", "--eval-images", "0")
    assert second.returncode == 0 and "at step 2" in second.stdout, second.stderr[-2000:]
    assert not (tmp_path / "checkpoint.tmp").exists() and not (tmp_path / "model.tmp").exists()

    model = CLIPModel.from_pretrained(str(tmp_path / "model"))
    processor = CLIPProcessor.from_pretrained(str(tmp_path / "model"))
    batch = processor(text=["a red circle", "a ball"], images=list(world.sample_dataset(2, 1)[0]), return_tensors="pt", padding=True, truncation=True)
    out = model(**batch)
    assert out.logits_per_image.shape == (2, 2)
    ev = ClipEvaluator(model, processor, world="shapes", batch_size=4)
    assert ev.score(world.sample_dataset(2, 1)[0], ["a ball", "a sun"]).shape == (2,)
