"""negstudy.shapes.render_torch against the reference world.py: pixels, token ids, distribution."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from negstudy.models import builtin_model_dir
from negstudy.shapes import render_torch as rt
from negstudy.shapes import world

SEED = 20261201


@pytest.fixture(scope="module")
def reference():
    """1500 reference scenes, their images, and the noise draws world.render_batch used."""
    scene_ss, noise_ss = np.random.SeedSequence(SEED).spawn(2)
    rng = np.random.default_rng(scene_ss)
    scenes = [world.sample_scene(rng) for _ in range(1500)]
    images = world.render_batch(scenes, np.random.default_rng(noise_ss))
    noisy = [i for i, s in enumerate(scenes) if s.attribute == "noisy"]
    draws = np.random.default_rng(noise_ss).normal(0.0, world.NOISE_STD, size=(len(noisy), 32, 32, 3)).astype(np.float32)
    noise = torch.zeros(len(scenes), 3, 32, 32)
    noise[noisy] = torch.from_numpy(draws).permute(0, 3, 1, 2)
    return scenes, images, noise


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(str(builtin_model_dir("shapes") / "tokenizer"))


def test_render_is_pixel_exact_for_the_same_scenes(reference):
    scenes, images, noise = reference
    attrs = Counter(s.attribute for s in scenes)
    assert all(attrs[a] >= 50 for a in world.ATTRIBUTES)  # every attribute path is exercised
    specs = rt.specs_from_scenes(scenes)
    assert rt.scenes_from_specs(specs) == scenes
    out = rt.render(specs, noise=noise)
    assert out.dtype == torch.uint8 and out.shape == (len(scenes), 3, 32, 32)
    np.testing.assert_array_equal(out.permute(0, 2, 3, 1).numpy(), images)  # noisy ones too: same draws


def test_render_with_its_own_noise_differs_only_by_the_noise(reference):
    scenes, images, _ = reference
    out = rt.render(rt.specs_from_scenes(scenes), torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy()
    noisy = np.array([s.attribute == "noisy" for s in scenes])
    np.testing.assert_array_equal(out[~noisy], images[~noisy])
    # two independent N(0, 18) draws, clipped at 0 / 255: difference std ~ 18 * sqrt(2) = 25.5 before clipping
    diff = out[noisy].astype(float) - images[noisy].astype(float)
    assert 20 < diff.std() < 27 and abs(diff.mean()) < 1.0


def test_caption_ids_equal_the_tokenizer_on_world_captions(reference, tokenizer):
    scenes, _, _ = reference
    assert len(tokenizer("sand", add_special_tokens=False).input_ids) == 2  # a multi-token word is covered
    ids = rt.CaptionTokens(tokenizer).ids(rt.specs_from_scenes(scenes))
    expect = tokenizer([world.caption(s) for s in scenes], padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
    assert torch.equal(ids, expect)


def test_sampled_specs_are_valid_scenes_and_render_like_the_reference(tokenizer):
    specs = rt.sample_specs(2000, torch.Generator().manual_seed(1))
    scenes = rt.scenes_from_specs(specs)
    for s in scenes:
        boxes = [(o.x0, o.y0, o.size) for o in s.objects]
        assert all(0 <= x and 0 <= y and x + z <= 32 and y + z <= 32 for x, y, z in boxes)
        assert all(world._boxes_clear(a, b) for i, a in enumerate(boxes) for b in boxes[:i])
        assert len(set(s.object_names)) == len(s.objects) and set(s.named_objects) <= set(s.object_names)
        assert not (s.attribute == "blurry" and not s.objects)
    images = rt.render(specs, torch.Generator().manual_seed(2)).permute(0, 2, 3, 1).numpy()
    clean = np.array([s.attribute != "noisy" for s in scenes])
    np.testing.assert_array_equal(images[clean], world.render_batch(scenes, np.random.default_rng(0))[clean])
    ids = rt.CaptionTokens(tokenizer).ids(specs)
    expect = tokenizer([world.caption(s) for s in scenes], padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
    assert torch.equal(ids, expect)


def _features(scenes: list[world.Scene]) -> dict[str, list]:
    """Categorical features whose joint laws define the world's distribution (one value per scene)."""
    return {
        "background": [s.background for s in scenes],
        "count": [len(s.objects) for s in scenes],
        "classes": [tuple(sorted(s.object_names)) for s in scenes],
        "sizes": [o.size for s in scenes for o in s.objects],
        "first_x0": [s.objects[0].x0 // 4 for s in scenes if s.objects],
        "third_y0": [s.objects[2].y0 // 4 for s in scenes if len(s.objects) == 3],
        "named": [(len(s.objects), len(s.named_objects)) for s in scenes],
        "first_named_is_first_object": [s.named_objects[0] == s.objects[0].name for s in scenes if len(s.named_objects) > 1],
        "attribute": [(s.attribute, s.attribute_named, len(s.objects) > 0) for s in scenes],
        "caption_words": [len(world.caption(s).split()) for s in scenes],
    }


def _chi2_pvalue(a: list, b: list) -> float:
    """Two-sample chi-square test of equal categorical distributions (cells with < 5 expected pooled)."""
    ca, cb = Counter(a), Counter(b)
    keys = sorted(set(ca) | set(cb), key=repr)
    table = np.array([[ca[k], cb[k]] for k in keys], float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    small = expected.min(1) < 5
    if small.any():  # pool rare cells into one
        table = np.vstack([table[~small], table[small].sum(0, keepdims=True)])
        expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    df = len(table) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def world_sample():
    rng = np.random.default_rng(SEED + 1)
    return _features([world.sample_scene(rng) for _ in range(4000)])


def test_sampled_distribution_matches_the_world(world_sample):
    ours = _features(rt.scenes_from_specs(rt.sample_specs(4000, torch.Generator().manual_seed(3))))
    pvalues = {k: _chi2_pvalue(world_sample[k], ours[k]) for k in world_sample}
    # 10 tests: a Bonferroni-corrected 1e-3 level; a real mismatch gives p ~ 1e-10 or less (next test)
    assert min(pvalues.values()) > 1e-4, pvalues


def test_the_distribution_check_catches_a_changed_law(world_sample):
    ours = _features(rt.scenes_from_specs(rt.sample_specs(4000, torch.Generator().manual_seed(3), p_named=0.5)))
    assert _chi2_pvalue(world_sample["named"], ours["named"]) < 1e-6
    ours = _features(rt.scenes_from_specs(rt.sample_specs(4000, torch.Generator().manual_seed(3), p_counts=(0.1, 0.3, 0.4, 0.2))))
    assert _chi2_pvalue(world_sample["count"], ours["count"]) < 1e-4


def test_world_keyword_arguments_are_checked():
    with pytest.raises(ValueError, match="p_counts"):
        rt.sample_specs(4, torch.Generator(), p_counts=(0.5, 0.6))
