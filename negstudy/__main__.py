"""``python -m negstudy``: the Hydra app. Configs live in the package ``negstudy.conf``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from negstudy.config import register_configs, validate
from negstudy.errors import ConfigError

log = logging.getLogger("negstudy")
register_configs()


@hydra.main(version_base="1.3", config_path="pkg://negstudy.conf", config_name="config")
def app(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)  # before any model is loaded
        from negstudy import generate

        table = generate.run(cfg, out_dir)
    except ConfigError as err:
        print(f"negstudy: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"negstudy: {len(table)} images -> {out_dir}")
    if "negative_present" in table and table["negative_present"].notna().any():
        rate = table.groupby("category")["negative_present"].mean()
        print("negstudy: negative concept still present: " + ", ".join(f"{k} {v:.0%}" for k, v in rate.items()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
