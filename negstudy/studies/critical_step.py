"""The critical-step study (PAPER.md section 3): when does a negative prompt start to act?

Per prompt pair (object or attribute negative), on any model, read by any evaluator
(:mod:`negstudy.evaluators.reader`):

1. screen (``sweep.screen=true``, negstudy's protocol, the default): seeds
   ``0..sweep.screen_seeds-1`` without the negative; the study's reader says in which the
   negative's concept (an object the caption does not name, or a global attribute) appears; seeds
   where it is unsure are counted (``screen.unsure``) and never swept. The screened image is the
   plain image (k = n_calls) of the sweep, and its trajectory's state (x_t and the scheduler's past
   predictions) is kept at every delayed start step.
   ``sweep.screen=false`` is the paper's protocol: every seed of ``seeds`` (the paper: 10 fixed
   seeds) of every pair is swept, drawn or not; with ``evaluator=none`` nothing is read and only
   the strength ratio (Figure 3) and its critical step are measured (no plain image, no delayed
   start: their only use is the removal table, which needs a reader);
2. sweep: k = 0 (the ratio and the attention) for up to ``sweep.ratio_seeds`` seeds where it
   appears (default and at least ``sweep.max_seeds``; padded with other seeds, up to
   ``sweep.min_seeds``, for the attention curves only); for the first ``sweep.max_seeds`` of them
   (and the padding) the delayed negative from every start step
   k = stride, 2 stride, ... CONTINUES the screened trajectory from step k (the prefix is not
   recomputed; the images equal fresh runs, bit for bit with fixed rows), and k = 0 runs with
   cross-attention recorded in both branches: ordinary negative prompting, whose curves give the
   strength ratio (Figure 3) and the negative word's attention mass inside the concept's region
   (Figures 1/4). Images of several (pair, seed) share each UNet batch (``batch_size`` images); the
   delayed starts fill batches in start-step order, each image joining its call at its own step.
   UNet rows per (pair, seed): 2 n_calls to screen, 2 (n_calls - k) per start k < n_calls;
3. tables: ``removal.parquet`` (pair, seed, start step, concept still present), ``ratio.parquet``
   (pair, seed, step, variant, ratio; ``padding``: a seed without the concept added up to
   ``sweep.min_seeds``, which no category pools), ``attention.parquet`` (pair, seed, step, the negative word's
   mass in the concept's region in the negative branch, and the positive word's mass in ITS object's
   region in the positive branch, where the prompt's first object is surely present; regions are
   pooled onto the attention grid (latents), so SD's 64x64 maps meet a 512x512 detector box);
   ``reader_limits.parquet`` says what the reader could not measure (no region from CLIP or the
   judge: no attention table and no PSNR outside the object; OWLv2 judges no attribute). The
   report (:mod:`negstudy.report`) turns them into critical steps with confidence intervals.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from negstudy.attention import AttentionRecorder, mask_on_grid, mass_in_mask
from negstudy.datasets import pairs_of
from negstudy.figures import positive_word_of, save_word_maps
from negstudy.records import save_png, slug, to_uint8, write_table
from negstudy.studies import StudyReport, Summary, note_limits, reader_for, screen_without_negative
from negstudy.sampler import Batch, NegativeSampler, UNetRows
from negstudy.schedules import FromStep
from negstudy.evaluators.reader import require_reader
from negstudy.shapes.quality import psnr_outside

log = logging.getLogger("negstudy")


def _chunks(items: list, size: int):
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + size]


NEEDS = {"presence": "the seed screen and removal against the start step",
         "regions": "the attention lag (the words' mass on their objects) and PSNR outside the object",
         "attributes": "attribute pairs under the screened protocol (sweep.screen=false sweeps them unread)"}


def prepare(cfg: DictConfig, world: str | None) -> dict:
    """The reader, built before the model loads; the screened protocol needs one (``evaluator=none``
    runs with ``sweep.screen=false``, the paper's protocol)."""
    reader = reader_for(cfg, world)
    if cfg.sweep.get("screen", True):
        require_reader(cfg, reader, "screen seeds where the concept appears (or sweep.screen=false: the paper's "
                                    "protocol, every seed, the ratio needs no reader)")
    return {"reader": reader}


def run(cfg: DictConfig, sampler: NegativeSampler, out_dir: Path, reader=None) -> dict[str, pd.DataFrame]:
    sw = cfg.sweep
    n = sampler.n_calls
    screen_on = bool(sw.get("screen", True))
    starts = list(range(0, n, sw.stride)) + [n]  # k = n: the negative never applies
    pairs = pairs_of(cfg.dataset)
    categories = [p.category for p in pairs]
    if screen_on:
        require_reader(cfg, reader, "screen seeds (or sweep.screen=false)")
    note_limits(out_dir, "critical_step", reader, NEEDS, categories)
    if reader is None:
        starts = [0]  # the paper's protocol without a reader: ordinary negative prompting, attention recorded
    delayed = [k for k in starts if 0 < k < n]  # continued from the screened trajectory at step k
    seeds = list(range(sw.screen_seeds)) if screen_on else [int(s) for s in cfg.seeds]
    maps_kind = OmegaConf.select(cfg, "attention.maps", default="negstudy")  # daam: the author's maps as well
    reader_name = reader.name if reader is not None else "none"
    name = lambda p, seed: f"{p:02d}_{slug(pairs[p].prompt)}_neg-{slug(pairs[p].negative, 20)}_s{seed}"

    # 1. screen: which seeds show the concept without the negative. Each screened image is the
    #    plain image (k = n) of its sweep, and its trajectory's state at every delayed start is kept,
    #    so the sweep recomputes no prefix (same images as fresh runs: tests/test_prefix_reuse.py).
    #    Without a reader nothing is screened: every seed is swept at k = 0 only
    found: dict[int, list[tuple[int, bool | None]]] = {p: [] for p in range(len(pairs))}
    plain, states = {}, {}
    items = [(p, seed) for p in range(len(pairs)) for seed in seeds]
    chunk = max(1, cfg.batch_size)
    counts = {phase: UNetRows(sampler) for phase in ("screen", "k = 0", "delayed starts")}
    if reader is not None:  # pairs that share a prompt share its screen images (one per seed)
        with counts["screen"]:
            results = screen_without_negative(sampler, reader, [pairs[p].prompt for p, _ in items],
                                              [pairs[p].negative for p, _ in items], [categories[p] for p, _ in items],
                                              [seed for _, seed in items], chunk, keep=delayed,
                                              words=[positive_word_of(pairs[p].prompt) for p, _ in items])
    else:
        results = [None] * len(items)
    for (p, seed), s in zip(items, results):
        found[p].append((seed, s.present if s is not None else None))
        plain[(p, seed)] = (s.image, s.present, s.region, s.word_region) if s is not None else (None, None, None, None)
        states[(p, seed)] = s.states if s is not None else {}
    ratio_seeds = max(int(sw.max_seeds), int(sw.get("ratio_seeds") or 0))
    screened = {}
    for p, pair_seeds in found.items():
        if screen_on:
            present = [s for s, ok in pair_seeds if ok][:ratio_seeds]
            padding = [s for s, ok in pair_seeds if ok is False][: max(0, sw.min_seeds - len(present))]
        else:  # the paper's protocol: every seed, drawn or not
            present, padding = [s for s, _ in pair_seeds], []
        screened[p] = (present, padding, sum(ok is True for _, ok in pair_seeds), sum(ok is None for _, ok in pair_seeds))
    # k = 0 (ratio, attention) on up to ratio_seeds present seeds a pair; every start step on the first max_seeds
    jobs = [(p, seed) for p in screened for seed in screened[p][0] + screened[p][1]]
    swept = [(p, seed) for p in screened for seed in screened[p][0][: sw.max_seeds] + screened[p][1]]
    states = {key: states[key] for key in swept}  # the other screened images' snapshots are freed
    plain = {key: plain[key] for key in jobs}

    # 2. the start-step sweep. k = 0 (ordinary negative prompting) with cross-attention recorded in
    #    both branches, batched over (pair, seed); each delayed start k continues the screened
    #    trajectories from step k, one batch per k; k = n is the screened image itself
    images_of: dict[tuple[int, int], dict[int, np.ndarray]] = {key: {n: plain[key][0]} for key in jobs if plain[key][0] is not None}
    images_of.update({key: {} for key in jobs if key not in images_of})
    ratio_rows: dict[tuple[int, int], list[dict]] = {}
    attention_rows: dict[tuple[int, int], list[dict]] = {}
    bar = tqdm(total=len(jobs) + len(swept) * len(delayed), desc="start-step sweep", unit="img")
    for part in _chunks(jobs, cfg.batch_size):
        words = sorted({w for p, _ in part for w in (pairs[p].negative, positive_word_of(pairs[p].prompt))})
        recorder = AttentionRecorder(sampler.unet, layers=sw.layers, words=words, maps=maps_kind)
        batch = Batch([pairs[p].prompt for p, _ in part], [pairs[p].negative for p, _ in part],
                      [seed for _, seed in part], [FromStep(0).plan(n)] * len(part))
        with counts["k = 0"]:
            images = to_uint8(sampler.generate(batch, [recorder]))
        strength = pd.concat([recorder.strength(v).assign(variant=v) for v in recorder.variants()])
        for j, (p, seed) in enumerate(part):
            pair, (_, plain_present, region, pos_region) = pairs[p], plain[(p, seed)]
            images_of[(p, seed)][0] = images[j]
            grid = mask_on_grid(region, recorder.size) if region is not None else None  # pixels -> the maps' grid
            if cfg.save_images:
                save_word_maps(recorder, j, pair.prompt, pair.negative, grid,  # the report's attention grids
                               out_dir / "maps" / f"{name(p, seed)}.npz")
            ratio_rows[(p, seed)] = [
                {"pair": p, "negative": pair.negative, "category": pair.category, "seed": seed,
                 "present_without_negative": plain_present, "padding": seed in screened[p][1],
                 "step": row.step, "variant": row.variant, "ratio": row.ratio}
                for row in strength[strength.image == j].itertuples()]
            rows = attention_rows[(p, seed)] = []
            if grid is not None and grid.any():
                maps = recorder.maps(j, "negative", pair.negative).float().numpy()
                word = positive_word_of(pair.prompt)
                pos_grid = mask_on_grid(pos_region, recorder.size) if pos_region is not None else None
                pos_grid = pos_grid if pos_grid is not None and pos_grid.any() else None
                pos_maps = recorder.maps(j, "positive", word).float().numpy() if pos_grid is not None else None
                for step, heat in enumerate(maps):
                    rows.append({"pair": p, "negative": pair.negative, "category": pair.category, "seed": seed,
                                 "step": step, "mass_in_region": mass_in_mask(heat, grid),
                                 "region_fraction": float(grid.mean()), "positive_word": word,
                                 "positive_mass_in_region": mass_in_mask(pos_maps[step], pos_grid) if pos_grid is not None else np.nan,
                                 "positive_region_fraction": float(pos_grid.mean()) if pos_grid is not None else np.nan})
                if maps_kind == "daam":  # the author's maps beside negstudy's (negstudy.attention)
                    daam = recorder.maps(j, "negative", pair.negative, kind="daam").float().numpy()
                    for row, heat in zip(rows, daam):
                        row["mass_in_region_daam"] = mass_in_mask(heat, grid)
        bar.update(len(part))
    # every (start step, pair-seed) in start-step order, batch_size images a call: a call's images of a later
    # start join its loop at their step, so no call pads a few leftover images of one start to a row block
    plans = {k: FromStep(k).plan(n) for k in delayed}
    for part in _chunks([(k, key) for k in delayed for key in swept], cfg.batch_size):
        batch = Batch([pairs[p].prompt for _, (p, _) in part], [pairs[p].negative for _, (p, _) in part],
                      [seed for _, (_, seed) in part], [plans[k] for k, _ in part],
                      resume=[states[key][k] for k, key in part])
        with counts["delayed starts"]:
            images = to_uint8(sampler.generate(batch))
        for (k, key), image in zip(part, images):
            images_of[key][k] = image
        bar.update(len(part))
    bar.close()
    log.info("UNet rows: %s (computed in blocks of %d rows: %d)", ", ".join(f"{k} {c.rows}" for k, c in counts.items()),
             sampler.fixed_rows, sum(c.padded for c in counts.values()))

    # 3. tables, per (pair, seed) in the screen's order
    removal, ratios, attention = [], [], []
    in_sweep = set(swept)
    for p, seed in jobs:
        pair, (_, plain_present, region, _) = pairs[p], plain[(p, seed)]
        ks = [k for k in starts if k in images_of[(p, seed)]]  # every start where swept; else k = 0 and the plain image
        images = np.stack([images_of[(p, seed)][k] for k in ks])
        if reader is not None and (p, seed) in in_sweep:  # removal against k: the swept pair-seeds, every k
            looks = reader.look(images, [pair.negative] * len(ks), [pair.category] * len(ks))
            for k, image, look in zip(ks, images, looks):
                removal.append({
                    "pair": p, "prompt": pair.prompt, "negative": pair.negative, "category": pair.category, "seed": seed,
                    "present_without_negative": plain_present, "start_step": k, "concept_present": look.present,
                    "psnr_outside": psnr_outside(images[-1], image, region) if region is not None else np.nan,
                })
        if cfg.save_images:
            save_png(np.concatenate(list(images), axis=1), out_dir / "strips" / f"{name(p, seed)}.png",
                     {"prompt": pair.prompt, "negative": pair.negative, "seed": seed, "start_steps": ks})
        ratios += ratio_rows[(p, seed)]
        attention += attention_rows[(p, seed)]
    screen = pd.DataFrame([{"pair": p, "prompt": pairs[p].prompt, "negative": pairs[p].negative,
                            "category": pairs[p].category, "screened": len(seeds) if reader is not None else 0,
                            "present": screened[p][2], "unsure": screened[p][3] if reader is not None else 0,
                            "reader": reader_name, "protocol": "screened" if screen_on else "paper"}
                           for p in screened])
    tables = {"screen": screen, "removal": pd.DataFrame(removal), "ratio": pd.DataFrame(ratios),
              "attention": pd.DataFrame(attention)}
    for name, frame in tables.items():
        write_table(frame, out_dir / f"{name}.parquet")
    return tables


def summarise(tables: dict[str, pd.DataFrame], out: Path, variant: str) -> Summary:
    """Critical steps (strength ratio and attention) and removal against the start step, pooled over jobs."""
    from negstudy.tables import _figure_ratio, _figure_removal, _png, critical_steps, critical_table, removal_vs_start

    ratio, removal, attention, screen = (tables[k] for k in ("ratio", "removal", "attention", "screen"))
    crit = critical_steps(ratio, attention, variant, screen=screen) if not ratio.empty else pd.DataFrame()
    summary = Summary(page={"ratio": ratio, "removal": removal, "crit": crit, "screen": screen})
    if not crit.empty:
        write_table(crit, out / "critical_steps.parquet")
        crit.to_csv(out / "critical_steps.csv", index=False)
        summary.figures["ratio"] = _png(_figure_ratio(ratio, crit, variant), out / "ratio_curves.png")
        summary.sections.append(("Critical steps", critical_table(crit)))
    rem = removal_vs_start(removal) if not removal.empty else pd.DataFrame()
    if not rem.empty:
        rem.to_csv(out / "removal_vs_start.csv", index=False)
        summary.figures["removal"] = _png(_figure_removal(rem), out / "removal_vs_start.png")
        summary.sections.append(("Removal against start step", rem))
    return summary


def _step(x) -> str:
    return "never" if x is None or pd.isna(x) else str(int(x))


def lines(out: Path) -> list[str]:
    """One line per category: the critical step with its CI, and where attention finds the concept."""
    from negstudy.critical import HIT_LIFT

    path = Path(out) / "critical_steps.parquet"
    if not path.exists():
        return []
    crit = pd.read_parquet(path)
    found = []
    for row in crit[crit.level == "category"].itertuples():
        line = (f"critical step, {row.category} negatives: {_step(row.critical_step)} "
                f"(95 % CI {_step(row.ci_low)}..{_step(row.ci_high)}, {row.n_pairs} pairs x {row.n_pair_seeds} pair-seeds, "
                f"rule {row.rule}, peak ratio {row.peak_ratio:.3f})")
        if "attention_step_mean" in crit and pd.notna(row.attention_step_mean):
            line += f"; the negative word's attention reaches the concept's region at step {row.attention_step_mean:.1f} on average"
        elif "attention_n" in crit and row.attention_n > 0:
            line += (f"; the negative word's attention never concentrates on the concept's region "
                     f"(lift >= {HIT_LIFT:g}) in {int(row.attention_n)} pair-seeds")
        found.append(line)
    measured = set(crit[crit.level == "category"].category)
    for category, rows in crit[crit.level == "pair"].groupby("category"):
        if category not in measured:  # every pair of it on the screen's padding
            found.append(f"critical step, {category} negatives: not measured (no seed where the concept was drawn; "
                         f"{len(rows)} pair{'s' if len(rows) != 1 else ''} on the screen's padding only)")
    return found


def track(tracker, tables: dict[str, pd.DataFrame], out_dir: Path, cfg: DictConfig) -> None:
    """W&B: the mean strength-ratio curve per category, and each category's critical step."""
    ratio = tables.get("ratio")
    if ratio is not None and not ratio.empty:
        from negstudy.tables import drawn

        curves = (drawn(ratio[ratio.variant == cfg.sweep.variant]).groupby(["step", "category"]).ratio.mean()
                  .unstack("category").add_prefix("ratio/").reset_index())
        tracker.curves(curves, "step", [c for c in curves if c != "step"])
    crit = Path(out_dir) / "report" / "critical_steps.parquet"
    if crit.exists():
        c = pd.read_parquet(crit)
        tracker.summary(**{f"critical_step/{r.category}": (None if pd.isna(r.critical_step) else int(r.critical_step))
                           for r in c[c.level == "category"].itertuples()})


REPORT = StudyReport(tables=("ratio", "removal", "attention", "screen"), summarise=summarise, lines=lines, track=track)
