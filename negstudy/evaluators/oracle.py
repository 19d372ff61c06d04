"""The exact shapes-world oracle as an evaluator: what is in each image, read from its pixels."""

from __future__ import annotations

import numpy as np

from negstudy.shapes import oracle, world


class OracleEvaluator:
    name = "oracle"
    locates = True

    def objects(self, images, labels=None) -> list[dict[str, np.ndarray]]:
        """Objects present (restricted to ``labels`` when given), each with its pixel mask."""
        return [{o: m for o, m in v.objects.items() if labels is None or o in labels} for v in oracle.inspect_batch(images)]

    def present(self, images, names) -> list[bool]:
        return [v.present(name) for v, name in zip(oracle.inspect_batch(images), names)]

    def evaluate(self, images, items) -> list[dict]:
        """images: uint8 (B, 32, 32, 3). Columns: objects present, background, attribute, and
        whether the negative's concept and the prompt's named content are present."""
        rows = []
        for verdict, item in zip(oracle.inspect_batch(images), items):
            named = world.parse_caption(item.prompt)
            target = world.parse_caption(item.negative)
            present = sorted(name for name in verdict.objects)
            negative_present = None
            if target.objects:
                negative_present = any(verdict.present(o) for o in target.objects)
            elif target.attribute:
                negative_present = verdict.attribute == target.attribute
            rows.append(
                {
                    "objects": ",".join(present),
                    "n_objects": len(present),
                    "background": verdict.background,
                    "attribute": verdict.attribute,
                    "negative_present": negative_present,
                    "named_objects_present": all(verdict.present(o) for o in named.objects),
                    "unnamed_objects": ",".join(o for o in present if o not in named.objects),
                    "background_right": named.background is None or verdict.background == named.background,
                }
            )
        return rows
