"""``python -m negstudy``: the Hydra app. Configs live in the package ``negstudy.conf``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from negstudy.config import register_configs, validate
from negstudy.errors import ConfigError

log = logging.getLogger("negstudy")
register_configs()


@hydra.main(version_base="1.3", config_path="pkg://negstudy.conf", config_name="config")
def app(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)  # before any model is loaded
        if cfg.sweep.name in STUDIES:
            study_job(cfg, out_dir)
        else:
            generation_job(cfg, out_dir)
    except ConfigError as err:
        print(f"negstudy: error: {err}", file=sys.stderr)
        sys.exit(2)


def generation_job(cfg: DictConfig, out_dir: Path) -> None:
    from negstudy import generate

    table = generate.run(cfg, out_dir)
    print(f"negstudy: {len(table)} images -> {out_dir}")
    if "negative_present" in table and table["negative_present"].notna().any():
        rate = table.groupby("category")["negative_present"].mean()
        print("negstudy: negative concept still present: " + ", ".join(f"{k} {v:.0%}" for k, v in rate.items()))


STUDIES = ("critical_step", "reverse_activation")


def study_job(cfg: DictConfig, out_dir: Path) -> None:
    """A study of negstudy.studies on the shapes world, then its report."""
    import importlib

    from negstudy import generate, report
    from negstudy.records import write_text

    if generate.model_world(cfg.model) != "shapes":
        raise ConfigError(f"sweep.name={cfg.sweep.name!r} reads images with the shapes oracle; model.path={cfg.model.path!r} "
                          "is not a shapes-world model (use model=shapes)")
    write_text(OmegaConf.to_yaml(cfg, resolve=True), out_dir / "config.yaml")
    sampler = generate.build_sampler(cfg)
    importlib.import_module(f"negstudy.studies.{cfg.sweep.name}").run(cfg, sampler, out_dir)
    page = report.build(out_dir, cfg.sweep.variant)
    print(f"negstudy: report -> {page}")
    for line in report.summary_lines(out_dir):
        print(f"negstudy: {line}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
