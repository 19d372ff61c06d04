"""Hydra callbacks: the aggregated report at the end of a multirun."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("negstudy")


class ReportCallback(Callback):
    """After every job of a multirun, write one report over all of them into ``<sweep dir>/report/``
    (the jobs' seeds and prompt shards are pooled; jobs that wrote no study tables are ignored)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from negstudy import report

        root = Path(config.hydra.sweep.dir)
        try:
            page = report.build(root, config.sweep.variant)
        except FileNotFoundError:
            return  # plain generation jobs: nothing to aggregate
        print(f"negstudy: sweep report -> {page}")
        for line in report.summary_lines(root):
            print(f"negstudy: {line}")
        self._track(config, root)

    @staticmethod
    def _track(config: DictConfig, root: Path) -> None:
        """One W&B run of job_type "report" in the sweep's group, with the pooled tables and figures."""
        import pandas as pd

        from negstudy.tracking import Tracker

        with Tracker(config, root / "report", "report", sweep_dir=str(root)) as tracker:
            for csv in sorted((root / "report").glob("*.csv")):
                tracker.table(csv.stem, pd.read_csv(csv))
            tracker.images("figures", sorted((root / "report").glob("*.png")))
