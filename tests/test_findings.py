"""negstudy.findings: the README's findings table and docs/findings.md's scorecard are what the
archived sweep tables give (no number typed by hand), every claim is measured, and the command
rewrites a stale block and refuses bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from negstudy import findings
from negstudy import scorecard as sc

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "docs" / "findings" / "runs"


def runs() -> list[Path]:
    found = sorted(p for p in RUNS.iterdir() if p.is_dir()) if RUNS.is_dir() else []
    assert found, f"{RUNS}: the archived sweeps behind the findings are missing"
    return found


@pytest.fixture(scope="module")
def collected():
    return findings.collect(sorted(runs(), key=findings.precedence))


def test_readme_and_docs_are_what_the_archived_tables_give(capsys):
    assert findings.main([*map(str, runs()), "--check"]) == 0, capsys.readouterr().err


def test_every_claim_is_measured_on_the_shipped_model(collected):
    table, inst, sweeps = collected
    assert {c.claim for c in sc.CLAIMS} <= set(table.claim)
    absent = table[table.verdict.str.startswith(sc.ABSENT)]
    assert absent.empty, absent[["claim", "verdict"]].to_string()
    assert all(m.startswith("shapes (builtin:shapes") for m in inst.models), inst.models
    assert all(s.jobs >= 1 and s.seconds > 0 and s.cpus != ("CPU not recorded",) for s in sweeps), sweeps
    # every row names the run it comes from, and that run is one of the archived ones
    assert set(table.run) <= {p.name for p in runs()}


def test_a_removal_claim_comes_whole_from_the_removal_sweep(collected):
    """The removal sweep (dataset shapes_removal_all) and the methods study (its own small removal on
    shapes_removal) both measure the removal claims: each claim's rows come from the removal sweep only,
    one per window method, not a second set of rows from the methods study's other dataset."""
    table, _, _ = collected
    removal = table[table.key.str.startswith("removal_")]
    assert set(removal.run) == {"removal"}
    assert len(removal) == 4 and removal.claim.str.endswith("shapes_removal_all)").all(), removal.claim.tolist()
    methods = sc.scorecard(RUNS / "methods")[0]
    assert methods.claim.str.endswith(", shapes_removal)").sum() == 4  # what the methods study measured, left out


def test_a_stale_block_is_found_and_rewritten(tmp_path, capsys):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    shutil.copy(REPO / "README.md", root / "README.md")
    shutil.copy(REPO / "docs" / "findings.md", root / "docs" / "findings.md")
    readme = (root / "README.md").read_text()
    start = readme.index("<!-- findings:start")
    stale = readme[:start] + readme[start:].replace("| claim (Ban et al.) |", "| claim (Ban et al., typed by hand) |", 1)
    assert stale != readme
    (root / "README.md").write_text(stale)
    args = [*map(str, runs()), "--root", str(root)]
    assert findings.main(args + ["--check"]) == 1
    assert "README.md" in capsys.readouterr().err
    assert findings.main(args + ["--write"]) == 0
    assert (root / "README.md").read_text() == readme  # the block again, and nothing else touched


def test_bad_input_is_refused_before_any_work(tmp_path, capsys):
    assert findings.main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "README.md").write_text("no markers here\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "findings.md").write_text("none either\n")
    with pytest.raises(ValueError, match="no <!-- findings:start -->"):
        findings.main([str(runs()[0]), "--root", str(tmp_path), "--write"])


def test_archive_keeps_what_the_scorecard_reads_and_nothing_else(tmp_path):
    src = runs()[0]
    copy = findings.archive([src], tmp_path / "again")[0]
    kept = sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
    assert kept == sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    assert not any(p.suffix == ".png" for p in kept)
    a, _ = sc.scorecard(src)
    b, _ = sc.scorecard(copy)
    assert a.drop(columns=["source"]).equals(b.drop(columns=["source"]))
