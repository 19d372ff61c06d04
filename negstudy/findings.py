"""The project's findings: one scorecard over several sweeps, written into README.md and docs/findings.md.

    python -m negstudy.findings <sweep dir> [<sweep dir> ...]              # print the tables
    python -m negstudy.findings <sweep dirs> --archive docs/findings/runs  # keep the sweeps' tables
    python -m negstudy.findings docs/findings/runs/* --write               # regenerate the blocks
    python -m negstudy.findings docs/findings/runs/* --check               # exit 1 if they are stale

Each sweep directory is one run of a study (``+sweep=critical_step``, ``removal``, ...). Its
scorecard (:mod:`negstudy.scorecard`) measures the claims its tables carry; the findings take, for
every claim, the first sweep that measured it (in the order of ORDER by directory name: the
critical-step sweep first, then removal, ...; other names after them, alphabetically), so one row comes from one run
and says which. Beside the tables: the command of each sweep, its jobs' time and the CPU they ran
on (from each job's ``done.json``). No number is typed by hand: ``--write`` replaces what lies
between ``<!-- findings:start -->`` and ``<!-- findings:end -->`` in README.md and between
``<!-- scorecard:start -->`` and ``<!-- scorecard:end -->`` in docs/findings.md, and the test suite
checks (``--check``) that both are what the archived tables give.

``--archive DIR`` copies what the scorecard reads from each sweep (its ``*.parquet`` tables, the
jobs' ``config.yaml``, ``done.json`` and ``overrides.yaml``, ``summary.json``) into ``DIR/<name>``,
a few hundred kB in all, so the findings can be regenerated from the repository.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from negstudy import scorecard as sc

REPO = Path(__file__).resolve().parents[1]
MARKERS = {"README.md": "findings", "docs/findings.md": "scorecard"}
KEEP = ("*.parquet", "config.yaml", "overrides.yaml", "done.json", "summary.json")


# Which run a claim is taken from when several measure it: the study written for it first.
ORDER = ("critical_step", "removal", "reverse_activation", "mechanisms", "attention_maps", "methods")


def precedence(directory: Path) -> tuple[int, str]:
    name = Path(directory).name
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


@dataclass(frozen=True)
class Sweep:
    name: str
    command: str
    jobs: int
    seconds: float
    cpus: tuple[str, ...]


def describe(directory: Path) -> Sweep:
    """A sweep's command (summary.json or the jobs' overrides), its jobs' time and CPUs (done.json)."""
    directory = Path(directory)
    done = [json.loads(p.read_text()) for p in sorted(directory.rglob("done.json")) if "report" not in p.parts]
    seconds = sum(float(d.get("seconds", 0.0)) for d in done)
    cpus = tuple(dict.fromkeys(d["cpu"] for d in done if d.get("cpu"))) or ("CPU not recorded",)
    command = ""
    summary = directory / "summary.json"
    if summary.exists():
        command = json.loads(summary.read_text()).get("command") or ""
    if not command:
        configs = sc.run_configs(directory)
        name = next((c.get("sweep", {}).get("name") for c in configs if c.get("sweep")), None)
        command = f"python -m negstudy +sweep={name}" if name else "python -m negstudy"
    command = re.sub(r"\s*'?hydra\.(sweep|run)\.dir=[^\s']*'?", "", command)  # where it ran is not part of the finding
    return Sweep(directory.name, command, len(done), seconds, cpus)


def collect(directories: list[Path], variant: str = sc.DEFAULT_VARIANT) -> tuple[pd.DataFrame, sc.Instrument, list[Sweep]]:
    """Every claim's rows from the first sweep that measured it (rows measured nowhere: the first
    sweep's row, which says which sweep writes it), with a ``run`` column naming the sweep. A claim
    measured per dataset (its rows share a ``family``: removal, per window method) is taken whole from
    one sweep: another sweep's rows of it on another dataset (the methods study's smaller removal) do
    not add to it."""
    if not directories:
        raise ValueError("findings: name at least one sweep directory")
    missing = [str(d) for d in directories if not Path(d).is_dir()]
    if missing:
        raise ValueError(f"findings: not a directory: {', '.join(missing)}")
    tables, instruments = [], []
    for d in directories:
        table, inst = sc.scorecard(d, variant)
        tables.append(table.assign(run=Path(d).name))
        instruments.append(inst)
    rows = []
    for family in dict.fromkeys(f for t in tables for f in t.family):
        candidates = [t[t.family == family] for t in tables if (t.family == family).any()]
        measured = [c[~c.verdict.astype(str).str.startswith(sc.ABSENT)] for c in candidates]
        measured = [m for m in measured if len(m)]
        rows += [r for _, r in (measured[0] if measured else candidates[0].iloc[:1]).iterrows()]
    # a claim measured per variant (removal: "... (fixed window, shapes_removal)") replaces its unmeasured plain row
    rows = [r for r in rows if not (str(r.verdict).startswith(sc.ABSENT)
                                    and any(o.claim.startswith(f"{r.claim} (") for o in rows))]
    inst = sc.Instrument(list(dict.fromkeys(m for i in instruments for m in i.models)),
                         "; ".join(dict.fromkeys(i.model_text for i in instruments)),
                         list(dict.fromkeys(r for i in instruments for r in i.readers)),
                         "; ".join(dict.fromkeys(i.reader_text for i in instruments)),
                         {k: sc._worst([i.checks[k] for i in instruments if k in i.checks])
                          for k in sc.CHECKS if any(k in i.checks for i in instruments)})
    return pd.DataFrame(rows).reset_index(drop=True), inst, [describe(Path(d)) for d in directories]


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _sweeps_lines(sweeps: list[Sweep]) -> list[str]:
    lines = ["| run | command | jobs | jobs' time | CPU |", "|---|---|---|---|---|"]
    for s in sweeps:
        minutes, secs = divmod(round(s.seconds), 60)
        lines.append(f"| {s.name} | `{s.command}` | {s.jobs} | {minutes} min {secs:02d} s | {', '.join(s.cpus)} |")
    return lines


def readme_block(table: pd.DataFrame, inst: sc.Instrument, sweeps: list[Sweep]) -> str:
    cpus = ", ".join(dict.fromkeys(c for sw in sweeps for c in sw.cpus))
    times = ", ".join(f"{sw.name} {round(sw.seconds / 60)} min" for sw in sweeps)
    lines = ["Measured by negstudy on the shipped model with the validated reader; 95 % intervals. Generated "
             "(`python -m negstudy.findings docs/findings/runs/* --write`) from the archived sweep tables.", "",
             f"Model quality: {inst.model_text}. Reader: {inst.reader_text}.", "",
             "| claim (Ban et al.) | paper | measured here | n | verdict | n to decide |", "|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        verdict = r["verdict"].split(" (")[0] if r["verdict"].startswith(sc.ABSENT) else r["verdict"]
        if r.get("failed checks"):  # the failed checks' names here; their values on the findings page
            verdict = f"{sc.INSTRUMENT}: {r['failed checks']})"
        lines.append(f"| {_cell(r['claim'])} | {_cell(_short(r['paper'], 60))} | {_cell(_short(r['measured'], 70))} | {_cell(r['n'])} | "
                     f"{_cell(verdict)} | {_cell(r.get('n to decide', '-'))} |")
    lines += ["", f"Sweeps (jobs' time on {cpus}): {times}. Commands, rules, per-pair tables and what each verdict "
                  "means: [findings](docs/findings.md)."]
    return "\n".join(lines)


def _short(text: str, limit: int = 90) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + " ..."


def _pct(x) -> str:
    return "-" if pd.isna(x) else f"{x:.0%}"


def _rate(value, low, high) -> str:
    return f"{_pct(value)} [{_pct(low)}, {_pct(high)}]"


def _section(title: str, header: list[str], rows: list[list]) -> list[str]:
    """A titled Markdown table: the lines to append to a page."""
    return ["", title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def supporting(directories: list[Path], variant: str = sc.DEFAULT_VARIANT) -> list[str]:
    """The tables behind the verdicts that the scorecard summarises in one cell: the critical steps
    per pair, removal against the start step, reverse activation per k (from the first run that has each)."""
    from negstudy import tables as tb

    lines: list[str] = []
    done = set()
    for d in directories:
        d = Path(d)
        ratio = tb._read(d, "ratio")
        if "critical" not in done and not ratio.empty:
            ratio = ratio[ratio.variant == variant] if "variant" in ratio else ratio
            crit = tb.critical_steps(ratio, tb._read(d, "attention"), variant, screen=tb._read(d, "screen"))
            shown = tb.critical_table(crit)
            shown = shown.drop(columns=[c for c in ("crossing: first", "crossing: stays_strict") if c in shown])
            lines += ["", f"Critical steps per pair and category (run {d.name}; steps of {int(crit.n_steps.max())} calls):", "",
                      shown.to_markdown(index=False)]
            done.add("critical")
            screen = tb._read(d, "screen")
            if not screen.empty and {"screened", "present", "unsure"} <= set(screen.columns):
                rows = []
                for r in screen.to_dict("records"):
                    rows.append([r.get("prompt", "-"), r["negative"], r["category"], int(r["screened"]), int(r["present"]),
                                 int(r["unsure"]), f"{r['present'] / r['screened']:.0%}" if r["screened"] else "-"])
                lines += _section(f"Where the main job's screened seeds go (run {d.name}; per pair: seeds generated without the "
                                  "negative, seeds where the reader saw the concept, unsure; the ratio takes up to "
                                  "`sweep.ratio_seeds` of the present ones, every start step the first `sweep.max_seeds`):",
                                  ["prompt", "negative", "category", "screened", "present", "unsure", "yield"], rows)
        removal = tb._read(d, "removal")
        if "removal" not in done and not removal.empty and "start_step" in removal:
            rv = tb.removal_vs_start(removal)
            lines += _section(f"Removal against the start step k of the negative (run {d.name}; k = {int(rv.start_step.max())}: "
                              "never applied):",
                              ["category", "start step k", "concept removed (95 % CI)", "pairs x pair-seeds", "unsure",
                               "median PSNR outside (dB)"],
                              [[r.category, r.start_step, _rate(r.removed, r.ci_low, r.ci_high), f"{r.n_pairs} x {r.n_pair_seeds}",
                                r.n_unsure, "-" if pd.isna(r.psnr_outside_median) else f"{r.psnr_outside_median:.1f}"]
                               for r in rv.itertuples()])
            done.add("removal")
        targets = tb._read(d, "removal_targets")
        if "methods" not in done and not targets.empty:
            rows = []
            for r in tb.removal_methods(targets).itertuples():
                ratio = "1.00" if r.method == tb.METHOD_NAMES["from0"] else f"{r.vs_from0:.2f} [{r.vs_from0_low:.2f}, {r.vs_from0_high:.2f}]"
                pref = (f"{_rate(r.preferred, r.preferred_low, r.preferred_high)} by {r.preference_by}"
                        if pd.notna(getattr(r, "preferred", float("nan"))) else "-")
                rows.append([r.dataset, r.method, f"{r.n_captions} x {r.objects}", _rate(r.removed, r.ci_low, r.ci_high), ratio, pref,
                             f"{r.psnr_out:.1f} [{r.psnr_out_low:.1f}, {r.psnr_out_high:.1f}]",
                             _pct(getattr(r, "substituted", float("nan"))), f"{r.regenerations:.1f}"])
            lines += _section(f"Object removal by method (run {d.name}; objects the caption does not name, with a verdict under "
                              "every method; intervals resample captions, then objects):",
                              ["dataset", "method", "captions x objects", "removed (95 % CI)", "/ from-0 (95 % CI)",
                               "preferred to from-0", "PSNR outside (dB)", "another object appears", "regenerations"], rows)
            done.add("methods")
        reverse = tb._read(d, "reverse")
        if "reverse" not in done and not reverse.empty:
            lines += _section(f"Reverse activation per k (run {d.name}; pair-seeds where the object is absent without the "
                              "negative):", ["k (negative in steps 0..k-1 only)", "object appears (95 % CI)", "pairs x pair-seeds", "unsure"],
                              [[r.k, _rate(r.appears, r.ci_low, r.ci_high), f"{r.n_pairs} x {r.n_pair_seeds}", r.n_unsure]
                               for r in tb.reverse_activation(reverse).itertuples()])
            done.add("reverse")
        if "guidance" not in done and not tb._read(d, "methods_removal").empty:
            import tempfile

            from negstudy.studies import methods

            frames = {t: tb._read(d, t) for t in methods.TABLES}
            with tempfile.TemporaryDirectory() as tmp:  # summarise also writes its csv / png: not wanted here
                summary = methods.summarise(frames, Path(tmp), variant)
            for title, frame in summary.sections:
                lines += ["", f"{title} (run {d.name}; 95 % intervals over pairs, then seeds):", "",
                          frame.rename(columns=lambda c: c.replace("_", " ")).to_markdown(index=False)]
            done.add("guidance")
    return lines


def docs_block(table: pd.DataFrame, inst: sc.Instrument, sweeps: list[Sweep], extra: list[str] = ()) -> str:
    lines = ["Generated by `python -m negstudy.findings docs/findings/runs/* --write` from the archived tables of "
             "the runs below; do not edit by hand.", "",
             f"Models: {', '.join(inst.models)}.", "", f"Model quality: {inst.model_text}.", "",
             f"Reader ({', '.join(inst.readers)}): {inst.reader_text}.", "",
             "| claim | paper | measured | n | verdict | n to decide | rule | checks | run |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        lines.append(" | ".join(["", *(_cell(r.get(c, "-")) for c in ("claim", "paper", "measured", "n", "verdict", "n to decide", "rule",
                                                                     "checks", "run")), ""]).strip())
    return "\n".join(lines + ["", *checks_lines(table, inst), "", *_sweeps_lines(sweeps), *extra])


def checks_lines(table: pd.DataFrame, inst: sc.Instrument) -> list[str]:
    """The instrument checks, one line each: what it measures, its threshold, its value on these runs, the claims
    that need it."""
    needs = {k: list(dict.fromkeys(r.key for r in table.itertuples() if k in str(getattr(r, "checks", "")).split(", ")))
             for k in inst.checks}
    lines = ["Instrument checks (a claim's verdict is given only when every check it names passes; the thresholds are "
             "the plan's, in `negstudy/scorecard.py` CHECKS):", "",
             "| check | what it measures | threshold | measured | claims that need it (scorecard keys) |", "|---|---|---|---|---|"]
    for key, r in inst.checks.items():
        value = ("not measured" if r.value is None else f"{r.value:.1%}") + ("" if r.passed else " (FAILS)")
        who = f" ({r.reader})" if r.reader else ""
        lines.append(f"| {key}{who} | {_cell(r.check.says)} | >= {r.check.threshold:.0%} | {value} | "
                     f"{', '.join(needs[key]) or '-'} |")
    return lines


def replace_block(text: str, marker: str, body: str, path: str) -> str:
    pattern = re.compile(rf"(<!-- {marker}:start[^>]*-->\n)(.*?)(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{path}: no <!-- {marker}:start --> ... <!-- {marker}:end --> block to write into")
    return pattern.sub(lambda m: m.group(1) + "\n" + body + "\n\n" + m.group(3), text, count=1)


def archive(directories: list[Path], target: Path) -> list[Path]:
    """Copy what the scorecard reads from each sweep into ``target/<sweep name>`` (replacing it)."""
    out = []
    for d in directories:
        d = Path(d)
        dest = Path(target) / d.name
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for pattern in KEEP:
            for path in d.rglob(pattern):
                rel = path.relative_to(d)
                if "report" in rel.parts or ".submitit" in rel.parts:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, tmp / rel)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)  # a crash leaves the previous archive or the new one, never half of one
        out.append(dest)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m negstudy.findings", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directories", nargs="+", type=Path, help="sweep directories (named after their sweep: critical_step, ...)")
    ap.add_argument("--archive", type=Path, default=None, help="copy the sweeps' tables here first, and read them from there")
    ap.add_argument("--write", action="store_true", help="write the blocks into README.md and docs/findings.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md or docs/findings.md differ from the tables")
    ap.add_argument("--root", type=Path, default=REPO, help="the repository whose README.md and docs/ are written")
    ap.add_argument("--variant", default=sc.DEFAULT_VARIANT)
    args = ap.parse_args(argv)
    dirs = sorted(args.directories, key=precedence)
    try:
        if args.archive is not None:
            dirs = archive(dirs, args.archive)
        table, inst, sweeps = collect(dirs, args.variant)
    except ValueError as err:
        print(f"negstudy.findings: error: {err}", file=sys.stderr)
        return 2
    blocks = {"README.md": readme_block(table, inst, sweeps),
              "docs/findings.md": docs_block(table, inst, sweeps, supporting(dirs, args.variant))}
    if not (args.write or args.check):
        print(blocks["docs/findings.md"])
        return 0
    stale = []
    for rel, body in blocks.items():
        path = args.root / rel
        old = path.read_text()
        new = replace_block(old, MARKERS[rel], body, rel)
        if new != old:
            stale.append(rel)
            if args.write:
                path.write_text(new)
    if args.check and stale:
        print(f"negstudy.findings: {', '.join(stale)} differ from what the tables give; run with --write", file=sys.stderr)
        return 1
    print(f"negstudy.findings: {'wrote' if args.write else 'checked'} {', '.join(blocks)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
