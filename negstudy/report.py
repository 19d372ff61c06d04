"""Reports: tables on disk -> critical steps with confidence intervals, figures, Markdown, CSV, HTML.

    python -m negstudy.report <run or sweep directory>

Reads every ``ratio.parquet`` / ``removal.parquet`` / ``attention.parquet`` under the directory
(one per job of a multirun, or one for a single run), and writes ``report/`` beside them:
``critical_steps.csv``, ``removal_vs_start.csv``, ``report.md``, the figures as PNG, and
``report.html`` (self-contained: figures embedded).

Rules (negstudy.critical): object negatives' critical step = the peak of the mean strength-ratio
curve; attribute negatives' = the first step from which the curve stays >= 1 up to dips of 0.01
(the default crossing rule; the first crossing and the strict stays-above crossing sit beside it).

Pooling: one curve or one verdict per (job, pair, seed), a "pair-seed"; tables say n_pairs x
n_pair_seeds. A pair is its (prompt, negative) when a table or the job's screen table names the
prompt, else (job, pair index). Seeds of one pair share its prompt, so they are not independent
trials: every interval is a 95 % two-stage bootstrap that resamples pairs, then seeds within pairs
(negstudy.critical.cluster_bootstrap_weights); rates take the wider of that interval and the
Wilson interval of the same counts (the Wilson end covers 0 of n or n of n, where a bootstrap
interval has zero width). Removal-benchmark rows cluster by caption (objects of one caption's
images share its prompt).
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from negstudy.critical import (
    CROSSING_RULES,
    CROSSING_TOLERANCE,
    DEFAULT_CROSSING,
    agreement,
    bootstrap_ci,
    bootstrap_critical_step,
    cluster_bootstrap_weights,
    cluster_mean_ci,
    cluster_rate_ci,
    cluster_ratio_ci,
    first_hit_step,
    weighted_means,
)
from negstudy.records import write_table, write_text

DEFAULT_VARIANT = "all_tokens"
HIT_LIFT = 2.0  # attention "reaches the region" once its mass there is twice what a uniform map would put there

log = logging.getLogger("negstudy")


def _read(root: Path, name: str) -> pd.DataFrame:
    frames = []
    for path in sorted(root.rglob(f"{name}.parquet")):
        if "report" in path.relative_to(root).parts:
            continue
        if path.parent != root and ((path.parent / ".incomplete").exists() or (path.parent / "failed.json").exists()):
            continue  # another job, killed or failed midway: its complete results or none (negstudy.jobs)
        frame = pd.read_parquet(path)
        if len(frame):  # a job can find nothing to measure (e.g. no seed showed the concept)
            frames.append(frame.assign(job=str(path.parent.relative_to(root))))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


UNIT = ["job", "pair", "seed"]  # one curve or verdict: a prompt pair's seed in one job (a "pair-seed")


def pair_labels(frame: pd.DataFrame) -> pd.Series:
    """One label per prompt pair and row: "prompt | negative" when the table names the prompt,
    else "job:pair index | negative" (a pair index counts within its job's prompt shard)."""
    if "prompt" in frame and len(frame) and frame.prompt.notna().all():
        return frame.prompt.astype(str) + " | " + frame.negative.astype(str)
    return frame.job.astype(str) + ":" + frame.pair.astype(str) + " | " + frame.negative.astype(str)


def with_prompts(frame: pd.DataFrame, screen: pd.DataFrame | None) -> pd.DataFrame:
    """``frame`` with each (job, pair)'s prompt from the job's screen table, when it has one and
    ``frame`` has none (ratio.parquet and attention.parquet do not name the prompt)."""
    if screen is None or screen.empty or frame.empty or "prompt" in frame or "prompt" not in screen:
        return frame
    names = screen[["job", "pair", "prompt"]].drop_duplicates(["job", "pair"])
    return frame.merge(names, on=["job", "pair"], how="left")


def _curves(frame: pd.DataFrame, value: str) -> tuple[np.ndarray, np.ndarray]:
    """(pair-seeds, steps) of ``value``, one row per (job, pair, seed), and each row's pair label."""
    wide = frame.assign(pair_label=pair_labels(frame)).pivot_table(index=UNIT + ["pair_label"], columns="step", values=value)
    return wide.to_numpy(), wide.index.get_level_values("pair_label").to_numpy()


def _matrix(frame: pd.DataFrame, value: str) -> np.ndarray:
    """(pair-seeds, steps) of ``value``: one row per (job, pair, seed), never two pairs averaged together."""
    return _curves(frame, value)[0]


def _counts(frame: pd.DataFrame) -> dict:
    """n_pairs and n_pair_seeds of a table with job, pair, seed (and maybe prompt) columns."""
    labels = pair_labels(frame)
    return {"n_pairs": int(labels.nunique()), "n_pair_seeds": int(len(frame[UNIT].assign(label=labels).drop_duplicates()))}


def critical_steps(ratio: pd.DataFrame, attention: pd.DataFrame, variant: str = DEFAULT_VARIANT,
                   hit_lift: float = HIT_LIFT, screen: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per pair and one per category: critical step from the ratio curve (with CI) and
    from attention: the first step at which the negative word's map is concentrated on the
    concept's region, i.e. lift = (mass inside the region) / (region's share of the image) >= hit_lift.
    Lift rather than raw mass because objects cover ~10 % of a shapes image: a raw-mass threshold
    of 0.5 would demand a five-fold concentration for small objects and a trivial one for large.

    Curves are pooled per (job, pair, seed) (n_pairs x n_pair_seeds); intervals resample pairs,
    then seeds within pairs. critical_step is the peak (object) or the default crossing rule
    (attribute, ``rule``); attribute rows also give crossing_<rule> with its interval for every
    rule of negstudy.critical.CROSSING_RULES. peak_ratio: the mean curve's maximum with its interval.
    screen: the jobs' screen tables, which name each pair's prompt (see :func:`pair_labels`)."""
    rows = []
    ratio = with_prompts(ratio[ratio.variant == variant], screen)
    attention = with_prompts(attention, screen) if len(attention) else attention
    ratio = ratio.assign(pair_label=pair_labels(ratio))
    if len(attention):
        attention = attention.assign(pair_label=pair_labels(attention))
    groups = [("pair", frame) for _, frame in ratio.groupby("pair_label", sort=False)]
    groups += [("category", frame) for _, frame in ratio.groupby("category")]
    for level, frame in groups:
        category = frame.category.iloc[0]
        negative = frame.negative.iloc[0] if level == "pair" else "all"
        values, pairs = _curves(frame, "ratio")
        ci = bootstrap_critical_step(values, category, clusters=pairs)
        mean = np.nanmean(values, axis=0)
        with np.errstate(all="ignore"):
            peaks = np.nanmax(weighted_means(values, cluster_bootstrap_weights(pairs)), axis=1)
        row = {"level": level, "category": category, "negative": negative,
               "prompt": frame.prompt.iloc[0] if level == "pair" and "prompt" in frame else "",
               **_counts(frame), "rule": "peak" if category == "object" else DEFAULT_CROSSING,
               "critical_step": ci.step, "ci_low": ci.low, "ci_high": ci.high,
               "never_fraction": getattr(ci, "fraction_never", np.nan),
               "peak_ratio": float(np.nanmax(mean)), "peak_ratio_low": float(np.nanpercentile(peaks, 2.5)),
               "peak_ratio_high": float(np.nanpercentile(peaks, 97.5)), "ratio_at_step0": float(mean[0]),
               "n_steps": values.shape[1]}
        if category == "attribute":
            for rule in CROSSING_RULES:
                c = ci if rule == DEFAULT_CROSSING else bootstrap_critical_step(values, category, rule=rule, clusters=pairs)
                row.update({f"crossing_{rule}": c.step, f"crossing_{rule}_low": c.low, f"crossing_{rule}_high": c.high})
        if level == "pair":
            att = attention[attention.pair_label == frame.pair_label.iloc[0]] if len(attention) else attention
        else:
            att = attention[attention.category == category] if len(attention) else attention
        if len(att):
            per_unit = [(key, first_hit_step((g.mass_in_region / g.region_fraction).to_numpy(), hit_lift))
                        for key, g in att.sort_values("step").groupby(UNIT + ["pair_label"])]
            hits = [h for _, h in per_unit]
            found = [(key[-1], h) for key, h in per_unit if h is not None]
            mean_hit, hit_lo, hit_hi = (cluster_mean_ci([h for _, h in found], [p for p, _ in found]) if found
                                        else (np.nan,) * 3)
            row.update(attention_step_mean=mean_hit, attention_step_low=hit_lo, attention_step_high=hit_hi,
                       attention_n_pairs=int(att.pair_label.nunique()), attention_n=len(hits),
                       attention_never=len(hits) - len(found))
            if "positive_mass_in_region" in att:
                row.update(attention_lag(att, hit_lift))
            if ci.step is not None:
                agree = agreement([ci.step] * len(hits), hits)
                row.update(agreement_mean_abs=agree.mean_abs_diff, agreement_within2=agree.within)
        rows.append(row)
    return pd.DataFrame(rows)


def attention_lag(att: pd.DataFrame, hit_lift: float = HIT_LIFT) -> dict:
    """Figures 1/4 as a number: per pair-seed, the step at which the positive word reaches its own
    object's region (positive branch) and the step at which the negative word reaches the concept's
    region (negative branch), both by the lift rule; lag = negative's step - positive's step over the
    pair-seeds where both arrive (95 % CI: pairs, then seeds). Pair-seeds where the positive word's
    object is absent (or the prompt names none) have no positive map and are left out."""
    per_unit = []
    for key, g in att.sort_values("step").groupby(UNIT + ["pair_label"]):
        if g.positive_mass_in_region.isna().all():
            continue
        neg = first_hit_step((g.mass_in_region / g.region_fraction).to_numpy(), hit_lift)
        pos = first_hit_step((g.positive_mass_in_region / g.positive_region_fraction).to_numpy(), hit_lift)
        per_unit.append((key[-1], pos, neg))
    both = [(p, neg - pos) for p, pos, neg in per_unit if pos is not None and neg is not None]
    pos_found = [(p, pos) for p, pos, _ in per_unit if pos is not None]
    lag = cluster_mean_ci([d for _, d in both], [p for p, _ in both]) if both else (np.nan,) * 3
    pos_step = cluster_mean_ci([h for _, h in pos_found], [p for p, _ in pos_found]) if pos_found else (np.nan,) * 3
    return {"positive_step_mean": pos_step[0], "positive_step_low": pos_step[1], "positive_step_high": pos_step[2],
            "positive_n": len(per_unit), "positive_never": len(per_unit) - len(pos_found),
            "lag_mean": lag[0], "lag_low": lag[1], "lag_high": lag[2], "lag_n": len(both),
            "lag_n_pairs": len({p for p, _ in both})}


def _with_ci(value, low, high, fmt: str = "{:.0f}") -> str:
    """"5 (4..7)"; NaN -> "-", an open end (None / NaN) -> "never"."""
    def one(x):
        return "never" if x is None or pd.isna(x) else fmt.format(x)
    return "-" if value is None and low is None and high is None else f"{one(value)} ({one(low)}..{one(high)})"


def critical_table(crit: pd.DataFrame) -> pd.DataFrame:
    """The critical-step table as the report shows it: each estimate with its 95 % interval in one
    cell, n as pairs x pair-seeds, the three crossing rules side by side (attribute rows); the full
    table (every column) is critical_steps.csv."""
    out = pd.DataFrame({"level": crit.level, "category": crit.category, "negative": crit.negative,
                        "n (pairs x seeds)": [f"{a} x {b}" for a, b in zip(crit.n_pairs, crit.n_pair_seeds)],
                        "rule": crit.rule,
                        "critical step (95 % CI)": [_with_ci(r.critical_step, r.ci_low, r.ci_high) for r in crit.itertuples()]})
    if "prompt" in crit and (crit.prompt.astype(str) != "").any():
        out.insert(2, "prompt", crit.prompt)
    for rule in CROSSING_RULES:
        if f"crossing_{rule}" in crit:
            out[f"crossing: {rule}" + (" (default)" if rule == DEFAULT_CROSSING else "")] = [
                "" if r.category != "attribute" else _with_ci(getattr(r, f"crossing_{rule}"), getattr(r, f"crossing_{rule}_low"),
                                                              getattr(r, f"crossing_{rule}_high")) for r in crit.itertuples()]
    out["peak ratio (95 % CI)"] = [_with_ci(r.peak_ratio, r.peak_ratio_low, r.peak_ratio_high, "{:.3f}") for r in crit.itertuples()]
    if "attention_step_mean" in crit:
        out["attention reaches region (95 % CI)"] = [
            "-" if pd.isna(r.attention_n) else
            f"{_with_ci(r.attention_step_mean, r.attention_step_low, r.attention_step_high, '{:.1f}')}; never in {int(r.attention_never)}"
            f"/{int(r.attention_n)}" for r in crit.itertuples()]
    return out


def removal_vs_start(removal: pd.DataFrame) -> pd.DataFrame:
    """Per category and start step: how often the concept is gone, over pair-seeds where it
    appeared without the negative (95 % CI: pairs-then-seeds bootstrap, widened to Wilson's)."""
    base = removal[removal.present_without_negative.fillna(False).astype(bool)]
    rows = []
    for (category, k), g_all in base.groupby(["category", "start_step"]):
        g = g_all[g_all.concept_present.notna()]  # the reader's "unsure" is counted, not guessed
        if g.empty:
            continue
        rate, lo, hi = cluster_rate_ci(~g.concept_present.astype(bool).to_numpy(), pair_labels(g).to_numpy())
        rows.append({"category": category, "start_step": int(k), "removed": rate, "ci_low": lo, "ci_high": hi,
                     **_counts(g), "n_unsure": len(g_all) - len(g), "psnr_outside_median": float(np.nanmedian(g.psnr_outside)) if g.psnr_outside.notna().any() else np.nan})
    return pd.DataFrame(rows)


def reverse_activation(reverse: pd.DataFrame) -> pd.DataFrame:
    """Per k (negative in steps 0..k-1 only): how often the negative's object APPEARS, over
    pair-seeds where it is absent without the negative (95 % CI: pairs-then-seeds bootstrap,
    widened to Wilson's)."""
    rows = []
    for k, g_all in reverse.groupby("k"):
        g = g_all[g_all.appears.notna()]  # the reader's "unsure" is counted, not guessed
        if g.empty:
            continue
        rate, lo, hi = cluster_rate_ci(g.appears.astype(bool).to_numpy(), pair_labels(g).to_numpy())
        rows.append({"k": int(k), "appears": rate, "ci_low": lo, "ci_high": hi, **_counts(g), "n_unsure": len(g_all) - len(g)})
    return pd.DataFrame(rows)


PSNR_CAP = 100.0  # dB: identical pixels (infinite PSNR) enter means at this value
METHOD_NAMES = {"from0": "negative from step 0", "window": "fixed window", "adaptive": "adaptive window"}


def _ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0,
              clusters: np.ndarray | None = None) -> tuple[float, float, float]:
    """mean(num) / mean(den) with a paired percentile bootstrap (95 %): over objects, or, with
    ``clusters`` (one caption label per object), over captions, then objects within captions."""
    if len(num) == 0 or den.mean() == 0:
        return (float("nan"),) * 3
    return cluster_ratio_ci(num, den, np.arange(len(num)) if clusters is None else clusters, n_boot, seed)


def _mean_ci(values: np.ndarray, clusters: np.ndarray | None = None) -> tuple[float, float, float]:
    """Mean of the finite values with a 95 % bootstrap interval (over ``clusters``, then rows, if given)."""
    values = np.asarray(values, dtype=float)
    return cluster_mean_ci(values, np.arange(len(values)) if clusters is None else clusters)


def removal_methods(targets: pd.DataFrame) -> pd.DataFrame:
    """The paper's removal table, per dataset and method: removal rate, the rate relative to
    from-0 (paired), how often the judge (or PSNR outside the object) prefers the method's image
    to from-0's as closer to the original, PSNR / SSIM outside the object (PSNR capped at
    PSNR_CAP, with the share of untouched backgrounds), regenerations used, and how often the
    critical step came from attention. Objects of one caption (its seeds, its several objects)
    share its prompt: every 95 % interval resamples captions, then objects within captions (rates:
    widened to the Wilson interval); n_captions x objects."""
    rows = []
    for dataset, d in targets.groupby("dataset"):
        judged = d.pivot_table(index=["job", "prompt", "seed", "object"], columns="method", values="removed", aggfunc="first")
        # objects with a verdict for every method (an unsure reader leaves None; a method with none at all is a NaN column)
        judged = judged.reindex(columns=[m for m in METHOD_NAMES if m in d.method.unique()]).dropna().astype(float)
        captions = judged.index.get_level_values("prompt").to_numpy()
        for method in [m for m in METHOD_NAMES if m in d.method.unique()]:
            g = d[d.method == method]
            removed = judged[method].to_numpy() if method in judged else np.array([])
            rate, lo, hi = cluster_rate_ci(removed.astype(bool), captions)
            ratio, rlo, rhi = (_ratio_ci(removed, judged["from0"].to_numpy(), clusters=captions)
                               if method != "from0" and "from0" in judged else (1.0, 1.0, 1.0))
            row = {"dataset": dataset, "method": METHOD_NAMES[method], "n_captions": len(set(captions)), "objects": len(removed),
                   "removed": rate, "ci_low": lo, "ci_high": hi, "vs_from0": ratio, "vs_from0_low": rlo, "vs_from0_high": rhi}
            prefs = g.dropna(subset=["prefers_over_from0"]) if "prefers_over_from0" in g else g.iloc[:0]
            if method != "from0" and len(prefs):
                p, plo, phi = cluster_rate_ci(prefs.prefers_over_from0.astype(bool).to_numpy(), prefs.prompt.to_numpy())
                row.update(preferred=p, preferred_low=plo, preferred_high=phi, preferred_n=len(prefs),
                           preference_by=g.preference_source.iloc[0])
            for metric in ("psnr_out", "ssim_out"):
                if metric in g:
                    values = g[metric].to_numpy(dtype=float)
                    if metric == "psnr_out":  # an untouched background has infinite PSNR: count it at the cap
                        row["background_identical"] = float(np.isinf(values).mean())
                        values = np.minimum(values, PSNR_CAP)
                    m, mlo, mhi = _mean_ci(values, g.prompt.to_numpy())
                    row.update({metric: m, f"{metric}_low": mlo, f"{metric}_high": mhi})
            if "substituted" in g and g.substituted.notna().any():
                sub = g.dropna(subset=["substituted"])
                row["substituted"], row["substituted_low"], row["substituted_high"] = cluster_rate_ci(
                    sub.substituted.astype(bool).to_numpy(), sub.prompt.to_numpy())
            row["regenerations"] = float(g.regenerations.mean())
            row["start_mean"] = float(g.start.mean())
            if method == "adaptive":
                row["critical_from_attention"] = float((g.critical_source == "attention").mean())
            rows.append(row)
    return pd.DataFrame(rows)


def _figure_methods(table: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(table.dataset.unique())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(1, len(datasets))
    for i, dataset in enumerate(datasets):
        g = table[table.dataset == dataset]
        x = np.arange(len(g)) + i * width
        axes[0].bar(x, g.removed, width, yerr=np.clip([g.removed - g.ci_low, g.ci_high - g.removed], 0, None), capsize=3, label=dataset)
        if "psnr_out" in g:
            axes[1].bar(x, g.psnr_out, width, yerr=np.clip([g.psnr_out - g.psnr_out_low, g.psnr_out_high - g.psnr_out], 0, None),
                        capsize=3, label=dataset)
    for ax, ylabel in zip(axes, ("object removed", "PSNR outside the object (dB)")):
        labels = table[table.dataset == datasets[0]].method
        ax.set_xticks(np.arange(len(labels)) + width * (len(datasets) - 1) / 2, labels, rotation=10)
        ax.set_ylabel(ylabel)
    axes[0].set_ylim(0, 1.02)
    axes[0].set_title("Removal rate (95 % Wilson CI)")
    axes[1].set_title("Background kept (95 % bootstrap CI)")
    if len(datasets) > 1:
        axes[0].legend(loc="upper right")
    fig.tight_layout()
    return fig


def _figure_examples(root: Path, targets: pd.DataFrame, n: int = 6):
    """Original | from-0 | window | adaptive examples, objects the adaptive window removed first (negstudy.report_html)."""
    from negstudy.report_html import fig_examples

    return fig_examples(root, targets, n)


def _figure_ratio(ratio: pd.DataFrame, crit: pd.DataFrame, variant: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (category, frame), colour in zip(ratio[ratio.variant == variant].groupby("category"), ("tab:blue", "tab:orange")):
        values, pairs = _curves(frame, "ratio")
        mean, lo, hi = bootstrap_ci(values, clusters=pairs)  # pairs, then seeds within pairs
        steps = np.arange(len(mean))
        ax.plot(steps, mean, color=colour, label=f"{category} negatives (n={len(set(pairs))} pairs x {values.shape[0]} pair-seeds)")
        ax.fill_between(steps, lo, hi, color=colour, alpha=0.2)
        row = crit[(crit.level == "category") & (crit.category == category)]
        if len(row) and pd.notna(row.critical_step.iloc[0]):
            ax.axvline(row.critical_step.iloc[0], color=colour, ls="--", lw=1)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("step (UNet call)")
    ax.set_ylabel("strength ratio  negative / positive")
    ax.set_title(f"Strength of the negative prompt ({variant}); dashed: critical step")
    ax.legend()
    fig.tight_layout()
    return fig


def _figure_removal(table: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    groups = list(table.groupby("category"))
    for i, (category, g) in enumerate(groups):
        dodge = 0.12 * (i - (len(groups) - 1) / 2)  # categories side by side, their intervals apart
        ax.errorbar(g.start_step + dodge, g.removed, yerr=np.clip([g.removed - g.ci_low, g.ci_high - g.removed], 0, None), marker="o",
                    capsize=3, label=f"{category} negatives")
    ax.set_xlabel("start step k of the negative (from_step k; last point: never)")
    ax.set_ylabel("concept removed")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Removal against the step at which the negative starts")
    ax.legend()
    fig.tight_layout()
    return fig


def _figure_rates(table: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(table[x], table[y], yerr=np.clip([table[y] - table.ci_low, table.ci_high - table[y]], 0, None), marker="o", capsize=3)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(-0.02, 1.02))
    fig.tight_layout()
    return fig


def _png(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path.write_bytes(buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def build(root: str | Path, variant: str = DEFAULT_VARIANT) -> Path:
    """Write the report of every job under ``root``; return the HTML path."""
    root = Path(root)
    ratio, removal, attention = _read(root, "ratio"), _read(root, "removal"), _read(root, "attention")
    reverse = _read(root, "reverse")
    targets = _read(root, "removal_targets")
    jobs = sorted({p.parent for p in root.rglob("config.yaml") if not {"report", ".hydra"} & set(p.relative_to(root).parts)})
    study_figures = [f for job in jobs for f in sorted(job.glob("*.png")) + sorted(job.glob("grids/*.png"))]  # drawn by studies
    tables = ("ratio", "removal", "reverse", "removal_targets", "originals", "attention_windows")
    if not any(next(root.rglob(f"{t}.parquet"), None) for t in tables) and not study_figures:
        raise FileNotFoundError(f"{root}: no ratio.parquet, removal.parquet, reverse.parquet or removal_targets.parquet "
                                "below it: is it a negstudy run directory?")
    out = root / "report"
    out.mkdir(exist_ok=True)
    sections, figures = [], {}
    crit = critical_steps(ratio, attention, variant, screen=_read(root, "screen")) if not ratio.empty else pd.DataFrame()
    rem = removal_vs_start(removal) if not removal.empty else pd.DataFrame()
    if not crit.empty:
        write_table(crit, out / "critical_steps.parquet")
        crit.to_csv(out / "critical_steps.csv", index=False)
        figures["ratio"] = _png(_figure_ratio(ratio, crit, variant), out / "ratio_curves.png")
        sections.append(("Critical steps", critical_table(crit)))
    if not rem.empty:
        rem.to_csv(out / "removal_vs_start.csv", index=False)
        figures["removal"] = _png(_figure_removal(rem), out / "removal_vs_start.png")
        sections.append(("Removal against start step", rem))
    if not reverse.empty:
        rev = reverse_activation(reverse)
        rev.to_csv(out / "reverse_activation.csv", index=False)
        figures["reverse"] = _png(_figure_rates(rev, "k", "appears", "k: the negative in steps 0..k-1 only",
                                                "object appears", "Reverse activation"), out / "reverse_activation.png")
        sections.append(("Reverse activation", rev))
    if not targets.empty:
        methods = removal_methods(targets)
        write_table(methods, out / "removal_methods.parquet")
        methods.to_csv(out / "removal_methods.csv", index=False)
        figures["removal_methods"] = _png(_figure_methods(methods), out / "removal_methods.png")
        examples = _figure_examples(root, targets)
        if examples is not None:
            figures["removal_examples"] = _png(examples, out / "removal_examples.png")
        sections.append(("Object removal: negative from step 0, fixed window, adaptive window", methods))
    for png in study_figures:
        figures[str(png.relative_to(root).with_suffix(""))] = base64.b64encode(png.read_bytes()).decode()
    md = ["# negstudy report", "", f"Run: `{root}`. Ratio variant: `{variant}`. Rules: object = peak of the mean ratio curve; "
          f"attribute = first step from which it stays >= 1 up to dips of {CROSSING_TOLERANCE:g} (the default, robust to noise "
          "on the plateau just above 1; crossing_first and crossing_stays_strict beside it); attention = first step at which the "
          f"negative word's map puts {HIT_LIFT:g}x a uniform map's mass on the concept's region. Pooled per (job, pair, seed): "
          "n = pairs x pair-seeds. 95 % CIs resample pairs, then seeds within pairs (removal benchmark: captions, then objects); "
          "rates take the wider of that and the Wilson interval. Removal rates over pair-seeds where the concept appears "
          "without the negative.", ""]
    if not sections and not figures:
        md += ["Nothing to report: the jobs found nothing to measure (e.g. no seed showed the concept, no object to remove).", ""]
    for title, frame in sections:
        md += [f"## {title}", "", frame.to_markdown(index=False, floatfmt=".3g"), ""]
    write_text("\n".join(md), out / "report.md")
    from negstudy import scorecard  # the replication scorecard: scorecard.md and .csv (report_html shows its HTML)

    try:
        card = scorecard.write(root, out, variant)
    except Exception as exc:  # a partial or foreign table must not cost the rest of the report
        log.warning("scorecard not written: %s: %s", type(exc).__name__, exc)
        card = None
    from negstudy import report_html  # the page: scorecard, strips, attention grids, curves, tables, captions

    page = report_html.page(root, out, md[2], sections, figures, ratio=ratio, removal=removal, crit=crit, variant=variant,
                            hit_lift=HIT_LIFT, screen=_read(root, "screen"), scorecard=card)
    write_text(page, out / "report.html")
    return out / "report.html"


def _step(x) -> str:
    return "never" if x is None or pd.isna(x) else str(int(x))


def summary_lines(root: str | Path) -> list[str]:
    """One line per category: the critical step with its CI, and where attention finds the concept."""
    lines = []
    methods_path = Path(root) / "report" / "removal_methods.parquet"
    if methods_path.exists():
        for row in pd.read_parquet(methods_path).itertuples():
            line = (f"removal, {row.dataset}, {row.method}: {row.removed:.0%} (95 % CI {row.ci_low:.0%}..{row.ci_high:.0%}, "
                    f"{getattr(row, 'n_captions', '?')} captions x {row.objects} objects)")
            if row.method != METHOD_NAMES["from0"]:
                line += f", {row.vs_from0:.0%} of from-0's rate"
                if pd.notna(getattr(row, "preferred", np.nan)):
                    line += f", preferred to from-0 in {row.preferred:.0%} ({row.preference_by})"
            if pd.notna(getattr(row, "psnr_out", np.nan)):
                line += f", PSNR outside {row.psnr_out:.1f} dB"
            if pd.notna(getattr(row, "substituted", np.nan)):
                line += f", another object appeared in {row.substituted:.0%}"
            lines.append(line)
    rev_path = Path(root) / "report" / "reverse_activation.csv"
    if rev_path.exists():
        rev = pd.read_csv(rev_path)
        top = rev.loc[rev.appears.idxmax()]
        lines.append(f"reverse activation: the object appears in {top.appears:.0%} (95 % CI {top.ci_low:.0%}..{top.ci_high:.0%}, "
                     f"{int(top.n_pairs)} pairs x {int(top.n_pair_seeds)} pair-seeds) at k={int(top.k)}; "
                     f"without the negative (k=0) in {rev.appears.iloc[0]:.0%}")
    card = Path(root) / "report" / "scorecard.csv"
    if card.exists():
        verdicts = pd.read_csv(card).verdict.str.replace(r"^(not measured in this run) .*", r"\1", regex=True).value_counts()
        lines.append("replication scorecard (report/scorecard.md): " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))
    path = Path(root) / "report" / "critical_steps.parquet"
    if not path.exists():
        return lines
    crit = pd.read_parquet(path)
    for row in crit[crit.level == "category"].itertuples():
        line = (f"critical step, {row.category} negatives: {_step(row.critical_step)} "
                f"(95 % CI {_step(row.ci_low)}..{_step(row.ci_high)}, {row.n_pairs} pairs x {row.n_pair_seeds} pair-seeds, "
                f"rule {row.rule}, peak ratio {row.peak_ratio:.3f})")
        if "attention_step_mean" in crit and pd.notna(row.attention_step_mean):
            line += f"; the negative word's attention reaches the concept's region at step {row.attention_step_mean:.1f} on average"
        elif "attention_n" in crit and row.attention_n > 0:
            line += (f"; the negative word's attention never concentrates on the concept's region "
                     f"(lift >= {HIT_LIFT:g}) in {int(row.attention_n)} pair-seeds")
        lines.append(line)
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m negstudy.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory")
    ap.add_argument("--variant", default=DEFAULT_VARIANT, choices=["all_tokens", "word_tokens", "all_tokens_daam", "word_tokens_daam"])
    args = ap.parse_args(argv)
    try:
        path = build(args.directory, args.variant)
    except FileNotFoundError as err:
        print(f"negstudy.report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"negstudy.report: {path}")


if __name__ == "__main__":
    main()
