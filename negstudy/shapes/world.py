"""The shapes world: a procedural 32x32 image + caption generator.

Every image is a flat background with 0-3 coloured shapes and at most one global
attribute (blurry / noisy / dark / striped). Captions deliberately under-describe the
image: each present object is named only with probability ``p_named`` and a present
attribute only with probability ``p_named_attribute``. A model trained on these pairs
therefore learns to draw unnamed objects "for free", which is what a negative prompt
naming that object can then remove.

Conventions
-----------
* Images are ``uint8`` arrays of shape ``(32, 32, 3)`` (row ``y``, column ``x``, RGB).
* Geometry is in pixels. An object of size ``s`` occupies the axis-aligned bounding box
  ``[x0, x0 + s) x [y0, y0 + s)`` with integer ``x0, y0``; its centre is
  ``(cx, cy) = (x0 + s/2, y0 + s/2)`` (so a half-integer for odd ``s``).
* Shapes are rasterised without anti-aliasing: a pixel belongs to a shape iff its
  centre ``(x + 0.5, y + 0.5)`` lies inside it, so the ground-truth masks are exact
  and depend only on the shape and size (one cached sprite per shape and size).
* Objects never overlap: bounding boxes are at least ``MIN_GAP`` = 2 empty pixels
  apart along x or y.
* The attribute is applied after drawing the objects, to the whole image, in float;
  the result is rounded and clipped to ``uint8`` once at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

RESOLUTION = 32
SIZE_RANGE = (9, 13)  # inclusive, pixels: disc diameter, square side, triangle/diamond height
MIN_GAP = 2  # empty pixels kept between the bounding boxes of two objects
MAX_OBJECTS = 3


@dataclass(frozen=True)
class ObjectClass:
    name: str
    rgb: tuple[int, int, int]
    shape: str  # "disc" | "square" | "triangle" | "diamond"


OBJECTS: dict[str, ObjectClass] = {
    o.name: o
    for o in (
        ObjectClass("ball", (220, 40, 40), "disc"),
        ObjectClass("sun", (240, 210, 40), "disc"),
        ObjectClass("box", (40, 70, 220), "square"),
        ObjectClass("tree", (10, 110, 30), "triangle"),
        ObjectClass("kite", (210, 60, 210), "diamond"),
    )
}
OBJECT_NAMES: tuple[str, ...] = tuple(OBJECTS)

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grass": (110, 185, 95),
    "sky": (150, 200, 245),
    "sand": (225, 205, 150),
    "night": (30, 30, 75),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

# Caption suffix per background when at least one object is named ("a ball on the grass").
BACKGROUND_PHRASES: dict[str, str] = {
    "grass": "on the grass",
    "sky": "in the sky",
    "sand": "on the sand",
    "night": "at night",
}

ATTRIBUTES: tuple[str, ...] = ("blurry", "noisy", "dark", "striped")

# Attribute parameters (see `apply_attribute`).
BLUR_KERNEL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0  # separable, applied twice
BLUR_PASSES = 2
NOISE_STD = 18.0  # additive N(0, 18) per pixel and channel, in uint8 units
DARK_GAIN = 0.45
STRIPE_GAIN = 0.7  # rows with (y // 2) % 2 == 0


def stripe_rows(resolution: int = RESOLUTION) -> np.ndarray:
    """Bool (resolution,): rows darkened by the 'striped' attribute ((y // 2) % 2 == 0)."""
    return (np.arange(resolution) // 2) % 2 == 0


def _caption_words() -> list[str]:
    words = {"a", "and", "view", "of", "the"}
    words |= set(OBJECTS) | set(BACKGROUNDS) | set(ATTRIBUTES)
    for phrase in BACKGROUND_PHRASES.values():
        words |= set(phrase.split())
    return sorted(words)


VOCABULARY: list[str] = _caption_words()
"""Sorted list of every word that can appear in a caption (punctuation excluded)."""


@dataclass(frozen=True)
class PlacedObject:
    """One object in a scene; (cx, cy) is the bounding-box centre in pixels, size in pixels."""

    name: str
    cx: float
    cy: float
    size: int

    @property
    def x0(self) -> int:
        return int(round(self.cx - self.size / 2))

    @property
    def y0(self) -> int:
        return int(round(self.cy - self.size / 2))


@dataclass(frozen=True)
class Scene:
    """A sampled scene. `named_objects` is in caption order and is a subset of the objects."""

    background: str
    objects: tuple[PlacedObject, ...]
    attribute: str | None
    named_objects: tuple[str, ...]
    attribute_named: bool

    @property
    def object_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.objects)


# ----------------------------------------------------------------------------- geometry


@lru_cache(maxsize=None)
def sprite(shape: str, size: int) -> np.ndarray:
    """Bool (size, size) hard mask of `shape` inside its bounding box (read-only, cached).

    Pixel centres relative to the box centre are ``d = i + 0.5 - size/2``:
    disc ``dx^2 + dy^2 <= r^2`` with ``r = size/2``; square: the whole box;
    diamond ``|dx| + |dy| <= r``; triangle: apex half a pixel above the box top, slopes
    of 1/2 so that row ``k`` (0 = top) holds the centres with ``|dx| <= (k + 1) / 2``
    and the bottom row spans the full width ``size`` (horizontal base).
    """
    d = np.arange(size) + 0.5 - size / 2.0
    dy, dx = np.meshgrid(d, d, indexing="ij")
    r = size / 2.0
    if shape == "disc":
        m = dx * dx + dy * dy <= r * r
    elif shape == "square":
        m = np.ones((size, size), dtype=bool)
    elif shape == "diamond":
        m = np.abs(dx) + np.abs(dy) <= r
    elif shape == "triangle":
        k = np.arange(size)[:, None]
        m = np.abs(dx) <= (k + 1) / 2.0
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m.setflags(write=False)
    return m


def object_mask(obj: PlacedObject, resolution: int = RESOLUTION) -> np.ndarray:
    """Bool (resolution, resolution) hard mask of one placed object."""
    m = np.zeros((resolution, resolution), dtype=bool)
    x0, y0, s = obj.x0, obj.y0, obj.size
    m[y0 : y0 + s, x0 : x0 + s] = sprite(OBJECTS[obj.name].shape, s)
    return m


def _boxes_clear(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """True if boxes (x0, y0, s) are >= MIN_GAP empty pixels apart along x or y."""
    ax, ay, as_ = a
    bx, by, bs = b
    return (
        ax + as_ + MIN_GAP <= bx
        or bx + bs + MIN_GAP <= ax
        or ay + as_ + MIN_GAP <= by
        or by + bs + MIN_GAP <= ay
    )


def _place(rng: np.random.Generator, sizes: list[int], tries: int = 64) -> list[tuple[int, int, int]]:
    """Rejection-sample non-overlapping (x0, y0, size) boxes fully inside the image.

    Positions are uniform over the valid top-left corners. Objects are placed one at a
    time; if one cannot be placed in `tries` attempts the whole layout is restarted
    (keeps the result a deterministic function of the rng stream).
    """
    while True:
        boxes: list[tuple[int, int, int]] = []
        for s in sizes:
            span = RESOLUTION - s + 1  # valid x0 / y0 in [0, span)
            for _ in range(tries):
                x0, y0 = rng.integers(0, span, size=2)
                box = (int(x0), int(y0), s)
                if all(_boxes_clear(box, b) for b in boxes):
                    boxes.append(box)
                    break
            else:
                break  # restart the layout
        if len(boxes) == len(sizes):
            return boxes


# ----------------------------------------------------------------------------- scenes


def sample_scene(
    rng: np.random.Generator,
    *,
    p_counts=(0.1, 0.35, 0.35, 0.2),
    p_attribute: float = 0.3,
    p_named: float = 0.6,
    p_named_attribute: float = 0.6,
) -> Scene:
    """Sample one scene.

    p_counts: probabilities of 0, 1, 2, 3 objects (classes drawn without replacement).
    p_attribute: probability that the image has an attribute (then uniform over ATTRIBUTES; never
        blurry without objects).
    p_named: probability that each present object is named in the caption (independent).
    p_named_attribute: probability that a present attribute is named.
    The background is uniform over BACKGROUNDS and always named.
    """
    p_counts = np.asarray(p_counts, dtype=float)
    if p_counts.ndim != 1 or len(p_counts) > MAX_OBJECTS + 1 or abs(p_counts.sum() - 1) > 1e-6:
        raise ValueError(f"p_counts must be <= {MAX_OBJECTS + 1} probabilities summing to 1")
    background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
    k = int(rng.choice(len(p_counts), p=p_counts))
    classes = [OBJECT_NAMES[i] for i in rng.permutation(len(OBJECT_NAMES))[:k]]
    sizes = [int(s) for s in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=k)]
    boxes = _place(rng, sizes)
    objects = tuple(
        PlacedObject(name, x0 + s / 2.0, y0 + s / 2.0, s) for name, (x0, y0, s) in zip(classes, boxes)
    )
    named = [name for name, u in zip(classes, rng.random(k)) if u < p_named]
    named = [named[i] for i in rng.permutation(len(named))]  # caption order
    attribute = None
    attribute_named = False
    if rng.random() < p_attribute:
        # blur is only visible on edges: an image without objects cannot be blurry (it would be
        # pixel-identical to the sharp one, and no oracle or model could tell)
        allowed = ATTRIBUTES if k else tuple(a for a in ATTRIBUTES if a != "blurry")
        attribute = allowed[int(rng.integers(len(allowed)))]
        attribute_named = bool(rng.random() < p_named_attribute)
    return Scene(background, objects, attribute, tuple(named), attribute_named)


# ----------------------------------------------------------------------------- rendering


def _draw(scene: Scene) -> np.ndarray:
    """Float32 (32, 32, 3) image of background and objects, before the attribute."""
    img = np.empty((RESOLUTION, RESOLUTION, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        x0, y0, s = obj.x0, obj.y0, obj.size
        img[y0 : y0 + s, x0 : x0 + s][sprite(OBJECTS[obj.name].shape, s)] = OBJECTS[obj.name].rgb
    return img


def blur(images: np.ndarray) -> np.ndarray:
    """Separable [1,4,6,4,1]/16 blur, BLUR_PASSES times, edge-replicated.

    images: float (..., H, W, C). Returns a new float array of the same shape.
    """
    out = np.asarray(images, dtype=np.float32)
    h_ax, w_ax = out.ndim - 3, out.ndim - 2
    r = len(BLUR_KERNEL) // 2
    for _ in range(BLUR_PASSES):
        for ax in (h_ax, w_ax):
            pad = [(0, 0)] * out.ndim
            pad[ax] = (r, r)
            p = np.pad(out, pad, mode="edge")
            n = out.shape[ax]
            acc = np.zeros_like(out)
            for i, w in enumerate(BLUR_KERNEL):
                acc += np.float32(w) * np.take(p, np.arange(i, i + n), axis=ax)
            out = acc
    return out


def apply_attribute(
    images: np.ndarray, attributes: list[str | None], rng: np.random.Generator
) -> np.ndarray:
    """Apply each image's attribute and quantise.

    images: float (N, 32, 32, 3) in uint8 units; attributes: N entries (None = clean).
    Noise for the noisy images is drawn in one call, in image order, from `rng`.
    Returns uint8 (N, 32, 32, 3).
    """
    out = np.array(images, dtype=np.float32)
    attrs = np.array([a if a is not None else "" for a in attributes], dtype=object)
    idx = {a: np.flatnonzero(attrs == a) for a in ATTRIBUTES}
    if len(idx["blurry"]):
        out[idx["blurry"]] = blur(out[idx["blurry"]])
    if len(idx["noisy"]):
        out[idx["noisy"]] += rng.normal(0.0, NOISE_STD, size=(len(idx["noisy"]),) + out.shape[1:]).astype(
            np.float32
        )
    if len(idx["dark"]):
        out[idx["dark"]] *= np.float32(DARK_GAIN)
    if len(idx["striped"]):
        rows = stripe_rows(out.shape[1])
        sub = out[idx["striped"]]
        sub[:, rows] *= np.float32(STRIPE_GAIN)
        out[idx["striped"]] = sub
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one scene.

    Returns (image uint8 (32, 32, 3), masks {object name: bool (32, 32)}). Masks are the
    hard object masks before the attribute. `rng` is used only by the noisy attribute.
    """
    img = apply_attribute(_draw(scene)[None], [scene.attribute], rng)[0]
    masks = {o.name: object_mask(o) for o in scene.objects}
    return img, masks


def render_batch(scenes: list[Scene], rng: np.random.Generator) -> np.ndarray:
    """Render many scenes (attributes vectorised). Returns uint8 (N, 32, 32, 3)."""
    canvas = np.empty((len(scenes), RESOLUTION, RESOLUTION, 3), dtype=np.float32)
    for i, scene in enumerate(scenes):
        canvas[i] = _draw(scene)
    return apply_attribute(canvas, [s.attribute for s in scenes], rng)


# ----------------------------------------------------------------------------- captions


def _join(nouns: list[str]) -> str:
    items = [f"a {n}" for n in nouns]
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene) -> str:
    """The scene's caption, e.g. 'a ball, a box and a tree on the grass, blurry'."""
    if scene.named_objects:
        text = f"{_join(list(scene.named_objects))} {BACKGROUND_PHRASES[scene.background]}"
    else:
        text = f"a view of the {scene.background}"
    if scene.attribute is not None and scene.attribute_named:
        text += f", {scene.attribute}"
    return text


@dataclass(frozen=True)
class CaptionSpec:
    """What a text names: objects in order of first mention, first background, first attribute."""

    objects: tuple[str, ...]
    background: str | None
    attribute: str | None


def _singular(word: str) -> str:
    """Map simple plurals of object nouns ('balls', 'boxes') to the noun; else the word."""
    if word in OBJECTS or word in BACKGROUNDS:
        return word
    for suffix in ("es", "s"):
        if word.endswith(suffix) and word[: -len(suffix)] in OBJECTS:
            return word[: -len(suffix)]
    return word


def parse_caption(text: str) -> CaptionSpec:
    """Which objects / background / attribute a caption or any prompt names.

    Case-insensitive; splits on anything that is not a letter, so punctuation and words
    outside the vocabulary are ignored ('a red thing' names nothing: colours are not
    object names). Simple plurals of object nouns count. If several backgrounds or
    attributes are named, the first one is returned.
    """
    objects: list[str] = []
    background = attribute = None
    for word in re.findall(r"[a-z]+", text.lower()):
        word = _singular(word)
        if word in OBJECTS and word not in objects:
            objects.append(word)
        elif word in BACKGROUNDS and background is None:
            background = word
        elif word in ATTRIBUTES and attribute is None:
            attribute = word
    return CaptionSpec(tuple(objects), background, attribute)


# ----------------------------------------------------------------------------- datasets


def sample_dataset(n: int, seed: int, **scene_kwargs) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n (image, caption, scene) triples, a deterministic function of `seed`.

    Scenes and attribute noise come from two independent streams spawned from `seed`,
    so the first m items of sample_dataset(n, seed) equal sample_dataset(m, seed) for
    m <= n. (render(scene, rng) with another rng gives the same image except for the
    noise of noisy scenes.) Returns images uint8 (n, 32, 32, 3), captions, scenes.
    """
    scene_ss, noise_ss = np.random.SeedSequence(seed).spawn(2)
    scene_rng = np.random.default_rng(scene_ss)
    scenes = [sample_scene(scene_rng, **scene_kwargs) for _ in range(n)]
    images = render_batch(scenes, np.random.default_rng(noise_ss))
    return images, [caption(s) for s in scenes], scenes
