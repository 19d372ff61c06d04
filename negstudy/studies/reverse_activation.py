"""Reverse activation (PAPER.md section 4): a negative prompt applied only in the first k steps can
CREATE the object it names. negstudy counts it instead of showing it.

Per prompt pair: the seeds ``0..sweep.screen_seeds-1`` where the negative's object surely does NOT
appear without the negative (the study's reader, :mod:`negstudy.evaluators.reader`: any evaluator
that says whether an object is in an image, on any model; seeds where it is unsure are counted in
``reverse_screen`` and left out), up to ``sweep.max_seeds``
of them; for each, ONE shared-prefix batch of ``first_k(k)`` for k = 0, stride, 2 stride, ..., n_calls (k = 0 is the plain image, k = n_calls
ordinary negative prompting). ``reverse.parquet``: pair, seed, k, whether the object appears
(True / False, missing where the reader is unsure: counted, never guessed).
The report gives, per k, the rate at which it appears, with 95 % intervals (pairs, then seeds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from negstudy.datasets import pairs_of
from negstudy.records import save_png, slug, to_uint8, write_table
from negstudy.sampler import Batch, NegativeSampler
from negstudy.schedules import FirstK
from negstudy.evaluators.reader import require_reader
from negstudy.studies import StudyReport, Summary, note_limits, reader_for, screen_without_negative

WHAT = "say whether the negative's object appears"


def prepare(cfg: DictConfig, world: str | None) -> dict:
    """Any model; the reader (built before the model loads) is required: the study counts appearances."""
    return {"reader": require_reader(cfg, reader_for(cfg, world), WHAT)}


def run(cfg: DictConfig, sampler: NegativeSampler, out_dir: Path, reader=None) -> dict[str, pd.DataFrame]:
    require_reader(cfg, reader, WHAT)
    note_limits(out_dir, "reverse_activation", reader, {"presence": "the appearance counts"}, ("object",))
    sw = cfg.sweep
    n = sampler.n_calls
    ks = list(range(0, n, sw.stride)) + [n]
    plans = [FirstK(k).plan(n) for k in ks]
    pairs = [p for p in pairs_of(cfg.dataset) if p.category == "object"]
    rows, screen = [], []
    for p, pair in enumerate(tqdm(pairs, desc="pairs", unit="pair")):
        seeds = list(range(sw.screen_seeds))
        screened = screen_without_negative(sampler, reader, [pair.prompt] * len(seeds), [pair.negative] * len(seeds),
                                           ["object"] * len(seeds), seeds, len(seeds))
        states = [s.present for s in screened]
        absent = [s for s, state in zip(seeds, states) if state is False]
        screen.append({"pair": p, "prompt": pair.prompt, "negative": pair.negative, "screened": len(seeds), "absent": len(absent),
                       "unsure": sum(state is None for state in states), "reader": reader.name})
        for seed in tqdm(absent[: sw.max_seeds], desc="first-k sweep", unit="seed", leave=False):
            m = len(plans)
            images = to_uint8(sampler.generate(Batch([pair.prompt] * m, [pair.negative] * m, [seed] * m, plans)))
            for k, look in zip(ks, reader.look(images, [pair.negative] * m, ["object"] * m)):
                rows.append({"pair": p, "prompt": pair.prompt, "negative": pair.negative, "seed": seed, "k": k,
                             "appears": look.present})
            if cfg.save_images:
                save_png(np.concatenate(list(images), axis=1),
                         out_dir / "strips" / f"{p:02d}_{slug(pair.prompt)}_neg-{slug(pair.negative, 20)}_s{seed}.png",
                         {"prompt": pair.prompt, "negative": pair.negative, "seed": seed, "first_k": ks})
    columns = ["pair", "prompt", "negative", "seed", "k", "appears"]  # kept when no seed qualifies (all present or unsure)
    tables = {"reverse": pd.DataFrame(rows, columns=columns), "reverse_screen": pd.DataFrame(screen)}
    for name, frame in tables.items():
        write_table(frame, out_dir / f"{name}.parquet")
    return tables


def summarise(tables: dict[str, pd.DataFrame], out: Path, variant: str) -> Summary:
    """Per k, the rate at which the negative's object appears (pooled over jobs)."""
    from negstudy.tables import _figure_rates, _png, reverse_activation

    rev = reverse_activation(tables["reverse"])
    rev.to_csv(out / "reverse_activation.csv", index=False)
    figure = _png(_figure_rates(rev, "k", "appears", "k: the negative in steps 0..k-1 only", "object appears",
                                "Reverse activation"), out / "reverse_activation.png")
    return Summary(sections=[("Reverse activation", rev)], figures={"reverse": figure})


def lines(out: Path) -> list[str]:
    path = Path(out) / "reverse_activation.csv"
    if not path.exists():
        return []
    rev = pd.read_csv(path)
    if rev.empty:
        return []
    top = rev.loc[rev.appears.idxmax()]
    return [f"reverse activation: the object appears in {top.appears:.0%} (95 % CI {top.ci_low:.0%}..{top.ci_high:.0%}, "
            f"{int(top.n_pairs)} pairs x {int(top.n_pair_seeds)} pair-seeds) at k={int(top.k)}; "
            f"without the negative (k=0) in {rev.appears.iloc[0]:.0%}"]


REPORT = StudyReport(tables=("reverse",), summarise=summarise, lines=lines)

