"""Measured quality of a shapes-world model, read by the exact oracle.

Protocol (all at the sampler's steps and guidance, PNDM 30 steps / 7.5 by default):
1. Captions drawn from the world's own distribution (``sample_scene`` + ``caption``, seed fixed),
   one image per caption, no negative. Scored: caption-exact (every named object present, the
   named background, the named attribute present), strict-exact (also no unnamed object or
   attribute), per-object recall, background accuracy, attribute recall, how often unnamed
   objects / attributes appear.
2. Negative prompts in the paper's setting: for every image of step 1 in which an object X appears
   that the caption does NOT name, the same seed again with negative "X" at every step. Scored:
   removal rate (X absent), survival of the named objects and the background, PSNR outside X's
   region against the image without the negative. Likewise for unnamed attributes.
Rates come with 95 % Wilson intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from negstudy.critical import wilson
from negstudy.records import to_uint8
from negstudy.sampler import Batch, NegativeSampler
from negstudy.schedules import Always, Never
from negstudy.shapes import oracle, world


def psnr_outside(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """PSNR (dB) between uint8 images a and b over the pixels outside ``region`` (bool, (H, W))."""
    keep = ~region
    if not keep.any():
        return float("nan")
    diff = a[keep].astype(np.float64) - b[keep].astype(np.float64)
    mse = float((diff**2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def tally(verdicts, specs) -> tuple[dict[str, tuple[int, int]], list[tuple[int, str]], list[tuple[int, str]]]:
    """Score plain images against their captions' specs (``world.parse_caption``).

    Returns ``{measure: (hits, n)}`` for caption-exact, strict-exact, object recall, background
    right, attribute recall and the unnamed-object / unnamed-attribute rates, and the removal jobs:
    (image index, unnamed object) and (image index, unnamed attribute)."""
    exact = strict = named_total = named_hit = bg_hit = attr_named = attr_hit = unnamed_obj = unnamed_attr = 0
    obj_jobs, attr_jobs = [], []
    for i, (v, s) in enumerate(zip(verdicts, specs)):
        hits = [v.present(o) for o in s.objects]
        named_total += len(hits)
        named_hit += sum(hits)
        bg_ok = v.background == s.background
        bg_hit += bg_ok
        attr_ok = s.attribute is None or v.attribute == s.attribute
        if s.attribute:
            attr_named += 1
            attr_hit += v.attribute == s.attribute
        extra = [o for o in v.objects if o not in s.objects]
        extra_attr = v.attribute is not None and v.attribute != s.attribute
        ok = all(hits) and bg_ok and attr_ok
        exact += ok
        strict += ok and not extra and not extra_attr
        unnamed_obj += bool(extra)
        unnamed_attr += extra_attr
        obj_jobs += [(i, o) for o in extra]
        if extra_attr and s.attribute is None:
            attr_jobs.append((i, v.attribute))
    n = len(specs)
    counts = {
        "caption_exact": (exact, n), "strict_exact": (strict, n), "object_recall": (named_hit, named_total),
        "background_right": (bg_hit, n), "attribute_recall": (attr_hit, attr_named),
        "images_with_unnamed_object": (unnamed_obj, n), "images_with_unnamed_attribute": (unnamed_attr, n),
    }
    return counts, obj_jobs, attr_jobs


def rates(counts: dict[str, tuple[int, int]]) -> dict:
    """``{key, key_lo, key_hi, key_n}`` for every ``key: (hits, n)``: the rate with its 95 % Wilson interval."""
    out = {}
    for key, (k, m) in counts.items():
        out[key], out[key + "_lo"], out[key + "_hi"] = wilson(k, m)
        out[key + "_n"] = m
    return out


def score_images(images: np.ndarray, captions: list[str]) -> dict:
    """The plain-image rates of :func:`measure` (with intervals) for given images and their captions."""
    counts, _, _ = tally(oracle.inspect_batch(images), [world.parse_caption(c) for c in captions])
    return rates(counts)


@dataclass
class Generated:
    captions: list[str]
    seeds: list[int]
    images: np.ndarray  # uint8 (N, 32, 32, 3)


def _generate(sampler: NegativeSampler, captions, negatives, seeds, schedule, batch_size, progress=None):
    plan = schedule.plan(sampler.n_calls)
    out = []
    for i in range(0, len(captions), batch_size):
        sl = slice(i, i + batch_size)
        batch = Batch(list(captions[sl]), list(negatives[sl]), list(seeds[sl]), [plan] * len(captions[sl]))
        out.append(to_uint8(sampler.generate(batch)))
        if progress:
            progress.update(len(captions[sl]))
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)


def measure(sampler: NegativeSampler, n: int = 256, seed: int = 0, batch_size: int = 64, progress: bool = True,
            clip=None, negatives: tuple[str, ...] = ("object", "attribute")) -> dict:
    """Run the protocol above on ``n`` captions; return a flat dict of measured numbers.

    ``negatives``: the kinds of unnamed concept whose removal is measured (``("object",)`` skips the
    attribute negatives' images: a guard of the object rates only).

    ``clip``: a shapes-world ``ClipEvaluator`` (the shipped shapes CLIP) that reads the same images a
    second time: ``clip_*`` keys for object recall, unnamed objects, removal of the oracle's unnamed
    objects, and its per-object agreement with the oracle."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    captions = [world.caption(world.sample_scene(rng)) for _ in range(n)]
    seeds = [seed * 100_000 + i for i in range(n)]
    bar = tqdm(total=n, desc="plain", disable=not progress)
    images = _generate(sampler, captions, [""] * n, seeds, Never(), batch_size, bar)
    bar.close()
    verdicts = oracle.inspect_batch(images)
    specs = [world.parse_caption(c) for c in captions]

    counts, obj_jobs, attr_jobs = tally(verdicts, specs)
    result = {"n": n, "steps": sampler.steps, "n_calls": sampler.n_calls, "guidance_scale": sampler.guidance_scale}
    result.update(rates(counts))
    clip_found = clip.objects(images, world.OBJECT_NAMES) if clip is not None else None
    if clip_found is not None:
        named = [(f, o) for f, sp in zip(clip_found, specs) for o in sp.objects]
        agree = [(o in f) == v.present(o) for f, v in zip(clip_found, verdicts) for o in world.OBJECT_NAMES]
        result.update(rates({
            "clip_object_recall": (sum(o in f for f, o in named), len(named)),
            "clip_images_with_unnamed_object": (sum(any(o not in sp.objects for o in f) for f, sp in zip(clip_found, specs)), n),
            "clip_oracle_object_agreement": (sum(agree), len(agree)),
        }))

    # negative "X" at every step, on the seeds where X appeared unnamed
    for kind, jobs in (("object", obj_jobs), ("attribute", attr_jobs)):
        if not jobs or kind not in negatives:
            continue
        idx = [i for i, _ in jobs]
        bar = tqdm(total=len(jobs), desc=f"negative {kind}", disable=not progress)
        neg_images = _generate(sampler, [captions[i] for i in idx], [c for _, c in jobs], [seeds[i] for i in idx],
                               Always(), batch_size, bar)
        bar.close()
        neg_verdicts = oracle.inspect_batch(neg_images)
        removed = kept_named = kept_bg = 0
        psnrs = []
        for (i, concept), img, v in zip(jobs, neg_images, neg_verdicts):
            s = specs[i]
            gone = not v.present(concept) if kind == "object" else v.attribute != concept
            removed += gone
            kept_named += all(v.present(o) for o in s.objects)
            kept_bg += v.background == verdicts[i].background
            if kind == "object":
                region = verdicts[i].objects[concept] | v.objects.get(concept, np.zeros_like(verdicts[i].objects[concept]))
                psnrs.append(psnr_outside(images[i], img, region))
        m = len(jobs)
        if kind == "object" and clip is not None:
            gone_clip = [c not in f for (_, c), f in zip(jobs, clip.objects(neg_images, world.OBJECT_NAMES))]
            result.update(rates({"clip_object_removal": (sum(gone_clip), m)}))
        for key, k in ((f"{kind}_removal", removed), (f"{kind}_named_kept", kept_named), (f"{kind}_background_kept", kept_bg)):
            result[key], result[key + "_lo"], result[key + "_hi"] = wilson(k, m)
            result[key + "_n"] = m
        if psnrs:
            finite = np.array([p for p in psnrs if np.isfinite(p)])
            result["object_psnr_outside_median"] = float(np.median(finite)) if len(finite) else float("inf")
            result["object_psnr_outside_mean"] = float(finite.mean()) if len(finite) else float("inf")
    return result


def format_report(r: dict) -> str:
    """A Markdown table of :func:`measure`'s result."""
    lines = [f"n = {r['n']} captions, {r['steps']} steps ({r['n_calls']} UNet calls), guidance {r['guidance_scale']}", "",
             "| measure | rate | 95 % CI | n |", "|---|---|---|---|"]
    for key in ("caption_exact", "strict_exact", "object_recall", "background_right", "attribute_recall",
                "images_with_unnamed_object", "images_with_unnamed_attribute", "object_removal", "object_named_kept",
                "object_background_kept", "attribute_removal", "attribute_named_kept", "attribute_background_kept",
                "clip_object_recall", "clip_images_with_unnamed_object", "clip_object_removal",
                "clip_oracle_object_agreement"):
        if key in r:
            lines.append(f"| {key} | {r[key]:.1%} | {r[key + '_lo']:.1%} - {r[key + '_hi']:.1%} | {r[key + '_n']} |")
    if "object_psnr_outside_median" in r:
        lines.append(f"| PSNR outside the removed object (median / mean, dB) | {r['object_psnr_outside_median']:.1f} / "
                     f"{r['object_psnr_outside_mean']:.1f} | | {r['object_removal_n']} |")
    return "\n".join(lines)
