#!/usr/bin/env python
"""Attention anatomy of a shapes-world model: where the cross-attention goes, and whether words land on their objects.

    python scripts/attention_anatomy.py                                # the shipped model, 64 captions
    python scripts/attention_anatomy.py --model DIR --n 64 --json out.json

Protocol (the sampler's PNDM, 30 steps = 31 UNet calls, guidance 7.5, the paper's layers: down
and up blocks, mid block excluded):

1. Plain images: n captions drawn from the world's own distribution (the draw of
   scripts/measure_shapes.py, seed 0: the same captions and seeds), no negative, so the branch
   opposite the prompt is the empty prompt "".
2. Negative images: for every plain image in which the oracle saw an object X that the caption
   does not name, the same seed again with the negative "X" at every step (measure_shapes.py's
   removal protocol); its negative branch is the one called "negative" below.

Recorded with :class:`negstudy.attention.AttentionRecorder` (its word maps and per-slot energy),
plus, per token slot, the attention probability MASS: ``mean_{layers, heads, positions} A[p, k]``
(each recorded layer weighs the same, whatever its grid). Per branch and step window, the share of
the mass (and of the recorder's energy ``sum_{l,h} mean_p up(A)[p, k]^2``) on the start token
(slot 0), the object words, the other words ("a", "and", "on the", background, attribute, commas),
the end token (the first EOS) and the padding (every slot after it: the tokenizer pads with EOS).

Lift of a word's map on its object: ``mass_in_mask(map, region) / region.mean()`` (1 = a uniform
map; the project's hit rule is lift >= HIT_LIFT = 2, negstudy.critical). Regions are the oracle's
masks of the plain image (negstudy.shapes.oracle). Positive branch: every named object the oracle
found, its word's map in the plain run. Negative branch: the negative word's map in the negative
run on X's region in the plain image (as the critical-step study does). The map of a window is the
mean of its steps' maps; "last5" (steps 26-30) is the issue's localization measure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from negstudy.attention import AttentionRecorder, mass_in_mask, word_slots
from negstudy.config import ModelConfig
from negstudy.critical import HIT_LIFT, wilson
from negstudy.models import load_pipeline, pick_device
from negstudy.records import to_uint8
from negstudy.sampler import Batch, NegativeSampler
from negstudy.schedules import Always, Never
from negstudy.shapes import oracle, world

PARTS = ("start", "object words", "other words", "end", "padding")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


class SlotMassRecorder(AttentionRecorder):
    """AttentionRecorder plus the attention probability mass per token slot: (steps, K) per (image, branch),
    the mean over the recorded layers, heads and positions of A[p, k] (rows sum to 1 over k)."""

    def before_unet(self, step, rows):
        super().before_unet(step, rows)
        self._mass_acc = None

    def _reduce(self, probs):
        super()._reduce(probs)
        m = probs.mean((1, 2))  # (B, K)
        self._mass_acc = m if self._mass_acc is None else self._mass_acc.add_(m)

    def on_step(self, state):
        self._mass_pending.append((self._step, self._rows, self._mass_acc / self._n_layers))
        super().on_step(state)

    def on_end(self, images):
        for step, rows, mass in self._mass_pending:
            mass = mass.cpu()
            for j, (image, branch) in enumerate(rows):
                self._mass[(image, branch, step)] = mass[j].clone()
        super().on_end(images)

    def _clear(self):
        super()._clear()
        self._mass, self._mass_pending = {}, []

    def mass(self, image: int, branch: str) -> torch.Tensor:
        out = torch.full((self.n_steps, self.n_slots), float("nan"))
        for (i, b, t), m in self._mass.items():
            if i == image and b == branch:
                out[t] = m
        return out


def slot_parts(tokenizer, prompt: str, n_slots: int) -> dict[str, list[int]]:
    """Token slots of each part of ``prompt``: start, object words, other words, end, padding."""
    n_words = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    words = list(range(1, min(n_words, n_slots - 2) + 1))
    objects = sorted({s for o in world.OBJECT_NAMES for s in word_slots([tokenizer], prompt, o)})
    end = words[-1] + 1 if words else 1
    return {"start": [0], "object words": objects, "other words": [s for s in words if s not in objects],
            "end": [end], "padding": list(range(end + 1, n_slots))}


def parse_windows(text: str, n_calls: int) -> dict[str, list[int]]:
    out = {}
    for item in text.split(","):
        a, b = (int(x) for x in item.split("-"))
        out[f"{a}-{b}"] = list(range(a, min(b, n_calls - 1) + 1))
    out["last5"] = list(range(n_calls - 5, n_calls))
    out["all"] = list(range(n_calls))
    return out


def generate(sampler, captions, negatives, seeds, schedule, batch_size):
    """(uint8 images, per image: {branch: (mass (steps, K), energy (steps, K), {word: maps (steps, h, w)})})."""
    plan = schedule.plan(sampler.n_calls)
    images, records = [], []
    for i in range(0, len(captions), batch_size):
        sl = slice(i, i + batch_size)
        rec = SlotMassRecorder(sampler.unet)
        batch = Batch(list(captions[sl]), list(negatives[sl]), list(seeds[sl]), [plan] * len(captions[sl]))
        images.append(to_uint8(sampler.generate(batch, [rec])))
        for j in range(len(batch)):
            branches = {}
            for branch in ("positive", "negative", "empty"):
                if any(b == branch and im == j for im, b, _ in rec._mass):
                    maps = {w: rec.maps(j, branch, w).float().numpy() for w in rec.words_of(j, branch)}
                    branches[branch] = (rec.mass(j, branch).numpy(), rec.energy(j, branch).numpy(), maps)
            records.append(branches)
    return np.concatenate(images), records


def shares(values: np.ndarray, parts: dict[str, list[int]], steps: list[int]) -> dict[str, float]:
    """Per part, its share of the per-slot values summed over slots, averaged over ``steps``."""
    v = values[steps]
    total = v.sum(1)
    return {p: float(np.mean(v[:, s].sum(1) / total)) if s else 0.0 for p, s in parts.items()}


def lift(maps: np.ndarray, region: np.ndarray, steps: list[int]) -> float:
    return mass_in_mask(maps[steps].mean(0), region) / float(region.mean())


def summarize_lifts(values: list[float]) -> dict:
    v = np.asarray([x for x in values if np.isfinite(x)])
    hits = int((v >= HIT_LIFT).sum())
    rate, lo, hi = wilson(hits, len(v)) if len(v) else (float("nan"),) * 3
    q = {f"q{int(p * 100)}": float(np.quantile(v, p)) if len(v) else float("nan") for p in QUANTILES}
    return {"n": int(len(v)), "hits": hits, "hit_rate": rate, "hit_lo": lo, "hit_hi": hi,
            "mean": float(v.mean()) if len(v) else float("nan"), **q}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:shapes", help="builtin:shapes or a diffusers directory")
    ap.add_argument("--n", type=int, default=64, help="captions (one plain image each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--windows", default="0-9,10-19,20-30", help="step windows (UNet-call indices), comma-separated a-b")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    pipe = load_pipeline(OmegaConf.structured(ModelConfig(name="shapes", path=args.model, dtype="fp32")), device)
    sampler = NegativeSampler(pipe, steps=args.steps, guidance_scale=args.guidance)
    windows = parse_windows(args.windows, sampler.n_calls)
    n_slots = sampler.encode("").shape[1]
    tok = pipe.tokenizer
    t0 = time.perf_counter()

    # 1. plain images (the measure protocol's captions and seeds)
    rng = np.random.default_rng(args.seed)
    captions = [world.caption(world.sample_scene(rng)) for _ in range(args.n)]
    seeds = [args.seed * 100_000 + i for i in range(args.n)]
    images, recs = generate(sampler, captions, [""] * args.n, seeds, Never(), args.batch_size)
    verdicts = oracle.inspect_batch(images)
    specs = [world.parse_caption(c) for c in captions]

    # 2. negative "X" at every step on the seeds where X appeared unnamed (the first such X of each image)
    jobs = []
    for i, (v, s) in enumerate(zip(verdicts, specs)):
        extra = [o for o in v.objects if o not in s.objects and v.present(o)]
        if extra:
            jobs.append((i, extra[0]))
    neg_images, neg_recs = generate(sampler, [captions[i] for i, _ in jobs], [x for _, x in jobs],
                                    [seeds[i] for i, _ in jobs], Always(), args.batch_size)

    # 3. shares per branch and window
    share_rows = []
    sources = [("positive", "plain", recs, captions), ("empty", "plain", recs, [""] * args.n),
               ("positive", "negative run", neg_recs, [captions[i] for i, _ in jobs]),
               ("negative", "negative run", neg_recs, [x for _, x in jobs])]
    for branch, run, rr, texts in sources:
        for stat, k in (("mass", 0), ("energy", 1)):
            for wname, steps in windows.items():
                per = [shares(r[branch][k], slot_parts(tok, t, n_slots), steps) for r, t in zip(rr, texts) if branch in r]
                if per:
                    share_rows.append({"branch": branch, "run": run, "statistic": stat, "window": wname, "n": len(per),
                                       **{p: float(np.mean([x[p] for x in per])) for p in PARTS}})

    # 4. lifts: a named object word on its own object (plain run), the negative word on X's plain region
    lift_rows = []
    pos_lifts = {w: [] for w in windows}
    for r, v, s in zip(recs, verdicts, specs):
        for o in s.objects:
            if v.present(o) and o in r["positive"][2]:
                for w, steps in windows.items():
                    pos_lifts[w].append(lift(r["positive"][2][o], v.objects[o], steps))
    neg_lifts = {w: [] for w in windows}
    for r, (i, x) in zip(neg_recs, jobs):
        if x in r.get("negative", (None, None, {}))[2]:
            for w, steps in windows.items():
                neg_lifts[w].append(lift(r["negative"][2][x], verdicts[i].objects[x], steps))
    for branch, lifts in (("positive", pos_lifts), ("negative", neg_lifts)):
        for w in windows:
            lift_rows.append({"branch": branch, "window": w, **summarize_lifts(lifts[w])})

    result = {"model": args.model, "n": args.n, "negative_jobs": len(jobs), "steps": sampler.steps,
              "n_calls": sampler.n_calls, "guidance_scale": sampler.guidance_scale, "token_slots": n_slots,
              "hit_lift": HIT_LIFT, "shares": share_rows, "lifts": lift_rows,
              "seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads()}
    print(format_tables(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_tables(r: dict) -> str:
    lines = [f"{r['model']}: n = {r['n']} plain images, {r['negative_jobs']} negative images, {r['steps']} steps "
             f"({r['n_calls']} UNet calls), guidance {r['guidance_scale']}, {r['token_slots']} token slots, "
             f"{r['seconds']} s", "",
             "Share of the cross-attention (mean over images and steps of the window):", "",
             "| branch (run) | statistic | steps | n | " + " | ".join(PARTS) + " |",
             "|---|---|---|---|" + "---|" * len(PARTS)]
    for s in r["shares"]:
        if s["window"] == "all" and s["statistic"] == "energy":
            continue
        lines.append(f"| {s['branch']} ({s['run']}) | {s['statistic']} | {s['window']} | {s['n']} | " +
                     " | ".join(f"{s[p]:.1%}" for p in PARTS) + " |")
    lines += ["", f"Lift of a word's map on its own object (hit: lift >= {r['hit_lift']:g}):", "",
              "| branch | steps | n | hit rate [95 % CI] | q10 | q25 | median | q75 | q90 | mean |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["lifts"]:
        lines.append(f"| {x['branch']} | {x['window']} | {x['n']} | {x['hit_rate']:.1%} [{x['hit_lo']:.1%}, {x['hit_hi']:.1%}] | "
                     f"{x['q10']:.2f} | {x['q25']:.2f} | {x['q50']:.2f} | {x['q75']:.2f} | {x['q90']:.2f} | {x['mean']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
