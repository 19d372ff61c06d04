"""Config nodes that name their object by ``_target_``: find the target, check the node, build it.

:func:`build` makes a config group's object (a schedule, an evaluator, a study, a guider) from its
node with ``hydra.utils.instantiate``, after :func:`check_target`: the target imports and every key
of the node is one of its parameters; otherwise a one-line :class:`ConfigError` names the key, the
value and what is allowed. A node's ``name`` is a label for tables, reports and W&B, not an argument
of the target, and is left out. (Re-exported by :mod:`negstudy.checks`.)
"""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from negstudy.errors import ConfigError

RESERVED = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_", "name")  # not arguments of the target


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
