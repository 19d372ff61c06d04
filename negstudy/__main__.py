"""``python -m negstudy``: the Hydra app. Configs live in the package ``negstudy.conf``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from negstudy.config import register_configs
from negstudy.errors import ConfigError

log = logging.getLogger("negstudy")
register_configs()


@hydra.main(version_base="1.3", config_path="pkg://negstudy.conf", config_name="config")
def app(cfg: DictConfig) -> None:
    from negstudy import jobs
    from negstudy.checks import validate

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    try:
        validate(cfg)  # before any model is loaded
        body = (lambda: study_job(cfg, out_dir)) if cfg.sweep.get("study") is not None else (lambda: generation_job(cfg, out_dir))
        outcome = jobs.run(cfg, out_dir, body, multirun=multirun)
    except ConfigError as err:
        print(f"negstudy: error: {err}", file=sys.stderr)
        if multirun:  # one bad job of a grid must not stop the others; the summary lists it
            jobs.record_failure(cfg, out_dir, f"ConfigError: {err}")
            return "failed"
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - one line here; the traceback is in negstudy.log and failed.json
        print(f"negstudy: error: the job failed: {type(err).__name__}: {err} (traceback in {out_dir / 'negstudy.log'})",
              file=sys.stderr)
        sys.exit(1)
    if not multirun:  # a multirun's last lines come from negstudy.callbacks, after the pooled report
        print(where_it_went(out_dir))
    return outcome.status


def where_it_went(out_dir: Path) -> str:
    """The last line of a job: its directory and its report (a study writes one; a generation job does not)."""
    page = out_dir / "report" / "report.html"
    report = shown(page) if page.exists() else "none (a generation job writes images and tables only)"
    return f"negstudy: outputs -> {shown(out_dir)}; report -> {report}"


def shown(path: Path) -> str:
    """``path`` relative to the directory the command was launched from, when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def generation_job(cfg: DictConfig, out_dir: Path) -> None:
    import pandas as pd

    from negstudy import generate
    from negstudy.tracking import Tracker

    with Tracker(cfg, out_dir, "generate") as tracker:
        table = generate.run(cfg, out_dir)
        print(f"negstudy: {len(table)} images -> {out_dir}")
        tracker.table("images", table)
        tracker.images("samples", [out_dir / f for f in table.get("file", pd.Series(dtype=str)).head(16)])
        steps = pd.read_parquet(out_dir / "steps.parquet").groupby("step", as_index=False)[["eps_pos_norm", "guidance_norm"]].mean()
        tracker.curves(steps, "step", ["eps_pos_norm", "guidance_norm"])
        tracker.summary(n_images=len(table))
        if "negative_present" in table and table["negative_present"].notna().any():
            judged = table.dropna(subset=["negative_present"])  # attribute negatives have no verdict under some evaluators
            rate = judged.groupby("category")["negative_present"].apply(lambda v: v.astype(bool).mean())
            tracker.summary(**{f"negative_still_present/{k}": float(v) for k, v in rate.items()})
            print("negstudy: negative concept still present: " + ", ".join(f"{k} {v:.0%}" for k, v in rate.items()))


def study_job(cfg: DictConfig, out_dir: Path) -> None:
    """The study ``sweep.study`` names (negstudy.studies: run, prepare, REPORT), then its report."""
    import pandas as pd

    from negstudy import generate, report
    from negstudy.targets import build
    from negstudy.records import write_text
    from negstudy.studies import module_of, prepared
    from negstudy.tracking import Tracker

    run, module = build(cfg.sweep.study, "sweep.study"), module_of(cfg.sweep.study)
    extra = prepared(module, cfg, generate.model_world(cfg.model))  # before the model loads
    write_text(OmegaConf.to_yaml(cfg, resolve=True), out_dir / "config.yaml")
    with Tracker(cfg, out_dir, "generate") as tracker:
        sampler = generate.build_sampler(cfg)
        tables = run(cfg, sampler, out_dir, **extra)
        page = report.build(out_dir, cfg.sweep.variant)
        print(f"negstudy: report -> {page}")
        for line in report.summary_lines(out_dir):
            print(f"negstudy: {line}")
        study_report = getattr(module, "REPORT", None)
        if study_report is not None and study_report.track is not None:
            study_report.track(tracker, tables, out_dir, cfg)
        strips = sorted(out_dir.glob("strips/*.png")) + sorted(out_dir.glob("triples/*.png"))
        if strips:
            tracker.image_table("image_strips", pd.DataFrame({"file": [p.name for p in strips], "image": strips}), ["image"])
        for csv in sorted((out_dir / "report").glob("*.csv")):
            tracker.table(csv.stem, pd.read_csv(csv))
        tracker.images("figures", sorted((out_dir / "report").glob("*.png")) + sorted(out_dir.glob("*.png"))
                       + sorted(out_dir.glob("grids/*.png")))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
