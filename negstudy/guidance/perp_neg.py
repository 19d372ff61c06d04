"""Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm", arXiv 2304.04968).

Only the negative's component perpendicular to the positive guidance direction is subtracted, so a
negative that overlaps the prompt does not cancel the prompt itself::

    d_pos = eps_pos - eps_empty,   d_neg = eps_neg - eps_empty
    d_perp = d_neg - <d_neg, d_pos> / ||d_pos||^2 * d_pos           (per image, over all latent axes)
    eps = eps_empty + s * d_pos - w * d_perp                        (steps where the schedule applies the negative)
    eps = eps_empty + s * d_pos                                     (other steps: plain CFG)

``weight`` w: null (default) is ``s - 1``, the weight the negative has in ordinary negative
prompting (``eps_neg + s (eps_pos - eps_neg) = eps_empty + s d_pos - (s - 1) d_neg``), so Perp-Neg
and the paper's negative prompt differ only by the projection.
"""

from __future__ import annotations

import torch

from negstudy.errors import ConfigError
from negstudy.guidance.base import GuideInput, Guidance, Guider, flat_dot


class PerpNeg(Guider):
    name = "perp_neg"

    def __init__(self, weight: float | None = None):
        super().__init__()
        if weight is not None and not weight >= 0:
            raise ConfigError(f"guidance.weight={weight}: must be >= 0 or null (null: guidance_scale - 1)")
        self.weight = weight

    def needs(self, negative: bool) -> set[str]:
        return {"negative", "empty"} if negative else {"empty"}

    def guide(self, x: GuideInput) -> Guidance:
        empty = x.eps["empty"]
        d_pos = x.eps["positive"] - empty
        pred = empty + x.scale * d_pos
        if bool(x.negative.any()):
            d_neg = torch.nan_to_num(x.eps["negative"] - empty)
            d_perp = d_neg - flat_dot(d_neg, d_pos) / flat_dot(d_pos, d_pos).clamp_min(1e-12) * d_pos
            w = x.scale - 1.0 if self.weight is None else self.weight
            mask = x.negative.view(-1, *([1] * (pred.ndim - 1)))
            pred = torch.where(mask, pred - w * d_perp, pred)
        return Guidance(pred, empty, (pred - empty) / x.scale)

    def params(self) -> dict:
        return {"weight": self.weight}
