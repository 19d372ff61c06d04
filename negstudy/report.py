"""Reports: tables on disk -> critical steps with confidence intervals, figures, Markdown, CSV, HTML.

    python -m negstudy.report <run or sweep directory>

Reads every ``ratio.parquet`` / ``removal.parquet`` / ``attention.parquet`` under the directory
(one per job of a multirun, or one for a single run), and writes ``report/`` beside them:
``critical_steps.csv``, ``removal_vs_start.csv``, ``report.md``, the figures as PNG, and
``report.html`` (self-contained: figures embedded).

Rules (negstudy.critical): object negatives' critical step = the peak of the mean strength-ratio
curve; attribute negatives' = the first step from which the curve stays >= 1. Intervals are 95 %
percentile bootstraps over seeds; removal rates carry 95 % Wilson intervals.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from negstudy.critical import agreement, bootstrap_ci, bootstrap_critical_step, first_hit_step, wilson
from negstudy.records import write_table, write_text

DEFAULT_VARIANT = "all_tokens"
HIT_LIFT = 2.0  # attention "reaches the region" once its mass there is twice what a uniform map would put there


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


def _matrix(frame: pd.DataFrame, value: str) -> np.ndarray:
    """(seeds, steps) of ``value``."""
    return frame.pivot_table(index=["job", "seed"], columns="step", values=value).to_numpy()


def critical_steps(ratio: pd.DataFrame, attention: pd.DataFrame, variant: str = DEFAULT_VARIANT,
                   hit_lift: float = HIT_LIFT) -> pd.DataFrame:
    """One row per pair and one per category: critical step from the ratio curve (with CI) and
    from attention: the first step at which the negative word's map is concentrated on the
    concept's region, i.e. lift = (mass inside the region) / (region's share of the image) >= hit_lift.
    Lift rather than raw mass because objects cover ~10 % of a shapes image: a raw-mass threshold
    of 0.5 would demand a five-fold concentration for small objects and a trivial one for large."""
    rows = []
    ratio = ratio[ratio.variant == variant]
    groups = [("pair", key, frame) for key, frame in ratio.groupby(["category", "negative"])]
    groups += [("category", (cat, "all"), frame) for cat, frame in ratio.groupby("category")]
    for level, (category, negative), frame in groups:
        values = _matrix(frame, "ratio")
        ci = bootstrap_critical_step(values, category)
        mean = np.nanmean(values, axis=0)
        row = {"level": level, "category": category, "negative": negative, "n_seeds": values.shape[0],
               "critical_step": ci.step, "ci_low": ci.low, "ci_high": ci.high,
               "never_fraction": getattr(ci, "fraction_never", np.nan),
               "peak_ratio": float(np.nanmax(mean)), "ratio_at_step0": float(mean[0])}
        att = attention[(attention.category == category) & ((attention.negative == negative) | (negative == "all"))] if len(attention) else attention
        if len(att):
            hits = [first_hit_step((g.mass_in_region / g.region_fraction).to_numpy(), hit_lift)
                    for _, g in att.sort_values("step").groupby(["job", "negative", "seed"])]
            found = [h for h in hits if h is not None]
            row.update(attention_step_mean=float(np.mean(found)) if found else np.nan,
                       attention_n=len(hits), attention_never=len(hits) - len(found))
            if ci.step is not None:
                agree = agreement([ci.step] * len(hits), hits)
                row.update(agreement_mean_abs=agree.mean_abs_diff, agreement_within2=agree.within)
        rows.append(row)
    return pd.DataFrame(rows)


def removal_vs_start(removal: pd.DataFrame) -> pd.DataFrame:
    """Per category and start step: how often the concept is gone, over seeds where it appeared
    without the negative (Wilson 95 % CI)."""
    base = removal[removal.present_without_negative]
    rows = []
    for (category, k), g in base.groupby(["category", "start_step"]):
        gone = int((~g.concept_present.astype(bool)).sum())
        rate, lo, hi = wilson(gone, len(g))
        rows.append({"category": category, "start_step": int(k), "removed": rate, "ci_low": lo, "ci_high": hi,
                     "n": len(g), "psnr_outside_median": float(np.nanmedian(g.psnr_outside)) if g.psnr_outside.notna().any() else np.nan})
    return pd.DataFrame(rows)


def reverse_activation(reverse: pd.DataFrame) -> pd.DataFrame:
    """Per k (negative in steps 0..k-1 only): how often the negative's object APPEARS, over seeds
    where it is absent without the negative (95 % Wilson CI)."""
    rows = []
    for k, g in reverse.groupby("k"):
        rate, lo, hi = wilson(int(g.appears.sum()), len(g))
        rows.append({"k": int(k), "appears": rate, "ci_low": lo, "ci_high": hi, "n": len(g)})
    return pd.DataFrame(rows)


PSNR_CAP = 100.0  # dB: identical pixels (infinite PSNR) enter means at this value
METHOD_NAMES = {"from0": "negative from step 0", "window": "fixed window", "adaptive": "adaptive window"}


def _ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """mean(num) / mean(den) with a paired percentile bootstrap over objects (95 %)."""
    if len(num) == 0 or den.mean() == 0:
        return (float("nan"),) * 3
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    with np.errstate(all="ignore"):
        boots = num[idx].mean(1) / den[idx].mean(1)
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return float(num.mean() / den.mean()), float(lo), float(hi)


def _mean_ci(values: np.ndarray) -> tuple[float, float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return (float("nan"),) * 3
    mean, lo, hi = bootstrap_ci(values[:, None])
    return float(mean[0]), float(lo[0]), float(hi[0])


def removal_methods(targets: pd.DataFrame) -> pd.DataFrame:
    """The paper's removal table, per dataset and method: removal rate (Wilson 95 % CI), the rate
    relative to from-0 (paired bootstrap over objects), how often the judge (or PSNR outside the
    object) prefers the method's image to from-0's as closer to the original, PSNR / SSIM outside
    the object (bootstrap CIs; PSNR capped at PSNR_CAP, with the share of untouched backgrounds), regenerations used, and how often the critical step came from attention."""
    rows = []
    for dataset, d in targets.groupby("dataset"):
        judged = d.pivot_table(index=["job", "caption", "seed", "object"], columns="method", values="removed", aggfunc="first")
        judged = judged.dropna().astype(float)  # objects with a verdict for every method
        for method in [m for m in METHOD_NAMES if m in d.method.unique()]:
            g = d[d.method == method]
            removed = judged[method].to_numpy() if method in judged else np.array([])
            rate, lo, hi = wilson(int(removed.sum()), len(removed))
            ratio, rlo, rhi = _ratio_ci(removed, judged["from0"].to_numpy()) if method != "from0" and "from0" in judged else (1.0, 1.0, 1.0)
            row = {"dataset": dataset, "method": METHOD_NAMES[method], "objects": len(removed), "removed": rate,
                   "ci_low": lo, "ci_high": hi, "vs_from0": ratio, "vs_from0_low": rlo, "vs_from0_high": rhi}
            prefs = g.prefers_over_from0.dropna().astype(bool) if "prefers_over_from0" in g else pd.Series(dtype=bool)
            if method != "from0" and len(prefs):
                p, plo, phi = wilson(int(prefs.sum()), len(prefs))
                row.update(preferred=p, preferred_low=plo, preferred_high=phi, preference_by=g.preference_source.iloc[0])
            for metric in ("psnr_out", "ssim_out"):
                if metric in g:
                    values = g[metric].to_numpy(dtype=float)
                    if metric == "psnr_out":  # an untouched background has infinite PSNR: count it at the cap
                        row["background_identical"] = float(np.isinf(values).mean())
                        values = np.minimum(values, PSNR_CAP)
                    m, mlo, mhi = _mean_ci(values)
                    row.update({metric: m, f"{metric}_low": mlo, f"{metric}_high": mhi})
            if "substituted" in g and g.substituted.notna().any():
                sub = g.substituted.dropna().astype(bool)
                row["substituted"], row["substituted_low"], row["substituted_high"] = wilson(int(sub.sum()), len(sub))
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
        values = _matrix(frame, "ratio")
        mean, lo, hi = bootstrap_ci(values)
        steps = np.arange(len(mean))
        ax.plot(steps, mean, color=colour, label=f"{category} negatives (n={values.shape[0]} pair-seeds)")
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
    crit = critical_steps(ratio, attention, variant) if not ratio.empty else pd.DataFrame()
    rem = removal_vs_start(removal) if not removal.empty else pd.DataFrame()
    if not crit.empty:
        write_table(crit, out / "critical_steps.parquet")
        crit.to_csv(out / "critical_steps.csv", index=False)
        figures["ratio"] = _png(_figure_ratio(ratio, crit, variant), out / "ratio_curves.png")
        sections.append(("Critical steps", crit))
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
          "attribute = first step from which it stays >= 1; attention = first step at which the negative word's map puts "
          f"{HIT_LIFT:g}x a uniform map's mass on the concept's region; 95 % bootstrap CIs over seeds; removal rates over seeds where "
          "the concept appears without the negative, 95 % Wilson CIs.", ""]
    if not sections and not figures:
        md += ["Nothing to report: the jobs found nothing to measure (e.g. no seed showed the concept, no object to remove).", ""]
    for title, frame in sections:
        md += [f"## {title}", "", frame.to_markdown(index=False, floatfmt=".3g"), ""]
    write_text("\n".join(md), out / "report.md")
    from negstudy import report_html  # the page: scorecard, strips, attention grids, curves, tables, captions

    page = report_html.page(root, out, md[2], sections, figures, ratio=ratio, removal=removal, crit=crit, variant=variant,
                            hit_lift=HIT_LIFT, screen=_read(root, "screen"))
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
                    f"{row.objects} objects)")
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
                     f"n={int(top.n)}) of seeds at k={int(top.k)}; without the negative (k=0) in {rev.appears.iloc[0]:.0%}")
    path = Path(root) / "report" / "critical_steps.parquet"
    if not path.exists():
        return lines
    crit = pd.read_parquet(path)
    for row in crit[crit.level == "category"].itertuples():
        line = (f"critical step, {row.category} negatives: {_step(row.critical_step)} "
                f"(95 % CI {_step(row.ci_low)}..{_step(row.ci_high)}, {row.n_seeds} pair-seeds, peak ratio {row.peak_ratio:.3f})")
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
    ap.add_argument("--variant", default=DEFAULT_VARIANT, choices=["all_tokens", "word_tokens"])
    args = ap.parse_args(argv)
    try:
        path = build(args.directory, args.variant)
    except FileNotFoundError as err:
        print(f"negstudy.report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"negstudy.report: {path}")


if __name__ == "__main__":
    main()
