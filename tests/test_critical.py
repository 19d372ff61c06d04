"""Critical-step rules on synthetic strength-ratio curves, and their bootstrap intervals."""

import numpy as np
import pytest

from negstudy.critical import (
    agreement,
    bootstrap_ci,
    bootstrap_critical_step,
    critical_step,
    crossing_step,
    first_hit_step,
    peak_step,
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
