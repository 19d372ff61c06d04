"""The smallest settings of each +sweep= overlay (one in-process job each), shared by the tests that run
every study on a model that is not the shipped one (test_studies_any_model, test_sdxl)."""

from pathlib import Path

STUDIES = {
    "critical_step": ["steps=4", "sweep.screen_seeds=2", "sweep.max_seeds=1", "sweep.ratio_seeds=1", "sweep.min_seeds=1",
                      "sweep.stride=2", "dataset.limit=1"],
    "reverse_activation": ["steps=4", "sweep.screen_seeds=2", "sweep.max_seeds=1", "sweep.stride=2", "dataset.limit=1"],
    "mechanisms": ["steps=4", "seeds=[0]", "dataset.limit=1", "mechanisms.screen_seeds=1", "mechanisms.max_extra=1",
                   "mechanisms.draws=1", "mechanisms.energy_steps=[1]"],
    "attention_maps": ["steps=4", "seeds=[0]", "dataset.limit=1", "sweep.stride=2"],
    "removal": ["steps=4", "seeds=[0]", "dataset.limit=1"],
    "methods": ["steps=4", "sweep.screen_seeds=2", "sweep.max_seeds=1", "sweep.min_seeds=1", "sweep.stride=2",
                "dataset.limit=1", "sweep.study.methods=[cfg,nag]", "sweep.study.removal_captions=1",
                "sweep.study.removal_seeds=[0]", "fixed_rows=auto", "batch_size=8"],
}
WRITES = {"critical_step": "ratio.parquet", "reverse_activation": "reverse_screen.parquet", "mechanisms": "inducing.parquet",
          "attention_maps": "attention_windows.parquet", "removal": "originals.parquet",
          "methods": "by_method/nag/methods_ratio.parquet"}
OVERLAYS = {p.stem for p in (Path(__file__).parents[1] / "conf" / "sweep").glob("*.yaml")}


def run_app(monkeypatch, capsys, argv: list[str]) -> None:
    """``python -m negstudy <argv>`` through the Hydra entry point in this process (one ``import diffusers``
    for many jobs); a failing job fails the test with the end of its stderr."""
    import sys

    import pytest

    from negstudy.__main__ import app

    monkeypatch.setattr(sys, "argv", ["negstudy", *argv])
    try:
        app()
    except SystemExit as err:  # the app exits non-zero on a failed job
        if err.code:
            pytest.fail(f"{argv}: exit {err.code}: {capsys.readouterr().err[-3000:]}")
