"""A real SLURM cluster: a single node on this machine (scripts/slurm_single_node.sh: munged, slurmctld,
slurmd) and a multirun through ``hydra/launcher=slurm`` on the shipped shapes model: an array job of
two prompt shards and one failing cell, one task cancelled mid-run with scancel, the sweep rerun to
completion. Skipped, with the reason, where the cluster cannot start (not root, packages missing)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from negstudy import jobs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_single_node.sh"
STATE = Path(os.environ.get("NEGSTUDY_SLURM_DIR", "/var/tmp/negstudy-slurm"))
sys.path.insert(0, str(Path(__file__).parent))
from shipped_sweeps import REMOVAL  # noqa: E402

# The submitit-local test's removal sweep (tests/shipped_sweeps.py): two prompt shards of two captions
# each, objects to remove in both, and a third cell, dataset.shard=2, that the job itself rejects (2 shards only).
SWEEP = [sys.executable, "-m", "negstudy", *REMOVAL, "logger=none", "dataset.shard=0,1,2"]
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]


@pytest.fixture(scope="module")
def slurm():
    """The cluster's environment for sbatch/squeue/scancel; stopped afterwards if this fixture started it."""
    if os.geteuid() != 0:
        pytest.skip("the single-node SLURM cluster needs root (scripts/slurm_single_node.sh runs its daemons as root)")
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin", "NEGSTUDY_SLURM_DIR": str(STATE)}
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, env=env).returncode == 0
    start = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=120)
    if start.returncode != 0:
        reason = (start.stderr.strip().splitlines() or ["no reason given"])[-1]
        pytest.skip(f"no SLURM cluster on this machine: {reason}")
    env["SLURM_CONF"] = str(STATE / "slurm.conf")
    env.pop("OMP_NUM_THREADS", None)  # the jobs' threads must come from their allocation alone
    yield env
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, env=env)


def _tables(sweep: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(p).assign(job=p.parent.name) for p in sorted(sweep.glob("*/removal_targets.parquet"))]
    return pd.concat(frames).reset_index(drop=True)


def _array_tasks(env, array_id: str) -> dict[int, str]:
    """Task index -> state of the array job, from slurmctld (scontrol keeps finished jobs for MinJobAge)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", array_id], capture_output=True, text=True, env=env).stdout
    tasks = {}
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("ArrayJobId") == array_id:
            tasks[int(fields["ArrayTaskId"])] = fields["JobState"]
    return tasks


def _wait(condition, what: str, proc=None, seconds: float = 150) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc is None or proc.poll() is None, f"the sweep ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_slurm_array_with_a_cancelled_task_and_a_failing_cell_reruns_to_completion(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    command = SWEEP + LAUNCHER + [f"hydra.sweep.dir={sweep}", f"job_store={tmp_path / 'store'}"]
    first = subprocess.Popen(command, cwd=tmp_path, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        # shard 1 is inside its job (negstudy marks it .incomplete before the work): cancel its task
        _wait(lambda: (sweep / "1" / ".incomplete").exists(), "shard 1 started", first)
        time.sleep(2.0)
        array_id = next(p.name for p in (sweep / ".submitit").iterdir() if p.name.endswith("_1")).split("_")[0]
        subprocess.run(["scancel", f"{array_id}_1"], check=True, env=slurm)
        # on the CPU the cancel freed: shard 1 uninterrupted, in-process, as the reference for the rerun
        reference = subprocess.Popen([a for a in SWEEP if not a.startswith("dataset.shard=")]
                                     + ["hydra.mode=RUN", "dataset.shard=1", f"hydra.run.dir={tmp_path / 'reference'}",
                                        f"job_store={tmp_path / 'store-reference'}"], cwd=tmp_path,
                                     env={**slurm, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # the other shard and the failing cell finish; then the cluster runs nothing of this sweep
        _wait(lambda: (sweep / "0" / "done.json").exists() and (sweep / "2" / "failed.json").exists(), "shard 0 and cell 2", first)
        _wait(lambda: set(_array_tasks(slurm, array_id).values()) <= {"COMPLETED", "CANCELLED", "FAILED"}, "the array to end")
    finally:
        # without accounting (no slurmdbd, so no sacct) submitit cannot see a cancelled task and waits on
        # it; on a cluster with sacct it raises instead. Either way the user stops the command and reruns it.
        os.killpg(first.pid, signal.SIGTERM)
        log = first.communicate(timeout=60)[0]
    tasks = _array_tasks(slurm, array_id)
    assert tasks == {0: "COMPLETED", 1: "CANCELLED", 2: "COMPLETED"}, (tasks, log[-3000:])  # one array job, three tasks
    assert (sweep / "1" / ".incomplete").exists() and not (sweep / "1" / "done.json").exists()
    assert not list(sweep.rglob("*.tmp"))

    rerun = subprocess.run(command, cwd=tmp_path, env=slurm, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stdout[-3000:] + rerun.stderr[-3000:]  # the failing cell fails again
    assert "sweep summary: 1 done, 1 skipped, 1 failed" in rerun.stdout, rerun.stdout[-3000:]
    assert re.search(r"job 2 \(dataset\.shard=2 .*\): ConfigError: dataset\.shard=2: must be in 0\.\.dataset\.shards-1",
                     rerun.stdout)
    summary = json.loads((sweep / "summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["skipped", "done", "failed"]
    assert "dataset.shard=2" in (sweep / "summary.md").read_text()

    # nothing lost, nothing duplicated: the rerun shard equals an uninterrupted run of it, and every
    # (prompt, seed, object) of both shards is there once per removal method
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    pd.testing.assert_frame_equal(pd.read_parquet(sweep / "1" / "removal_targets.parquet"),
                                  pd.read_parquet(tmp_path / "reference" / "removal_targets.parquet"))
    table = _tables(sweep)
    assert set(table.job) == {"0", "1"} and not table.duplicated(["job", "caption", "seed", "object", "method"]).any()
    per_target = table.groupby(["job", "prompt", "seed", "object"]).method.agg(["nunique", "size"])
    assert (per_target["nunique"] == per_target["size"]).all() and per_target["size"].eq(table.method.nunique()).all()
    assert table.method.nunique() == 3 and len(table) == 3 * len(per_target)
    methods = pd.read_csv(sweep / "report" / "removal_methods.csv")  # the pooled report reads both shards
    assert len(methods) >= 3

    # logs where the README says: <sweep>/.submitit/<array job id>_<task>/; each task's torch threads
    # follow its allocation (cpus_per_task=1) although the node has more cores
    logs = {p.parent.name: p.read_text() for p in sweep.glob(".submitit/*/*_log.out")}
    assert {f"{array_id}_{i}" for i in range(3)} <= set(logs)
    reruns = [name for name in logs if not name.startswith(f"{array_id}_")]
    assert len(reruns) == 3  # the rerun: a second array job of three tasks
    ran = [text for text in logs.values() if "torch threads:" in text]
    assert len(ran) == 3  # shard 0 and shard 1 in the first array, shard 1 again in the rerun
    assert all("torch threads: 1 (from SLURM_CPUS_PER_TASK)" in text for text in ran)


def test_threads_follow_the_allocation(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        assert jobs.size_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")
        assert jobs.size_threads() == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a smaller explicit choice wins
        assert jobs.size_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
