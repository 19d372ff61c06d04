"""Attention grids (the paper's Figures 1 and 4), with "the right place" decided automatically.

Per prompt pair (object negatives) and seed among ``cfg.seeds``: one trajectory with the negative at
every step and cross-attention recorded in both branches, and the same seed without the negative,
whose oracle mask of the object is the reference region; per window of ``sweep.stride`` steps the
mass of each word's window-mean map inside that region. Any model: the region comes from the
study's reader (:mod:`negstudy.evaluators.reader`); a reader that does not locate (CLIP, a judge)
or ``evaluator=none`` gives the grids without a region and without a boxed window. Writes ``grids/*.png`` (rows: the
positive word, the negative word; columns: step windows; the first window whose negative-branch
map puts twice a uniform map's mass on the region boxed: the attention hit rule of negstudy.critical) and ``attention_windows.parquet``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from negstudy import figures
from negstudy.datasets import pairs_of
from negstudy.records import slug, write_table
from negstudy.sampler import NegativeSampler
from negstudy.evaluators.reader import Unread
from negstudy.studies import StudyReport, Summary, note_limits, reader_for


def prepare(cfg: DictConfig, world: str | None) -> dict:
    return {"reader": reader_for(cfg, world)}


def run(cfg: DictConfig, sampler: NegativeSampler, out_dir: Path, reader=None) -> dict[str, pd.DataFrame]:
    note_limits(out_dir, "attention_maps", reader, {"regions": "the object's region and the boxed hit window"}, ("object",))
    reader = reader or Unread()  # evaluator=none: the grids without a region
    pairs = [p for p in pairs_of(cfg.dataset) if p.category == "object"]
    tables = []
    jobs = [(i, pair, int(seed)) for i, pair in enumerate(pairs) for seed in cfg.seeds]
    for i, pair, seed in tqdm(jobs, desc="attention grids", unit="grid"):
        fig, table = figures.attention_grid_for(sampler, pair.prompt, pair.negative, seed, window=cfg.sweep.stride, reader=reader)
        figures.save(fig, out_dir / "grids" / f"{i:02d}_{slug(pair.prompt)}_neg-{slug(pair.negative, 20)}_s{seed}.png")
        tables.append(table.assign(pair=i, prompt=pair.prompt, negative=pair.negative, seed=seed))
    frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    write_table(frame.drop(columns="heat", errors="ignore"), out_dir / "attention_windows.parquet")
    return {"attention_windows": frame.drop(columns="heat", errors="ignore"), "heatmaps": frame}


def track(tracker, tables: dict[str, pd.DataFrame], out_dir: Path, cfg) -> None:
    """W&B: the attention heat maps as an image table."""
    heat = tables.get("heatmaps")
    if heat is not None and not heat.empty:
        tracker.image_table("attention_heatmaps", heat, ["heat"])


# the grids are PNGs below the job, which the report shows as they are
REPORT = StudyReport(tables=("attention_windows",), summarise=lambda tables, out, variant: Summary(), track=track)

