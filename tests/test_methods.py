"""``+sweep=methods`` end to end on the shipped model at tiny sizes: one report row per method, a
method finished before a crash is not recomputed, and a bad method name stops before any model loads."""

import subprocess
import sys

import pandas as pd
import pytest

TINY = ["steps=6", "sweep.screen_seeds=2", "sweep.stride=3", "sweep.study.removal_captions=1",
        "sweep.study.removal_seeds=[0,1]", "logger=none", "dataset.limit=2", "fixed_rows=0", "batch_size=8"]


def negstudy(*args, cwd):
    return subprocess.run([sys.executable, "-m", "negstudy", "+sweep=methods", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_methods_study_runs_resumes_per_method_and_rejects_bad_names(tmp_path):
    # a bad name stops at validation, before any model loads (the CLI turns a ConfigError into one line and
    # exit code 2: tests/test_app.py)
    from hydra import compose, initialize_config_module

    from negstudy.checks import validate
    from negstudy.config import register_configs
    from negstudy.errors import ConfigError

    register_configs()
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+sweep=methods", "sweep.study.methods=[cfg,classifier_free]"])
    with pytest.raises(ConfigError, match=r"sweep\.study\.methods: 'classifier_free' is not an option of the guidance "
                                          r"group \(allowed: .*perp_neg"):
        validate(cfg)

    run_dir = tmp_path / "run"
    args = ["sweep.study.methods=[cfg,perp_neg]", f"hydra.run.dir={run_dir}", *TINY]
    first = negstudy(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    table = pd.read_parquet(run_dir / "report" / "methods.parquet")
    assert table.guidance.tolist() == ["cfg", "perp_neg"]
    assert "guidance perp_neg:" in first.stdout
    ratio = pd.concat([pd.read_parquet(run_dir / "by_method" / m / "methods_ratio.parquet") for m in ("cfg", "perp_neg")])
    assert set(ratio.guider) == {"cfg", "perp_neg(weight=None)"} and ratio.ratio.notna().all()
    # the two methods saw the same screened pair-seeds (same trajectories without the negative)
    screens = [pd.read_parquet(run_dir / "by_method" / m / "methods_screen.parquet") for m in ("cfg", "perp_neg")]
    assert screens[0].drop(columns=["guidance", "guider"]).equals(screens[1].drop(columns=["guidance", "guider"]))

    # a crash after cfg finished: the rerun recomputes perp_neg only
    kept = (run_dir / "by_method" / "cfg" / "methods_ratio.parquet").stat().st_mtime_ns
    (run_dir / "by_method" / "perp_neg" / "done").unlink()
    (run_dir / "done.json").unlink(missing_ok=True)
    second = negstudy(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (run_dir / "by_method" / "cfg" / "methods_ratio.parquet").stat().st_mtime_ns == kept
    assert (run_dir / "by_method" / "perp_neg" / "done").exists()
    assert pd.read_parquet(run_dir / "report" / "methods.parquet").guidance.tolist() == ["cfg", "perp_neg"]


def test_the_methods_table_keeps_each_guidance_and_each_removal_method_apart(tmp_path):
    """removal_targets has its own ``method`` column (from0 / window / adaptive): the guidance is another column."""
    from negstudy.studies.methods import TABLES, summarise

    rows = []
    for guidance, removed in (("cfg", [1, 1, 0]), ("nag", [1, 0, 0])):  # from0, window, adaptive per object
        for obj in range(4):
            for method, r in zip(("from0", "window", "adaptive"), removed):
                rows.append({"dataset": "shapes_removal", "job": f"by_method/{guidance}", "prompt": f"caption {obj % 2}",
                             "seed": obj, "object": "ball", "method": method, "removed": bool(r), "regenerations": 0,
                             "start": 0, "critical_source": "attention", "psnr_out": 20.0, "guidance": guidance,
                             "guider": guidance})
    tables = {t: pd.DataFrame() for t in TABLES}
    tables["methods_removal_targets"] = pd.DataFrame(rows)
    table = summarise(tables, tmp_path, "all_tokens").sections[0][1].set_index("guidance")
    assert table.loc["cfg", "from0_removed"].startswith("100%") and table.loc["cfg", "adaptive_removed"].startswith("0%")
    assert table.loc["nag", "window_removed"].startswith("0%") and table.loc["nag", "from0_objects"] == 4
