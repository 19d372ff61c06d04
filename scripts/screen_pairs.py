"""How often the shapes model draws each concept its caption does NOT name: the yield of candidate
prompt pairs for the critical-step study, measured before choosing them.

    OMP_NUM_THREADS=2 python scripts/screen_pairs.py --seeds 20 --out outputs/screen_pairs.csv

Every candidate caption names one object and a background ("a box in the sky"; every object x every
background) or only a background ("a view of the sky"). Each caption is sampled once per seed
without a negative (30 PNDM steps, guidance 7.5, the study's seeds 0..N-1) and read by the
default reader (the ensemble); one reading answers every concept at once. Per (caption, concept
the caption does not name): the rate at which the concept is surely present, its Wilson 95 %
interval, and how often the reader was unsure. A pair of the study is a caption and a concept
with a high yield: each seed that shows the concept is a pair-seed the sweep can measure; the
pairs whose caption names an object also measure the attention lag (the caption's object word
has a region of its own).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from negstudy.shapes import world


def candidates() -> list[str]:
    named = [f"a {o} {world.BACKGROUND_PHRASES[b]}" for o in world.OBJECT_NAMES for b in world.BACKGROUND_NAMES]
    return named + [f"a view {'at night' if b == 'night' else 'of the ' + b}" for b in world.BACKGROUND_NAMES]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--model", default="builtin:shapes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--captions", nargs="*", default=None, help="default: every object x background, and the views")
    ap.add_argument("--out", type=Path, default=Path("outputs/screen_pairs.csv"))
    args = ap.parse_args(argv)
    captions = args.captions or candidates()
    for c in captions:  # a caption outside the world's grammar fails here, before any sampling
        world.parse_caption(c)

    from omegaconf import OmegaConf

    from negstudy.config import ModelConfig
    from negstudy.critical import wilson
    from negstudy.evaluators.ensemble import EnsembleEvaluator, concept_present
    from negstudy.models import load_pipeline, pick_device
    from negstudy.sampler import NegativeSampler
    from negstudy.studies import screen_without_negative

    cfg = OmegaConf.structured(ModelConfig(name="shapes", path=args.model, dtype="fp32"))
    sampler = NegativeSampler(load_pipeline(cfg, pick_device("cpu")), steps=args.steps, guidance_scale=7.5)
    items = [(c, s) for c in captions for s in range(args.seeds)]
    start = time.perf_counter()
    # the studies' own screening (never schedule) without a reader: every concept is then judged from
    # one ensemble reading of each image, by the studies' rule
    screened = screen_without_negative(sampler, None, [c for c, _ in items], ["noisy"] * len(items),
                                       ["attribute"] * len(items), [s for _, s in items], args.batch_size)
    readings = EnsembleEvaluator.build(world="shapes").read(np.stack([found.image for found in screened]))
    rows = []
    for (caption, seed), reading in zip(items, readings):
        named = world.parse_caption(caption).objects
        for concept in [o for o in world.OBJECT_NAMES if o not in named] + list(world.ATTRIBUTES):
            rows.append({"caption": caption, "concept": concept, "category": "attribute" if concept in world.ATTRIBUTES else "object",
                         "seed": seed, "present": concept_present(reading, concept)[0]})
    frame = pd.DataFrame(rows)
    out = []
    for (caption, concept, category), g in frame.groupby(["caption", "concept", "category"], sort=False):
        sure = g.present.notna()
        k, n = int((g.present == True).sum()), int(sure.sum())  # noqa: E712 - a column of True / False / None
        rate, lo, hi = wilson(k, n)
        out.append({"caption": caption, "concept": concept, "category": category, "present": k, "sure": n,
                    "unsure": int((~sure).sum()), "rate": rate, "low": lo, "high": hi})
    table = pd.DataFrame(out).sort_values(["category", "rate"], ascending=[True, False])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"{len(items)} images in {time.perf_counter() - start:.0f} s; {args.out}", file=sys.stderr)
    print(table.head(40).to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
