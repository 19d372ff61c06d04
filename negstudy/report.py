"""Reports: tables on disk -> critical steps with confidence intervals, figures, Markdown, CSV, HTML.

    python -m negstudy.report <run or sweep directory>

The report loops over studies (negstudy.studies): those the jobs' configs name and every module of
the package. Each study's ``REPORT`` names the tables its jobs write; they are pooled over every job
under the directory (one per job of a multirun, or one for a single run), and the study's
``summarise`` writes its tables and figures to ``report/`` beside them (e.g. ``critical_steps.csv``,
``removal_vs_start.csv``). Then ``report.md``, the replication scorecard and ``report.html``
(self-contained: figures embedded).

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
import logging
import sys
from pathlib import Path

import pandas as pd

from negstudy.critical import CROSSING_TOLERANCE
from negstudy.records import write_text
from negstudy.scorecard import run_name
from negstudy.tables import (  # noqa: F401 - the statistics of the studies' tables, importable from here as before
    DEFAULT_VARIANT,
    HIT_LIFT,
    METHOD_NAMES,
    UNIT,
    _read,
    attention_lag,
    critical_steps,
    critical_table,
    pair_labels,
    removal_methods,
    removal_vs_start,
    reverse_activation,
    with_prompts,
)

log = logging.getLogger("negstudy")


def build(root: str | Path, variant: str = DEFAULT_VARIANT) -> Path:
    """Write the report of every job under ``root``; return the HTML path."""
    from negstudy import studies

    root = Path(root)
    found = studies.reports(studies.job_targets(root))
    names = list(dict.fromkeys(t for _, rep in found for t in rep.tables))
    jobs = sorted({p.parent for p in root.rglob("config.yaml") if not {"report", ".hydra"} & set(p.relative_to(root).parts)})
    study_figures = [f for job in jobs for f in sorted(job.glob("*.png")) + sorted(job.glob("grids/*.png"))]  # drawn by studies
    if not any(next(root.rglob(f"{t}.parquet"), None) for t in names) and not study_figures \
            and next(root.rglob(f"{studies.LIMITS_TABLE}.parquet"), None) is None:
        raise FileNotFoundError(f"{root}: no {', '.join(f'{t}.parquet' for t in names)} below it: "
                                "is it a negstudy run directory?")
    out = root / "report"
    out.mkdir(exist_ok=True)
    pooled = {name: _read(root, name) for name in names}
    sections, figures, inputs = [], {}, {}
    for _, rep in found:
        tables = {t: pooled[t] for t in rep.tables}
        if all(frame.empty for frame in tables.values()):
            continue
        summary = rep.summarise(tables, out, variant)
        sections += summary.sections
        figures.update(summary.figures)
        inputs.update(summary.page)
    limits = _read(root, studies.LIMITS_TABLE)
    if not limits.empty:  # what the chosen evaluator could not measure: said once, first
        sections.insert(0, ("What the reader could not measure", limits[["study", "reader", "left_out"]].drop_duplicates()))
    for png in study_figures:
        figures[str(png.relative_to(root).with_suffix(""))] = base64.b64encode(png.read_bytes()).decode()
    md = ["# negstudy report", "", f"Run: `{run_name(root)}`. Ratio variant: `{variant}`. Rules: object = peak of the mean ratio curve; "
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

    page = report_html.page(root, out, md[2], sections, figures, variant=variant, hit_lift=HIT_LIFT, scorecard=card, **inputs)
    write_text(page, out / "report.html")
    return out / "report.html"


def summary_lines(root: str | Path) -> list[str]:
    """One-line results of every study (its ``REPORT.lines`` on ``root/report``), and the scorecard's verdicts."""
    from negstudy import studies

    root = Path(root)
    lines = [line for _, rep in studies.reports(studies.job_targets(root)) if rep.lines is not None
             for line in rep.lines(root / "report")]
    limits = _read(root, studies.LIMITS_TABLE)
    if not limits.empty:
        lines += [f"not measured: {line}" for line in dict.fromkeys(limits.left_out)]
    card = root / "report" / "scorecard.csv"
    if card.exists():
        verdicts = (pd.read_csv(card).verdict.str.replace(r"^(not measured in this run) .*", r"\1", regex=True)
                    .str.replace(r"^inconclusive \(instrument: .*", "inconclusive (instrument)", regex=True).value_counts())
        lines.append("replication scorecard (report/scorecard.md): " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))
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
