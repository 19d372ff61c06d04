"""Shared-prefix engine vs independent runs: a delayed negative from every start step, one pair and seed.

    python scripts/bench_prefix.py [--steps 30] [--device cpu]

Prints UNet batch rows, wall time, their ratios and the max pixel difference, measured in one run.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from negstudy.config import ModelConfig
from negstudy.models import load_pipeline, pick_device
from negstudy.sampler import Batch, NegativeSampler
from negstudy.schedules import FromStep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:shapes")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    pipe = load_pipeline(OmegaConf.structured(ModelConfig(name="m", path=args.model)), device)
    sampler = NegativeSampler(pipe, steps=args.steps)
    n = sampler.n_calls
    plans = [FromStep(k).plan(n) for k in range(n + 1)]
    m = len(plans)
    rows = []
    pipe.unet.register_forward_hook(lambda mod, a, out: rows.append(a[0].shape[0]))
    prompt, negative, seed = "a ball on the grass", "sun", 3
    sampler.generate(Batch([prompt], [negative], [seed], plans[:1]))  # warm-up
    rows.clear()
    t = time.perf_counter()
    shared = sampler.generate(Batch([prompt] * m, [negative] * m, [seed] * m, plans))
    t_shared, r_shared = time.perf_counter() - t, sum(rows)
    rows.clear()
    t = time.perf_counter()
    alone = np.concatenate([sampler.generate(Batch([prompt], [negative], [seed], [p])) for p in plans])
    t_alone, r_alone = time.perf_counter() - t, sum(rows)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {device}")
    print(f"from_step k = 0..{n} ({m} schedules, {n} UNet calls each), model {args.model}")
    print(f"UNet batch rows: shared {r_shared}, independent {r_alone}, ratio {r_shared / r_alone:.3f}")
    print(f"wall time:       shared {t_shared:.2f} s, independent {t_alone:.2f} s, ratio {t_shared / t_alone:.3f}")
    print(f"max |pixel difference|: {np.abs(shared - alone).max():.2e}")


if __name__ == "__main__":
    main()
