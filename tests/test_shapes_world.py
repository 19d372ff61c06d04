"""The shapes world (generator, captions) and its oracle. numpy only; whole file < 20 s."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from negstudy.shapes import oracle, world
from negstudy.shapes.oracle import Verdict, classify_shape, connected_components, inspect, inspect_batch
from negstudy.shapes.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    OBJECTS,
    RESOLUTION,
    VOCABULARY,
    CaptionSpec,
    PlacedObject,
    Scene,
    caption,
    object_mask,
    parse_caption,
    render,
    sample_dataset,
    sample_scene,
    sprite,
)

ORACLE_SEED = 20240611  # fresh images: not a seed used while tuning the oracle


@pytest.fixture(scope="module")
def dataset():
    return sample_dataset(2000, ORACLE_SEED)


@pytest.fixture(scope="module")
def verdicts(dataset):
    images, _, _ = dataset
    return inspect_batch(images)


# ----------------------------------------------------------------------------- world


def test_determinism_and_prefix_stability():
    a_img, a_cap, a_sc = sample_dataset(300, 5)
    b_img, b_cap, b_sc = sample_dataset(300, 5)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_sc == b_sc
    c_img, c_cap, c_sc = sample_dataset(300, 6)
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap
    p_img, p_cap, p_sc = sample_dataset(120, 5)  # a prefix of the same stream
    assert np.array_equal(p_img, a_img[:120]) and p_cap == a_cap[:120] and p_sc == a_sc[:120]
    assert a_img.dtype == np.uint8 and a_img.shape == (300, RESOLUTION, RESOLUTION, 3)
    s1 = [sample_scene(np.random.default_rng(9)) for _ in range(3)]
    s2 = [sample_scene(np.random.default_rng(9)) for _ in range(3)]
    assert s1 == s2
    # A clean scene renders the same whatever the rng; a noisy one depends on it.
    clean = next(s for s in a_sc if s.attribute is None and s.objects)
    noisy = next(s for s in a_sc if s.attribute == "noisy")
    assert np.array_equal(render(clean, np.random.default_rng(0))[0], render(clean, np.random.default_rng(1))[0])
    assert not np.array_equal(render(noisy, np.random.default_rng(0))[0], render(noisy, np.random.default_rng(1))[0])


def _brute_force_count(shape: str, s: int) -> int:
    """Pixel count of a shape by explicit loops over pixel centres (independent of `sprite`)."""
    c, r, n = s / 2.0, s / 2.0, 0
    for y in range(s):
        for x in range(s):
            dx, dy = x + 0.5 - c, y + 0.5 - c
            if shape == "disc":
                n += dx * dx + dy * dy <= r * r
            elif shape == "square":
                n += 1
            elif shape == "diamond":
                n += abs(dx) + abs(dy) <= r
            elif shape == "triangle":
                n += abs(dx) <= (y + 1) / 2.0
    return n


@pytest.mark.parametrize("size", range(world.SIZE_RANGE[0], world.SIZE_RANGE[1] + 1))
def test_sprite_geometry(size):
    for shape in ("disc", "square", "triangle", "diamond"):
        m = sprite(shape, size)
        assert m.shape == (size, size) and m.dtype == bool
        assert m.sum() == _brute_force_count(shape, size)
        assert m[:, 0].any() and m[:, -1].any() and m[0].any() and m[-1].any()  # fills its box
    r = size / 2
    assert sprite("square", size).sum() == size * size
    assert abs(sprite("disc", size).sum() - math.pi * r * r) <= 0.12 * math.pi * r * r
    assert abs(sprite("diamond", size).sum() - 2 * r * r) <= 0.25 * 2 * r * r
    tri = sprite("triangle", size)
    assert tri[-1].all() and tri[0].sum() <= 2  # horizontal base, apex on top
    assert np.all(np.diff(tri.sum(1)) >= 0)  # widens downwards


def test_masks_exact_disjoint_inside():
    images, _, scenes = sample_dataset(1500, 11)
    n_pairs = 0
    for img, scene in zip(images, scenes):
        img2, masks = render(scene, np.random.default_rng(0))
        assert set(masks) == set(scene.object_names)
        for o in scene.objects:
            m = masks[o.name]
            # Inside the image, unclipped: the mask holds the whole sprite.
            assert 0 <= o.x0 and o.x0 + o.size <= RESOLUTION and 0 <= o.y0 and o.y0 + o.size <= RESOLUTION
            assert m.sum() == sprite(OBJECTS[o.name].shape, o.size).sum()
            assert world.SIZE_RANGE[0] <= o.size <= world.SIZE_RANGE[1]
            if scene.attribute is None:  # hard masks: exactly the object's colour inside
                assert np.all(img[m] == OBJECTS[o.name].rgb)
        if scene.attribute is None:
            covered = np.zeros((RESOLUTION, RESOLUTION), bool)
            for m in masks.values():
                covered |= m
            assert np.all(img[~covered] == BACKGROUNDS[scene.background])
        for a in scene.objects:  # >= 2 empty pixels between any two objects
            for b in scene.objects:
                if a.name < b.name:
                    ya, xa = np.nonzero(masks[a.name])
                    yb, xb = np.nonzero(masks[b.name])
                    cheb = np.maximum(np.abs(ya[:, None] - yb[None]), np.abs(xa[:, None] - xb[None]))
                    assert cheb.min() >= 3
                    n_pairs += 1
    assert n_pairs > 500
    names = [len(set(s.object_names)) == len(s.objects) for s in scenes]
    assert all(names)  # each class at most once


def test_attributes_rendering():
    objs = (PlacedObject("ball", 8.5, 8.5, 11), PlacedObject("box", 22.0, 22.0, 12))
    clean = render(Scene("sky", objs, None, (), False), np.random.default_rng(0))[0].astype(float)
    dark = render(Scene("sky", objs, "dark", (), False), np.random.default_rng(0))[0]
    assert np.array_equal(dark, np.clip(np.rint(clean * 0.45), 0, 255).astype(np.uint8))
    striped = render(Scene("sky", objs, "striped", (), False), np.random.default_rng(0))[0].astype(float)
    rows = (np.arange(RESOLUTION) // 2) % 2 == 0
    assert np.allclose(striped[rows], np.rint(clean[rows] * 0.7)) and np.array_equal(striped[~rows], clean[~rows])
    noisy = render(Scene("sky", objs, "noisy", (), False), np.random.default_rng(0))[0].astype(float)
    assert 15 < (noisy - clean)[clean[..., 2] < 240].std() < 21
    blurry = render(Scene("sky", objs, "blurry", (), False), np.random.default_rng(0))[0].astype(float)
    assert abs(blurry.mean() - clean.mean()) < 1.0  # blur preserves the mean (edge-replicated)
    assert np.array_equal(blurry[0:3, 20:30], clean[0:3, 20:30])  # flat areas unchanged
    n_mixed = np.count_nonzero(np.abs(blurry - clean).max(-1) > 10)
    assert n_mixed > 60  # edges are smeared


def test_captions_name_only_present_things():
    _, captions, scenes = sample_dataset(3000, 21)
    vocab = set(VOCABULARY)
    assert VOCABULARY == sorted(VOCABULARY)
    seen_words = set()
    for text, scene in zip(captions, scenes):
        assert text == caption(scene) and text == text.lower()
        words = text.replace(",", " ").split()
        seen_words |= set(words)
        assert set(words) <= vocab
        spec = parse_caption(text)
        assert spec.background == scene.background
        assert set(spec.objects) <= set(scene.object_names)
        assert spec.objects == scene.named_objects  # caption order
        assert spec.attribute == (scene.attribute if scene.attribute_named else None)
        assert spec == CaptionSpec(scene.named_objects, scene.background, scene.attribute if scene.attribute_named else None)
    assert seen_words == vocab  # every vocabulary word occurs; nothing else does


def test_caption_format():
    ball = PlacedObject("ball", 6.5, 6.5, 9)
    box = PlacedObject("box", 20.0, 20.0, 10)
    tree = PlacedObject("tree", 20.5, 5.5, 9)
    assert caption(Scene("grass", (ball,), None, ("ball",), False)) == "a ball on the grass"
    assert caption(Scene("sky", (ball, box), None, ("box", "ball"), False)) == "a box and a ball in the sky"
    three = Scene("sand", (ball, box, tree), "blurry", ("ball", "box", "tree"), True)
    assert caption(three) == "a ball, a box and a tree on the sand, blurry"
    assert caption(Scene("night", (ball,), "dark", (), False)) == "a view of the night"
    assert caption(Scene("night", (), "noisy", (), True)) == "a view of the night, noisy"
    assert caption(Scene("night", (ball,), None, ("ball",), False)) == "a ball at night"


def test_parse_caption_prompts():
    assert parse_caption("ball") == CaptionSpec(("ball",), None, None)
    assert parse_caption("blurry") == CaptionSpec((), None, "blurry")
    assert parse_caption("a red thing") == CaptionSpec((), None, None)
    assert parse_caption("") == CaptionSpec((), None, None)
    assert parse_caption("Balls, BOXES and a tree!!") == CaptionSpec(("ball", "box", "tree"), None, None)
    assert parse_caption("kite at night, dark, ugly") == CaptionSpec(("kite",), "night", "dark")
    assert parse_caption("sun sun sun in the sky") == CaptionSpec(("sun",), "sky", None)
    assert parse_caption("grassy") == CaptionSpec((), None, None)  # whole words only


def test_scene_distribution():
    rng = np.random.default_rng(123)
    scenes = [sample_scene(rng) for _ in range(5000)]
    counts = Counter(len(s.objects) for s in scenes)
    for k, p in enumerate((0.1, 0.35, 0.35, 0.2)):
        assert abs(counts[k] / 5000 - p) < 0.03, (k, counts[k] / 5000)
    present = sum(len(s.objects) for s in scenes)
    named = sum(len(s.named_objects) for s in scenes)
    assert abs(named / present - 0.6) < 0.02
    with_attr = [s for s in scenes if s.attribute]
    assert abs(len(with_attr) / 5000 - 0.3) < 0.025
    assert abs(sum(s.attribute_named for s in with_attr) / len(with_attr) - 0.6) < 0.05
    assert not any(s.attribute_named for s in scenes if s.attribute is None)
    for a, c in Counter(s.attribute for s in with_attr).items():
        assert abs(c / len(with_attr) - 0.25) < 0.04, a
    for b, c in Counter(s.background for s in scenes).items():
        assert abs(c / 5000 - 0.25) < 0.03, b
    for o, c in Counter(n for s in scenes for n in s.object_names).items():
        assert abs(c / present - 0.2) < 0.025, o
    # Keyword arguments are honoured.
    rng = np.random.default_rng(1)
    alt = [sample_scene(rng, p_counts=(0, 0, 0, 1), p_attribute=1.0, p_named=0.0, p_named_attribute=1.0) for _ in range(200)]
    assert all(len(s.objects) == 3 and s.attribute and s.attribute_named and not s.named_objects for s in alt)
    assert all(caption(s).startswith("a view of the ") for s in alt)


# ----------------------------------------------------------------------------- oracle


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_connected_components():
    lab = np.array(
        [
            [0, 0, 1, 1],
            [0, 1, 1, 0],  # the 0 at (1, 3) touches the top-left 0s only diagonally
            [2, 2, 2, 0],
            [0, 0, 2, 0],
        ]
    )[None]
    comp = connected_components(lab, lab >= 0)[0]
    assert len(set(comp[lab[0] == 0].tolist())) == 3  # {(0,0),(0,1),(1,0)}, {(1,3),(2,3),(3,3)}, {(3,0),(3,1)}
    assert len(set(comp[lab[0] == 1].tolist())) == 1 and len(set(comp[lab[0] == 2].tolist())) == 1
    assert comp[0, 0] == comp[1, 0] and comp[1, 3] == comp[3, 3] and comp[0, 0] != comp[3, 0]
    spiral = np.zeros((1, 9, 9), int)  # a long snake converges too
    spiral[0, ::2, :] = 1
    spiral[0, 1::4, -1] = 1
    spiral[0, 3::4, 0] = 1
    c = connected_components(spiral, spiral == 1)[0]
    assert len(set(c[spiral[0] == 1].tolist())) == 1


def test_classify_shape_on_sprites():
    for shape in ("disc", "square", "triangle", "diamond"):
        for s in range(7, 16):
            m = np.zeros((RESOLUTION, RESOLUTION), bool)
            m[5 : 5 + s, 9 : 9 + s] = sprite(shape, s)
            assert classify_shape(m) == shape, (shape, s)
    line = np.zeros((RESOLUTION, RESOLUTION), bool)
    line[10, 2:30] = True
    assert classify_shape(line) == "unknown"


def test_oracle_accuracy(dataset, verdicts):
    images, _, scenes = dataset
    n = len(scenes)
    bg = attr = objset = 0
    iou_ok = iou_n = blur_ok = blur_n = shape_ok = shape_n = 0
    for scene, v in zip(scenes, verdicts):
        assert isinstance(v, Verdict)
        bg += v.background == scene.background
        objset += set(v.objects) == set(scene.object_names)
        attr += v.attribute == scene.attribute
        assert not (scene.attribute == "blurry" and not scene.objects)  # the world never draws it
        for o in scene.objects:
            if not v.present(o.name):
                continue
            m = v.objects[o.name]
            assert m.shape == (RESOLUTION, RESOLUTION) and m.dtype == bool
            iou = _iou(m, object_mask(o))
            shape_n += 1
            shape_ok += v.shapes[o.name] == OBJECTS[o.name].shape
            if scene.attribute == "blurry":
                blur_n += 1
                blur_ok += iou >= 0.8
            else:
                iou_n += 1
                iou_ok += iou >= 0.9
    acc = {
        "background": bg / n,
        "attribute": attr / n,
        "object set": objset / n,
        "mask IoU>=0.9 (not blurry)": iou_ok / iou_n,
        "mask IoU>=0.8 (blurry)": blur_ok / blur_n,
        "shape": shape_ok / shape_n,
    }
    print(f"\noracle on {n} world images:")
    for k, a in acc.items():
        print(f"  {k:30s} {a:.4f}")
    for k, a in acc.items():
        assert a >= 0.99, (k, a)
    assert set(ATTRIBUTES) == {v.attribute for v in verdicts} - {None}


def test_oracle_robust_to_jitter_and_strays(dataset):
    images, _, scenes = dataset
    rng = np.random.default_rng(77)
    x = images.astype(np.int16) + rng.integers(-25, 26, size=(len(images), 1, 1, 3))
    idx = np.arange(len(images))[:, None]
    ys, xs = rng.integers(0, RESOLUTION, (len(images), 3)), rng.integers(0, RESOLUTION, (len(images), 3))
    x[idx, ys, xs] = rng.integers(0, 256, (len(images), 3, 3))
    x = np.clip(x, 0, 255).astype(np.uint8)
    vs = inspect_batch(x)
    objset = np.mean([set(v.objects) == set(s.object_names) for v, s in zip(vs, scenes)])
    bg = np.mean([v.background == s.background for v, s in zip(vs, scenes)])
    print(f"\noracle on jittered (+-25/channel) images with 3 stray pixels: object set {objset:.4f}, background {bg:.4f}")
    assert objset >= 0.97
    assert bg >= 0.97


def test_oracle_edge_cases():
    # Too small a blob is not an object; a big enough one is, with its shape.
    img = np.empty((RESOLUTION, RESOLUTION, 3), np.uint8)
    img[:] = BACKGROUNDS["sand"]
    img[3:6, 3:6] = OBJECTS["ball"].rgb  # 9 pixels < MIN_AREA
    v = inspect(img)
    assert v.background == "sand" and not v.present("ball") and v.objects == {}
    img[20:28, 20:28] = OBJECTS["box"].rgb
    v = inspect(img)
    assert v.present("box") and v.objects["box"].sum() == 64 and v.shapes["box"] == "square"
    assert v.attribute is None
    # Shapes follow pixels, not colour: a blue disc is a box drawn as a disc.
    img2 = np.empty((RESOLUTION, RESOLUTION, 3), np.uint8)
    img2[:] = BACKGROUNDS["grass"]
    img2[4:15, 4:15][sprite("disc", 11)] = OBJECTS["box"].rgb
    assert inspect(img2).shapes == {"box": "disc"}
    # Garbage in: a constant unknown colour yields no objects, and batches of 0 work.
    grey = inspect(np.full((RESOLUTION, RESOLUTION, 3), (255, 128, 0), np.uint8))
    assert grey.objects == {} and grey.background is None
    assert inspect_batch(np.zeros((0, RESOLUTION, RESOLUTION, 3), np.uint8)) == []
    with pytest.raises(ValueError):
        inspect_batch(np.zeros((2, 16, 16, 3), np.uint8))
    assert oracle.MIN_AREA == 12
