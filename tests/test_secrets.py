"""Secrets and untrusted input: planted keys never reach any output; faults of a paid judge never
lose work. The removal sweep runs with the judge against the local OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from judge_server import JudgeServer  # noqa: E402

OPENAI_KEY = "sk-negstudy-planted-0a1b2c3d4e5f"
VIEWS = "dataset.captions=['a view of the grass','a view of the sky','a view of the sand','a view at night']"
WANDB_KEY = "0123456789abcdef0123456789abcdefplanted0"


def _sweep(tmp_path, server, sweep_dir, *extra):
    env = {**os.environ, "OPENAI_API_KEY": OPENAI_KEY, "WANDB_API_KEY": WANDB_KEY}
    return subprocess.run(
        # the "a view of X" captions: few unnamed objects each, so the judge's faults, not the UNet, set the time
        [sys.executable, "-m", "negstudy", "+sweep=removal", "steps=10", "seeds=[0,1,2]", VIEWS,
         "fixed_rows=0", "evaluator=judge", f"evaluator.base_url={server.base_url}", f"evaluator.cache_dir={tmp_path / 'cache'}",
         "evaluator.timeout_s=2", "evaluator.requests_per_minute=60000",  # the judge's 60 a minute: ~40 s of waits
         "logger=wandb", f"hydra.sweep.dir={sweep_dir}", *extra],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("judged")
    # each fault to another question (the retries and re-asks of a question are answered): without a
    # rate limit of the judge's own, 4 questions in flight could otherwise meet garbage and bad JSON in one
    # question (missing by design: tests/test_judge.py) or not, by timing
    with JudgeServer(hang_s=3.0, faults_on_new_requests=True) as server:
        # a flaky paid API for a while: rate limits, server errors, a timeout and garbage, then answers
        for fault in ("429", "500", "hang", "garbage", "429", "bad_json", "500"):
            server.fail(fault)
        proc = _sweep(tmp_path, server, tmp_path / "sweep")
        first_requests = server.requests
        # shard 1 again (job 0 of this sweep) in a new job store: a new job, the same questions (one shard shows the
        # cache; both would cost a sweep)
        rerun = _sweep(tmp_path, server, tmp_path / "again", "job_store=other-store", "dataset.shard=1")
        auth = set(server.authorizations)
        rerun_requests = server.requests - first_requests
    return tmp_path, proc, rerun, first_requests, rerun_requests, auth


def test_removal_sweep_with_the_judge_survives_a_flaky_server(judged):
    tmp_path, proc, _, requests, _, auth = judged
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep summary: 2 done, 0 skipped, 0 failed" in proc.stdout
    assert auth == {f"Bearer {OPENAI_KEY}"}  # the key from the environment was used ...
    t = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "sweep").glob("*/removal_targets.parquet"))])
    assert len(t) > 0 and set(t.evaluator) == {"judge"} and set(t.preference_source) == {"judge"}
    assert t.removed.notna().all()  # every fault was retried into an answer: nothing guessed, nothing lost
    assert t[t.method != "from0"].prefers_over_from0.notna().all()
    assert {"from0"} < set(t[t.method != "from0"].shown_first)  # both orders asked: a position bias cancels
    originals = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "sweep").glob("*/originals.parquet"))])
    assert originals.judged.all()
    usage = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/judge_usage.json"))]
    assert sum(u["requests"] + u["http_retries"] for u in usage) == requests and sum(u["input_tokens"] for u in usage) > 0


def test_a_rerun_asks_the_judge_nothing_and_gets_the_same_table(judged):
    tmp_path, _, rerun, _, rerun_requests, _ = judged
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "sweep summary: 1 done, 0 skipped" in rerun.stdout  # other job store: the job ran again ...
    assert rerun_requests == 0  # ... but every answer came from the persistent cache
    first = pd.read_parquet(tmp_path / "sweep" / "1" / "removal_targets.parquet")
    again = pd.read_parquet(tmp_path / "again" / "0" / "removal_targets.parquet")
    assert len(first) and (again.evaluator == "judge").all()
    pd.testing.assert_frame_equal(again, first)


def test_planted_keys_appear_in_no_output_file(judged):
    """Every file the sweeps wrote (tables, configs, logs, reports, W&B offline runs and staged
    artifacts, the judge cache, the job store) is free of both keys."""
    tmp_path, proc, rerun, *_ = judged
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 50
    leaks = [str(p) for p in files for key in (OPENAI_KEY, WANDB_KEY) if key.encode() in p.read_bytes()]
    assert leaks == []
    for text in (proc.stdout, proc.stderr, rerun.stdout, rerun.stderr):
        assert OPENAI_KEY not in text and WANDB_KEY not in text
