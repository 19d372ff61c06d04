"""The critical-step study (PAPER.md section 3): when does a negative prompt start to act?

Per prompt pair (object or attribute negative):
1. screen: seeds ``0..sweep.screen_seeds-1`` without the negative; the oracle says in which the
   negative's concept (an object the caption does not name, or a global attribute) appears;
2. sweep: for up to ``sweep.max_seeds`` seeds where it appears (padded with other seeds, up to
   ``sweep.min_seeds``, for the attention curves only), ONE shared-prefix batch holds the delayed
   negative from every start step k = 0, stride, 2 stride, ... and the plain image (k = n_calls).
   Cross-attention is recorded in both branches; the k = 0 image is ordinary negative prompting,
   whose curves give the strength ratio (Figure 3) and the negative word's attention mass inside
   the concept's region (Figures 1/4);
3. tables: ``removal.parquet`` (pair, seed, start step, concept still present), ``ratio.parquet``
   (pair, seed, step, variant, ratio), ``attention.parquet`` (pair, seed, step, mass in region);
   the report (:mod:`negstudy.report`) turns them into critical steps with confidence intervals.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from negstudy.attention import AttentionRecorder, mass_in_mask
from negstudy.datasets import pairs_of
from negstudy.figures import positive_word_of, save_word_maps
from negstudy.records import save_png, slug, to_uint8, write_table
from negstudy.sampler import Batch, NegativeSampler
from negstudy.schedules import FromStep, Never
from negstudy.shapes import oracle, world
from negstudy.shapes.quality import psnr_outside

log = logging.getLogger("negstudy")


def concept_present(verdict, negative: str) -> tuple[bool, np.ndarray | None]:
    """Whether the negative's concept is in the image, and its region (object mask) if any."""
    spec = world.parse_caption(negative)
    if spec.objects:
        masks = [verdict.objects[o] for o in spec.objects if verdict.present(o)]
        return bool(masks), (np.logical_or.reduce(masks) if masks else None)
    if spec.attribute:
        return verdict.attribute == spec.attribute, None
    raise ValueError(f"negative prompt {negative!r} names no object or attribute of the shapes world")


def run(cfg: DictConfig, sampler: NegativeSampler, out_dir: Path) -> dict[str, pd.DataFrame]:
    sw = cfg.sweep
    n = sampler.n_calls
    starts = list(range(0, n, sw.stride)) + [n]  # k = n: the negative never applies
    plans = [FromStep(k).plan(n) for k in starts]
    pairs = pairs_of(cfg.dataset)
    screen_seeds = list(range(sw.screen_seeds))
    maps_kind = OmegaConf.select(cfg, "attention.maps", default="negstudy")  # daam: the author's maps as well

    # 1. screen: which seeds show the concept without the negative
    screened = {}
    bar = tqdm(total=len(pairs) * len(screen_seeds), desc="screen (no negative)", unit="img")
    for p, pair in enumerate(pairs):
        found = []
        for i in range(0, len(screen_seeds), cfg.batch_size):
            seeds = screen_seeds[i : i + cfg.batch_size]
            never = Never().plan(n)
            images = to_uint8(sampler.generate(Batch([pair.prompt] * len(seeds), [pair.negative] * len(seeds), seeds, [never] * len(seeds))))
            for seed, verdict in zip(seeds, oracle.inspect_batch(images)):
                found.append((seed, concept_present(verdict, pair.negative)[0]))
            bar.update(len(seeds))
        present = [s for s, ok in found if ok][: sw.max_seeds]
        padding = [s for s, ok in found if not ok][: max(0, sw.min_seeds - len(present))]
        screened[p] = (present, padding, sum(ok for _, ok in found))
    bar.close()

    # 2. the start-step sweep with attention, one shared-prefix batch per (pair, seed)
    removal, ratios, attention = [], [], []
    jobs = [(p, seed, seed in screened[p][0]) for p in screened for seed in screened[p][0] + screened[p][1]]
    for p, seed, present in tqdm(jobs, desc="start-step sweep", unit="pair-seed"):
        pair = pairs[p]
        m = len(plans)
        recorder = AttentionRecorder(sampler.unet, layers=sw.layers, words=[pair.negative, positive_word_of(pair.prompt)], maps=maps_kind)
        batch = Batch([pair.prompt] * m, [pair.negative] * m, [seed] * m, plans)
        images = to_uint8(sampler.generate(batch, [recorder]))
        verdicts = oracle.inspect_batch(images)
        plain_present, region = concept_present(verdicts[-1], pair.negative)
        for k, image, verdict in zip(starts, images, verdicts):
            still, _ = concept_present(verdict, pair.negative)
            removal.append({
                "pair": p, "prompt": pair.prompt, "negative": pair.negative, "category": pair.category, "seed": seed,
                "present_without_negative": plain_present, "start_step": k, "concept_present": still,
                "psnr_outside": psnr_outside(images[-1], image, region) if region is not None else np.nan,
            })
        if cfg.save_images:
            save_png(np.concatenate(list(images), axis=1), out_dir / "strips" / f"{p:02d}_{slug(pair.prompt)}_neg-{slug(pair.negative, 20)}_s{seed}.png",
                     {"prompt": pair.prompt, "negative": pair.negative, "seed": seed, "start_steps": starts})
            save_word_maps(recorder, 0, pair.prompt, pair.negative, region,  # the report's attention grids
                           out_dir / "maps" / f"{p:02d}_{slug(pair.prompt)}_neg-{slug(pair.negative, 20)}_s{seed}.npz")
        strength = pd.concat([recorder.strength(v).assign(variant=v) for v in recorder.variants()])
        strength = strength[strength.image == 0]  # k = 0: the negative at every step
        for row in strength.itertuples():
            ratios.append({"pair": p, "negative": pair.negative, "category": pair.category, "seed": seed,
                           "present_without_negative": plain_present, "step": row.step, "variant": row.variant,
                           "ratio": row.ratio})
        if region is not None:
            maps = recorder.maps(0, "negative", pair.negative).float().numpy()
            for step, heat in enumerate(maps):
                attention.append({"pair": p, "negative": pair.negative, "category": pair.category, "seed": seed,
                                  "step": step, "mass_in_region": mass_in_mask(heat, region),
                                  "region_fraction": float(region.mean())})
            if maps_kind == "daam":  # the author's maps beside negstudy's (negstudy.attention)
                daam = recorder.maps(0, "negative", pair.negative, kind="daam").float().numpy()
                for row, heat in zip(attention[len(attention) - len(maps):], daam):
                    row["mass_in_region_daam"] = mass_in_mask(heat, region)
    screen = pd.DataFrame([{"pair": p, "prompt": pairs[p].prompt, "negative": pairs[p].negative,
                            "category": pairs[p].category, "screened": len(screen_seeds), "present": screened[p][2]}
                           for p in screened])
    tables = {"screen": screen, "removal": pd.DataFrame(removal), "ratio": pd.DataFrame(ratios),
              "attention": pd.DataFrame(attention)}
    for name, frame in tables.items():
        write_table(frame, out_dir / f"{name}.parquet")
    return tables
