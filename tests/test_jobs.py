"""Cluster-scale sweeps: job identity, resume, failure isolation, the submitit launcher, fault drills."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from negstudy import jobs
from negstudy.config import register_configs

sys.path.insert(0, str(Path(__file__).parent))
from shipped_sweeps import REMOVAL  # noqa: E402

# A removal sweep small enough for a test: two prompt shards (the overlay's grid), 2 captions, one
# seed, one object to remove in each shard (tests/shipped_sweeps.py).
SWEEP = [sys.executable, "-m", "negstudy", *REMOVAL, "logger=none"]


def _cfg(*overrides):
    register_configs()
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_job_identity_ignores_logger_batch_size_and_paths_but_not_the_science():
    base = jobs.job_hash(_cfg())
    assert jobs.job_hash(_cfg("logger=none", "batch_size=3", "job_store=/elsewhere", "resume=false")) == base
    for change in ("seeds=[5]", "guidance_scale=5", "schedule=never", "steps=20", "dataset.shard=0", "evaluator=none"):
        assert (jobs.job_hash(_cfg(change)) == base) == (change == "dataset.shard=0"), change


def _run(args, cwd, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd, **kw)


def _tables(sweep: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(p).assign(job=p.parent.name) for p in sorted(sweep.glob("*/removal_targets.parquet"))]
    assert all(len(f) for f in frames)
    return pd.concat(frames).sort_values(["job", "caption", "seed", "object", "method"]).reset_index(drop=True)


def test_submitit_local_multirun_then_a_rerun_skips_every_finished_job(tmp_path):
    """A real multirun through hydra-submitit's local executor (the SLURM code path): each job in its
    own process, logs under the sweep directory; the same sweep again, into another sweep directory,
    finishes nothing twice: its jobs come from the job store (outputs/.jobs under cwd), their tables equal."""
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=local"]
    first = _run(SWEEP + launcher + [f"hydra.sweep.dir={sweep}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep summary: 2 done, 0 skipped, 0 failed" in first.stdout
    last = [line for line in first.stdout.splitlines() if line.startswith("negstudy:")][-1]
    assert last == f"negstudy: outputs -> {sweep}; report -> {sweep / 'report' / 'report.html'}"
    logs = list(sweep.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2 and all("negstudy: report ->" in p.read_text() for p in logs)  # each job's own stdout
    # submitit starts both jobs at once on this machine: each holds itself to the launcher's cpus_per_task
    assert all("torch threads: 1 (from hydra.launcher.cpus_per_task (submitit local))" in p.read_text() for p in logs)
    before = {p: p.read_bytes() for p in sweep.glob("*/*.parquet")}
    again = tmp_path / "again"
    second = _run(SWEEP + launcher + [f"hydra.sweep.dir={again}"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "sweep summary: 0 done, 2 skipped, 0 failed" in second.stdout
    assert {p: p.read_bytes() for p in sweep.glob("*/*.parquet")} == before
    summary = json.loads((again / "summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["skipped", "skipped"] and summary["rerun"] is None
    pd.testing.assert_frame_equal(_tables(again), _tables(sweep))
    for job in ("0", "1"):  # the reused job keeps the time and CPU that made its results (reports quote them)
        made, reused = (json.loads((d / job / "done.json").read_text()) for d in (sweep, again))
        assert made["seconds"] > 0 and made["cpu"]
        assert {k: reused[k] for k in ("seconds", "cpu", "threads")} == {k: made[k] for k in ("seconds", "cpu", "threads")}
        assert reused["reused_from"] == str(sweep / job)


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory):
    """The shipped sweep beside two invalid cells (steps=0): 2 of 4 jobs fail. Its two good jobs are the
    plain sweep's, uninterrupted: the fault drill below compares its rerun with them."""
    root = tmp_path_factory.mktemp("failing")
    sweep = root / "sweep"
    return sweep, _run(SWEEP + ["steps=20,0", f"hydra.sweep.dir={sweep}"], root)


def test_one_failing_job_does_not_stop_the_others_and_the_summary_says_how_to_rerun(failing_sweep):
    sweep, proc = failing_sweep
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((sweep / "summary.json").read_text())
    assert (summary["done"], summary["failed"]) == (2, 2)
    failed = [j for j in summary["jobs"] if j["status"] == "failed"]
    assert all("steps=0" in j["overrides"] and j["cause"].startswith("ConfigError: steps=0") for j in failed)
    assert summary["rerun"].startswith("python -m negstudy -m +sweep=removal") and f"hydra.sweep.dir={sweep}" in summary["rerun"]
    assert "rerun only the failed jobs" in proc.stdout
    done = [sweep / j["job"] for j in summary["jobs"] if j["status"] == "done"]
    assert all((d / "removal_targets.parquet").exists() and (d / "done.json").exists() for d in done)
    assert len(_tables(sweep).job.unique()) == 2  # the pooled report reads the finished jobs only


def test_fault_drill_sigkill_mid_sweep_then_rerun_loses_and_duplicates_nothing(tmp_path, failing_sweep):
    """SIGKILL the sweep while its second job runs; the same command again finishes only that job,
    and the tables and the pooled report equal those of an uninterrupted run (the good jobs of
    ``failing_sweep``: the same two jobs, never interrupted, in another job store)."""
    sweep = tmp_path / "killed"
    command = SWEEP + [f"hydra.sweep.dir={sweep}", "job_store=store-killed"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not ((sweep / "0" / "done.json").exists() and (sweep / "1" / ".incomplete").exists()):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.02)
    time.sleep(1.0)  # into the second job's work
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (sweep / "1" / ".incomplete").exists() and not (sweep / "1" / "done.json").exists()
    assert not list(sweep.rglob("*.tmp"))  # atomic writes: no half-written file under its final name or elsewhere
    status = jobs.summarize(sweep, "rerun")
    assert [j["status"] for j in status["jobs"]] == ["done", "failed"] and "did not finish" in status["jobs"][1]["cause"]

    rerun = _run(command, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "sweep summary: 1 done, 1 skipped, 0 failed" in rerun.stdout
    clean = failing_sweep[0]
    science = lambda t: t.drop(columns="job").sort_values(["caption", "seed", "object", "method"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(science(_tables(sweep)), science(_tables(clean)))
    assert (sweep / "report" / "removal_methods.csv").read_text() == (clean / "report" / "removal_methods.csv").read_text()


def test_fault_drill_full_disk_ends_in_a_clear_error_and_no_half_written_file(tmp_path):
    """A write failure (file-size limit: EFBIG, as a full disk gives ENOSPC) in a single run."""
    out = tmp_path / "run"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with an error instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))  # the PNGs fit, images.parquet does not

    proc = _run([sys.executable, "-m", "negstudy", "steps=4", "seeds=[0]", "dataset.limit=2", "logger=none",
                 f"hydra.run.dir={out}"], tmp_path, preexec_fn=small_files)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "negstudy: error: the job failed: OSError" in proc.stderr and "File too large" in proc.stderr
    assert not list(out.rglob("*.tmp"))
    for png in out.rglob("*.png"):  # what was written is complete
        from PIL import Image

        Image.open(png).load()
    assert not (out / "done.json").exists() and (out / ".incomplete").exists()


def test_every_launcher_composes_and_instantiates():
    from hydra.utils import instantiate

    register_configs()
    with initialize_config_module(config_module="negstudy.conf", version_base="1.3"):
        for name, target in (("slurm", "SlurmLauncher"), ("local", "LocalLauncher"), ("joblib", "JoblibLauncher")):
            cfg = compose(config_name="config", overrides=[f"hydra/launcher={name}", "hydra.launcher.timeout_min=7"]
                          if name != "joblib" else [f"hydra/launcher={name}"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_.endswith(target)
            launcher = instantiate(cfg.hydra.launcher)
            assert type(launcher).__name__ == target
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                                       "hydra.launcher.array_parallelism=8"], return_hydra_config=True)
        assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.array_parallelism, cfg.hydra.launcher.gpus_per_node) == ("gpu", 8, 1)
        assert cfg.hydra.launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"  # job logs inside the sweep directory
