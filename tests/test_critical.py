"""Critical-step rules on synthetic strength-ratio curves, and their bootstrap intervals."""

import numpy as np
import pytest

from negstudy.critical import (
    CROSSING_RULES,
    DEFAULT_CROSSING,
    agreement,
    attribute_step,
    bootstrap_ci,
    bootstrap_critical_step,
    cluster_bootstrap_weights,
    cluster_mean_ci,
    cluster_rate_ci,
    cluster_ratio_ci,
    critical_step,
    crossing_step,
    first_crossing_step,
    first_hit_step,
    peak_step,
    wilson,
)

T = np.arange(31)


def noun_curve(peak=5, height=0.07):
    """A Figure-3 noun curve: rises to 1 + height at ``peak``, decays slowly."""
    return 1.0 + height * np.exp(-((T - peak) ** 2) / (2 * 2.0**2)) * np.where(T > peak, np.exp(-(T - peak) / 20), 1.0)


def test_clean_peak_and_ties():
    assert peak_step(noun_curve(5)) == 5
    assert peak_step([0.9, 1.1, 1.0, 1.1]) == 1  # ties: the first
    assert peak_step([np.nan, 0.5, np.nan, 0.7, 0.1]) == 3  # unmeasured steps are ignored
    assert peak_step([np.nan, np.nan]) is None


def test_crossing_stays_above():
    assert crossing_step([0.8, 0.9, 0.95, 1.0, 1.02, 1.03]) == 3  # exactly at the level counts
    assert crossing_step([1.1, 1.2, 1.3]) == 0  # above from the start
    assert crossing_step([0.8, 0.9, 1.1], level=1.2) is None


def test_flat_curve_never_crosses():
    assert crossing_step(np.full(31, 0.95)) is None
    assert critical_step(np.full(31, 0.95), "attribute") is None


def test_a_curve_that_dips_back_has_not_crossed_until_it_stays():
    curve = [0.9, 1.05, 0.98, 0.97, 1.02, 1.03, 1.04]
    assert crossing_step(curve) == 4
    assert crossing_step(curve, tolerance=0.05) == 1  # dips within tolerance are noise
    assert crossing_step([0.9, 1.05, 1.1, 0.99]) is None  # falls below at the very end
    assert crossing_step([0.9, 1.05, np.nan, 1.1]) == 1  # an unmeasured step breaks nothing


def test_critical_step_dispatches_on_category():
    adjective = np.concatenate([np.linspace(0.9, 0.99, 10), np.linspace(1.01, 1.05, 21)])
    assert critical_step(noun_curve(6), "object") == 6
    assert critical_step(adjective, "attribute") == 10
    with pytest.raises(ValueError, match="category='verb'"):
        critical_step(adjective, "verb")


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_seeds():
    rng = np.random.default_rng(1)
    few = 1.0 + 0.05 * rng.standard_normal((5, 31))
    many = 1.0 + 0.05 * rng.standard_normal((200, 31))
    for values in (few, many):
        mean, low, high = bootstrap_ci(values, n_boot=500)
        assert mean.shape == low.shape == high.shape == (31,)
        np.testing.assert_allclose(mean, values.mean(0))
        assert (low <= mean).all() and (mean <= high).all()
    # the band's width follows the standard error: about 2 * 1.96 * 0.05 / sqrt(200)
    width = np.median(bootstrap_ci(many, n_boot=500)[2] - bootstrap_ci(many, n_boot=500)[1])
    assert 0.010 < width < 0.018
    assert np.median(bootstrap_ci(few, n_boot=500)[2] - bootstrap_ci(few, n_boot=500)[1]) > 2 * width
    same = np.tile(noun_curve(), (4, 1))  # identical seeds: no uncertainty
    mean, low, high = bootstrap_ci(same)
    np.testing.assert_allclose(low, high)


def test_bootstrap_critical_step_covers_the_true_peak_of_noisy_curves():
    rng = np.random.default_rng(0)
    values = noun_curve(peak=5) + 0.01 * rng.standard_normal((10, 31))  # 10 seeds, as in the paper
    ci = bootstrap_critical_step(values, "object", n_boot=500)
    assert ci.low <= 5 <= ci.high
    assert ci.high - ci.low <= 3
    assert ci.samples.shape == (500,) and ci.fraction_never == 0.0


def test_bootstrap_critical_step_of_a_crossing_and_of_a_curve_that_may_never_cross():
    rng = np.random.default_rng(2)
    rising = np.where(T < 10, 0.95, 1.04) + 0.005 * rng.standard_normal((10, 31))
    ci = bootstrap_critical_step(rising, "attribute", n_boot=300)
    assert ci.step == 10 and ci.low <= 10 <= ci.high
    # half the seeds plateau above 1, half below: many resampled means never cross -> open interval
    mixed = np.vstack([np.where(T < 10, 0.95, 1.02)] * 5 + [np.full(31, 0.97)] * 5)
    ci = bootstrap_critical_step(mixed, "attribute", n_boot=300)
    assert ci.high is None and 0.1 < ci.fraction_never < 0.9


def test_first_hit_step():
    mass = [0.1, 0.3, np.nan, 0.6, 0.4, 0.8]
    assert first_hit_step(mass) == 3
    assert first_hit_step(mass, threshold=0.7) == 5
    assert first_hit_step(mass, threshold=0.9) is None


def test_agreement():
    a = agreement([5, 7, None, 10], [6, 10, 3, 10])
    assert a.mean_abs_diff == pytest.approx(4 / 3)
    assert a.within == pytest.approx(2 / 3)
    assert (a.n, a.missing) == (3, 1)
    assert agreement([None], [1]).n == 0
    with pytest.raises(ValueError):
        agreement([1, 2], [1])


# ----------------------------------------------------------------------------- pairs x seeds


def planted_pairs(between: float, n_pairs: int = 8, n_seeds: int = 5, within: float = 0.01, seed: int = 0):
    """(pairs x seeds, 31) noun curves: pair i is shifted by offset_i ~ N(0, between), each seed by N(0, within)."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, between, n_pairs)
    rows = [noun_curve() + offsets[i] + rng.normal(0, within, 31) for i in range(n_pairs) for _ in range(n_seeds)]
    return np.array(rows), np.repeat(np.arange(n_pairs), n_seeds), offsets


def test_cluster_weights_draw_pairs_then_seeds():
    clusters = np.array(["a"] * 3 + ["b"] * 5 + ["c"])
    w = cluster_bootstrap_weights(clusters, n_boot=2000, seed=0)
    assert w.shape == (2000, 9) and (w >= 0).all()
    per_pair = np.stack([w[:, clusters == c].sum(1) for c in "abc"], 1)
    sizes = np.array([3, 5, 1])
    # every resample holds whole numbers of draws of each pair, each draw with all of its seeds' worth of rows
    assert ((per_pair % sizes) == 0).all() and (per_pair.sum(1) // 1 >= 3).all()
    assert (per_pair // sizes).sum(1).tolist() == [3] * 2000  # three pairs drawn per resample
    assert np.allclose((per_pair // sizes).mean(0), 1.0, atol=0.08)  # each pair drawn once on average


def test_hierarchical_band_grows_with_between_pair_variance_and_covers_the_mean():
    widths = []
    for between in (0.0, 0.01, 0.04):
        values, pairs, offsets = planted_pairs(between)
        mean, low, high = bootstrap_ci(values, n_boot=800, clusters=pairs)
        truth = noun_curve() + offsets.mean()  # the planted mean curve of these pairs
        assert (low <= truth + 1e-9).mean() > 0.9 and (truth <= high + 1e-9).mean() > 0.9
        np.testing.assert_allclose(mean, values.mean(0))
        widths.append(float(np.median(high - low)))
    assert widths[0] < widths[1] < widths[2]
    # pair offsets of 0.04 give a standard error of about 0.04 / sqrt(8) = 0.014 per step: band ~ 4 x that
    assert 0.03 < widths[2] < 0.09
    # the naive bootstrap over the 40 pair-seeds treats them as independent and is far too narrow
    values, pairs, _ = planted_pairs(0.04)
    naive = np.median(np.subtract(*bootstrap_ci(values, n_boot=800)[:0:-1]))
    assert naive < widths[2] / 1.8


def test_one_pair_is_the_ordinary_bootstrap_over_its_seeds():
    rng = np.random.default_rng(3)
    values = 1.0 + 0.05 * rng.standard_normal((40, 31))
    ordinary = bootstrap_ci(values, n_boot=1000)
    clustered = bootstrap_ci(values, n_boot=1000, clusters=np.zeros(40))
    np.testing.assert_allclose(np.median(clustered[2] - clustered[1]), np.median(ordinary[2] - ordinary[1]), rtol=0.15)


def test_critical_step_interval_resamples_pairs():
    """Half the pairs peak at 5, half at 12: seeds agree within each pair, so only resampling pairs
    shows that the pooled peak is uncertain."""
    curves = [noun_curve(5 if i < 4 else 12, 0.07 if i < 4 else 0.075) + 0.002 * np.random.default_rng(i * 10 + j).standard_normal(31)
              for i in range(8) for j in range(5)]
    pairs = np.repeat(np.arange(8), 5)
    clustered = bootstrap_critical_step(np.array(curves), "object", n_boot=500, clusters=pairs)
    assert clustered.step in (5, 12) and clustered.low <= 5 and clustered.high >= 12
    one_group = bootstrap_critical_step(np.array(curves[:20]), "object", n_boot=500, clusters=pairs[:20])
    assert one_group.step == one_group.low == one_group.high == 5


def test_cluster_rates_and_ratios():
    # four pairs: two always succeed, two never; Wilson over 20 trials is too narrow for 4 pairs
    ok = np.repeat([1, 0, 1, 0], 5).astype(bool)
    pairs = np.repeat(np.arange(4), 5)
    rate, low, high = cluster_rate_ci(ok, pairs)
    assert rate == 0.5 and low <= 0.125 and high >= 0.875
    _, wlo, whi = wilson(10, 20)
    assert low < wlo and high > whi
    # none of 30 independent trials: the bootstrap interval is [0, 0], Wilson's upper end is kept
    rate, low, high = cluster_rate_ci(np.zeros(30, bool), np.arange(30))
    assert rate == 0 and low == 0 and high == pytest.approx(wilson(0, 30)[2], rel=1e-3)
    num, den = np.repeat([1.0, 0.0], 10), np.ones(20)
    ratio, low, high = cluster_ratio_ci(num, den, np.repeat([0, 1], 10))
    assert ratio == 0.5 and low == 0.0 and high == 1.0  # two captions: either may be drawn twice
    m, low, high = cluster_mean_ci([1.0, np.nan, 3.0], [0, 0, 1])
    assert m == 2.0 and low <= 2.0 <= high


# ----------------------------------------------------------------------------- crossing rules


def test_three_crossing_rules_on_planted_curves():
    early_blip = np.array([0.9, 1.01, 0.95, 0.96, 0.97, 1.02, 1.03, 1.04, 1.03])  # noise above 1 before the real crossing
    late_dip = np.array([0.9, 0.95, 1.02, 1.03, 0.995, 1.02, 1.03, 1.02, 1.03])  # a shallow dip on the plateau
    deep_dip = np.array([0.9, 0.95, 1.02, 1.03, 0.95, 1.02, 1.03, 1.02, 1.03])
    assert [attribute_step(early_blip, r) for r in CROSSING_RULES] == [1, 5, 5]
    assert [attribute_step(late_dip, r) for r in CROSSING_RULES] == [2, 2, 5]
    assert [attribute_step(deep_dip, r) for r in CROSSING_RULES] == [2, 5, 5]
    assert attribute_step(late_dip, "stays_tolerant", tolerance=0.001) == 5
    assert [attribute_step(np.full(9, 0.97), r) for r in CROSSING_RULES] == [None, None, None]
    assert first_crossing_step([0.9, np.nan, 1.0]) == 2
    assert DEFAULT_CROSSING == "stays_tolerant" and critical_step(late_dip, "attribute") == 2
    assert critical_step(late_dip, "attribute", rule="stays_strict") == 5
    with pytest.raises(ValueError, match="rule='last'"):
        attribute_step(late_dip, "last")


def test_crossing_rules_under_the_bootstrap():
    """A plateau at 1.003 with seed noise: the strict rule's resampled curves often dip below 1
    late and so cross late or never; the tolerant rule finds the crossing at 10."""
    rng = np.random.default_rng(5)
    values = np.where(T < 10, 0.95, 1.003) + 0.004 * rng.standard_normal((12, 31))
    pairs = np.repeat(np.arange(4), 3)
    tolerant = bootstrap_critical_step(values, "attribute", n_boot=300, clusters=pairs)
    strict = bootstrap_critical_step(values, "attribute", n_boot=300, clusters=pairs, rule="stays_strict")
    assert tolerant.step == 10 and tolerant.low == 10 and tolerant.high == 10
    assert strict.high is None or strict.high > 15
