"""Hydra callbacks: the aggregated report at the end of a multirun."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("negstudy")


def rerun_command(config: DictConfig) -> str:
    """The command line of this sweep, pinned to its directory: with resume on, it runs only the
    jobs that did not finish."""
    import shlex

    args = [a for a in config.hydra.overrides.task if not a.startswith("hydra.sweep.dir=")]
    return " ".join(["python -m negstudy -m", *map(shlex.quote, args), shlex.quote(f"hydra.sweep.dir={config.hydra.sweep.dir}")])


class ReportCallback(Callback):
    """After every job of a multirun, write one report over all of them into ``<sweep dir>/report/``
    (the jobs' seeds and prompt shards are pooled; jobs that wrote no study tables, failed or did
    not finish are ignored), then the sweep summary (negstudy.jobs); exit status 1 if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from negstudy import jobs, report

        root = Path(config.hydra.sweep.dir)
        try:
            page = report.build(root, config.sweep.variant)
        except FileNotFoundError:
            page = None  # plain generation jobs: nothing to aggregate
        if page is not None:
            print(f"negstudy: sweep report -> {page}")
            for line in report.summary_lines(root):
                print(f"negstudy: {line}")
            self._track(config, root)
        summary = jobs.summarize(root, rerun_command(config))
        print(f"negstudy: sweep summary: {summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed "
              f"-> {root / 'summary.md'}")
        print(f"negstudy: outputs -> {root}; report -> {page if page is not None else 'none (generation jobs only)'}")
        for job in summary["jobs"]:
            if job["status"] == "failed":
                print(f"negstudy:   job {job['job']} ({' '.join(job['overrides'])}): {job['cause']}")
        if summary["failed"]:
            print(f"negstudy: rerun only the failed jobs (finished ones are skipped): {summary['rerun']}")
            raise SystemExit(1)

    @staticmethod
    def _track(config: DictConfig, root: Path) -> None:
        """One W&B run of job_type "report" in the sweep's group, with the pooled tables and figures."""
        import pandas as pd

        from negstudy.tracking import Tracker

        with Tracker(config, root / "report", "report", sweep_dir=str(root)) as tracker:
            for csv in sorted((root / "report").glob("*.csv")):
                tracker.table(csv.stem, pd.read_csv(csv))
            tracker.images("figures", sorted((root / "report").glob("*.png")))
