"""Measure a shapes-world model with the exact oracle (the numbers of its model card).

    python scripts/measure_shapes.py                      # the shipped model, 256 captions
    python scripts/measure_shapes.py --model DIR --n 512 --device cuda --json out.json
    python scripts/measure_shapes.py --clip none          # the oracle only (no second reading by the shapes CLIP)
    python scripts/measure_shapes.py --plain-only         # only the plain images (no negatives): the rates below

Beside negstudy.shapes.quality.measure's rates, the plain images (no negative) give, with the
definitions of train_shapes.py's probe: each attribute drawn when named (attribute_blurry, ...),
broken images (no world background, or a quarter of the pixels in no world colour), and
object_localization: of the named objects the oracle found, the share whose word's map (positive
branch, mean of the last five steps, negstudy.attention.AttentionRecorder) puts at least
HIT_LIFT = 2 times a uniform map's mass on the object's mask. Recorded while the plain images are
sampled: the images are those of the measure, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from negstudy.attention import AttentionRecorder
from negstudy.config import ModelConfig
from negstudy.models import load_pipeline, pick_device
from negstudy.records import to_uint8
from negstudy.sampler import Batch, NegativeSampler
from negstudy.schedules import Never
from negstudy.shapes import world
from negstudy.shapes.quality import format_report, measure, rates, tally

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shapes import probe_rates  # noqa: E402  (the probe's definitions: one place)

EXTRA_KEYS = ("attribute_blurry", "attribute_noisy", "attribute_dark", "attribute_striped", "broken_images",
              "object_localization")


class RecordingSampler(NegativeSampler):
    """The sampler, keeping the images of its plain batches (no negative prompt) and, per image, the mean map of
    the last five steps of each object word of the prompt (positive branch). Recording leaves images unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plain_images: list[np.ndarray] = []
        self.last_maps: list[dict[str, np.ndarray]] = []

    def generate(self, batch, hooks=()):
        if any(batch.negative_prompts):
            return super().generate(batch, hooks)
        rec = AttentionRecorder(self.unet, words=list(world.OBJECT_NAMES))
        images = super().generate(batch, [*hooks, rec])
        self.plain_images.append(to_uint8(images))
        last = slice(self.n_calls - 5, self.n_calls)
        self.last_maps += [{w: rec.maps(j, "positive", w)[last].float().mean(0).numpy() for w in rec.words_of(j, "positive")}
                           for j in range(len(batch))]
        return images


def extras(sampler: RecordingSampler, captions: list[str]) -> dict:
    images = np.concatenate(sampler.plain_images)
    r = probe_rates(images, captions, sampler.last_maps, images[:0], [], [], images[:0])
    return {k + s: r[k + s] for k in EXTRA_KEYS for s in ("", "_lo", "_hi", "_n")}


def format_extras(r: dict) -> str:
    lines = ["", "", "| measure (plain images) | rate | 95 % CI | n |", "|---|---|---|---|"]
    for k in EXTRA_KEYS:
        if k in r:
            lines.append(f"| {k} | {r[k]:.1%} | {r[k + '_lo']:.1%} - {r[k + '_hi']:.1%} | {r[k + '_n']} |")
    return "\n".join(lines)


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
    ap.add_argument("--plain-only", action="store_true",
                    help="only the plain images: their rates and the attribute / broken / localization rates (no negatives)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()

    device = pick_device(args.device)
    cfg = OmegaConf.structured(ModelConfig(name="shapes", path=args.model, scheduler=args.scheduler, dtype="fp32"))
    pipe = load_pipeline(cfg, device)
    sampler = RecordingSampler(pipe, steps=args.steps, guidance_scale=args.guidance)
    rng = np.random.default_rng(args.seed)
    captions = [world.caption(world.sample_scene(rng)) for _ in range(args.n)]  # measure()'s draw
    start = time.perf_counter()
    if args.plain_only:
        seeds = [args.seed * 100_000 + i for i in range(args.n)]  # measure()'s seeds
        plan = Never().plan(sampler.n_calls)
        for i in range(0, args.n, args.batch_size):
            sl = slice(i, i + args.batch_size)
            sampler.generate(Batch(captions[sl], [""] * len(captions[sl]), seeds[sl], [plan] * len(captions[sl])))
        from negstudy.shapes import oracle

        counts, _, _ = tally(oracle.inspect_batch(np.concatenate(sampler.plain_images)), [world.parse_caption(c) for c in captions])
        result = {"n": args.n, "steps": sampler.steps, "n_calls": sampler.n_calls, "guidance_scale": sampler.guidance_scale,
                  **rates(counts)}
    else:
        clip = None
        if args.clip != "none":
            from negstudy.config import ClipConfig
            from negstudy.evaluators.clip import ClipEvaluator

            clip = ClipEvaluator.from_config(OmegaConf.structured(ClipConfig(path=args.clip)), "shapes")
        result = measure(sampler, n=args.n, seed=args.seed, batch_size=args.batch_size, clip=clip)
    result.update(extras(sampler, captions))
    result.update(model=args.model, device=str(device), seconds=round(time.perf_counter() - start, 1),
                  torch=torch.__version__, torch_threads=torch.get_num_threads(),
                  protocol=f"scripts/measure_shapes.py --n {args.n} (seed {args.seed}){' --plain-only' if args.plain_only else ''}")
    print(format_report(result) + format_extras(result))
    print(f"\n{result['seconds']} s on {device}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
