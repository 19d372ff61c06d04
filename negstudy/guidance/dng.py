"""Dynamic Negative Guidance (Koulischer et al., ICLR 2025, arXiv 2410.14398).

The negative's weight follows an estimate of the posterior p_t = p(c_neg | x_t), tracked along the
trajectory by Bayes' rule from the two denoisers' predicted means (the paper's Algorithm 1)::

    eps = eps_empty + s (eps_pos - eps_empty) - lam * p_t / (1 - p_t) * (eps_neg - eps_empty)

    p_{t-1} = clamp(p_t * exp((-T * (||x' - mu_neg||^2 - ||x' - mu_empty||^2) + offset) / (2 sigma_t^2)), p_min, p_max)

with x' = x_{t-1} the sampler's next latents, mu_c = (x_t - (1 - a_t) / sqrt(1 - abar_t) eps_c) / sqrt(a_t)
the DDPM posterior mean of the jump from this timestep to the next (a_t = abar_t / abar_next) and
sigma_t^2 = (1 - abar_next) / (1 - abar_t) (1 - a_t) its variance. Latents of sigma-parametrised
schedulers (Euler) are brought to the variance-preserving scale first. On deterministic samplers
(PNDM, DDIM) the same quantities are used as if the step were DDPM's; ``temperature`` absorbs
the difference. Where two timesteps repeat (PNDM's second call) the posterior is not updated.

The posterior starts at ``prior`` on the first step where the schedule applies the negative and is
updated only on steps where it does (eps_neg exists there): a delayed DNG starts from its prior.
Defaults are the authors' published example (scale 5, prior 0.01, temperature 0.2, offset 2e-4,
p_max 0.8), set for 32 x 32 x 3 pixel models like the shapes model; latent models may need others.
"""

from __future__ import annotations

import torch

from negstudy.errors import ConfigError
from negstudy.guidance.base import GuideInput, Guidance, Guider


class DNG(Guider):
    name = "dng"

    def __init__(self, scale: float = 5.0, prior: float = 0.01, temperature: float = 0.2, offset: float = 2e-4,
                 p_min: float = 1e-6, p_max: float = 0.8):
        super().__init__()
        if not 0 < p_min <= prior <= p_max < 1:
            raise ConfigError(f"guidance.prior={prior}: need 0 < p_min ({p_min}) <= prior <= p_max ({p_max}) < 1")
        if scale < 0 or temperature < 0:
            raise ConfigError(f"guidance.scale={scale}, guidance.temperature={temperature}: must be >= 0")
        self.scale, self.prior, self.temperature, self.offset = float(scale), float(prior), float(temperature), float(offset)
        self.p_min, self.p_max = float(p_min), float(p_max)

    def needs(self, negative: bool) -> set[str]:
        return {"negative", "empty"} if negative else {"empty"}

    def start(self, n_lanes: int, device: torch.device) -> None:
        self.lane_state = {"p": torch.full((n_lanes,), self.prior, dtype=torch.float64, device=device)}

    def guide(self, x: GuideInput) -> Guidance:
        empty = x.eps["empty"]
        pred = empty + x.scale * (x.eps["positive"] - empty)
        p = self.lane_state["p"]
        if bool(x.negative.any()):
            lam = (self.scale * p / (1 - p)).to(pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
            push = torch.nan_to_num(x.eps["negative"] - empty)
            mask = x.negative.view(-1, *([1] * (pred.ndim - 1)))
            pred = torch.where(mask, pred - lam * push, pred)
        return Guidance(pred, empty, (pred - empty) / x.scale)

    def after_step(self, x: GuideInput, out: Guidance, next_latents: torch.Tensor, scheduler) -> None:
        if x.next_timestep is None or not bool(x.negative.any()):
            return
        abar = scheduler.alphas_cumprod.to(torch.float64)
        a_t, a_next = abar[int(x.timestep)], abar[int(x.next_timestep)]
        if not a_next > a_t:  # a repeated timestep: no jump to score
            return
        alpha = a_t / a_next
        sigma2 = (1 - a_next) / (1 - a_t) * (1 - alpha)
        x_t, x_next = x.latents.to(torch.float64), next_latents.to(torch.float64)
        if float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0:  # sigma-parametrised latents -> VP scale
            x_t, x_next = x_t * a_t.sqrt(), x_next * a_next.sqrt()

        def mean(eps):
            return (x_t - (1 - alpha) / (1 - a_t).sqrt() * eps.to(torch.float64)) / alpha.sqrt()

        d_neg = (x_next - mean(torch.nan_to_num(x.eps["negative"]))).flatten(1).pow(2).sum(1)
        d_empty = (x_next - mean(x.eps["empty"])).flatten(1).pow(2).sum(1)
        p = self.lane_state["p"]
        updated = (p * torch.exp((-self.temperature * (d_neg - d_empty) + self.offset) / (2 * sigma2))).clamp(self.p_min, self.p_max)
        self.lane_state["p"] = torch.where(x.negative, updated, p)

    def params(self) -> dict:
        return {"scale": self.scale, "prior": self.prior, "temperature": self.temperature, "offset": self.offset,
                "p_min": self.p_min, "p_max": self.p_max}
