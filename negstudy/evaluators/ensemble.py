"""Readers of the shapes world with explicit "unsure", and the default reader: oracle + shapes CLIP.

A *reading* of an image is, per decision: each of the 5 objects present (True), absent (False)
or unsure (None); the background (a class, ``"none"`` for a colour that is no world background,
or ``"unsure"``); the attribute (a class, ``"none"`` or ``"unsure"``). Three readers:

- ``oracle``: :func:`negstudy.shapes.oracle.inspect_batch` (pixel rules with margins; masks).
- ``clip``: the shipped shapes CLIP, zero-shot over the 520 world captions (as
  :class:`~negstudy.evaluators.clip.ClipEvaluator`) with a margin: object ``o`` is present if the
  best caption naming it beats the best caption lacking it by more than ``CLIP_MARGIN`` (cosine
  units), absent if it loses by more, else unsure; likewise the best background against the best
  other background, and the best attribute (or none) against the best other. CLIP always names a
  background: it cannot say "none".
- ``ensemble`` (the default reader for the shapes model): per decision, the oracle and CLIP
  readings are combined by the rule measured best on the tuning split of the labelled generated
  images (``tests/fixtures/generated``, ``scripts/reader_agreement.py``):

  * objects: a blob whose mean colour is outside its class's colour family (``HUE_FAMILIES``: an
    orange disc is neither ball nor sun) is no object, whatever CLIP says (unsure near the bounds);
    the oracle's decision counts only with the object's shape (a blob of the right colour
    in another or no recognisable shape is unsure: by-eye labels count no orange disc as a sun, no
    teal square as a box); then both sure and agreeing -> that; the oracle unsure -> absent if CLIP
    says absent, else unsure; CLIP unsure -> the oracle's; a disagreement -> unsure (on the tuning
    split the two were right about equally often where they disagreed);
  * background: the oracle's, with a tighter "none" (offset above ``NONE_OFFSET``) than the
    oracle's own, and unsure in a band around it (CLIP names a world background for every tint,
    and agreed with the labels on 35 % of tuned backgrounds);
  * attribute: the oracle's (CLIP is unsure on 70 % of generated images' attributes), except that
    "dark" needs a clean background: a world dark image is a clean image times 0.45, so where the
    oracle's noise statistic is unmeasurable (under 30 interior background pixels) or within or
    above the noise band (``NOISE_STD_THRESHOLD - NOISE_STD_MARGIN``), "dark" becomes unsure. The
    model's speckle over a near-black or maroon image fits the dark hypothesis best (4 of the 6
    attribute errors of the tuning split, all labelled noisy by eye). Likewise "striped" needs stripes
    in the image: a world striped image has its stripe rows at 0.7 of the other rows' brightness, so
    where the tint-corrected ratio (the oracle's ``stripe_ratio`` times ``world.STRIPE_GAIN``) is not
    below the oracle's stripe band (``STRIPE_RATIO_THRESHOLD - STRIPE_RATIO_MARGIN``), "striped" becomes
    unsure. A uniformly dark, tinted grass image (the main job's "a box on the grass", negative
    "striped", seed 17: ratio 0.95, no stripe visible) fits the striped hypothesis best; every image
    labelled striped by eye has 0.55..0.77.

  Every rule keeps the property that a +-1 grey-level change flips no decision except to or from
  unsure (each input decision flips only through unsure, and each rule maps such a path to one).
  An object is present only where the oracle located it, so every present object has its mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from negstudy.shapes import oracle, world

NONE, UNSURE = oracle.NONE, oracle.UNSURE
# Cosine units. A +-1 grey-level change moves CLIP's margins by up to ~0.03 on generated images
# (0.005 on world images); a sure CLIP decision cannot flip unless a margin moves by 2 * CLIP_MARGIN.
CLIP_MARGIN = 0.025
# The ensemble's "none" background: the oracle's offset |j| above NONE_OFFSET (+- the margin: unsure).
# Chosen on the tuning split (45 of 30..60); the oracle's own threshold (60) keeps world images exact.
NONE_OFFSET = 45.0
# Colour families (hue bounds in degrees, from the labelling protocol of tests/fixtures/generated):
# an orange disc is neither ball nor sun, a teal-blue triangle no tree.
HUE_FAMILIES = {"ball": (340.0, 14.0), "sun": (40.0, 70.0), "tree": (70.0, 180.0)}
HUE_MARGIN = 3.0
NONE_OFFSET_MARGIN = 6.0


@dataclass
class Reading:
    """What a reader decides on one image (see the module docstring)."""

    objects: dict[str, bool | None]
    background: str
    attribute: str
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    margins: dict[str, float] = field(default_factory=dict)  # CLIP's per decision, cosine units
    diagnostics: dict[str, float] = field(default_factory=dict)  # the oracle's (Verdict.diagnostics)
    shapes: dict[str, str] = field(default_factory=dict)  # the oracle's, of its located objects
    colours: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # mean RGB of each mask

    @property
    def unsure(self) -> frozenset[str]:
        out = {o for o, s in self.objects.items() if s is None}
        return frozenset(out | {k for k in ("background", "attribute") if getattr(self, k) == UNSURE})

    def present(self, name: str) -> bool:
        return bool(self.objects.get(name))


def oracle_readings(images: np.ndarray) -> list[Reading]:
    return [
        Reading(
            objects={o: v.decision(o) for o in world.OBJECT_NAMES},
            background=v.background_state,
            attribute=v.attribute_state,
            masks={**v.objects, **v.candidates},
            diagnostics=v.diagnostics,
            shapes=_all_shapes(v),
            colours={n: tuple(float(x) for x in image[m].mean(0)) for n, m in {**v.objects, **v.candidates}.items()},
        )
        for image, v in zip(images, oracle.inspect_batch(images))
    ]


def _all_shapes(v) -> dict[str, str]:
    """Shapes of the oracle's present and unsure (candidate) objects."""
    blur = v.attribute == "blurry"
    return {**v.shapes, **{n: oracle.classify_shape(m, blur, world.OBJECTS[n].shape) for n, m in v.candidates.items()}}


def _world_captions():
    """Captions, and per caption its object set, background and attribute (NONE if none)."""
    from negstudy.evaluators.clip import shapes_captions

    captions, named = shapes_captions()
    specs = [world.parse_caption(c) for c in captions]
    return captions, named, [s.background for s in specs], [s.attribute or NONE for s in specs]


def _decide(best_in: np.ndarray, best_out: np.ndarray, margin: float) -> list[bool | None]:
    d = best_in - best_out
    return [True if x > margin else False if x < -margin else None for x in d]


def clip_readings(clip, images: np.ndarray, margin: float = CLIP_MARGIN) -> list[Reading]:
    """Readings of the shapes CLIP (a ClipEvaluator on the shapes world)."""
    captions, named, backgrounds, attributes = _world_captions()
    scores = (clip.image_embeds(images) @ clip.text_embeds(captions).T).numpy()  # (B, C)
    n = len(images)
    objects, margins = [dict() for _ in range(n)], [dict() for _ in range(n)]
    for o in world.OBJECT_NAMES:
        has = np.array([o in s for s in named])
        best_in, best_out = scores[:, has].max(1), scores[:, ~has].max(1)
        for i, (d, s) in enumerate(zip(best_in - best_out, _decide(best_in, best_out, margin))):
            objects[i][o], margins[i][o] = s, float(d)

    def best_class(labels: list[str], classes: Sequence[str], key: str) -> list[str]:
        labels = np.array(labels)
        per = np.stack([scores[:, labels == c].max(1) for c in classes], 1)  # (B, K)
        top = np.sort(per, 1)
        out = []
        for i in range(n):
            margins[i][key] = float(top[i, -1] - top[i, -2])
            out.append(classes[int(per[i].argmax())] if margins[i][key] > margin else UNSURE)
        return out

    bgs = best_class(backgrounds, world.BACKGROUND_NAMES, "background")
    attrs = best_class(attributes, world.ATTRIBUTES + (NONE,), "attribute")
    return [Reading(objects[i], bgs[i], attrs[i], margins=margins[i]) for i in range(n)]


def _shaped(present: bool | None, shape: str | None, name: str) -> bool | None:
    """The oracle's object decision with its shape: a blob of the object's colour counts as the object
    only if it has the object's shape; another or no recognisable shape (doubled, merged, half-formed
    blobs) is unsure. (By-eye labels count an orange disc, a green square or a teal square as no
    object; the oracle alone reads colours.)"""
    if not present:
        return present
    return True if shape == world.OBJECTS[name].shape else None


def _family(name: str, rgb) -> bool | None:
    """Whether a blob's mean colour is in its class's colour family, by hue (degrees): ball red to
    red-orange, sun amber to lemon, tree green to teal-green; unsure within HUE_MARGIN of a bound;
    True for the other classes and for unsaturated blobs (hue is meaningless there)."""
    import colorsys

    if name not in HUE_FAMILIES or rgb is None:
        return True
    h, s, _ = colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255.0))
    if s < 0.25:
        return True
    lo, hi = HUE_FAMILIES[name]
    inside = (h * 360.0 - lo) % 360.0  # degrees past the lower bound
    width = (hi - lo) % 360.0
    if HUE_MARGIN <= inside <= width - HUE_MARGIN:
        return True
    if inside <= width + HUE_MARGIN or inside >= 360.0 - HUE_MARGIN:
        return None
    return False


def _object(a: bool | None, b: bool | None) -> bool | None:
    """Oracle (shape-checked) `a` and CLIP `b`: agreement -> that; the oracle unsure -> CLIP's "absent"
    only; CLIP unsure -> the oracle's; a disagreement -> unsure."""
    if a == b:
        return a
    if a is None:
        return False if b is False else None
    if b is None:
        return a
    return None


def _attribute(o: Reading) -> str:
    """The oracle's attribute; "dark" only over a background measured clean, "striped" only with stripes in
    the image (see the module docstring)."""
    if o.attribute == "dark":
        noise = o.diagnostics.get("noise_std", float("nan"))
        return "dark" if noise < oracle.NOISE_STD_THRESHOLD - oracle.NOISE_STD_MARGIN else UNSURE  # NaN: unsure
    if o.attribute == "striped":
        ratio = o.diagnostics.get("stripe_ratio", float("nan")) * world.STRIPE_GAIN
        return "striped" if ratio < oracle.STRIPE_RATIO_THRESHOLD - oracle.STRIPE_RATIO_MARGIN else UNSURE  # NaN: unsure
    return o.attribute


def combine(o: Reading, c: Reading) -> Reading:
    """The ensemble rule of the module docstring, for one image."""
    objects = {}
    for name in world.OBJECT_NAMES:
        family = _family(name, o.colours.get(name)) if o.objects[name] is not False else True
        if family is False:  # a wrong-coloured blob (an orange disc): no object, whatever CLIP says
            objects[name] = False
            continue
        oracle_says = _shaped(o.objects[name], o.shapes.get(name), name)
        objects[name] = _object(oracle_says if family else (None if oracle_says is not False else False), c.objects[name])
    background = o.background
    if background not in (NONE, UNSURE):
        # A tighter "none" than the oracle's own: by-eye labels call a mint, olive or khaki tint "none".
        offset = o.diagnostics.get("offset_norm", 0.0)
        if offset > NONE_OFFSET + NONE_OFFSET_MARGIN:
            background = NONE
        elif offset >= NONE_OFFSET - NONE_OFFSET_MARGIN:
            background = UNSURE
    masks = {name: o.masks.get(name) for name, s in objects.items() if s or (s is None and name in o.masks)}
    return Reading(objects, background, _attribute(o), masks=masks, margins=c.margins, shapes=o.shapes,
                   diagnostics=o.diagnostics)


def ensemble_readings(clip, images: np.ndarray) -> list[Reading]:
    return [combine(o, c) for o, c in zip(oracle_readings(images), clip_readings(clip, images))]


def reading_row(r: Reading, prompt: str, negative: str) -> dict:
    """The generation table's columns for one reading (the oracle evaluator's, plus unsure)."""
    named = world.parse_caption(prompt)
    target = world.parse_caption(negative or "")
    present = sorted(o for o, s in r.objects.items() if s)
    negative_present = None
    if target.objects:
        states = [r.objects.get(o) for o in target.objects]
        negative_present = True if any(states) else (None if None in states else False)
    elif target.attribute:
        negative_present = None if r.attribute == UNSURE else r.attribute == target.attribute
    named_states = [r.objects.get(o) for o in named.objects]
    named_present = False if False in named_states else (None if None in named_states else True)
    background = r.background if r.background in world.BACKGROUND_NAMES else None
    return {
        "objects": ",".join(present),
        "n_objects": len(present),
        "background": background,
        "attribute": r.attribute if r.attribute in world.ATTRIBUTES else None,
        "negative_present": negative_present,
        "named_objects_present": named_present,
        "unnamed_objects": ",".join(o for o in present if o not in named.objects),
        "background_right": None if r.background == UNSURE else (named.background is None or background == named.background),
        "background_state": r.background,
        "attribute_state": r.attribute,
        "unsure": ",".join(sorted(r.unsure)),
    }


class EnsembleEvaluator:
    """The default reader of the shapes model as an evaluator (see the module docstring)."""

    name = "ensemble"
    locates = True
    kinds = ("object", "attribute")

    def __init__(self, clip):
        self.clip = clip

    @classmethod
    def build(cls, *, world: str | None = None, **settings) -> "EnsembleEvaluator":
        """The target of conf/evaluator/ensemble.yaml: the shapes CLIP's keys (ClipConfig) as keyword arguments."""
        from negstudy.config import ClipConfig
        from negstudy.evaluators import settings_node

        return cls.from_config(settings_node(ClipConfig, settings, "ensemble"), world)

    @classmethod
    def from_config(cls, cfg_evaluator, model_world: str | None) -> "EnsembleEvaluator":
        from negstudy.evaluators import shapes_world_only
        from negstudy.evaluators.clip import ClipEvaluator

        shapes_world_only("ensemble", model_world, "evaluator=owl, clip or judge")
        return cls(ClipEvaluator.from_config(cfg_evaluator, model_world))

    def read(self, images: np.ndarray) -> list[Reading]:
        return ensemble_readings(self.clip, images)

    def objects(self, images, labels=None) -> list[dict[str, np.ndarray | None]]:
        """Surely present objects (among ``labels``), each with the oracle's mask."""
        return [{o: r.masks.get(o) for o, s in r.objects.items() if s and (labels is None or o in labels)}
                for r in self.read(images)]

    def present(self, images, names, kind: str = "object") -> list[bool | None]:
        """True / False, or None where the reader is unsure (recorded as missing, never guessed)."""
        if kind == "attribute":
            return [None if r.attribute == UNSURE else r.attribute == name for r, name in zip(self.read(images), names)]
        return [r.objects.get(name) if name in world.OBJECT_NAMES else None for r, name in zip(self.read(images), names)]

    def evaluate(self, images, items) -> list[dict]:
        return [reading_row(r, it.prompt, it.negative) for r, it in zip(self.read(images), items)]


# ----------------------------------------------------------------------------- agreement with labels

DECISIONS = ("object", "background", "attribute")


def load_labels(directory) -> tuple["object", np.ndarray]:
    """The labelled generated images: (labels DataFrame, uint8 (N, 32, 32, 3) images in its order)."""
    from pathlib import Path

    import pandas as pd
    from PIL import Image

    directory = Path(directory)
    table = pd.read_csv(directory / "labels.csv", dtype=str, keep_default_na=False)
    images = np.stack([np.asarray(Image.open(directory / f).convert("RGB")) for f in table["file"]]) if len(table) else \
        np.zeros((0, world.RESOLUTION, world.RESOLUTION, 3), np.uint8)
    return table, images


def agreement(table, readings: Sequence[Reading]) -> dict[str, dict]:
    """Per decision type: agreement with the labels, unsure excluded and counted.

    Labels other than 1/0 (objects), a class or ``none`` (background, attribute) are left out.
    Returns {decision: {"agree", "n" (sure decisions compared), "unsure", "labelled", "rate",
    "lo", "hi" (Wilson 95 %), "unsure_rate"}}.
    """
    from negstudy.critical import wilson

    counts = {d: [0, 0, 0] for d in DECISIONS}  # agree, compared, unsure
    allowed = {"background": set(world.BACKGROUND_NAMES) | {NONE}, "attribute": set(world.ATTRIBUTES) | {NONE}}

    def add(kind: str, said, truth) -> None:
        c = counts[kind]
        if said is None or said == UNSURE:
            c[2] += 1
        else:
            c[0] += said == truth
            c[1] += 1

    for (_, row), r in zip(table.iterrows(), readings):
        for o in world.OBJECT_NAMES:
            if row[o].strip() in ("0", "1"):
                add("object", r.objects[o], row[o].strip() == "1")
        for kind in ("background", "attribute"):
            if row[kind].strip() in allowed[kind]:
                add(kind, getattr(r, kind), row[kind].strip())
    out = {}
    for d, (k, n, u) in counts.items():
        rate, lo, hi = wilson(k, n)
        out[d] = {"agree": k, "n": n, "unsure": u, "labelled": n + u, "rate": rate, "lo": lo, "hi": hi,
                  "unsure_rate": u / (n + u) if n + u else float("nan")}
    return out


def attribute_agreement(table, readings: Sequence[Reading]) -> dict[str, dict]:
    """Per attribute (and ``none``): of the images labelled with it by eye, how often the reader says it, over its
    sure answers. Returns {attribute: {"agree", "n", "unsure", "rate", "lo", "hi"}} (rate, lo, hi None when n is 0:
    JSON has no NaN): the attribute agreement of :func:`agreement` split by the label, so that an attribute the
    labelled images rarely show is seen to rest on few decisions."""
    from negstudy.critical import wilson

    out = {}
    for a in (*world.ATTRIBUTES, NONE):
        agree = n = unsure = 0
        for (_, row), r in zip(table.iterrows(), readings):
            if row["attribute"].strip() != a:
                continue
            if r.attribute is None or r.attribute == UNSURE:
                unsure += 1
            else:
                agree, n = agree + (r.attribute == a), n + 1
        rate, lo, hi = wilson(agree, n) if n else (None, None, None)
        out[a] = {"agree": agree, "n": n, "unsure": unsure, "rate": rate, "lo": lo, "hi": hi}
    return out


# ----------------------------------------------------------------------------- the studies' reader

def concept_present(reading: Reading, negative: str) -> tuple[bool | None, np.ndarray | None]:
    """The rule every study uses for "the negative's concept is in the image": True / False, or
    None where the reader is unsure (tables count such rows and leave them out of rates), and the
    concept's region (the union of the surely present objects' masks) when it is an object.
    An object negative is present if any object it names is surely present, unsure if none is but
    one is unsure; an attribute negative is the reading's attribute (unsure -> None)."""
    spec = world.parse_caption(negative)
    if spec.objects:
        states = [reading.objects.get(o) for o in spec.objects]
        masks = [reading.masks[o] for o, s in zip(spec.objects, states) if s and o in reading.masks]
        if any(states):
            return True, (np.logical_or.reduce(masks) if masks else None)
        return (None if None in states else False), None
    if spec.attribute:
        return (None if reading.attribute == UNSURE else reading.attribute == spec.attribute), None
    raise ValueError(f"negative prompt {negative!r} names no object or attribute of the shapes world")
