"""Step masks of every schedule against hand-written masks, the step-index convention, errors."""

import numpy as np
import pytest
from diffusers import DDIMScheduler, PNDMScheduler

from negstudy.schedules import (
    Always, FirstK, FromStep, Inject, Never, ScheduleError, Window, n_calls, to_index,
)
from negstudy.checks import build
from negstudy.errors import ConfigError

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)


def mask(s):
    return np.array([c == "1" for c in s.replace(" ", "")])


def test_pndm_makes_one_extra_call_and_ddim_none():
    assert n_calls(PNDMScheduler(skip_prk_steps=True, **SD), 30) == 31
    assert n_calls(PNDMScheduler(skip_prk_steps=True, **SD), 10) == 11
    assert n_calls(DDIMScheduler(**SD), 30) == 30


def test_pndm_repeats_one_timestep():
    s = PNDMScheduler(skip_prk_steps=True, **SD)
    s.set_timesteps(10)
    t = s.timesteps.tolist()
    assert len(t) == 11 and len(set(t)) == 10  # step indices are calls, not distinct timesteps


@pytest.mark.parametrize(
    "schedule, n, expected",
    [
        (Never(), 6, "000000"),
        (Always(), 6, "111111"),
        (FromStep(2), 6, "001111"),
        (FromStep(0), 6, "111111"),
        (FromStep(6), 6, "000000"),
        (FirstK(2), 6, "110000"),
        (FirstK(0), 6, "000000"),
        (FirstK(6), 6, "111111"),
        (Window(1, 3), 6, "011100"),
        (Window(4, 4), 6, "000010"),
        # fractions: floor(f * n_calls)
        (FromStep(0.5), 31, "0" * 15 + "1" * 16),
        (FirstK(0.1), 31, "111" + "0" * 28),
        (FromStep(1.0), 31, "0" * 31),
        (FirstK(1.0), 31, "1" * 31),
        (Window(5, 15), 31, "0" * 5 + "1" * 11 + "0" * 15),  # the removal benchmark's window
        (Window(0.0, 1.0), 31, "1" * 31),
    ],
)
def test_masks(schedule, n, expected):
    np.testing.assert_array_equal(schedule.plan(n).negative, mask(expected))


def test_inject_plan_and_branches():
    plan = Inject(steps=(1, 0.5), g=-20.0).plan(6)
    np.testing.assert_array_equal(plan.inject, [0, -20, 0, -20, 0, 0])
    assert not plan.negative.any()
    assert [plan.branch(i) for i in range(6)] == ["empty", "inject", "empty", "inject", "empty", "empty"]
    assert plan.needs(1) == {"negative", "empty"} and plan.needs(0) == {"empty"}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: FromStep(32).plan(31), "schedule.start=32: a step index must be in [0, 31]"),
        (lambda: Window(5, 31).plan(31), "schedule.end=31: a step index must be in [0, 30]"),
        (lambda: Window(9, 3).plan(31), "schedule.start=9 > schedule.end=3"),
        (lambda: FirstK(1.5).plan(31), "schedule.k=1.5: a fraction of the loop must be in [0, 1]"),
        (lambda: FirstK(-1).plan(31), "schedule.k=-1"),
        (lambda: Inject(steps=(), g=1.0).plan(31), "schedule.steps=[]"),
        (lambda: Inject(steps=(3,), g=0.0).plan(31), "schedule.g=0"),
        (lambda: to_index(True, 31, "schedule.k", upper=31), "schedule.k=True"),
    ],
)
def test_errors_name_the_key(make, message):
    with pytest.raises(ScheduleError) as err:
        make()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_built_from_its_target_with_the_yaml_keys():
    schedule = build({"_target_": "negstudy.schedules.Inject", "name": "inject", "steps": [1, 0.5], "g": -20.0}, "schedule")
    assert schedule == Inject(steps=(1, 0.5), g=-20.0) and schedule.describe() == "inject(steps=(1, 0.5),g=-20.0)"
    assert build({"_target_": "negstudy.schedules.Window", "start": 1, "end": 3}, "schedule") == Window(1, 3)


@pytest.mark.parametrize(
    "node, message",
    [
        ({"_target_": "negstudy.schedules.Sometimes"}, "schedule._target_='negstudy.schedules.Sometimes': does not import"),
        ({"_target_": "negstudy.schedules.Window", "begin": 3},
         "schedule.begin: not a parameter of negstudy.schedules.Window (allowed: start, end)"),
        ({"name": "window", "start": 3}, "schedule: no _target_"),
    ],
)
def test_target_errors_name_the_key(node, message):
    with pytest.raises(ConfigError) as err:
        build(node, "schedule")
    assert message in str(err.value)
    assert "\n" not in str(err.value)

