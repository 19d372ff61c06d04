"""diffusers' own guiders as negstudy guiders: classifier-free guidance (the default), adaptive
projected guidance (APG, Sadat et al. 2024), tangential CFG (TCFG, Kwon et al. 2025), CFG-Zero*...

Any ``diffusers.guiders`` class whose declared input predictions are ``pred_cond`` and
``pred_uncond`` fits: its ``pred_cond`` is eps_pos and its ``pred_uncond`` is the prediction
opposite the prompt, eps_neg on steps where the schedule applies the negative, eps_empty elsewhere.
So ``guidance=apg schedule=from_step`` is APG with a delayed negative. Guiders that perturb the
model itself (PAG, SLG, SEG, auto-guidance) need other UNet calls and are refused.

The guider's own ``start``/``stop`` (fractions of the loop) stay at 0 and 1: the schedule says
when. Momentum (APG's ``adaptive_projected_guidance_momentum``) keeps a running average over the
whole batch, which the shared-prefix engine cannot split per lane: it is refused.
"""

from __future__ import annotations

from negstudy.errors import ConfigError
from negstudy.guidance.base import GuideInput, Guidance, Guider, where_negative

FIXED = ("guidance_scale", "start", "stop", "enabled")  # set by negstudy, not by the config


class DiffusersGuider(Guider):
    """A ``diffusers.guiders`` class (``method``, its class name) with ``options`` (its init arguments).

    The guidance scale is the run's ``guidance_scale``.
    """

    def __init__(self, method: str = "ClassifierFreeGuidance", options: dict | None = None, name: str | None = None):
        super().__init__()
        import diffusers.guiders as guiders

        cls = getattr(guiders, method, None)
        if not (isinstance(cls, type) and issubclass(cls, guiders.BaseGuidance)):
            allowed = sorted(n for n in dir(guiders) if isinstance(getattr(guiders, n), type)
                             and issubclass(getattr(guiders, n), guiders.BaseGuidance) and n != "BaseGuidance")
            raise ConfigError(f"guidance.method={method!r}: not a diffusers guider (diffusers.guiders has {', '.join(allowed)})")
        if list(cls._input_predictions or []) != ["pred_cond", "pred_uncond"]:
            raise ConfigError(f"guidance.method={method!r}: needs the predictions {cls._input_predictions}, which perturb "
                              "the model; negstudy guiders take eps_pos and the negative/empty prediction only")
        options = dict(options or {})
        for key in FIXED:
            if key in options:
                raise ConfigError(f"guidance.options.{key}: set by negstudy (the run's guidance_scale; the schedule says when)")
        if options.get("adaptive_projected_guidance_momentum") is not None:
            raise ConfigError("guidance.options.adaptive_projected_guidance_momentum: momentum averages over the whole "
                              "batch, which lanes sharing prefixes cannot split; allowed: null")
        from diffusers.utils import logging as dlogging

        verbosity = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # diffusers warns at every guider built that guiders are experimental
        try:
            self.guider = cls(**options)
        except TypeError as err:
            raise ConfigError(f"guidance.options: {err} (the options are {cls.__name__}'s init arguments)") from None
        finally:
            dlogging.set_verbosity(verbosity)
        self.method, self.options = method, options
        self.name = name or method

    def guide(self, x: GuideInput) -> Guidance:
        self.guider.guidance_scale = x.scale
        self.guider.set_state(x.step, x.n_calls, x.timestep)
        uncond = where_negative(x.negative, x.eps["negative"], x.eps["empty"])
        pred = self.guider.forward(x.eps["positive"], uncond).pred
        return Guidance(pred, uncond, (pred - uncond) / x.scale)

    def params(self) -> dict:
        return dict(self.options)


class CFG(DiffusersGuider):
    """Classifier-free guidance, the paper's: ``eps_u + s (eps_pos - eps_u)`` with eps_u = eps_neg where
    the schedule applies the negative, eps_empty elsewhere (PAPER.md section 2). diffusers'
    ``ClassifierFreeGuidance``, so images match ``StableDiffusionPipeline``."""

    def __init__(self):
        super().__init__("ClassifierFreeGuidance", {}, name="cfg")

    def params(self) -> dict:
        return {}


class APG(DiffusersGuider):
    """Adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416) through diffusers: the guidance
    update (eps_pos - eps_u) rescaled to norm <= ``rescale`` and its component parallel to eps_pos
    weighted by ``eta`` (the paper recommends 0: drop it)."""

    def __init__(self, rescale: float = 15.0, eta: float = 0.0):
        super().__init__("AdaptiveProjectedGuidance",
                         {"adaptive_projected_guidance_rescale": float(rescale), "eta": float(eta)}, name="apg")
        self.rescale, self.eta = float(rescale), float(eta)

    def params(self) -> dict:
        return {"rescale": self.rescale, "eta": self.eta}


class TCFG(DiffusersGuider):
    """Tangential classifier-free guidance (Kwon et al. 2025, arXiv 2503.18137) through diffusers: eps_u
    projected, by an SVD of [eps_pos, eps_u], onto their first singular direction before CFG."""

    def __init__(self):
        super().__init__("TangentialClassifierFreeGuidance", {}, name="tcfg")

    def params(self) -> dict:
        return {}

