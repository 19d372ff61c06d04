"""Evaluators: read generated images and say what is in them.

An evaluator is built from ``cfg.evaluator`` by :func:`make_evaluator` BEFORE the model loads, so
an evaluator that cannot judge the chosen model fails fast. Every evaluator implements

- ``evaluate(images, items) -> list[dict]``: per-image columns for the generation job's table;
- ``objects(images, labels) -> list[dict[str, mask | None] | None]``: the objects it finds in each
  image among ``labels``, each with a boolean (H, W) mask of its region when the evaluator can
  locate it (oracle, detector) or None (judge); None for an image it could not judge;
- ``present(images, names) -> list[bool | None]``: whether object ``names[i]`` is in image ``i``
  (None = no answer, recorded as missing, never guessed).

``images`` are uint8 arrays (B, H, W, 3). The judge adds ``closer`` and ``background_rating``.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from negstudy.errors import ConfigError

EVALUATORS = ("none", "oracle", "judge", "clip", "owl", "ensemble")
Mask = np.ndarray


class Evaluator(Protocol):
    name: str
    locates: bool  # objects() returns masks

    def evaluate(self, images: np.ndarray, items) -> list[dict]: ...

    def objects(self, images: np.ndarray, labels: Sequence[str]) -> list[dict[str, Mask | None] | None]: ...

    def present(self, images: np.ndarray, names: Sequence[str]) -> list[bool | None]: ...


class NoEvaluator:
    name = "none"
    locates = False

    def evaluate(self, images, items) -> list[dict]:
        return [{} for _ in items]

    def objects(self, images, labels):
        return [None for _ in images]

    def present(self, images, names):
        return [None for _ in images]


def check_evaluator(cfg_evaluator) -> None:
    """Name and settings checks that need no model or network (run by ``negstudy.config.validate``)."""
    name = cfg_evaluator.name
    if name not in EVALUATORS:
        raise ConfigError(f"evaluator.name={name!r}: allowed values are {', '.join(EVALUATORS)}")
    if "labels" in cfg_evaluator:
        from negstudy.labels import label_set

        label_set(cfg_evaluator.labels)


def make_evaluator(cfg_evaluator, model_world: str | None) -> Evaluator:
    name = cfg_evaluator.name
    if name == "none":
        return NoEvaluator()
    if name == "oracle":
        if model_world != "shapes":
            raise ConfigError(
                f"evaluator.name='oracle': the oracle reads the shapes world only, and model {model_world or 'is not a shapes model'}"
                " (use evaluator=none, or model=shapes)"
            )
        from negstudy.evaluators.oracle import OracleEvaluator

        return OracleEvaluator()
    if name == "judge":
        from negstudy.evaluators.judge import JudgeEvaluator

        return JudgeEvaluator.from_config(cfg_evaluator)
    if name == "clip":
        from negstudy.evaluators.clip import ClipEvaluator

        return ClipEvaluator.from_config(cfg_evaluator, model_world)
    if name == "ensemble":
        if model_world != "shapes":
            raise ConfigError(f"evaluator.name='ensemble': the ensemble reads the shapes world only (oracle + shapes CLIP),"
                              f" and model {model_world or 'is not a shapes model'} (use evaluator=clip or judge, or model=shapes)")
        from negstudy.evaluators.ensemble import EnsembleEvaluator

        return EnsembleEvaluator.from_config(cfg_evaluator, model_world)
    if name == "owl":
        from negstudy.evaluators.owl import OwlEvaluator

        return OwlEvaluator.from_config(cfg_evaluator)
    raise ConfigError(f"evaluator.name={name!r}: allowed values are {', '.join(EVALUATORS)}")
