"""The report on synthetic tables whose critical steps are known, and the main job end to end."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from negstudy import report


def synthetic(root, rng):
    steps = np.arange(31)
    ratio, removal, attention = [], [], []
    for seed in range(6):
        noise = rng.normal(0, 0.005, size=31)
        obj = 0.9 + 0.17 * np.exp(-0.5 * ((steps - 5) / 2.0) ** 2) + noise  # peak at 5
        att = np.clip(0.8 + 0.03 * steps, None, 1.2) + noise  # crosses 1 at step 7 and stays
        for category, curve, negative in (("object", obj, "sun"), ("attribute", att, "dark")):
            ratio += [{"pair": 0, "negative": negative, "category": category, "seed": seed, "present_without_negative": True,
                       "step": int(s), "variant": "all_tokens", "ratio": float(v)} for s, v in zip(steps, curve)]
            for k in (0, 10, 20, 31):
                removal.append({"pair": 0, "negative": negative, "category": category, "seed": seed,
                                "present_without_negative": True, "start_step": k, "concept_present": k >= 20,
                                "psnr_outside": 30.0})
        mass = np.where(steps >= 8, 0.7, 0.1)
        attention += [{"pair": 0, "negative": "sun", "category": "object", "seed": seed, "step": int(s),
                       "mass_in_region": float(m), "region_fraction": 0.2} for s, m in zip(steps, mass)]
    job = root / "0"
    job.mkdir(parents=True)
    for name, rows in (("ratio", ratio), ("removal", removal), ("attention", attention)):
        pd.DataFrame(rows).to_parquet(job / f"{name}.parquet")


def test_report_finds_the_planted_critical_steps(tmp_path):
    synthetic(tmp_path, np.random.default_rng(0))
    page = report.build(tmp_path)
    crit = pd.read_csv(tmp_path / "report" / "critical_steps.csv")
    cat = crit[crit.level == "category"].set_index("category")
    assert cat.loc["object", "critical_step"] == 5 and cat.loc["object", "ci_low"] <= 5 <= cat.loc["object", "ci_high"]
    assert cat.loc["attribute", "critical_step"] == 7
    assert cat.loc["object", "attention_step_mean"] == 8
    rem = pd.read_csv(tmp_path / "report" / "removal_vs_start.csv")
    obj = rem[rem.category == "object"].set_index("start_step").removed
    assert obj[0] == 1.0 and obj[10] == 1.0 and obj[20] == 0.0 and obj[31] == 0.0
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3 and "critical steps" in text  # per category, per pair, removal
    lines = report.summary_lines(tmp_path)
    assert any(line.startswith("critical step, object negatives: 5 ") for line in lines)


def test_report_cli_rejects_a_directory_without_results(tmp_path, capsys):
    """``python -m negstudy.report DIR`` (its main, in this process)."""
    from negstudy.report import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and ": no " in err and "is it a negstudy run directory?" in err
    assert all(f"{t}.parquet" in err for t in ("ratio", "removal", "reverse", "removal_targets"))  # every study's tables


# test_main_job_end_to_end_on_the_shipped_model: in test_report_html.py, whose report test shares its run


def test_multirun_ends_with_one_report_over_all_jobs(tmp_path):
    """A real Hydra multirun (the overlay's two prompt shards x a command-line axis) and the pooled report."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "negstudy", "+sweep=reverse_activation", "steps=20", "sweep.screen_seeds=2",
         "sweep.max_seeds=1", "sweep.stride=5", "dataset.limit=2", "save_images=false", "logger=wandb",
         "evaluator=oracle", "fixed_rows=0",  # the oracle finds an absent seed among 2 in both shards (the ensemble may be unsure)
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sweep report -> {sweep / 'report' / 'report.html'}" in proc.stdout
    jobs = sorted(p.parent.name for p in sweep.glob("*/reverse.parquet"))
    assert jobs == ["0", "1"]
    negatives = [set(pd.read_parquet(sweep / j / "reverse.parquet").negative) for j in jobs]
    assert len(negatives[0] | negatives[1]) == 2 and not negatives[0] & negatives[1]  # disjoint shards of 2 pairs
    pooled = pd.read_csv(sweep / "report" / "reverse_activation.csv")
    per_job = sum(len(pd.read_parquet(sweep / j / "reverse.parquet")) for j in jobs)
    assert (pooled.n_pair_seeds + pooled.n_unsure).sum() == per_job and sorted(pooled.k) == [0, 5, 10, 15, 20, 21]  # unsure: counted apart
    assert (pooled.n_pairs <= 2).all()
    from negstudy.tracking import read_offline_run

    runs = [read_offline_run(d) for d in sweep.rglob("offline-run-*")]
    assert sorted(r["job_type"] for r in runs) == ["generate", "generate", "report"]
    assert len({r["group"] for r in runs}) == 1 and runs[0]["group"] == f"reverse_activation:{sweep}"


def test_attention_maps_sweep_writes_grids(tmp_path):
    out = tmp_path / "am"
    # hydra.mode=RUN dataset.shards=1: the sweep as one in-process job instead of the overlay's multirun
    proc = subprocess.run([sys.executable, "-m", "negstudy", "+sweep=attention_maps", "steps=9", "seeds=[0]", "dataset.limit=1",
                           "hydra.mode=RUN", "dataset.shards=1", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grids = list((out / "grids").glob("*.png"))
    assert len(grids) == 1 and grids[0].stat().st_size > 5000
    windows = pd.read_parquet(out / "attention_windows.parquet")
    assert sorted(windows.first_step.unique()) == [0, 5] and set(windows.branch) == {"positive", "negative"}  # 10 calls
    assert "data:image/png;base64," in (out / "report" / "report.html").read_text()
    from negstudy.tracking import read_offline_run

    run = read_offline_run(next((out / "wandb").glob("offline-run-*")))
    heat = [row for row in run["history"] if row.get("attention_heatmaps/_type") == "table-file"]
    assert heat and heat[0]["attention_heatmaps/nrows"] == len(windows)  # one heat-map image per window and branch
    staged = []  # the table's artifact copy (with its images), staged inside the job directory
    for path in (out / "wandb" / "data").rglob("*"):
        if path.is_file() and path.read_bytes()[:1] == b"{":
            staged.append(json.loads(path.read_text()))
    table = next(t for t in staged if t.get("_type") == "table" and "heat" in t["columns"])
    column = table["columns"].index("heat")
    assert len(table["data"]) == len(windows) and all(row[column]["_type"] == "image-file" for row in table["data"])


def bump(peak: int, height: float) -> np.ndarray:
    steps = np.arange(31)
    return 1.0 + height * np.exp(-0.5 * ((steps - peak) / 2.0) ** 2)


def test_pairs_sharing_seeds_are_pooled_as_pairs_x_seeds(tmp_path):
    """Two object pairs of one job with the same negative word share seeds 0 and 1. Pair A (6 seeds)
    peaks at step 5, pair B (2 seeds) higher at step 15. Pooled over the 8 pair-seeds the mean curve
    peaks at 15; averaging the pairs per seed first (pivoting on job and seed) peaks at 5."""
    rng = np.random.default_rng(0)
    rows = []
    for pair, seeds, curve in ((0, range(6), bump(5, 0.05)), (1, range(2), bump(15, 0.2))):
        for seed in seeds:
            noisy = curve + rng.normal(0, 0.001, 31)
            rows += [{"pair": pair, "negative": "sun", "category": "object", "seed": seed, "present_without_negative": True,
                      "step": s, "variant": "all_tokens", "ratio": float(v)} for s, v in enumerate(noisy)]
    (tmp_path / "0").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "0" / "ratio.parquet")
    crit = report.critical_steps(report._read(tmp_path, "ratio"), pd.DataFrame())
    cat = crit[crit.level == "category"].iloc[0]
    assert cat.critical_step == 15
    assert (cat.n_pairs, cat.n_pair_seeds) == (2, 8)
    pairs = crit[crit.level == "pair"].sort_values("critical_step")
    assert pairs.critical_step.tolist() == [5, 15] and pairs.n_pair_seeds.tolist() == [6, 2]
    assert (pairs.ci_low <= pairs.critical_step).all() and (pairs.critical_step <= pairs.ci_high).all()
    # two pairs that disagree: the category interval spans both peaks (pairs are resampled, not only seeds)
    assert cat.ci_low <= 5 and cat.ci_high >= 15


def test_a_category_pools_only_seeds_where_the_concept_was_drawn(tmp_path):
    """The screen pads a pair with too few present seeds with absent ones (``sweep.min_seeds``): the pair's
    row still shows their curve, the category pools only seeds whose plain image showed the concept."""
    rows = []
    for pair, seeds, curve, present in ((0, range(4), bump(5, 0.05), True), (1, range(2), bump(20, 0.5), False)):
        for seed in seeds:
            rows += [{"pair": pair, "negative": "sun" if pair == 0 else "box", "category": "object", "seed": seed,
                      "present_without_negative": present, "step": s, "variant": "all_tokens", "ratio": float(v)}
                     for s, v in enumerate(curve)]
    (tmp_path / "0").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "0" / "ratio.parquet")
    crit = report.critical_steps(report._read(tmp_path, "ratio"), pd.DataFrame())
    cat = crit[crit.level == "category"].iloc[0]
    assert (cat.critical_step, cat.n_pairs, cat.n_pair_seeds) == (5, 1, 4)  # with the padding: step 20, 6 pair-seeds
    box = crit[crit.level == "pair"].set_index("negative").loc["box"]
    assert (box.critical_step, box.n_without_concept) == (20, 2) and cat.n_without_concept == 0
    assert report.critical_table(crit)["n (pairs x seeds)"].tolist() == ["1 x 4", "1 x 2 (2 without the concept)", "1 x 4"]
    only_padding = report.critical_steps(report._read(tmp_path, "ratio").query("pair == 1"), pd.DataFrame())
    assert list(only_padding.level) == ["pair"]
    from negstudy.studies.critical_step import lines

    only_padding.to_parquet(tmp_path / "critical_steps.parquet")
    assert lines(tmp_path) == ["critical step, object negatives: not measured (no seed where the concept was drawn; "
                               "1 pair on the screen's padding only)"]
    # the paper's protocol (sweep.screen=false) pads nothing: every seed counts, drawn or not, even where a
    # reader said the concept was absent (the study's padding column is False)
    paper = report._read(tmp_path, "ratio").assign(padding=False)
    cat = report.critical_steps(paper, pd.DataFrame()).query("level == 'category'").iloc[0]
    assert (cat.n_pairs, cat.n_pair_seeds, cat.n_without_concept) == (2, 6, 0)


def test_rates_cluster_by_pair():
    """Four pairs share seeds 0..4: two always show the effect, two never. 20 pair-seeds, but only
    4 independent prompts: the interval must be far wider than Wilson's over 20 trials."""
    reverse, removal, targets = [], [], []
    for pair, (prompt, hit) in enumerate((("a ball on the grass", True), ("a box in the sky", False),
                                          ("a tree on the sand", True), ("a kite at night", False))):
        for seed in range(5):
            reverse += [{"pair": pair, "prompt": prompt, "negative": "sun", "seed": seed, "k": k, "appears": hit and k > 0}
                        for k in (0, 3)]
            removal.append({"pair": pair, "prompt": prompt, "negative": "sun", "category": "object", "seed": seed,
                            "present_without_negative": True, "start_step": 0, "concept_present": not hit, "psnr_outside": 20.0})
            for method in ("from0", "window"):
                targets.append({"dataset": "d", "caption": pair, "prompt": prompt, "seed": seed, "object": "sun", "method": method,
                                "removed": hit or method == "from0", "prefers_over_from0": None if method == "from0" else hit,
                                "preference_source": "psnr_out", "psnr_out": 20.0, "ssim_out": 0.9, "regenerations": 0,
                                "start": 0, "critical_source": "fallback"})
    frame = lambda rows: pd.DataFrame(rows).assign(job="0")  # noqa: E731
    wilson_20 = (0.299, 0.701)
    rev = report.reverse_activation(frame(reverse)).set_index("k")
    assert rev.loc[3, "appears"] == 0.5 and (rev.loc[3, "n_pairs"], rev.loc[3, "n_pair_seeds"]) == (4, 20)
    assert rev.loc[3, "ci_low"] < 0.2 and rev.loc[3, "ci_high"] > 0.8  # Wilson over 20 trials: 0.30..0.70
    assert rev.loc[0, "appears"] == 0 and rev.loc[0, "ci_high"] > 0.1  # 0 of 20: the Wilson end is kept
    rem = report.removal_vs_start(frame(removal)).iloc[0]
    assert rem.removed == 0.5 and rem.ci_low < wilson_20[0] - 0.1 and rem.ci_high > wilson_20[1] + 0.1
    methods = report.removal_methods(frame(targets)).set_index("method")
    window = methods.loc["fixed window"]
    assert (window.n_captions, window.objects) == (4, 20) and window.vs_from0 == 0.5
    assert window.vs_from0_low < 0.3 and window.vs_from0_high > 0.7
    assert window.preferred == 0.5 and window.preferred_low < 0.2 and window.preferred_high > 0.8


def test_removal_methods_count_only_objects_with_every_verdict():
    """An unsure reader (None) on an object's from-0 image takes the object out of every method's rate."""
    rows = []
    for o, from0 in enumerate((None, True, False)):
        for method, removed in (("from0", from0), ("window", True)):
            rows.append({"job": "0", "dataset": "d", "caption": 0, "prompt": "a view of the sky", "seed": o, "object": "sun",
                         "method": method, "removed": removed, "preference_source": "psnr_out", "regenerations": 0, "start": 0,
                         "critical_source": "fallback"})
    methods = report.removal_methods(pd.DataFrame(rows)).set_index("method")
    assert methods.objects.tolist() == [2, 2] and methods.loc["fixed window", "vs_from0"] == 2.0
    only_unsure = report.removal_methods(pd.DataFrame(rows[:2])).set_index("method")
    assert (only_unsure.objects == 0).all() and np.isnan(only_unsure.loc["fixed window", "vs_from0"])
