"""The critical step: when a negative prompt starts to act, decided by rules on curves (PAPER.md section 3).

Curves are indexed by step (UNet-call index, see :mod:`negstudy.schedules`); NaN marks a step
where the curve was not measured and never counts for or against a rule. Per seed curves come as
arrays (seeds, steps).

Rules:
- object negatives (nouns): the strength ratio peaks early -> :func:`peak_step`;
- attribute negatives (adjectives): the ratio starts below 1 and crosses it for good ->
  :func:`crossing_step`;
- from attention maps: the negative token attends to the object's region -> :func:`first_hit_step`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

CATEGORIES = ("object", "attribute")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """(rate, low, high): the 95 % Wilson score interval of k successes in n trials."""
    if n == 0:
        return (float("nan"),) * 3
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return p, max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, ci: float = 0.95):
    """Mean curve over seeds with a percentile-bootstrap confidence band.

    values: (seeds, steps). Seeds are resampled with replacement ``n_boot`` times; low/high are
    the (1 - ci)/2 and (1 + ci)/2 percentiles of the resampled mean curves.
    Returns (mean, low, high), each (steps,).
    """
    v = _seeds_by_steps(values)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.shape[0], size=(n_boot, v.shape[0]))
    with np.errstate(all="ignore"), _quiet_empty_slices():
        boots = np.nanmean(v[idx], axis=1)  # (n_boot, steps)
        q = 100 * (1 - ci) / 2
        low, high = np.nanpercentile(boots, [q, 100 - q], axis=0)
        mean = np.nanmean(v, axis=0)
    return mean, low, high


def peak_step(curve) -> int | None:
    """The step of the curve's maximum (the first one if tied); None for an all-NaN curve."""
    c = np.asarray(curve, dtype=float)
    if np.isnan(c).all():
        return None
    return int(np.nanargmax(c))


def crossing_step(curve, level: float = 1.0, tolerance: float = 0.0) -> int | None:
    """The first step from which the curve stays at or above ``level`` until the end; None if never.

    A step qualifies if the curve there is >= level and at every later step >= level - tolerance:
    a curve that crosses and dips back below does not cross until the last time it goes up for
    good; ``tolerance`` forgives later dips no deeper than that (noise around a plateau at the
    level). A curve above the level from the start crosses at step 0.
    """
    c = np.asarray(curve, dtype=float)
    ok = np.isnan(c) | (c >= level - tolerance)
    stays = np.flip(np.logical_and.accumulate(np.flip(ok)))  # stays[i]: ok at i and at every later step
    hits = np.flatnonzero(stays & (c >= level))
    return int(hits[0]) if hits.size else None


def critical_step(curve, category: str, level: float = 1.0, tolerance: float = 0.0) -> int | None:
    """The critical step of a strength-ratio curve: the peak for "object", the crossing of ``level`` for "attribute"."""
    if category == "object":
        return peak_step(curve)
    if category == "attribute":
        return crossing_step(curve, level, tolerance)
    raise ValueError(f"category={category!r}: expected one of {CATEGORIES}")


@dataclass(frozen=True)
class StepCI:
    """A critical step with a percentile-bootstrap interval over seeds.

    step: the rule applied to the mean curve. low/high: the interval's ends; None means "never"
    (a bootstrap mean curve that never crosses counts as later than every step, so high is None
    when more than (1 - ci)/2 of them never cross). samples: (n_boot,) float, NaN for never.
    """

    step: int | None
    low: int | None
    high: int | None
    samples: np.ndarray

    @property
    def fraction_never(self) -> float:
        return float(np.isnan(self.samples).mean())


def bootstrap_critical_step(values, category: str, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                            level: float = 1.0, tolerance: float = 0.0) -> StepCI:
    """Bootstrap distribution of the critical step: resample seeds, average, apply the rule.

    values: (seeds, steps) strength-ratio curves; level, tolerance: see :func:`crossing_step`.
    ci: the interval's coverage.
    """
    v = _seeds_by_steps(values)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.shape[0], size=(n_boot, v.shape[0]))
    with np.errstate(all="ignore"), _quiet_empty_slices():
        means = np.nanmean(v[idx], axis=1)
        centre = critical_step(np.nanmean(v, axis=0), category, level, tolerance)
    steps = [critical_step(m, category, level, tolerance) for m in means]
    samples = np.array([np.nan if s is None else s for s in steps], dtype=float)
    never_last = np.where(np.isnan(samples), np.inf, samples)
    q = 100 * (1 - ci) / 2
    low = np.percentile(never_last, q, method="lower")
    high = np.percentile(never_last, 100 - q, method="higher")
    return StepCI(centre, _step_or_never(low), _step_or_never(high), samples)


def _step_or_never(x: float) -> int | None:
    return None if np.isinf(x) else int(x)


def first_hit_step(mass_per_step, threshold: float = 0.5) -> int | None:
    """The first step at which a token's map mass inside the object's region is >= ``threshold``.

    mass_per_step: (steps,) from :func:`negstudy.attention.mass_in_mask`, NaN where not recorded.
    The default 0.5 is a majority rule: the token then attends more inside the region than in the
    whole rest of the image. It needs no per-image calibration, but it means something only for
    regions much smaller than half the image (uniform attention already puts ``area`` of the mass
    inside): use a higher threshold for large objects.
    """
    m = np.asarray(mass_per_step, dtype=float)
    hits = np.flatnonzero(m >= threshold)  # NaN compares False
    return int(hits[0]) if hits.size else None


@dataclass(frozen=True)
class Agreement:
    """How two ways of finding the critical step agree over the same items.

    mean_abs_diff and within (the fraction with |a - b| <= tol) are over the n pairs where both
    found a step; missing counts the pairs where one or both gave None.
    """

    mean_abs_diff: float
    within: float
    n: int
    missing: int


def agreement(a_steps, b_steps, tol: int = 2) -> Agreement:
    """Mean absolute difference between two lists of critical steps and the fraction within +-``tol`` steps."""
    if len(a_steps) != len(b_steps):
        raise ValueError(f"{len(a_steps)} and {len(b_steps)} steps: the lists must pair up")
    pairs = [(a, b) for a, b in zip(a_steps, b_steps) if a is not None and b is not None]
    if not pairs:
        return Agreement(float("nan"), float("nan"), 0, len(a_steps))
    d = np.abs(np.array([a - b for a, b in pairs], dtype=float))
    return Agreement(float(d.mean()), float((d <= tol).mean()), len(pairs), len(a_steps) - len(pairs))


def _seeds_by_steps(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"expected values of shape (seeds, steps), got {v.shape}")
    return v


def _quiet_empty_slices():
    """numpy warns on the mean of an all-NaN step; such a step stays NaN, as documented."""
    return warnings.catch_warnings(action="ignore", category=RuntimeWarning)
