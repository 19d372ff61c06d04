"""Attention grids (the paper's Figures 1 and 4), with "the right place" decided automatically.

Per prompt pair (object negatives) and seed among ``cfg.seeds``: one trajectory with the negative at
every step and cross-attention recorded in both branches, and the same seed without the negative,
whose oracle mask of the object is the reference region; per window of ``sweep.stride`` steps the
mass of each word's window-mean map inside that region. Writes ``grids/*.png`` (rows: the
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
from negstudy.studies import StudyReport, Summary, shapes_only



def run(cfg: DictConfig, sampler: NegativeSampler, out_dir: Path) -> dict[str, pd.DataFrame]:
    pairs = [p for p in pairs_of(cfg.dataset) if p.category == "object"]
    tables = []
    jobs = [(i, pair, int(seed)) for i, pair in enumerate(pairs) for seed in cfg.seeds]
    for i, pair, seed in tqdm(jobs, desc="attention grids", unit="grid"):
        fig, table = figures.attention_grid_for(sampler, pair.prompt, pair.negative, seed, window=cfg.sweep.stride)
        figures.save(fig, out_dir / "grids" / f"{i:02d}_{slug(pair.prompt)}_neg-{slug(pair.negative, 20)}_s{seed}.png")
        tables.append(table.assign(pair=i, prompt=pair.prompt, negative=pair.negative, seed=seed))
    frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    write_table(frame.drop(columns="heat", errors="ignore"), out_dir / "attention_windows.parquet")
    return {"attention_windows": frame.drop(columns="heat", errors="ignore"), "heatmaps": frame}


prepare = shapes_only  # the grids' regions come from the shapes oracle


def track(tracker, tables: dict[str, pd.DataFrame], out_dir: Path, cfg) -> None:
    """W&B: the attention heat maps as an image table."""
    heat = tables.get("heatmaps")
    if heat is not None and not heat.empty:
        tracker.image_table("attention_heatmaps", heat, ["heat"])


# the grids are PNGs below the job, which the report shows as they are
REPORT = StudyReport(tables=("attention_windows",), summarise=lambda tables, out, variant: Summary(), track=track)

