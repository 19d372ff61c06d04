"""The critical step: when a negative prompt starts to act, decided by rules on curves (PAPER.md section 3).

Curves are indexed by step (UNet-call index, see :mod:`negstudy.schedules`); NaN marks a step
where the curve was not measured and never counts for or against a rule. Per seed curves come as
arrays (seeds, steps).

Rules:
- object negatives (nouns): the strength ratio peaks early -> :func:`peak_step`;
- attribute negatives (adjectives): the ratio starts below 1 and crosses it -> :func:`attribute_step`,
  under one of three crossing rules (:data:`CROSSING_RULES`):

  * ``first``: the first step at which the curve is >= 1 (:func:`first_crossing_step`);
  * ``stays_tolerant`` (the default): the first step at which the curve is >= 1 and from which it
    never falls below 1 - :data:`CROSSING_TOLERANCE` (:func:`crossing_step` with a tolerance);
  * ``stays_strict``: the same with no tolerance: it never falls below 1 again.

  Why the tolerant rule is the default: the paper's adjective curves cross 1 and then PLATEAU just
  above it. On a plateau that close to the level, noise decides the strict rule (one late dip of a
  thousandth below 1 moves the crossing to after the dip, or to "never"), while the first-crossing
  rule is decided by noise before the crossing (an early blip above 1 counts). The tolerant rule
  asks for a crossing that holds up to a dip of 0.01 in ratio units, a fifth of the effect sizes
  the paper reports (noun peak 1.07); all three are reported side by side;
- from attention maps: the negative token attends to the object's region -> :func:`first_hit_step`.

Intervals: curves from several prompt pairs with several seeds each are NOT independent draws:
seeds of one pair share its prompt. :func:`cluster_bootstrap_weights` resamples pairs, then seeds
within each drawn pair (a two-stage, hierarchical bootstrap); every interval here takes optional
``clusters`` (one pair label per row) and then uses it. Point estimates pool all rows (pair-seeds)
with equal weight, as the paper's figures average its 10 pairs x 10 seeds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

CATEGORIES = ("object", "attribute")
CROSSING_RULES = ("first", "stays_tolerant", "stays_strict")
DEFAULT_CROSSING = "stays_tolerant"
CROSSING_TOLERANCE = 0.01  # ratio units: later dips this shallow do not undo a crossing (default rule)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """(rate, low, high): the 95 % Wilson score interval of k successes in n trials."""
    if n == 0:
        return (float("nan"),) * 3
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return p, max(0.0, centre - half), min(1.0, centre + half)


def cluster_bootstrap_weights(clusters, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """How often each row enters each resample of a two-stage (hierarchical) bootstrap: (n_boot, rows) int.

    clusters: (rows,) labels, one per row (e.g. the prompt pair of a pair-seed curve). Each
    resample draws as many clusters as there are, with replacement, then, for every drawn cluster,
    as many of its rows as it has, with replacement. A statistic of a resample is a weighted one:
    e.g. the pooled mean is ``w @ x / w.sum()``. One cluster: the ordinary bootstrap over its rows.
    """
    labels = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)[1].ravel()
    rng = np.random.default_rng(seed)
    n_clusters = int(labels.max()) + 1 if labels.size else 0
    if n_clusters == 0:
        raise ValueError("no rows to resample")
    drawn = rng.multinomial(n_clusters, np.full(n_clusters, 1 / n_clusters), size=n_boot)  # (n_boot, clusters)
    weights = np.zeros((n_boot, labels.size), dtype=np.int64)
    for c in range(n_clusters):
        rows = np.flatnonzero(labels == c)
        # the rows of k independent draws of cluster c: one multinomial of k * len(rows) picks
        weights[:, rows] = rng.multinomial(drawn[:, c] * len(rows), np.full(len(rows), 1 / len(rows)))
    return weights


def weighted_means(values, weights: np.ndarray) -> np.ndarray:
    """Per resample, the mean of ``values`` (rows, steps) under ``weights`` (n_boot, rows), NaN
    entries left out: (n_boot, steps); NaN where a resample has no measured value at a step."""
    v = _seeds_by_steps(values)
    seen = np.isfinite(v)
    with np.errstate(all="ignore"):
        return (weights @ np.where(seen, v, 0.0)) / (weights @ seen.astype(float))


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, ci: float = 0.95, clusters=None):
    """Mean curve over seeds with a percentile-bootstrap confidence band.

    values: (seeds, steps). Seeds are resampled with replacement ``n_boot`` times; low/high are
    the (1 - ci)/2 and (1 + ci)/2 percentiles of the resampled mean curves.
    clusters: None, or (seeds,) pair labels: then pairs are resampled, then seeds within pairs
    (:func:`cluster_bootstrap_weights`); the band then includes the spread between pairs.
    Returns (mean, low, high), each (steps,).
    """
    v = _seeds_by_steps(values)
    if clusters is not None:
        boots = weighted_means(v, cluster_bootstrap_weights(clusters, n_boot, seed))
        return _percentile_band(v, boots, ci)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.shape[0], size=(n_boot, v.shape[0]))
    with np.errstate(all="ignore"), _quiet_empty_slices():
        boots = np.nanmean(v[idx], axis=1)  # (n_boot, steps)
        q = 100 * (1 - ci) / 2
        low, high = np.nanpercentile(boots, [q, 100 - q], axis=0)
        mean = np.nanmean(v, axis=0)
    return mean, low, high


def _percentile_band(v: np.ndarray, boots: np.ndarray, ci: float):
    with np.errstate(all="ignore"), _quiet_empty_slices():
        q = 100 * (1 - ci) / 2
        low, high = np.nanpercentile(boots, [q, 100 - q], axis=0)
        mean = np.nanmean(v, axis=0)
    return mean, low, high


def cluster_mean_ci(values, clusters, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a scalar per row, NaN rows left out, with the pairs-then-seeds
    percentile bootstrap of :func:`cluster_bootstrap_weights`."""
    v = np.asarray(values, dtype=float)
    keep = np.isfinite(v)
    if not keep.any():
        return (float("nan"),) * 3
    mean, low, high = bootstrap_ci(v[keep, None], n_boot, seed, ci, clusters=np.asarray(clusters, dtype=object)[keep])
    return float(mean[0]), float(low[0]), float(high[0])


def cluster_rate_ci(successes, clusters, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> tuple[float, float, float]:
    """(rate, low, high) of boolean ``successes`` (rows,) whose rows cluster by pair.

    The interval is the pairs-then-seeds bootstrap interval WIDENED to contain the Wilson interval
    of the same counts: the bootstrap carries the correlation of seeds within a pair (Wilson
    assumes independent trials and is too narrow when pairs differ), Wilson covers what a
    percentile bootstrap cannot (0 or n successes give a zero-width bootstrap interval).
    """
    s = np.asarray(successes, dtype=bool)
    if s.size == 0:
        return (float("nan"),) * 3
    rate, wlo, whi = wilson(int(s.sum()), s.size, z=_z(ci))
    _, blo, bhi = cluster_mean_ci(s.astype(float), clusters, n_boot, seed, ci)
    return rate, min(wlo, blo), max(whi, bhi)


def cluster_ratio_ci(num, den, clusters, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> tuple[float, float, float]:
    """(sum(num) / sum(den), low, high): a ratio of two per-row quantities (paired rows), with the
    pairs-then-rows percentile bootstrap."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if num.size == 0 or den.sum() == 0:
        return (float("nan"),) * 3
    w = cluster_bootstrap_weights(clusters, n_boot, seed)
    sums = w @ den
    with np.errstate(all="ignore"):
        boots = np.where(sums != 0, (w @ num) / sums, np.nan)  # a resample without a from-0 success has no ratio
    q = 100 * (1 - ci) / 2
    low, high = np.nanpercentile(boots, [q, 100 - q])
    return float(num.sum() / den.sum()), float(low), float(high)


def _z(ci: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + ci / 2)


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


def first_crossing_step(curve, level: float = 1.0) -> int | None:
    """The first step at which the curve is >= ``level`` (whatever it does later); None if never."""
    hits = np.flatnonzero(np.asarray(curve, dtype=float) >= level)  # NaN compares False
    return int(hits[0]) if hits.size else None


def attribute_step(curve, rule: str = DEFAULT_CROSSING, level: float = 1.0, tolerance: float = CROSSING_TOLERANCE) -> int | None:
    """The crossing of ``level`` under one of :data:`CROSSING_RULES` (see the module docstring);
    ``tolerance`` is used by ``stays_tolerant`` only."""
    if rule == "first":
        return first_crossing_step(curve, level)
    if rule == "stays_tolerant":
        return crossing_step(curve, level, tolerance)
    if rule == "stays_strict":
        return crossing_step(curve, level, 0.0)
    raise ValueError(f"rule={rule!r}: expected one of {CROSSING_RULES}")


def critical_step(curve, category: str, level: float = 1.0, tolerance: float = CROSSING_TOLERANCE,
                  rule: str = DEFAULT_CROSSING) -> int | None:
    """The critical step of a strength-ratio curve: the peak for "object", the crossing of ``level``
    under ``rule`` (:func:`attribute_step`) for "attribute"."""
    if category == "object":
        return peak_step(curve)
    if category == "attribute":
        return attribute_step(curve, rule, level, tolerance)
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
                            level: float = 1.0, tolerance: float = CROSSING_TOLERANCE, rule: str = DEFAULT_CROSSING,
                            clusters=None) -> StepCI:
    """Bootstrap distribution of the critical step: resample seeds, average, apply the rule.

    values: (seeds, steps) strength-ratio curves; level, tolerance, rule: see :func:`critical_step`.
    ci: the interval's coverage. clusters: None, or (seeds,) pair labels: pairs are resampled,
    then seeds within pairs (:func:`cluster_bootstrap_weights`).
    """
    v = _seeds_by_steps(values)
    with np.errstate(all="ignore"), _quiet_empty_slices():
        if clusters is not None:
            means = weighted_means(v, cluster_bootstrap_weights(clusters, n_boot, seed))
        else:
            idx = np.random.default_rng(seed).integers(0, v.shape[0], size=(n_boot, v.shape[0]))
            means = np.nanmean(v[idx], axis=1)
        centre = critical_step(np.nanmean(v, axis=0), category, level, tolerance, rule)
    steps = [critical_step(m, category, level, tolerance, rule) for m in means]
    samples = np.array([np.nan if s is None else s for s in steps], dtype=float)
    never_last = np.where(np.isnan(samples), np.inf, samples)
    q = 100 * (1 - ci) / 2
    low = np.percentile(never_last, q, method="lower")
    high = np.percentile(never_last, 100 - q, method="higher")
    return StepCI(centre, _step_or_never(low), _step_or_never(high), samples)


def _step_or_never(x: float) -> int | None:
    return None if np.isinf(x) else int(x)


HIT_LIFT = 2.0  # attention "reaches the region" once its mass there is twice what a uniform map would put there


def attention_hit_step(mass_in_region, region_fraction, hit_lift: float = HIT_LIFT) -> int | None:
    """The attention hit rule, the one place it is written: the first step at which a word's map
    puts ``hit_lift`` times a uniform map's mass on the region, i.e. its lift
    ``mass_in_region / region_fraction >= hit_lift``. Lift rather than raw mass because objects
    cover ~10 % of a shapes image: a raw-mass threshold of 0.5 would demand a five-fold
    concentration for small objects and a trivial one for large.

    mass_in_region: (steps,) from :func:`negstudy.attention.mass_in_mask`, NaN where not recorded;
    region_fraction: the region's share of the image, a scalar or (steps,).
    """
    lift = np.asarray(mass_in_region, dtype=float) / np.asarray(region_fraction, dtype=float)
    return first_hit_step(lift, hit_lift)


def maps_hit_step(maps, region, hit_lift: float = HIT_LIFT) -> int | None:
    """:func:`attention_hit_step` of a word's maps (steps, h, w) on a boolean region (h, w); a step
    whose map is not finite was not recorded. None without a region."""
    from negstudy.attention import mass_in_mask

    if region is None or not region.any():
        return None
    mass = [mass_in_mask(m, region) if np.isfinite(m).all() else np.nan for m in maps]
    return attention_hit_step(mass, float(region.mean()), hit_lift)


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
