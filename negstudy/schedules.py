"""Negative-prompt schedules: for every step of the loop, which branch stands opposite the prompt.

The step index
--------------
negstudy counts steps as **UNet-call indices** of the denoising loop: step ``i`` is the
``i``-th entry of ``scheduler.timesteps`` after ``set_timesteps(steps)``, ``0 <= i < n_calls``.
For most schedulers ``n_calls == steps``. PNDM with ``skip_prk_steps`` (Stable Diffusion's
default, used by the paper) repeats one timestep, so 30 steps make **31 calls**, indices 0..30,
exactly as the paper counts. :func:`n_calls` gives the number for a scheduler.

A schedule value may be a step index (``int``) or a fraction of the loop (``float`` in
[0, 1]); fraction ``f`` means step ``floor(f * n_calls)``, so ``0.0`` is the first step and
``1.0`` is one past the last (``from_step: 1.0`` never applies the negative,
``first_k: 1.0`` always does). ``True``/``False`` are not numbers here.

Guidance (PAPER.md section 2), with ``s`` the guidance scale::

    eps = eps_u + s * (eps_pos - eps_u),   eps_u = eps_neg where the schedule says so, else eps_empty
    inject step:  eps = eps_empty + s * (eps_pos - eps_empty) - g * (eps_neg - eps_empty)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np

from negstudy.errors import ConfigError

Step = Union[int, float]


class ScheduleError(ConfigError):
    """A schedule value outside the loop; the message names the key, the value and the allowed range."""


def n_calls(scheduler, steps: int) -> int:
    """Number of UNet calls (= step indices) the loop makes for ``steps`` inference steps."""
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def to_index(value: Step, n: int, key: str, *, upper: int) -> int:
    """Resolve a step index or a fraction of the loop to an index in ``[0, upper]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleError(f"{key}={value!r}: expected a step index (int) or a fraction of the loop (float in [0, 1])")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ScheduleError(f"{key}={value!r}: a fraction of the loop must be in [0, 1]")
        return min(math.floor(value * n), upper)
    if not 0 <= value <= upper:
        raise ScheduleError(f"{key}={value!r}: a step index must be in [0, {upper}] ({n} UNet calls)")
    return value


@dataclass(frozen=True)
class StepPlan:
    """What one image's loop does at each step.

    negative: bool (n_calls,), True where eps_neg replaces eps_empty in guidance.
    inject:   float (n_calls,), gain g of the one-step injection ``- g (eps_neg - eps_empty)``; 0 elsewhere.
    """

    negative: np.ndarray
    inject: np.ndarray

    def needs(self, step: int) -> set[str]:
        """The unconditional-side branches the guidance formula reads at ``step``."""
        if self.inject[step] != 0.0:
            return {"negative", "empty"}
        return {"negative"} if self.negative[step] else {"empty"}

    def branch(self, step: int) -> str:
        """Name of the guidance opposite the prompt at ``step``: negative, empty or inject."""
        if self.inject[step] != 0.0:
            return "inject"
        return "negative" if self.negative[step] else "empty"


@dataclass(frozen=True)
class Schedule:
    """Base of all schedules. A schedule is chosen by ``_target_`` in conf/schedule/*.yaml and built
    by :func:`negstudy.targets.build`; ``name`` labels it in tables (:meth:`describe`)."""

    name: ClassVar[str]

    def steps_with_negative(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def plan(self, n: int) -> StepPlan:
        negative = np.asarray(self.steps_with_negative(n), dtype=bool)
        return StepPlan(negative=negative, inject=np.zeros(n))

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.__dict__.items())
        return f"{self.name}({args})" if args else self.name


@dataclass(frozen=True)
class Never(Schedule):
    """Plain classifier-free guidance with the empty prompt."""

    name: ClassVar[str] = "never"

    def steps_with_negative(self, n):
        return np.zeros(n, bool)


@dataclass(frozen=True)
class Always(Schedule):
    """Ordinary negative prompting: the negative at every step."""

    name: ClassVar[str] = "always"

    def steps_with_negative(self, n):
        return np.ones(n, bool)


@dataclass(frozen=True)
class FromStep(Schedule):
    """The negative from step ``start`` on (delayed negative)."""

    name: ClassVar[str] = "from_step"
    start: Step = 0

    def steps_with_negative(self, n):
        k = to_index(self.start, n, "schedule.start", upper=n)
        return np.arange(n) >= k


@dataclass(frozen=True)
class FirstK(Schedule):
    """The negative in the first ``k`` steps only (steps 0..k-1): reverse activation."""

    name: ClassVar[str] = "first_k"
    k: Step = 0

    def steps_with_negative(self, n):
        k = to_index(self.k, n, "schedule.k", upper=n)
        return np.arange(n) < k


@dataclass(frozen=True)
class Window(Schedule):
    """The negative in steps ``start..end``, both inclusive."""

    name: ClassVar[str] = "window"
    start: Step = 0
    end: Step = 0

    def steps_with_negative(self, n):
        a = to_index(self.start, n, "schedule.start", upper=n - 1)
        b = to_index(self.end, n, "schedule.end", upper=n - 1)
        if a > b:
            raise ScheduleError(f"schedule.start={self.start!r} > schedule.end={self.end!r}: a window needs start <= end")
        i = np.arange(n)
        return (i >= a) & (i <= b)


@dataclass(frozen=True)
class Inject(Schedule):
    """Ordinary CFG with the empty prompt plus ``-g (eps_neg - eps_empty)`` at the given steps."""

    name: ClassVar[str] = "inject"
    steps: tuple[Step, ...] = ()
    g: float = 10.0

    def __post_init__(self):
        steps = self.steps if isinstance(self.steps, (list, tuple)) else (self.steps,)  # one step may be given bare
        object.__setattr__(self, "steps", tuple(steps))  # a YAML list, hashable and printed as the tuple it is

    def steps_with_negative(self, n):
        return np.zeros(n, bool)

    def plan(self, n):
        if not self.steps:
            raise ScheduleError("schedule.steps=[]: inject needs at least one step")
        if isinstance(self.g, bool) or not isinstance(self.g, (int, float)):
            raise ScheduleError(f"schedule.g={self.g!r}: the injection gain must be a number")
        if self.g == 0:
            raise ScheduleError("schedule.g=0: the injection gain must be non-zero (positive removes, negative adds)")
        inject = np.zeros(n)
        for s in self.steps:
            inject[to_index(s, n, "schedule.steps", upper=n - 1)] = float(self.g)
        return StepPlan(negative=np.zeros(n, bool), inject=inject)
