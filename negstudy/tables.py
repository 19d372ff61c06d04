"""Study tables pooled over the jobs of a run, and their statistics and figures.

Every job writes its tables as ``<job>/<name>.parquet``; :func:`_read` pools one name over every
job below a run or sweep directory. The functions here turn pooled tables into the report's
tables (critical steps, removal against the start step, reverse activation, the removal
benchmark's methods) and figures; each study's ``REPORT`` (negstudy.studies) says which of them
it uses. Pooling and intervals: see :mod:`negstudy.report`.
"""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from negstudy.critical import (
    CROSSING_RULES,
    DEFAULT_CROSSING,
    HIT_LIFT,
    agreement,
    attention_hit_step,
    bootstrap_ci,
    bootstrap_critical_step,
    cluster_bootstrap_weights,
    cluster_mean_ci,
    cluster_rate_ci,
    cluster_ratio_ci,
    weighted_means,
)

DEFAULT_VARIANT = "all_tokens"

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


def _is_padding(frame: pd.DataFrame) -> np.ndarray:
    """Per row: whether its pair-seed is the screen's padding (a seed without the concept that
    ``sweep.min_seeds`` adds to a pair with too few present seeds, so that its curve can still be
    drawn): the study's ``padding`` column; tables written before it (all screened) say so by
    ``present_without_negative`` False."""
    if "padding" in frame:
        return frame.padding.fillna(False).astype(bool).to_numpy()
    if "present_without_negative" in frame:
        return frame.present_without_negative.eq(False).to_numpy()
    return np.zeros(len(frame), dtype=bool)


def _padding(frame: pd.DataFrame) -> int:
    """Pair-seeds of ``frame`` on the screen's padding."""
    return int(frame[_is_padding(frame)][UNIT].drop_duplicates().shape[0])


def drawn(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without the screen's padding: the pair-seeds whose plain image showed the concept
    (the screened protocol), or every seed, drawn or not (the paper's protocol, ``sweep.screen=false``,
    which pads nothing). A category pools only these, as removal against the start step
    (:func:`removal_vs_start`) only ever counted seeds that showed the concept."""
    return frame[~_is_padding(frame)]


def critical_steps(ratio: pd.DataFrame, attention: pd.DataFrame, variant: str = DEFAULT_VARIANT,
                   hit_lift: float = HIT_LIFT, screen: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per pair and one per category: critical step from the ratio curve (with CI) and
    from attention: the first step at which the negative word's map is concentrated on the
    concept's region, i.e. lift = (mass inside the region) / (region's share of the image) >= hit_lift.
    Lift rather than raw mass because objects cover ~10 % of a shapes image: a raw-mass threshold
    of 0.5 would demand a five-fold concentration for small objects and a trivial one for large.

    Curves are pooled per (job, pair, seed) (n_pairs x n_pair_seeds); intervals resample pairs,
    then seeds within pairs. A pair's row takes all its seeds; a category's only those where the
    concept was drawn (:func:`drawn`: the screen's padding seeds stay out of it). critical_step is the peak (object) or the default crossing rule
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
    groups += [("category", frame) for _, frame in drawn(ratio).groupby("category")]
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
               **_counts(frame), "n_without_concept": _padding(frame),
               "rule": "peak" if category == "object" else DEFAULT_CROSSING,
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
            per_unit = [(key, attention_hit_step(g.mass_in_region.to_numpy(), g.region_fraction.to_numpy(), hit_lift))
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
        neg = attention_hit_step(g.mass_in_region.to_numpy(), g.region_fraction.to_numpy(), hit_lift)
        pos = attention_hit_step(g.positive_mass_in_region.to_numpy(), g.positive_region_fraction.to_numpy(), hit_lift)
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
                        "n (pairs x seeds)": [f"{a} x {b}" + (f" ({int(c)} without the concept)" if c > 0 else "")
                                              for a, b, c in zip(crit.n_pairs, crit.n_pair_seeds,
                                                                 crit.get("n_without_concept", pd.Series(0, index=crit.index)))],
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


def _figure_ratio(ratio: pd.DataFrame, crit: pd.DataFrame, variant: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (category, frame), colour in zip(drawn(ratio[ratio.variant == variant]).groupby("category"), ("tab:blue", "tab:orange")):
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


def summarize(df: pd.DataFrame, x: str, value: str, units: Sequence[str], by: Sequence[str] = (),
              n_boot: int = 1000, ci: float = 0.95) -> pd.DataFrame:
    """Mean curve of ``value`` against ``x`` with a percentile-bootstrap band over ``units``.

    units: the columns naming one independent curve (e.g. pair and seed); curves are resampled
    whole (:func:`negstudy.critical.bootstrap_ci`); the mechanisms study's figures use it. by: columns giving separate curves.
    Returns by..., x, mean, low, high, n (the number of units).
    """
    frames = []
    groups = df.groupby(list(by)) if by else [((), df)]
    for key, g in groups:
        mat = g.pivot_table(index=list(units), columns=x, values=value, aggfunc="mean", dropna=False)
        mean, low, high = bootstrap_ci(mat.to_numpy(), n_boot=n_boot, ci=ci)
        frame = pd.DataFrame({x: mat.columns.to_numpy(), "mean": mean, "low": low, "high": high,
                              "n": mat.notna().sum(axis=0).to_numpy()})
        for col, v in zip(by, key if isinstance(key, tuple) else (key,)):
            frame.insert(0, col, v)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
