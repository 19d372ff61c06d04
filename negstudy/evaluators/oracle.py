"""The exact shapes-world oracle as an evaluator: what is in each image, read from its pixels.

Decisions the oracle cannot make within its margins are unsure (``Verdict.unsure``): ``present``
answers None for them (recorded as missing, never guessed), ``objects`` lists surely present
objects only, and the table's rows say ``unsure`` (decision names), ``background_state`` and
``attribute_state`` (a class, "none" or "unsure") beside the older columns.
"""

from __future__ import annotations

import numpy as np

from negstudy.evaluators.ensemble import UNSURE, oracle_readings, reading_row
from negstudy.shapes import oracle


class OracleEvaluator:
    name = "oracle"
    locates = True
    kinds = ("object", "attribute")

    def __init__(self, *, world: str | None = "shapes"):
        from negstudy.evaluators import shapes_world_only

        shapes_world_only("oracle", world, "evaluator=owl, clip, judge or none")

    def read(self, images) -> list:
        """The oracle's readings (negstudy.evaluators.ensemble.Reading): the studies' reader on request."""
        return oracle_readings(images)

    def objects(self, images, labels=None) -> list[dict[str, np.ndarray]]:
        """Surely present objects (restricted to ``labels`` when given), each with its pixel mask."""
        return [{o: m for o, m in v.objects.items() if labels is None or o in labels} for v in oracle.inspect_batch(images)]

    def present(self, images, names, kind: str = "object") -> list[bool | None]:
        """True / False, None where the oracle is unsure (attributes: the image's attribute is ``name``)."""
        if kind == "attribute":
            return [None if r.attribute == UNSURE else r.attribute == name for r, name in zip(oracle_readings(images), names)]
        return [v.decision(name) for v, name in zip(oracle.inspect_batch(images), names)]

    def evaluate(self, images, items) -> list[dict]:
        """images: uint8 (B, 32, 32, 3). Columns: objects present, background, attribute, whether the
        negative's concept and the prompt's named content are present (None where unsure), and the
        unsure decisions (see ``negstudy.evaluators.ensemble.reading_row``)."""
        return [reading_row(r, it.prompt, it.negative) for r, it in zip(oracle_readings(images), items)]
