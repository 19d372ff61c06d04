"""Weights & Biases: one run per Hydra job, offline by default, never a prompt or a hang.

``logger=wandb`` (``conf/logger/wandb.yaml``): runs are written under the job directory
(``<job>/wandb/offline-run-*``) and uploaded later with ``wandb sync <that dir>``. Online mode
(``logger.mode=online``) needs ``WANDB_API_KEY`` in the environment (or a ``wandb login`` entry in
~/.netrc); without one the job stops before any work, with one line saying so. ``logger=none``
(the default) turns tracking off. Runs are grouped by sweep: group = "<sweep name>:<sweep dir>".
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from negstudy.errors import ConfigError

SECRET_WORDS = ("key", "token", "secret", "password")


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def check(cfg: DictConfig) -> None:
    """Refuse online tracking without credentials (before any work is done)."""
    if cfg.logger.name == "wandb" and cfg.logger.mode == "online" and not has_credentials():
        raise ConfigError("logger.mode='online': no W&B credentials (set WANDB_API_KEY, or use logger.mode=offline and "
                          "`wandb sync` later)")


def public_config(cfg: DictConfig) -> dict:
    """The resolved config without any key that looks like a secret."""

    def clean(node):
        if isinstance(node, dict):
            return {k: ("<redacted>" if any(w in str(k).lower() for w in SECRET_WORDS) else clean(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    keys = [k for k in cfg.keys() if k != "hydra"]  # the callback's config also holds Hydra's own node
    return clean(OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True))


_USER_ENV = frozenset(k for k in os.environ if k.startswith("WANDB_"))


class Tracker:
    """A W&B run for one job, or nothing (``logger=none``); use as a context manager."""

    def __init__(self, cfg: DictConfig, out_dir: Path, job_type: str = "generate", sweep_dir: str | None = None):
        self.run = None
        if cfg.logger.name != "wandb" or cfg.logger.mode == "disabled":
            return
        check(cfg)
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        if sweep_dir is None:
            try:
                from hydra.core.hydra_config import HydraConfig

                hc = HydraConfig.get()
                sweep_dir = hc.sweep.dir if hc.mode.name == "MULTIRUN" else hc.run.dir
            except ValueError:  # not under Hydra
                sweep_dir = str(out_dir)
        # Artifact staging (tables with images are logged as artifacts too) under the job's own
        # wandb/ directory, so an offline run is self-contained for `wandb sync`.
        if "WANDB_DATA_DIR" not in _USER_ENV:
            os.environ["WANDB_DATA_DIR"] = str(Path(out_dir) / "wandb" / "data")
        self.run = wandb.init(
            project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode, dir=str(out_dir),
            group=f"{cfg.sweep.name}:{sweep_dir}", job_type=job_type, config=public_config(cfg),
            tags=list(cfg.logger.tags), settings=wandb.Settings(silent=True, console="off"),
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish(failed=exc[0] is not None)
        return False

    def curves(self, frame: pd.DataFrame, step: str, columns: list[str], prefix: str = "") -> None:
        """Per-step curves as W&B line plots: one history row per value of ``step``."""
        if self.run is None or frame.empty:
            return
        self.run.define_metric(f"{prefix}{step}")
        for c in columns:
            self.run.define_metric(f"{prefix}{c}", step_metric=f"{prefix}{step}")
        for d in frame.sort_values(step).to_dict("records"):
            self.run.log({f"{prefix}{step}": d[step], **{f"{prefix}{c}": d[c] for c in columns}})

    def table(self, name: str, frame: pd.DataFrame) -> None:
        if self.run is not None and not frame.empty:
            import wandb

            self.run.log({name: wandb.Table(dataframe=frame.reset_index(drop=True))})

    def image_table(self, name: str, frame: pd.DataFrame, image_columns: list[str]) -> None:
        """A wandb.Table whose ``image_columns`` hold images: a path (PNG on disk), a uint8 (H, W, 3)
        image, or a float (h, w) heat map (drawn with viridis, scaled to its own maximum)."""
        if self.run is None or frame.empty:
            return
        import wandb
        from matplotlib import colormaps

        def cell(value):
            if isinstance(value, (str, Path)):
                return wandb.Image(str(value))
            a = np.asarray(value)
            if a.ndim == 2:
                a = np.nan_to_num(a.astype(np.float64))
                a = (colormaps["viridis"](a / a.max() if a.max() > 0 else a)[..., :3] * 255).astype(np.uint8)
            return wandb.Image(a)

        columns = list(frame.columns)
        data = [[cell(v) if c in image_columns else (v.item() if isinstance(v, np.generic) else v) for c, v in zip(columns, row)]
                for row in frame.itertuples(index=False)]
        self.run.log({name: wandb.Table(columns=columns, data=data)})

    def images(self, name: str, paths: list[Path]) -> None:
        if self.run is not None and paths:
            import wandb

            self.run.log({name: [wandb.Image(str(p), caption=Path(p).stem) for p in paths]})

    def summary(self, **values) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


def read_offline_run(run_dir: str | Path) -> dict:
    """Read an offline run's records back: {"config": {...}, "history": [rows], "summary": {...}}.

    The ``.wandb`` file is a LevelDB-style log (7-byte file header, 32 KiB blocks, records with a
    7-byte header: crc32, length, type) of ``wandb_internal_pb2.Record`` messages."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    path = next(Path(run_dir).glob("*.wandb"))
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    block, pos, pending = 32768, 7, b""
    out = {"config": {}, "history": [], "summary": {}}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        if kind in (2, 3):  # first / middle fragment
            pending += payload
            continue
        record = pb.Record()
        record.ParseFromString(pending + payload)
        pending = b""
        which = record.WhichOneof("record_type")
        if which in ("config", "run"):
            update = record.config.update if which == "config" else record.run.config.update
            out["config"].update({i.key: json.loads(i.value_json) for i in update})
            if which == "run":
                out.update(group=record.run.run_group, job_type=record.run.job_type)
        elif which == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif which == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    return out
