"""Evaluators: read generated images and say what is in them.

An evaluator is chosen by ``_target_`` in conf/evaluator/*.yaml and built from ``cfg.evaluator`` by
``negstudy.targets.build(cfg.evaluator, "evaluator", world=model_world)`` BEFORE the model loads, so an
evaluator that cannot judge the chosen model fails fast. The target is a keyword factory (the
node's keys, and ``world``: the model's world, "shapes" or None), usually the class's ``build``.
Every evaluator implements

- ``evaluate(images, items) -> list[dict]``: per-image columns for the generation job's table;
- ``objects(images, labels) -> list[dict[str, mask | None] | None]``: the objects it finds in each
  image among ``labels``, each with a boolean (H, W) mask of its region when the evaluator can
  locate it (oracle, detector) or None (judge); None for an image it could not judge;
- ``present(images, names, kind="object") -> list[bool | None]``: whether concept ``names[i]``
  (an object, or with ``kind="attribute"`` a property of the whole image such as "blurry") is in
  image ``i`` (None = no answer or unsure, recorded as missing, never guessed); ``kinds`` lists
  the kinds it judges (a kind it does not judge is answered None).

The studies read images through :mod:`negstudy.evaluators.reader`, which wraps these methods.

``images`` are uint8 arrays (B, H, W, 3). The judge adds ``closer`` and ``background_rating``.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from negstudy.errors import ConfigError

Mask = np.ndarray


class Evaluator(Protocol):
    name: str
    locates: bool  # objects() returns masks
    kinds: tuple[str, ...]  # the concept kinds present() judges: "object", "attribute"

    def evaluate(self, images: np.ndarray, items) -> list[dict]: ...

    def objects(self, images: np.ndarray, labels: Sequence[str]) -> list[dict[str, Mask | None] | None]: ...

    def present(self, images: np.ndarray, names: Sequence[str], kind: str = "object") -> list[bool | None]: ...


class NoEvaluator:
    name = "none"
    locates = False
    kinds = ()

    def __init__(self, *, world: str | None = None):
        pass

    def evaluate(self, images, items) -> list[dict]:
        return [{} for _ in items]

    def objects(self, images, labels):
        return [None for _ in images]

    def present(self, images, names, kind: str = "object"):
        return [None for _ in images]


def settings_node(schema, settings: dict, kind: str):
    """``settings`` (an evaluator node's keys as keyword arguments) over ``schema``'s defaults, as the
    node ``from_config`` reads; a key the schema lacks is a ConfigError naming ``evaluator.<key>``."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    names = [f.name for f in fields(schema) if not f.name.startswith("_") and f.name != "name"]
    for key in settings:
        if key not in names:
            raise ConfigError(f"evaluator.{key}: not a parameter of the {kind} evaluator (allowed: {', '.join(names)})")
    return OmegaConf.merge(OmegaConf.structured(schema), settings)


def shapes_world_only(name: str, model_world: str | None, instead: str) -> None:
    """Readers of the shapes world refuse other models before anything loads."""
    if model_world != "shapes":
        raise ConfigError(f"evaluator.name={name!r}: the {name} reads the shapes world only, and model "
                          f"{model_world or 'is not a shapes model'} (use {instead}, or model=shapes)")
