"""Checks of a composed config before any model loads.

Hydra type-checks the groups that have schemas in :mod:`negstudy.config` when it composes the
config; :func:`validate` then checks meaning (ranges, names, paths, that every ``_target_``
imports and takes the node's keys: :mod:`negstudy.targets`) and raises :class:`ConfigError`, whose
one-line message names the key, the bad value and what is allowed. The app prints that line and
exits with status 2. ``build`` (:func:`negstudy.targets.build`) is importable from here too.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from negstudy.datasets import pairs_of
from negstudy.errors import ConfigError
from negstudy.targets import build, check_target, locate, target_of  # noqa: F401 - the builder, importable from here

SCHEDULERS = ("default", "pndm", "ddim", "euler", "dpmpp", "euler_a", "dpmpp_sde")
DTYPES = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
RECORDABLE = ("eps", "latents")


def allowed(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: allowed values are {', '.join(map(str, choices))}")


# ----------------------------------------------------------------------------- the whole config


def validate(cfg: DictConfig) -> None:
    """Semantic checks that need no model weights; raises ConfigError (one line)."""
    from negstudy.models import resolve_model_path

    if cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps}: must be >= 1")
    if not cfg.guidance_scale > 0:
        raise ConfigError(f"guidance_scale={cfg.guidance_scale}: must be > 0")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be >= 1")
    if not cfg.seeds:
        raise ConfigError("seeds=[]: give at least one seed")
    for key in ("height", "width"):
        v = cfg.get(key)
        if v is not None and (v < 8 or v % 8):
            raise ConfigError(f"{key}={v}: must be a positive multiple of 8")
    allowed("device", cfg.device, DEVICES)
    if cfg.fixed_rows != "auto" and not (isinstance(cfg.fixed_rows, int) and cfg.fixed_rows >= 0):
        raise ConfigError(f"fixed_rows={cfg.fixed_rows!r}: allowed values are auto, 0 (off) or a positive number of rows")
    if cfg.get("autocast") is not None:
        allowed("autocast", cfg.autocast, ("bf16",))
    for item in cfg.record:
        allowed("record", item, RECORDABLE)
    allowed("model.scheduler", cfg.model.scheduler, SCHEDULERS)
    allowed("model.dtype", cfg.model.dtype, DTYPES)
    resolve_model_path(cfg.model.path)
    if cfg.dataset.limit is not None and cfg.dataset.limit < 1:
        raise ConfigError(f"dataset.limit={cfg.dataset.limit}: must be >= 1 or null")
    if not 0 <= cfg.dataset.shard < cfg.dataset.shards:
        raise ConfigError(f"dataset.shard={cfg.dataset.shard}: must be in 0..dataset.shards-1 (dataset.shards={cfg.dataset.shards})")
    if not pairs_of(cfg.dataset):
        raise ConfigError(f"dataset.shard={cfg.dataset.shard}: this shard of {cfg.dataset.shards} is empty (dataset {cfg.dataset.name!r} "
                          "has fewer items than shards)")
    allowed("logger.mode", cfg.logger.mode, ("offline", "online", "disabled"))
    allowed("logger.name", cfg.logger.name, ("none", "wandb"))
    from negstudy.tracking import check as check_tracking

    check_tracking(cfg)
    allowed("sweep.layers", cfg.sweep.layers, ("down_up", "all"))
    allowed("attention.maps", cfg.attention.maps, ("negstudy", "daam"))
    allowed("sweep.variant", cfg.sweep.variant, ("all_tokens", "word_tokens", "all_tokens_daam", "word_tokens_daam"))
    if cfg.sweep.variant.endswith("_daam") and cfg.attention.maps != "daam":
        raise ConfigError(f"sweep.variant={cfg.sweep.variant!r}: the author's ratio is recorded only with attention.maps=daam "
                          f"(attention.maps={cfg.attention.maps!r})")
    allowed("mechanisms.energy", OmegaConf.select(cfg, "mechanisms.energy", default="negstudy"), ("negstudy", "paper", "both"))
    for key in ("stride", "screen_seeds", "max_seeds"):
        if cfg.sweep[key] < 1:
            raise ConfigError(f"sweep.{key}={cfg.sweep[key]}: must be >= 1")
    ratio_seeds = cfg.sweep.get("ratio_seeds")
    if ratio_seeds is not None and ratio_seeds < cfg.sweep.max_seeds:
        raise ConfigError(f"sweep.ratio_seeds={ratio_seeds}: must be >= sweep.max_seeds ({cfg.sweep.max_seeds}) or null "
                          f"(the ratio's pair-seeds include the swept ones)")
    build(cfg.schedule, "schedule").plan(_n_calls_for(cfg))
    check_target(cfg.evaluator, "evaluator", ("world",))
    if "labels" in cfg.evaluator:
        from negstudy.labels import label_set

        label_set(cfg.evaluator.labels)
    if cfg.get("guidance") is not None:  # guiders (negstudy.guidance): built here once to check their values
        from negstudy.guidance import from_config as guider_from_config

        check_target(cfg.guidance, "guidance")
        guider_from_config(cfg.guidance)
    if cfg.sweep.get("study") is not None:
        from negstudy.studies import module_of

        check_target(cfg.sweep.study, "sweep.study", ("cfg", "sampler", "out_dir"))
        check = getattr(module_of(cfg.sweep.study), "check", None)
        if check is not None:
            check(cfg)


def _n_calls_for(cfg: DictConfig) -> int:
    """UNet calls of the loop, from the scheduler config alone (no weights are loaded)."""
    from negstudy.models import load_scheduler
    from negstudy.schedules import n_calls

    try:
        scheduler = load_scheduler(cfg.model)
    except ConfigError:
        raise
    except Exception:  # remote checkpoint not reachable yet: the loader reports it properly later
        return cfg.steps + (1 if cfg.model.scheduler in ("default", "pndm") else 0)
    return n_calls(scheduler, cfg.steps)
