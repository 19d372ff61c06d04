"""Checks of a composed config before any model loads, and the one builder of config objects.

Hydra type-checks every group against the schemas of :mod:`negstudy.config` when it composes the
config; :func:`validate` then checks meaning (ranges, names, paths, that every ``_target_``
imports and takes the node's keys) and raises :class:`ConfigError`, whose one-line message names
the key, the bad value and what is allowed. The app prints that line and exits with status 2.

:func:`build` makes a config group's object (a schedule, an evaluator, a study, a guider) from its
node with ``hydra.utils.instantiate``, after the same target checks. A node's ``name`` is a label
for tables, reports and W&B, not an argument of the target, and is left out.
"""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from negstudy.datasets import pairs_of
from negstudy.errors import ConfigError

SCHEDULERS = ("default", "pndm", "ddim", "euler", "dpmpp", "euler_a", "dpmpp_sde")
DTYPES = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
RECORDABLE = ("eps", "latents")
RESERVED = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_", "name")  # not arguments of the target


def allowed(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: allowed values are {', '.join(map(str, choices))}")


# ----------------------------------------------------------------------------- _target_ nodes


def locate(path: str):
    """The object at a dotted path (a module's attribute, or an attribute of one: ``a.b.C.build``),
    as Hydra finds a ``_target_``; ImportError with one line when there is none."""
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):  # a module that imports a missing one
                raise ImportError(f"{module_name} needs {err.name}, which is not installed") from None
            continue
        for j in range(i, len(parts)):
            if not hasattr(obj, parts[j]):
                raise ImportError(f"{'.'.join(parts[:j])} has no {parts[j]!r}")
            obj = getattr(obj, parts[j])
        return obj
    raise ImportError(f"no module named {parts[0]!r}")


def target_of(node, key: str):
    """The callable a node's ``_target_`` names; ConfigError naming ``<key>._target_`` otherwise."""
    if not isinstance(node, (dict, DictConfig)) or "_target_" not in node:
        raise ConfigError(f"{key}: no _target_ (give the dotted path of the class or function that builds it)")
    path = node["_target_"]
    try:
        target = locate(str(path))
    except ImportError as err:
        raise ConfigError(f"{key}._target_={path!r}: does not import ({err}); give a dotted path such as "
                          "negstudy.schedules.Window") from None
    if not callable(target):
        raise ConfigError(f"{key}._target_={path!r}: not a class or function")
    return target


def parameters(target) -> tuple[list[str], bool]:
    """(keyword parameter names of ``target``, whether it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: accept anything
        return [], True
    names = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def check_target(node, key: str, passed: tuple[str, ...] = ()) -> Any:
    """The target of ``node`` after checking that it imports and that every key of the node (and
    ``passed``, the arguments the caller adds) is one of its parameters. Returns the target."""
    target = target_of(node, key)
    names, var_kw = parameters(target)
    if not var_kw:
        for k in list(node.keys()) + list(passed):
            if k not in RESERVED and k not in names:
                where = f"{key}.{k}" if k not in passed else f"{key} (argument {k!r} passed by negstudy)"
                raise ConfigError(f"{where}: not a parameter of {node['_target_']} "
                                  f"(allowed: {', '.join(n for n in names if n not in passed) or 'none'})")
    return target


def build(node, key: str, **kwargs) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` without the node's ``name``, after
    :func:`check_target`; ``key`` (e.g. ``schedule``) names the node in errors."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    check_target(node, key, tuple(kwargs))
    container = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    container.pop("name", None)
    container.setdefault("_convert_", "all")  # lists and dicts reach the target as Python's own
    try:
        return instantiate(container, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):  # the target's own check: its one line, as is
            raise cause from None
        raise


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
