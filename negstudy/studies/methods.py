"""Negative-guidance methods compared on the same questions (``+sweep=methods``).

For each guider named in ``sweep.study.methods`` (options of the ``guidance`` config group: cfg,
perp_neg, nag, dng, apg, tcfg, or any YAML added there), on the same model, prompts and seeds:

1. the critical-step question (:mod:`negstudy.studies.critical_step` on the object pairs of
   ``dataset``): how often an object the caption does not name is removed when the negative starts
   at step k, and the strength-ratio curve of the negative's attention;
2. the removal table (:mod:`negstudy.studies.removal` on the first ``removal_captions`` captions of
   ``removal_dataset``, seeds ``removal_seeds``): from-0, fixed window and adaptive window, with
   the background kept (PSNR outside the object).

The schedules say WHEN the negative acts; the method says HOW. Methods whose negative acts in
attention space and compute no negative UNet branch (NAG) observe it: the branch is computed where
the negative acts, for its strength ratio only (it does not enter the image).

Each method's sub-studies run in ``by_method/<method>/run/`` (marked ``.incomplete``, so no other
study's report pools them); their tables are copied, with a ``method`` column, to
``by_method/<method>/methods_<table>.parquet`` (columns ``guidance``, the option's name, and ``guider``, its parameters), and a finished method is not rerun when the job is
resumed. The report (:data:`REPORT`) puts one row per method in the table ``methods``.
"""

from __future__ import annotations

import copy
import importlib.resources
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from negstudy.config import PromptPair
from negstudy.datasets import pairs_of
from negstudy.errors import ConfigError
from negstudy.records import write_table
from negstudy.studies import StudyReport, Summary
from negstudy.studies import critical_step, removal

log = logging.getLogger("negstudy")
CRITICAL = ("removal", "ratio", "attention", "screen")
REMOVAL = ("removal_targets", "originals")
TABLES = tuple(f"methods_{t}" for t in CRITICAL + REMOVAL)


def guidance_options() -> list[str]:
    """The ``guidance`` config group's options (its YAML files)."""
    folder = importlib.resources.files("negstudy.conf") / "guidance"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def guidance_node(name: str) -> DictConfig:
    if name not in guidance_options():
        raise ConfigError(f"sweep.study.methods: {name!r} is not an option of the guidance group "
                          f"(allowed: {', '.join(guidance_options())})")
    node = OmegaConf.load(str(importlib.resources.files("negstudy.conf") / "guidance" / f"{name}.yaml"))
    node.pop("defaults", None)
    return node


def check(cfg: DictConfig) -> None:
    """Every method names a guidance option whose guider builds; the removal dataset exists."""
    from negstudy.guidance import from_config

    study = cfg.sweep.study
    methods = list(study.get("methods") or [])
    if not methods:
        raise ConfigError("sweep.study.methods=[]: name at least one option of the guidance group")
    for name in methods:
        from_config(guidance_node(name))
    _dataset_node(study.get("removal_dataset", "shapes_removal"))
    removal.check(cfg)


def prepare(cfg: DictConfig, world: str | None) -> dict:
    """Any model: one evaluator, built before the model loads, reads both parts (the critical-step
    part through :mod:`negstudy.evaluators.reader`, the removal part through the evaluator)."""
    from negstudy.evaluators.reader import reader_of, require_reader

    found = removal.prepare(cfg, world)
    reader = reader_of(found["evaluator"], world, cfg.evaluator.get("name"))
    if cfg.sweep.get("screen", True):
        require_reader(cfg, reader, "screen seeds for the start-step question and list objects to remove")
    return {**found, "reader": reader}


def _dataset_node(name: str) -> DictConfig:
    path = importlib.resources.files("negstudy.conf") / "dataset" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"sweep.study.removal_dataset={name!r}: not an option of the dataset group")
    node = OmegaConf.load(str(path))
    node.pop("defaults", None)
    return node


def _critical_cfg(cfg: DictConfig, categories) -> DictConfig:
    """``cfg`` with the dataset cut to the pairs of ``categories`` (after this job's shard)."""
    out = copy.deepcopy(cfg)
    pairs = [p for p in pairs_of(cfg.dataset) if p.category in set(categories)]
    with open_dict(out):
        out.dataset.pairs = [PromptPair(p.prompt, p.negative, p.category) for p in pairs]
        out.dataset.path, out.dataset.limit, out.dataset.shard, out.dataset.shards = None, None, 0, 1
    return out


def _removal_cfg(cfg: DictConfig, dataset: str, captions: int, seeds) -> DictConfig:
    out = copy.deepcopy(cfg)
    node = _dataset_node(dataset)
    with open_dict(out):
        out.dataset.name = str(node.name)
        out.dataset.pairs = []
        out.dataset.captions = list(node.captions)
        out.dataset.path, out.dataset.format = None, None
        out.dataset.limit = int(captions)
        out.seeds = list(seeds)
    return out


def run(cfg: DictConfig, sampler, out_dir: Path, methods=("cfg", "perp_neg", "nag", "dng", "apg", "tcfg"),
        categories=("object",), removal_dataset: str = "shapes_removal", removal_captions: int = 4,
        removal_seeds=(0, 1, 2, 3, 4, 5), evaluator=None, world: str | None = None, reader=None) -> dict[str, pd.DataFrame]:
    from negstudy.guidance import from_config

    out_dir = Path(out_dir)
    guiders = {name: from_config(guidance_node(name)) for name in methods}  # all built before any image
    crit_cfg = _critical_cfg(cfg, categories)
    rem_cfg = _removal_cfg(cfg, removal_dataset, removal_captions, removal_seeds)
    original = sampler.guider
    tables: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    try:
        for name, guider in guiders.items():
            home = out_dir / "by_method" / name
            if not cfg.get("resume", True) or not (home / "done").exists():  # resume=false recomputes every method
                work = home / "run"
                if work.exists():
                    shutil.rmtree(work)
                work.mkdir(parents=True)
                # both sub-studies write here (their table names differ); never pooled by their own reports
                (work / ".incomplete").write_text("sub-studies of the methods study: pooled only through methods_* tables\n")
                sampler.guider = guider
                guider.bind(sampler)
                if "negative" not in guider.needs(True) and hasattr(guider, "observe_negative"):
                    guider.observe_negative = True  # the strength ratio needs the negative branch's attention
                log.info("methods: %s (%s)", name, guider.describe())
                found = critical_step.run(crit_cfg, sampler, work, reader=reader)
                found.update(removal.run(rem_cfg, sampler, work, evaluator=evaluator, world=world))
                for table, frame in found.items():
                    if f"methods_{table}" in tables:
                        write_table(frame.assign(guidance=name, guider=guider.describe()), home / f"methods_{table}.parquet")
                (home / "done").write_text(guider.describe() + "\n")
                guider.remove()  # attention-space guiders unhook from the UNet
            for table in TABLES:
                path = home / f"{table}.parquet"
                if path.exists():
                    tables[table].append(pd.read_parquet(path))
    finally:
        sampler.guider.remove()  # also when a method failed midway
        sampler.guider = original
    return {t: pd.concat(f, ignore_index=True) if f else pd.DataFrame() for t, f in tables.items()}


# ----------------------------------------------------------------------------- the report


def _fmt(rate, low, high) -> str:
    return "-" if rate is None or pd.isna(rate) else f"{rate:.0%} ({low:.0%}..{high:.0%})"


def _step(x) -> str:
    return "never" if x is None or pd.isna(x) else f"{int(x)}"


def summarise(tables: dict[str, pd.DataFrame], out: Path, variant: str) -> Summary:
    """One row per method: removal against the start step (objects), the strength ratio's peak and
    critical step, and the removal table's three methods with the background kept."""
    from negstudy.tables import _png, critical_steps, removal_methods, removal_vs_start

    rem_all, ratio_all = tables["methods_removal"], tables["methods_ratio"]
    if rem_all.empty and tables["methods_removal_targets"].empty:
        return Summary()
    # the paper's CFG first (the reference every other row is read against), then the others by name
    order = sorted(set(pd.concat([t.guidance for t in tables.values() if "guidance" in t]).tolist()), key=lambda m: (m != "cfg", m))
    rows, curves, rates = [], {}, {}
    for m in order:
        pick = {k: (v[v.guidance == m].drop(columns=["guidance", "guider"]) if "guidance" in v else v) for k, v in tables.items()}
        row = {"guidance": m}
        rem = removal_vs_start(pick["methods_removal"]) if not pick["methods_removal"].empty else pd.DataFrame()
        if not rem.empty:
            obj = rem[rem.category == "object"].sort_values("start_step")
            rates[m] = obj
            row["pair_seeds"] = int(obj.n_pair_seeds.max()) if len(obj) else 0
            for r in obj.itertuples():
                row[f"removed_k{r.start_step}"] = _fmt(r.removed, r.ci_low, r.ci_high)
        ratio = pick["methods_ratio"]
        if not ratio.empty and ratio.ratio.notna().any():
            crit = critical_steps(ratio, pick["methods_attention"], variant, screen=pick["methods_screen"])
            cat = crit[(crit.level == "category") & (crit.category == "object")]
            if len(cat):
                c = cat.iloc[0]
                row["ratio_peak"] = f"{c.peak_ratio:.3f}"
                row["critical_step"] = f"{_step(c.critical_step)} ({_step(c.ci_low)}..{_step(c.ci_high)})"
            sel = ratio[(ratio.variant == variant) & (ratio.category == "object")]
            curves[m] = sel.groupby("step").ratio.mean()
        targets = pick["methods_removal_targets"]
        if not targets.empty:
            table = removal_methods(targets)
            for r in table.itertuples():
                key = {"negative from step 0": "from0", "fixed window": "window", "adaptive window": "adaptive"}.get(r.method, r.method)
                row[f"{key}_removed"] = _fmt(r.removed, r.ci_low, r.ci_high)
                row[f"{key}_objects"] = int(r.objects)
                if pd.notna(getattr(r, "psnr_out", np.nan)):  # dB outside the object, mean over objects (95 % CI)
                    row[f"{key}_psnr_out"] = f"{r.psnr_out:.1f} ({r.psnr_out_low:.1f}..{r.psnr_out_high:.1f})"
        rows.append(row)
    table = pd.DataFrame(rows)
    ks = sorted((c for c in table if c.startswith("removed_k")), key=lambda c: int(c[len("removed_k"):]))
    rest = [c for c in table if c not in ks and c not in ("guidance", "pair_seeds")]
    table = table[["guidance"] + (["pair_seeds"] if "pair_seeds" in table else []) + ks + rest]
    write_table(table, out / "methods.parquet")
    table.to_csv(out / "methods.csv", index=False)
    summary = Summary(sections=[("Negative-guidance methods: removal against start step, strength ratio, removal table", table)])
    if rates or curves:
        summary.figures["methods"] = _png(_figure(rates, curves), out / "methods.png")
    return summary


def _figure(rates: dict, curves: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, obj in rates.items():
        line = a.plot(obj.start_step, obj.removed, marker="o", label=m)[0]
        a.fill_between(obj.start_step, obj.ci_low, obj.ci_high, color=line.get_color(), alpha=0.12)
    a.set(xlabel="start step k of the negative", ylabel="object removed (share of pair-seeds)", ylim=(-0.02, 1.02),
          title="Removal against start step, per method (95 % CI)")
    for m, curve in curves.items():
        b.plot(curve.index, curve.values, label=m)
    b.axhline(1.0, color="grey", lw=0.8, ls=":")
    b.set(xlabel="step", ylabel="strength ratio (negative / positive)", title="Mean strength ratio, object negatives")
    for ax in (a, b):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lines(out: Path) -> list[str]:
    path = Path(out) / "methods.parquet"
    if not path.exists():
        return []
    found = []
    for r in pd.read_parquet(path).to_dict("records"):
        parts = [f"{k}={v}" for k, v in r.items() if k != "guidance" and v is not None and not (isinstance(v, float) and np.isnan(v))]
        found.append(f"guidance {r['guidance']}: " + ", ".join(parts))
    return found


REPORT = StudyReport(tables=TABLES, summarise=summarise, lines=lines)
