"""Measure a shapes-world model with the exact oracle (the numbers of its model card).

    python scripts/measure_shapes.py                      # the shipped model, 256 captions
    python scripts/measure_shapes.py --model DIR --n 512 --device cuda --json out.json
    python scripts/measure_shapes.py --clip none          # the oracle only (no second reading by the shapes CLIP)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from omegaconf import OmegaConf

from negstudy.config import ModelConfig
from negstudy.models import load_pipeline, pick_device
from negstudy.sampler import NegativeSampler
from negstudy.shapes.quality import format_report, measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:shapes", help="builtin:shapes or a diffusers directory")
    ap.add_argument("--n", type=int, default=256, help="captions (one image each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--scheduler", default="default", choices=["default", "pndm", "ddim", "euler", "dpmpp"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--clip", default="builtin:shapes_clip",
                    help="a shapes-world CLIP that reads the same images a second time (clip_* rows); 'none' to skip")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()

    device = pick_device(args.device)
    cfg = OmegaConf.structured(ModelConfig(name="shapes", path=args.model, scheduler=args.scheduler, dtype="fp32"))
    pipe = load_pipeline(cfg, device)
    sampler = NegativeSampler(pipe, steps=args.steps, guidance_scale=args.guidance)
    clip = None
    if args.clip != "none":
        from negstudy.config import ClipConfig
        from negstudy.evaluators.clip import ClipEvaluator

        clip = ClipEvaluator.from_config(OmegaConf.structured(ClipConfig(path=args.clip)), "shapes")
    start = time.perf_counter()
    result = measure(sampler, n=args.n, seed=args.seed, batch_size=args.batch_size, clip=clip)
    result.update(model=args.model, device=str(device), seconds=round(time.perf_counter() - start, 1),
                  torch=torch.__version__)
    print(format_report(result))
    print(f"\n{result['seconds']} s on {device}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
