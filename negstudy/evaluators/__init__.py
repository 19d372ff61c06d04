"""Evaluators: read generated images and add columns to the per-image table.

An evaluator is built from ``cfg.evaluator`` by :func:`make_evaluator` BEFORE the model loads, so
an evaluator that cannot judge the chosen model fails fast. ``evaluate(images, items)`` takes
uint8 images (B, H, W, 3) and the job's items and returns one dict of columns per image.
"""

from __future__ import annotations

from negstudy.errors import ConfigError

EVALUATORS = ("none", "oracle")


class NoEvaluator:
    name = "none"

    def evaluate(self, images, items) -> list[dict]:
        return [{} for _ in items]


def make_evaluator(cfg_evaluator, model_world: str | None):
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
    raise ConfigError(f"evaluator.name={name!r}: allowed values are {', '.join(EVALUATORS)}")
