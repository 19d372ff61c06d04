"""The guider interface: HOW the negative prompt acts at a step (a schedule says WHEN).

At every step :class:`negstudy.sampler.NegativeSampler` asks the guider which branch predictions
each lane needs (:meth:`Guider.needs`), makes one batched UNet call holding them, and hands them to
:meth:`Guider.guide`, which returns the prediction the scheduler receives together with what it
was built from (:class:`Guidance`), so recorders log what was actually applied. The design follows
diffusers' guiders (``diffusers.guiders.BaseGuidance``: declared input predictions, ``forward``);
:mod:`negstudy.guidance.diffusers_guiders` wraps those directly.

Shapes: L lanes (images sharing a trajectory, see the sampler), predictions ``(L, C, h, w)``.

A schedule's *inject* steps (``- g (eps_neg - eps_empty)`` on top of plain guidance, PAPER.md
section 2) belong to the schedule: :meth:`Guider.__call__` applies them after any guider's
``guide``, which therefore only sees lanes' ``negative`` flags.

Stateful guiders (e.g. :class:`negstudy.guidance.dng.DNG`'s posterior) keep one row per lane in
``self.lane_state``; the sampler re-indexes it when lanes split (:meth:`select`), snapshots it with
a trajectory and restores it on resume, so the shared-prefix engine gives the same images as
independent runs for every guider.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BRANCHES = ("negative", "empty", "positive")


@dataclass
class GuideInput:
    """What a guider sees at one step.

    step: UNet-call index; n_calls: the loop's calls; timestep / next_timestep: the scheduler's
    timestep of this step and of the next (None at the last step). scale: the guidance scale s.
    latents: x_t (L, C, h, w). eps: branch -> (L, C, h, w) predictions, NaN in lanes where that
    branch was not computed. negative: bool (L,), whether the schedule applies the negative.
    """

    step: int
    n_calls: int
    timestep: int
    next_timestep: int | None
    scale: float
    latents: torch.Tensor
    eps: dict[str, torch.Tensor]
    negative: torch.Tensor


@dataclass
class Guidance:
    """A guider's result: ``pred = uncond + scale * direction`` (the scheduler receives ``pred``).

    uncond: the prediction guidance starts from (eps_neg or eps_empty per lane for CFG).
    direction: the effective guidance direction, ``(pred - uncond) / scale``; its norm is the
    ``guidance_norm`` column of the step table.
    """

    pred: torch.Tensor
    uncond: torch.Tensor
    direction: torch.Tensor


def where_negative(negative: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per lane: ``a`` where the negative acts, ``b`` elsewhere (NaNs of the unused side are dropped)."""
    return torch.where(negative.view(-1, *([1] * (a.ndim - 1))), a, b)


def flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-lane inner product over all non-lane axes, shaped to broadcast: (L, 1, 1, 1)."""
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.ndim - 1)))


class Guider:
    """Base of every guider. Subclasses set ``name`` and override :meth:`needs` and :meth:`guide`;
    stateful ones also :meth:`start` / :meth:`after_step`, attention-space ones :meth:`before_unet`."""

    name: str = "guider"

    def __init__(self):
        self.lane_state: dict[str, torch.Tensor] = {}

    # -- which predictions

    def needs(self, negative: bool) -> set[str]:
        """Branches beside ``positive`` one lane needs at a step where the negative acts or not."""
        return {"negative"} if negative else {"empty"}

    # -- the combination

    def guide(self, x: GuideInput) -> Guidance:
        raise NotImplementedError

    def __call__(self, x: GuideInput, inject: torch.Tensor | None = None) -> Guidance:
        """``guide``, then the schedule's injection ``- g (eps_neg - eps_empty)`` where ``inject`` (L,) is non-zero."""
        out = self.guide(x)
        if inject is not None and bool((inject != 0).any()):
            g = inject.to(out.pred.dtype).view(-1, *([1] * (out.pred.ndim - 1)))
            push = torch.where(g != 0, x.eps["negative"] - x.eps["empty"], torch.zeros_like(out.pred))
            pred = out.pred - g * push
            out = Guidance(pred, out.uncond, (pred - out.uncond) / x.scale)
        return out

    # -- the loop's events (no-ops unless a guider needs them)

    def bind(self, sampler) -> None:
        """Called once by the sampler that uses this guider (e.g. to install attention hooks)."""

    def remove(self) -> None:
        """Undo :meth:`bind` (e.g. take the attention hooks off the UNet)."""

    def start(self, n_lanes: int, device: torch.device) -> None:
        """A generate call starts from x_T with ``n_lanes`` lanes: reset per-lane state."""
        self.lane_state = {}

    def before_unet(self, step: int, rows: list[tuple[int, str]], negative: torch.Tensor, embeds: dict) -> None:
        """Before the UNet call: ``rows[j] = (lane, branch)``, ``negative`` (L,), ``embeds`` branch -> (L, T, D)."""

    def after_unet(self) -> None:
        """After the UNet call (release what ``before_unet`` set)."""

    def after_step(self, x: GuideInput, out: Guidance, next_latents: torch.Tensor, scheduler) -> None:
        """After the scheduler's update: x_{t-1} is ``next_latents`` (stateful guiders update here)."""

    # -- per-lane state follows the lanes

    def select(self, index: torch.Tensor) -> None:
        """Lanes were split: new lane k continues old lane ``index[k]``."""
        self.lane_state = {k: v[index] for k, v in self.lane_state.items()}

    def state_of(self, lane: int) -> dict[str, torch.Tensor]:
        return {k: v[lane : lane + 1].clone() for k, v in self.lane_state.items()}

    def restore(self, states: list[dict[str, torch.Tensor]]) -> None:
        self.lane_state = {k: torch.cat([s[k] for s in states]) for k in (states[0] if states else {})}

    def describe(self) -> str:
        """Name and parameters, for tables and the snapshot check."""
        params = ",".join(f"{k}={v}" for k, v in sorted(self.params().items()))
        return f"{self.name}({params})" if params else self.name

    def params(self) -> dict:
        return {}
