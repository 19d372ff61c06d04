"""The shapes-world oracle: read background, objects (with masks and shapes) and the
attribute back from pixels.

Works on the world's own images (near-exact) and is meant to stay usable on images
sampled from a trained diffusion model: colours off by ~20-30 per channel, a few stray
pixels, soft edges. Pure numpy; `inspect_batch` vectorises over images.

Pipeline (all colours in uint8 units, images float (B, 32, 32, 3)):

1. Photometric fit. The world's attributes act on colours as a per-row gain: 1 (plain,
   also blurry / noisy), 0.45 (dark) or 0.7 on rows (y // 2) % 2 == 0 (striped). With a
   global colour offset j (absorbs a model's tint), an image is explained by the
   hypothesis h = (background b, mode) as  pixel ~= j + G_h(y) * c, with c the background
   colour or one of the 5 object colours (or, at a small extra cost MIX_PENALTY, a
   mixture of the background and one object: soft edges). For each of the 12 hypotheses,
   j is the per-channel median of (pixel - G_h(y) * b) over the 2-pixel border ring (the
   background covers most of the border, so the median is robust to objects). The cost
   is the sum over pixels of the capped distance to the nearest prediction, plus a
   penalty on |j| (small below OFFSET_MAX: prefers small offsets and decides e.g. between
   'night' and 'dark night' when nothing else can; steep above it). The fit runs on the
   3x3-median-filtered image (noise and stray pixels removed; 2-row stripes survive).
   The cheapest hypothesis gives the background class and the dark / striped attribute;
   the background is reported as None if even that needs an offset above
   BACKGROUND_MAX_OFFSET (not a shapes-world background).
2. Normalise: q = (pixel - j) / G(y), i.e. back to palette space.
3. Pixel labels. Soft edges are mixtures of the background and one object, i.e. points
   on the segment from colour b to an object colour o. Each pixel goes to its nearest
   segment; it is that object if it lies past the midpoint (t > 0.5), else background;
   'unknown' if farther than SEGMENT_DIST from every segment (stray pixels, junk).
   Pixels with no equal label among their 8 neighbours are relabelled to the majority
   of the neighbours (removes single stray / noise pixels, keeps 1-pixel shape tips).
4. Objects: the biggest 4-connected component of each object label; present if its
   area >= MIN_AREA pixels. Its shape is the best-matching ideal sprite.
5. Remaining attributes, on images whose fit said 'plain':
   striped if the background on stripe rows is darker than on the other rows by more
          than STRIPE_RATIO_THRESHOLD (softened or weaker stripes than the fit's 0.7);
   noisy  if the robust std of (image - its 3x3 median) over background pixels whose
          8 neighbours are background (max over channels) exceeds NOISE_STD_THRESHOLD;
   blurry if the median edge drop is below BLUR_STEP_THRESHOLD: across every pair of
          4-neighbours (kept object pixel, background pixel), the drop of the mixture
          coordinate t along that object's segment (hard edge: 1; the world's blur: <=
          0.28; a one-pixel [1, 2, 1] soft edge as a model may draw: ~0.3-0.5).
   A blurry image WITHOUT objects is a flat colour, identical to its clean version: it
   is undecidable and is reported as attribute None (counted as an error when
   measuring accuracy).

Margins and unsure. Generated images sit near the thresholds far more often than world images,
and their pixels differ in the last bits between machines, so every decision has a band around
its threshold in which it is UNSURE (Verdict.unsure) rather than a guess:
- object o: present if its biggest blob of pixels that pass the pixel rule of step 3 by the
  margins (t > 0.5 + PIXEL_T_MARGIN, distance < SEGMENT_DIST - PIXEL_DIST_MARGIN, nearer to o's
  segment than to any other by PIXEL_DIST_MARGIN) has >= MIN_AREA pixels, absent if even the
  blob of pixels that fail no test by more than the margins has fewer, else unsure;
- background: the class if |j| < BACKGROUND_MAX_OFFSET - BACKGROUND_OFFSET_MARGIN, "none" (not
  a world background: grey, pink, purple...) above the band, unsure inside it;
- attribute: each threshold of step 5 with its band (NOISE_STD_MARGIN, ...);
- if the runner-up hypothesis of the fit costs less than FIT_MARGIN more than the best, the image
  is read under both and every decision on which they differ is unsure.
A +-1 grey-level change of any pixel therefore flips no decision except to or from unsure
(tests/test_reader.py). Blobs of >= MIN_AREA pixels in no world colour (orange discs...) are
counted in diagnostics["other_blobs"], never forced into a class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .world import (
    ATTRIBUTES,
    BACKGROUNDS,
    DARK_GAIN,
    OBJECTS,
    RESOLUTION,
    STRIPE_GAIN,
    blur,
    sprite,
    stripe_rows,
)

BG_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
OBJ_NAMES: tuple[str, ...] = tuple(OBJECTS)
BG_RGB = np.array([BACKGROUNDS[b] for b in BG_NAMES], dtype=np.float32)  # (4, 3)
OBJ_RGB = np.array([OBJECTS[o].rgb for o in OBJ_NAMES], dtype=np.float32)  # (5, 3)
MODES: tuple[str, ...] = ("plain", "dark", "striped")
SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "diamond")

# Thresholds (uint8 colour units unless stated).
FIT_CAP = 50.0  # per-pixel residual cap in the photometric fit (outliers count at most this)
MIX_PENALTY = 15.0  # extra fit cost of explaining a pixel as a background/object mixture
OFFSET_PENALTY = 4.0  # cost per unit |j| (pixel-residual units; one object is ~1000s)
# Offsets beyond OFFSET_MAX are implausible (a tint, not another background): a steep
# extra cost keeps a wrong background + big offset from "explaining" soft stripes etc.
OFFSET_MAX = 60.0
OFFSET_EXCESS_PENALTY = 200.0
# A dark or striped image is a world image times a gain: a model's tint shows as an offset on the
# plain hypothesis. Large offsets on a dark / striped hypothesis explain tinted plain images (a
# lavender "sky" as a dark sky + offset) and then mislabel their objects, so they cost earlier.
MODE_OFFSET_MAX = 30.0
BACKGROUND_MAX_OFFSET = 60.0  # world images with +-25 jitter per channel need <= 43
FIT_CANDIDATES = 7  # hypotheses (of 12) scored per image: those with the smallest offsets
SEGMENT_DIST = 70.0  # max distance (palette space) from a background-object segment
MIN_AREA = 12  # pixels: smaller blobs are not objects
NOISE_STD_THRESHOLD = 8.0  # robust residual std: clean images ~0-1, noisy (sigma 18) ~20
STRIPE_RATIO_THRESHOLD = 0.9  # background brightness, stripe rows / other rows
BLUR_STEP_THRESHOLD = 0.35  # median edge drop in t: sharp 1, world blur 0.2-0.28
MIN_SHAPE_IOU = 0.6  # below: shape "unknown"

# Margins: a decision whose measured value lies within its margin of the threshold is UNSURE
# (see "Margins and unsure" in the module docstring). Sized so that a +-1 grey-level change
# of any pixel (what differs between CPU kinds and thread counts) cannot cross a whole band.
PIXEL_T_MARGIN = 0.06  # on the mixture coordinate t of a pixel (threshold 0.5)
PIXEL_DIST_MARGIN = 8.0  # palette units, on the distance to a segment and to the next one
BACKGROUND_OFFSET_MARGIN = 6.0  # on the offset |j| (threshold BACKGROUND_MAX_OFFSET)
FIT_MARGIN = 600.0  # fit-cost units: a runner-up hypothesis this close is read too
NOISE_STD_MARGIN = 1.5
STRIPE_RATIO_MARGIN = 0.02
BLUR_STEP_MARGIN = 0.05
NONE = "none"  # a decision's value when none of the classes applies
UNSURE = "unsure"

BG_LABEL = len(OBJ_NAMES)  # label of background pixels (objects are 0..4)
UNKNOWN_LABEL = -1
_CHUNK = 128  # images per vectorised chunk (bounds memory to ~100 MB)


@dataclass
class Verdict:
    """What the oracle reads from one image.

    background: background class, or None if nothing fits (never for world images) or unsure.
    objects: surely present object name -> bool (32, 32) mask (biggest connected blob).
    attribute: one of ATTRIBUTES or None (no attribute, or unsure).
    unsure: the decisions the oracle cannot make within its margins: object names,
        "background", "attribute". Tables should count these and leave them out of rates.
    candidates: unsure object name -> mask of the blob the plain rule found, if any.
    shapes: present object name -> "disc" | "square" | "triangle" | "diamond" | "unknown".
    diagnostics: measured statistics: fit_cost, offset_norm (|j|, colour units),
        noise_std, edge_step (NaN without objects), stripe_ratio, unknown_pixels, other_blobs
        (blobs of >= MIN_AREA pixels in no world colour), fit_margin (runner-up cost - best).
    """

    background: str | None
    objects: dict[str, np.ndarray]
    attribute: str | None
    shapes: dict[str, str]
    diagnostics: dict[str, float] = field(default_factory=dict)
    unsure: frozenset[str] = frozenset()
    candidates: dict[str, np.ndarray] = field(default_factory=dict)

    def present(self, name: str) -> bool:
        """True only for a surely present object (False for absent AND for unsure)."""
        return name in self.objects and name not in self.unsure

    def decision(self, name: str) -> bool | None:
        """Object `name`: True present, False absent, None unsure."""
        return None if name in self.unsure else name in self.objects

    @property
    def background_state(self) -> str:
        """A background class, NONE ("none": not a world background) or UNSURE."""
        return UNSURE if "background" in self.unsure else (self.background or NONE)

    @property
    def attribute_state(self) -> str:
        """An attribute, NONE (no attribute) or UNSURE."""
        return UNSURE if "attribute" in self.unsure else (self.attribute or NONE)


# ----------------------------------------------------------------------------- helpers


def _row_gains() -> np.ndarray:
    """Float32 (3, 32): per-row gain of each mode."""
    g = np.ones((len(MODES), RESOLUTION), dtype=np.float32)
    g[MODES.index("dark")] = DARK_GAIN
    g[MODES.index("striped"), stripe_rows()] = STRIPE_GAIN
    return g


_GAINS = _row_gains()
# Hypotheses h = (background index, mode index), background-major.
_HYP = [(b, m) for b in range(len(BG_NAMES)) for m in range(len(MODES))]
_HYP_GAIN = np.stack([np.repeat(_GAINS[m], RESOLUTION) for _, m in _HYP])  # (12, 1024) per pixel
_HYP_COLOURS = np.stack([np.vstack([BG_RGB[b][None], OBJ_RGB]) for b, _ in _HYP])  # (12, 6, 3)
_HYP_BG = _HYP_COLOURS[:, 0]  # (12, 3)
_HYP_OFFSET_MAX = np.array([OFFSET_MAX if MODES[m] == "plain" else MODE_OFFSET_MAX for _, m in _HYP], dtype=np.float32)
# Two row types (stripe rows, other rows): every mode's gain is constant within a type.
_ROW_TYPES = (stripe_rows(), ~stripe_rows())
_HYP_ROW_GAIN = np.array(
    [[_GAINS[m][rows][0] for rows in _ROW_TYPES] for _, m in _HYP], dtype=np.float32
)  # (12, 2)
_yy, _xx = np.mgrid[:RESOLUTION, :RESOLUTION]
_RING = ((np.minimum(_yy, RESOLUTION - 1 - _yy) < 2) | (np.minimum(_xx, RESOLUTION - 1 - _xx) < 2)).ravel()


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """a (B, H, W, ...) shifted so out[y, x] = a[y + dy, x + dx]; `fill` outside."""
    out = np.full_like(a, fill)
    h, w = a.shape[1], a.shape[2]
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[:, yd, xd] = a[:, ys, xs]
    return out


_N8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
_N4 = [(-1, 0), (1, 0), (0, -1), (0, 1)]


def connected_components(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """4-connected components of equal labels.

    labels: int (B, H, W); valid: bool (B, H, W), pixels to group. Returns int64 (B, H, W):
    for valid pixels the flat index (y * W + x) of the smallest pixel of its component,
    -1 elsewhere. Min-label propagation plus pointer jumping, vectorised over the batch.
    """
    b, h, w = labels.shape
    big = h * w
    idx = np.broadcast_to(np.arange(big).reshape(1, h, w), labels.shape)
    comp = np.where(valid, idx, big)
    same = [
        valid & _shift(valid, dy, dx, False) & (_shift(labels, dy, dx, -(10**9)) == labels) for dy, dx in _N4
    ]
    while True:
        new = comp
        for (dy, dx), ok in zip(_N4, same):
            new = np.where(ok, np.minimum(new, _shift(comp, dy, dx, big)), new)
        # Pointer jumping: a pixel's label is a pixel of the same component whose own
        # label is no larger, so following it is safe and halves the path length.
        flat = new.reshape(b, big)
        jumped = np.take_along_axis(flat, np.minimum(flat, big - 1), axis=1).reshape(b, h, w)
        new = np.where(valid, np.minimum(new, jumped), big)
        if np.array_equal(new, comp):
            break
        comp = new
    return np.where(valid, comp, -1)


def _median3x3(q: np.ndarray) -> np.ndarray:
    """q float (B, H, W, C) -> 3x3 median, edge-replicated."""
    p = np.pad(q, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = q.shape[1], q.shape[2]
    stack = np.stack([p[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=-1)
    return np.partition(stack, 4, axis=-1)[..., 4]


@lru_cache(maxsize=None)
def _template(shape: str, size: int, blurred: bool) -> np.ndarray:
    """Bool mask of an ideal shape cropped to its bounding box (read-only, cached).

    blurred: the sprite after the world's blur, thresholded at 1/2 (what the oracle's
    t > 0.5 rule recovers from a blurry image: corners and tips are rounded off).
    """
    m = sprite(shape, size)
    if blurred:
        pad = 4
        f = np.zeros((size + 2 * pad, size + 2 * pad, 1), dtype=np.float32)
        f[pad:-pad, pad:-pad, 0] = m
        m = blur(f)[..., 0] > 0.5
    ys, xs = np.nonzero(m)
    if len(ys) == 0:  # tiny blurred shapes vanish
        return np.zeros((0, 0), dtype=bool)
    out = m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].copy()
    out.setflags(write=False)
    return out


def classify_shape(mask: np.ndarray, blurred: bool = False, prefer: str | None = None) -> str:
    """Best-matching shape of a bool (H, W) mask, by IoU with ideal templates.

    Templates (sharp sprites, or blurred ones if `blurred`) whose bounding box is within
    one pixel of the mask's are aligned with it (shifts of up to one pixel tried);
    "unknown" if no template reaches IoU MIN_SHAPE_IOU. Exact ties (e.g. a blurred
    12-pixel diamond is pixel-identical to a blurred 10-pixel disc) go to `prefer`, the
    shape the object's colour class should have: the mask cannot tell them apart.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return "unknown"
    y0, x0 = int(ys.min()), int(xs.min())
    h, w = int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1
    crop = np.zeros((h + 4, w + 4), dtype=bool)  # the mask's box with a 2-pixel margin
    crop[2 : 2 + h, 2 : 2 + w] = mask[y0 : y0 + h, x0 : x0 + w]
    area = len(ys)
    best, best_iou = "unknown", MIN_SHAPE_IOU
    for size in range(max(3, min(h, w) - 2), max(h, w) + 4):
        for shape in SHAPES:
            tpl = _template(shape, size, blurred)
            th, tw = tpl.shape
            if abs(th - h) > 1 or abs(tw - w) > 1:
                continue
            # All placements of the template whose box is within one pixel of the mask's.
            win = np.lib.stride_tricks.sliding_window_view(crop[1 : 3 + h, 1 : 3 + w], (th, tw))
            inter = (win & tpl).sum((-1, -2))
            iou = (inter / (area + np.count_nonzero(tpl) - inter)).max()
            if iou > best_iou + 1e-9 or (shape == prefer and iou >= best_iou - 1e-9):
                best, best_iou = shape, iou
    return best


# ----------------------------------------------------------------------------- core


def _fit(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Photometric fit. p float32 (B, 1024, 3), ideally 3x3-median filtered (noise, strays).

    Each hypothesis h predicts, per row, a background colour a = j + G b and object colours
    j + G o; soft edges are points on the segments from a to each object colour. A pixel's
    cost is min(distance to a predicted colour, distance to a segment + MIX_PENALTY),
    capped at FIT_CAP. The mixture penalty matters: without it a 'plain' hypothesis
    explains a dark image's objects perfectly as 45 % mixtures, and a 'dark' hypothesis
    explains a blurry image's edges; with it, exact colours win.
    Returns (best hypothesis index (B,), its offset j (B, 3), its cost (B,)) and the same three
    for the runner-up hypothesis (the decisions' margin against a close second).
    """
    n = len(p)
    ring = p[:, _RING]  # (B, R, 3)
    j = np.median(ring[:, None] - _HYP_GAIN[None][:, :, _RING, None] * _HYP_BG[None, :, None], axis=2)
    j = j.astype(np.float32)  # (B, H, 3)
    j_norm = np.linalg.norm(j, axis=-1)  # (B, H)
    penalty = OFFSET_PENALTY * j_norm + OFFSET_EXCESS_PENALTY * np.maximum(j_norm - _HYP_OFFSET_MAX, 0)
    # Only the FIT_CANDIDATES hypotheses with the smallest offsets are scored (the others
    # would need an offset far beyond any tint); saves most of the work.
    sel = np.argsort(penalty, axis=1, kind="stable")[:, :FIT_CANDIDATES]  # (B, K)
    k = sel.shape[1]
    j_s = np.take_along_axis(j, sel[..., None], 1)  # (B, K, 3)
    cost = np.take_along_axis(penalty, sel, 1)  # (B, K)
    palette = _HYP_COLOURS[sel]  # (B, K, 6, 3)
    for rt, rows in enumerate(_ROW_TYPES):
        pr = p.reshape(n, RESOLUTION, RESOLUTION, 3)[:, rows].reshape(n, -1, 3)  # (B, Pr, 3)
        g = _HYP_ROW_GAIN[sel, rt][..., None, None]  # (B, K, 1, 1)
        # Predicted colours (B, K, 6, 3): background first, then the objects.
        cols = j_s[:, :, None] + g * palette
        # Squared distances |p - c|^2 = |p|^2 - 2 p.c + |c|^2 (in place: this is the hot loop).
        d2 = np.matmul(pr, cols.reshape(n, k * 6, 3).transpose(0, 2, 1))  # (B, Pr, K*6)
        d2 *= -2
        d2 += (pr * pr).sum(-1)[:, :, None]
        d2 += (cols * cols).sum(-1).reshape(n, 1, k * 6)
        d2 = d2.reshape(n, -1, k, 6)
        point = d2.min(-1)  # (B, Pr, K), squared
        # Segments a -> a + D with a = predicted background, D = g (o - b).
        seg_d = cols[:, :, 1:] - cols[:, :, :1]  # (B, K, 5, 3)
        dd = (seg_d * seg_d).sum(-1)[:, None]  # (B, 1, K, 5)
        pa = np.matmul(pr, seg_d.reshape(n, k * 5, 3).transpose(0, 2, 1)).reshape(n, -1, k, 5)
        pa -= np.einsum("bki,bkli->bkl", cols[:, :, 0], seg_d)[:, None]  # (p - a).D
        t = pa / dd
        np.clip(t, 0.0, 1.0, out=t)
        # |p - a - t D|^2 = |p - a|^2 + t (t |D|^2 - 2 (p - a).D)
        seg2 = t * dd
        seg2 -= pa
        seg2 -= pa
        seg2 *= t
        seg2 = seg2.min(-1)
        seg2 += d2[..., 0]
        seg = np.sqrt(np.maximum(seg2, 0)) + MIX_PENALTY
        cost += np.minimum(np.minimum(np.sqrt(np.maximum(point, 0)), seg), FIT_CAP).sum(1)
    ar = np.arange(n)
    order = np.argsort(cost, axis=1, kind="stable")
    best, second = sel[ar, order[:, 0]], sel[ar, order[:, 1]]
    return best, j[ar, best], cost[ar, order[:, 0]], second, j[ar, second], cost[ar, order[:, 1]]


def _biggest_areas(masks: np.ndarray) -> np.ndarray:
    """masks bool (B, K, H, W) -> int (B, K): pixels in the biggest 4-connected blob of each mask."""
    b, k, h, w = masks.shape
    flat = masks.reshape(b * k, h, w)
    comp = connected_components(np.zeros(flat.shape, np.int32), flat)
    key = (np.arange(b * k)[:, None, None] * (h * w) + comp)[flat]
    areas = np.bincount(key, minlength=b * k * h * w).reshape(b * k, h * w)
    return areas.max(1).reshape(b, k)


def _read(raw: np.ndarray, med: np.ndarray, hyp: np.ndarray, j: np.ndarray) -> list[dict]:
    """Steps 2-5 of the module docstring under one hypothesis per image.

    raw, med: float32 (B, 32, 32, 3) image and its 3x3 median; hyp (B,) hypothesis indices,
    j (B, 3) their offsets. Returns per image a dict: background / attribute (a class, NONE or
    UNSURE), objects {name: True | False | None (unsure)}, masks {name: bool (32, 32)} of the
    blobs found by the plain rule, and the diagnostics.
    """
    n = len(raw)
    r = RESOLUTION
    bg_idx = np.array([_HYP[h][0] for h in hyp])
    mode_idx = np.array([_HYP[h][1] for h in hyp])
    gain = _GAINS[mode_idx]  # (B, 32)
    q = (raw - j[:, None, None]) / gain[:, :, None, None]  # palette space
    q = q.reshape(n, r * r, 3)

    # Nearest background->object segment per pixel. A model may tint the background but draw
    # the objects in their own colours: each object has two segments, to its colour with the
    # offset (a tint of the whole image) and without it (o - j / mean gain in palette space).
    b = BG_RGB[bg_idx]  # (B, 3)
    untinted = OBJ_RGB[None] - j[:, None] / gain.mean(1)[:, None, None]  # (B, 5, 3)
    d_vec = np.concatenate([np.broadcast_to(OBJ_RGB[None], untinted.shape), untinted], 1) - b[:, None]  # (B, 10, 3)
    qb = q - b[:, None]  # (B, P, 3)
    proj = np.einsum("bpi,bki->bpk", qb, d_vec)
    dd = np.maximum((d_vec**2).sum(-1)[:, None], 1e-6)  # (B, 1, 10)
    t = np.clip(proj / dd, 0.0, 1.0)
    dist = np.sqrt(np.maximum((qb**2).sum(-1)[..., None] - 2 * t * proj + t * t * dd, 0.0))  # (B, P, 10)
    n_obj = len(OBJ_NAMES)
    pick = (dist[..., n_obj:] < dist[..., :n_obj])[..., None]  # the nearer of each object's two segments
    t = np.where(pick[..., 0], t[..., n_obj:], t[..., :n_obj])  # (B, P, 5)
    dist = np.where(pick[..., 0], dist[..., n_obj:], dist[..., :n_obj])
    k = dist.argmin(-1)  # (B, P)
    tk = np.take_along_axis(t, k[..., None], -1)[..., 0]
    dk = np.take_along_axis(dist, k[..., None], -1)[..., 0]
    labels = np.where(tk > 0.5, k, BG_LABEL)
    labels = np.where(dk > SEGMENT_DIST, UNKNOWN_LABEL, labels).reshape(n, r, r)

    # The same rule with margins (step 4): a pixel is surely object o if it passes every test by
    # the pixel margins, possibly o if it fails none by more than them. An object is present if
    # its surely-o blob reaches MIN_AREA, absent if its possibly-o blob does not, else unsure; a
    # +-1 grey-level change moves no pixel across both margins, so it flips no decision outright.
    others = np.where(np.eye(len(OBJ_NAMES), dtype=bool)[None, None], np.inf, dist[..., None, :]).min(-1)
    sure = (t > 0.5 + PIXEL_T_MARGIN) & (dist < SEGMENT_DIST - PIXEL_DIST_MARGIN) & (dist + PIXEL_DIST_MARGIN < others)
    maybe = (t > 0.5 - PIXEL_T_MARGIN) & (dist < SEGMENT_DIST + PIXEL_DIST_MARGIN) & (dist <= others + PIXEL_DIST_MARGIN)
    to_maps = lambda m: m.transpose(0, 2, 1).reshape(n, len(OBJ_NAMES), r, r)  # noqa: E731
    area_sure, area_maybe = np.split(_biggest_areas(np.concatenate([to_maps(sure), to_maps(maybe)], 1)), 2, axis=1)

    # Relabel pixels that share their label with none of their 8 neighbours.
    nb = np.stack([_shift(labels, dy, dx, -99) for dy, dx in _N8], axis=-1)  # (B, H, W, 8)
    lonely = ~(nb == labels[..., None]).any(-1)
    if lonely.any():
        votes = np.stack([(nb == v).sum(-1) for v in range(-1, BG_LABEL + 1)], axis=-1)
        majority = votes.argmax(-1) - 1
        labels = np.where(lonely, majority, labels)

    # Objects: biggest 4-connected blob per object label; blobs of unknown colour counted.
    is_obj = (labels >= 0) & (labels < BG_LABEL)
    comp = connected_components(labels, is_obj)
    key = (np.arange(n)[:, None, None] * (r * r) + comp)[is_obj]
    areas = np.bincount(key, minlength=n * r * r)
    reps = np.flatnonzero(areas >= MIN_AREA)
    rep_img, rep_pix = reps // (r * r), reps % (r * r)
    rep_cls = labels.reshape(n, -1)[rep_img, rep_pix]
    order = np.lexsort((-areas[reps], rep_cls, rep_img))  # biggest first within (image, class)
    found: list[dict[str, np.ndarray]] = [dict() for _ in range(n)]
    obj_lab = np.full((n, r, r), -1)  # class index on the kept blobs, -1 elsewhere
    for i in order:
        name = OBJ_NAMES[rep_cls[i]]
        if name not in found[rep_img[i]]:
            m = comp[rep_img[i]] == rep_pix[i]
            found[rep_img[i]][name] = m
            obj_lab[rep_img[i]][m] = rep_cls[i]
    is_unknown = labels == UNKNOWN_LABEL
    unk = connected_components(np.zeros(labels.shape, np.int32), is_unknown)
    unk_areas = np.bincount((np.arange(n)[:, None, None] * (r * r) + unk)[is_unknown], minlength=n * r * r)
    other_blobs = (unk_areas.reshape(n, r * r) >= MIN_AREA).sum(1)

    # Edge sharpness: across each 4-neighbour pair (kept-object pixel, background pixel),
    # the drop of the mixture coordinate t along that object's segment. A hard edge drops
    # from 1 to 0; the world's blur spreads the edge over ~4 pixels (drops 0.2-0.28).
    # Per image, the median drop over all such pairs (NaN without objects).
    t4 = t.reshape(n, r, r, len(OBJ_NAMES))
    safe = np.maximum(obj_lab, 0)[..., None]
    t_self = np.take_along_axis(t4, safe, -1)[..., 0]
    steps = []
    for dy, dx in _N4:
        pair = (obj_lab >= 0) & (_shift(labels, dy, dx, -99) == BG_LABEL)
        t_nb = np.take_along_axis(_shift(t4, dy, dx, 0.0), safe, -1)[..., 0]
        steps.append(np.where(pair, t_self - t_nb, np.nan))
    steps = np.stack(steps, -1).reshape(n, -1)
    n_pairs = np.count_nonzero(~np.isnan(steps), axis=1)
    edge_step = np.full(n, np.nan)
    has = n_pairs > 0
    edge_step[has] = np.nanmedian(steps[has], axis=1)

    # Noise: robust residual std against a 3x3 median, over interior background pixels.
    is_bg = labels == BG_LABEL
    interior = is_bg & np.stack([_shift(is_bg, dy, dx, False) for dy, dx in _N8], -1).all(-1)
    # Residual against the median, in palette units (only used for 'plain' images).
    resid = np.abs(raw - med) / gain[:, :, None, None]

    # Stripe ratio: mean background brightness on stripe rows / on the other rows, in
    # palette space (1 for a plain image or correctly undone stripes; 0.7 for the
    # world's stripes left in). Catches stripes the fixed-gain fit did not explain.
    bright = q.reshape(n, r, r, 3).sum(-1)
    rows = stripe_rows()
    on = (bright * is_bg)[:, rows].sum((1, 2)) / np.maximum(is_bg[:, rows].sum((1, 2)), 1)
    off = (bright * is_bg)[:, ~rows].sum((1, 2)) / np.maximum(is_bg[:, ~rows].sum((1, 2)), 1)
    stripe_ratio = np.where(off > 0, on / np.maximum(off, 1e-6), 1.0)

    out = []
    for i in range(n):
        res_i = resid[i][interior[i]]  # (K, 3)
        # Robust (MAD) std per channel; the max over channels, because a channel clipped
        # at 0 or 255 (e.g. 'night' red/green pushed down) shows no noise at all.
        noise = float(1.4826 * np.median(res_i, axis=0).max()) if len(res_i) >= 30 else float("nan")
        offset = float(np.linalg.norm(j[i]))
        objects = {}
        for c, name in enumerate(OBJ_NAMES):
            if area_sure[i, c] >= MIN_AREA and name in found[i]:
                objects[name] = True
            elif area_maybe[i, c] < MIN_AREA and name not in found[i]:
                objects[name] = False
            else:
                objects[name] = None
        out.append(
            {
                "background": _band(offset, BACKGROUND_MAX_OFFSET, BACKGROUND_OFFSET_MARGIN, BG_NAMES[bg_idx[i]], NONE),
                "attribute": _attribute(MODES[mode_idx[i]], stripe_ratio[i], noise, edge_step[i]),
                "objects": objects,
                "masks": found[i],
                "diagnostics": {
                    "offset_norm": offset,
                    "noise_std": noise,
                    "edge_step": float(edge_step[i]),
                    "stripe_ratio": float(stripe_ratio[i]),
                    "unknown_pixels": float(np.count_nonzero(labels[i] == UNKNOWN_LABEL)),
                    "other_blobs": float(other_blobs[i]),
                },
            }
        )
    return out


def _band(x: float, threshold: float, margin: float, below: str, above: str) -> str:
    """`below` if x < threshold - margin, `above` if x > threshold + margin, else UNSURE."""
    if x < threshold - margin:
        return below
    if x > threshold + margin:
        return above
    return UNSURE


def _attribute(mode: str, stripe_ratio: float, noise: float, edge_step: float) -> str:
    """Step 5 with an unsure band around each threshold; NONE if no attribute (or undecidable)."""
    if mode != "plain":
        return mode
    # The tests run in order; the first one that is not a clear "no" decides.
    for value, threshold, margin, name, low_is_yes in (
        (stripe_ratio, STRIPE_RATIO_THRESHOLD, STRIPE_RATIO_MARGIN, "striped", True),
        (noise, NOISE_STD_THRESHOLD, NOISE_STD_MARGIN, "noisy", False),
        (edge_step, BLUR_STEP_THRESHOLD, BLUR_STEP_MARGIN, "blurry", True),
    ):
        if np.isnan(value):  # no interior background (noise) or no objects (blur): undecidable
            continue
        yes, no = (name, "no") if low_is_yes else ("no", name)
        state = _band(value, threshold, margin, yes, no)
        if state != "no":
            return state
    return NONE


def _merge(a: str | bool | None, b: str | bool | None):
    """One decision read under two hypotheses: kept if both agree, else unsure."""
    if a == b:
        return a
    return UNSURE if isinstance(a, str) or isinstance(b, str) else None


def _inspect_chunk(images: np.ndarray) -> list[Verdict]:
    """Steps 1-5 of the module docstring for uint8 (B, 32, 32, 3) images."""
    n = len(images)
    r = RESOLUTION
    raw = images.astype(np.float32)  # (B, 32, 32, 3)
    # The 3x3 median removes noise and stray pixels but keeps the 2-row stripes (a window
    # always holds 6 pixels of the centre's row pair), so the fit runs on it.
    med = _median3x3(raw)
    hyp, j, cost, hyp2, j2, cost2 = _fit(med.reshape(n, r * r, 3))
    readings = _read(raw, med, hyp, j)
    # A runner-up hypothesis within FIT_MARGIN of the best is read too: decisions on which the
    # two readings differ are unsure (the choice between them is within the machine's noise).
    close = np.flatnonzero(cost2 - cost < FIT_MARGIN)
    seconds = dict(zip(close, _read(raw[close], med[close], hyp2[close], j2[close]))) if len(close) else {}

    out = []
    for i in range(n):
        rd = readings[i]
        background, attribute, objects = rd["background"], rd["attribute"], dict(rd["objects"])
        if i in seconds:
            alt = seconds[i]
            background = _merge(background, alt["background"])
            attribute = _merge(attribute, alt["attribute"])
            objects = {o: _merge(objects[o], alt["objects"][o]) for o in OBJ_NAMES}
        unsure = {o for o, s in objects.items() if s is None}
        unsure |= {name for name, s in (("background", background), ("attribute", attribute)) if s == UNSURE}
        masks = rd["masks"]
        present = {o: masks[o] for o, s in objects.items() if s}
        shape_blur = attribute == "blurry"
        out.append(
            Verdict(
                background=background if background in BG_NAMES else None,
                objects=present,
                attribute=attribute if attribute in ATTRIBUTES else None,
                shapes={name: classify_shape(m, shape_blur, OBJECTS[name].shape) for name, m in present.items()},
                diagnostics={"fit_cost": float(cost[i]), "fit_margin": float(cost2[i] - cost[i]), **rd["diagnostics"]},
                unsure=frozenset(unsure),
                candidates={o: masks[o] for o in unsure if o in masks},
            )
        )
    return out


def inspect_batch(images: np.ndarray) -> list[Verdict]:
    """Inspect uint8 (N, 32, 32, 3) images; returns N verdicts."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (RESOLUTION, RESOLUTION, 3):
        raise ValueError(f"expected (N, {RESOLUTION}, {RESOLUTION}, 3) images, got {images.shape}")
    out: list[Verdict] = []
    for start in range(0, len(images), _CHUNK):
        out.extend(_inspect_chunk(images[start : start + _CHUNK]))
    return out


def inspect(image: np.ndarray) -> Verdict:
    """Inspect one uint8 (32, 32, 3) image."""
    return inspect_batch(np.asarray(image)[None])[0]
