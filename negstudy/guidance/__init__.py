"""Guiders: HOW a negative prompt acts at a step (negstudy.schedules says WHEN).

Chosen by the ``guidance`` config group (``guidance=cfg|perp_neg|nag|dng|apg|tcfg``), each YAML a
``_target_`` built with ``hydra.utils.instantiate``; any guider runs with any schedule, the
shared-prefix engine, the attention recorder and every study. A new guider is one module with a
:class:`Guider` subclass plus one YAML under ``conf/guidance/`` (docs/extending.md).
"""

from negstudy.guidance.base import Guidance, GuideInput, Guider
from negstudy.guidance.diffusers_guiders import APG, CFG, TCFG, DiffusersGuider
from negstudy.guidance.dng import DNG
from negstudy.guidance.nag import NAG
from negstudy.guidance.perp_neg import PerpNeg

__all__ = ["APG", "CFG", "DNG", "NAG", "TCFG", "DiffusersGuider", "Guidance", "GuideInput", "Guider", "PerpNeg",
           "from_config"]


def from_config(node) -> Guider:
    """The guider of a ``guidance`` config node (``_target_`` + parameters), or ConfigError naming the key.

    None (a config without a guidance group) is plain CFG.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from negstudy.errors import ConfigError

    if node is None:
        return CFG()
    target = OmegaConf.select(node, "_target_") if OmegaConf.is_config(node) else node.get("_target_")
    try:
        guider = instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        message = str(cause or err).splitlines()[0]
        if isinstance(cause, TypeError) and "argument" in message:
            raise ConfigError(f"guidance: {message} (guidance._target_={target!r})") from None
        raise ConfigError(f"guidance._target_={target!r}: {message}") from None
    if not isinstance(guider, Guider):
        raise ConfigError(f"guidance._target_={target!r}: builds a {type(guider).__name__}, not a negstudy.guidance.Guider")
    return guider
