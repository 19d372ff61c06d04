"""How fast this machine runs the main job's UNet work: rows per second of the shipped shapes model.

    OMP_NUM_THREADS=2 python scripts/draw_speed.py            # one batch as the main job runs it

One batch of 32 images (the main job's batch_size) with the negative from step 0, fixed-row blocks
of 32 (its fixed_rows), 30 PNDM steps (31 calls, 2 rows an image a call), after a warm-up batch of
4. Machines of one kind differ up to 2x: a time measured on one draw compares with another draw's
through this number (docs/performance.md names it next to the main job's times). Also the shapes
world's own sampler (the training data: sample_dataset, 4000 images, numpy), in images/s.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fixed-rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)

    import torch
    from omegaconf import OmegaConf

    from negstudy.config import ModelConfig
    from negstudy.jobs import cpu_name
    from negstudy.models import load_pipeline
    from negstudy.sampler import Batch, NegativeSampler
    from negstudy.schedules import FromStep

    pipe = load_pipeline(OmegaConf.structured(ModelConfig(name="shapes", path="builtin:shapes")), torch.device("cpu"))
    sampler = NegativeSampler(pipe, steps=args.steps, fixed_rows=args.fixed_rows)
    n = sampler.n_calls
    batch = lambda b: Batch(["a sun on the grass"] * b, ["ball"] * b, list(range(b)), [FromStep(0).plan(n)] * b)
    sampler.generate(batch(4))  # warm-up
    start = time.perf_counter()
    sampler.generate(batch(args.batch))
    rate = 2 * n * args.batch / (time.perf_counter() - start)
    print(f"{rate:.1f} UNet rows/s (shapes model, batch {args.batch}, fixed rows {args.fixed_rows}, "
          f"{torch.get_num_threads()} torch threads, {cpu_name()})")
    from negstudy.shapes.world import sample_dataset

    sample_dataset(50, 0)  # warm caches
    start = time.perf_counter()
    sample_dataset(4000, 1)
    print(f"{4000 / (time.perf_counter() - start):.0f} world images/s (negstudy.shapes.world.sample_dataset)")
    return rate


if __name__ == "__main__":
    main()
