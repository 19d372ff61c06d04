"""The generation job: dataset pairs x seeds under one schedule -> PNGs, per-image and per-step tables.

Data flow: config -> items (one per image) -> sampler (hooks record per-step rows) -> evaluator
columns -> ``images.parquet`` + ``steps.parquet`` (+ ``tensors.safetensors`` if ``record`` asks).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from negstudy.checks import build
from negstudy.models import load_pipeline, pick_device, resolve_model_path
from negstudy.datasets import pairs_of
from negstudy.records import atomic_path, save_png, slug, to_uint8, write_table, write_text
from negstudy import guidance
from negstudy.sampler import Batch, Hook, NegativeSampler, StepState, halve_on_oom
from negstudy.schedules import Schedule

log = logging.getLogger("negstudy")


@dataclass
class Item:
    """One image of a job."""

    image_id: int
    pair: int
    prompt: str
    negative: str
    category: str
    seed: int
    schedule: Schedule


def items_from_config(cfg: DictConfig, schedule: Schedule) -> list[Item]:
    pairs = pairs_of(cfg.dataset)
    items = []
    for p, pair in enumerate(pairs):
        for seed in cfg.seeds:
            items.append(Item(len(items), p, pair.prompt, pair.negative, pair.category, int(seed), schedule))
    return items


class StepTable(Hook):
    """Per-step rows: which branch stood opposite the prompt, and cheap statistics of the predictions.

    Columns: image_id, step (UNet-call index), timestep, branch (negative/empty/inject),
    inject_gain, and the L2 norms of eps_pos and of the guidance direction the guider applied
    (``StepState.direction``: eps_pos - eps_u for CFG, with eps_u the prediction it actually used).
    """

    def __init__(self):
        self.rows: list[dict] = []
        self.ids: list[int] = []
        self.gains: list[np.ndarray] = []

    def start_batch(self, items: list[Item], plans) -> None:
        self.ids = [it.image_id for it in items]
        self.gains = [p.inject for p in plans]

    def on_step(self, state: StepState) -> None:
        pos = state.eps["positive"]
        pos_norm = pos.flatten(1).norm(dim=1).tolist()
        dir_norm = state.direction.flatten(1).norm(dim=1).tolist()
        for b, image_id in enumerate(self.ids):
            self.rows.append(
                {
                    "image_id": image_id,
                    "step": state.step,
                    "timestep": state.timestep,
                    "branch": state.branch[b],
                    "inject_gain": float(self.gains[b][state.step]),
                    "eps_pos_norm": pos_norm[b],
                    "guidance_norm": dir_norm[b],
                }
            )


class TensorRecorder(Hook):
    """Keeps per-step tensors on the CPU when the config asks (``record: [eps, latents]``)."""

    def __init__(self, what: list[str]):
        self.what = set(what)
        self.tensors: dict[str, torch.Tensor] = {}
        self._batch: list[dict[str, torch.Tensor]] = []
        self.ids: list[int] = []

    def start_batch(self, ids: list[int]) -> None:
        self.ids, self._batch = ids, []

    def on_step(self, state: StepState) -> None:
        entry = {}
        if "latents" in self.what:
            entry["latents"] = state.latents.detach().cpu()
        if "eps" in self.what:
            for branch, value in state.eps.items():
                entry[f"eps_{branch}"] = value.detach().cpu()
        self._batch.append(entry)

    def on_end(self, images) -> None:
        # name: <kind>/<image_id>, tensor (steps, C, h, w)
        for key in self._batch[0] if self._batch else []:
            stacked = torch.stack([e[key] for e in self._batch], dim=1)
            for b, image_id in enumerate(self.ids):
                self.tensors[f"{key}/{image_id}"] = stacked[b].contiguous()
        self._batch = []


def model_world(model_cfg) -> str | None:
    """The procedural world a model was trained on (``shapes``), read from its model_index.json."""
    path, local = resolve_model_path(model_cfg.path)
    if not local:
        return None
    index = json.loads((Path(path) / "model_index.json").read_text())
    return index.get("negstudy", {}).get("world")


def build_sampler(cfg: DictConfig) -> NegativeSampler:
    """Load the model of ``cfg`` and wrap it in the step-scheduled sampler."""
    device = pick_device(cfg.device)
    log.info("loading %s from %s on %s", cfg.model.name, cfg.model.path, device)
    pipe = load_pipeline(cfg.model, device)
    return NegativeSampler(pipe, steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=cfg.height,
                           width=cfg.width, three_branches=cfg.three_branches, progress=True,
                           fixed_rows=cfg.get("fixed_rows", "auto"), autocast=cfg.get("autocast"),
                           guider=guidance.from_config(cfg.get("guidance")))


def run(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    """Run the generation job of ``cfg`` into ``out_dir``; return the per-image table."""
    out_dir = Path(out_dir)
    schedule = build(cfg.schedule, "schedule")
    evaluator = build(cfg.evaluator, "evaluator", world=model_world(cfg.model))
    items = items_from_config(cfg, schedule)
    write_text(OmegaConf.to_yaml(cfg, resolve=True), out_dir / "config.yaml")
    sampler = build_sampler(cfg)
    pipe = sampler.pipe
    plan = schedule.plan(sampler.n_calls)  # ConfigError if the schedule leaves the loop
    log.info("%d images, %d UNet calls each, schedule %s", len(items), sampler.n_calls, schedule.describe())
    steps = StepTable()
    recorder = TensorRecorder(list(cfg.record)) if cfg.record else None
    rows = []

    def sample(chunk: list[Item]) -> np.ndarray:
        """One sampler call; a call that raises (CUDA out of memory) leaves no step rows behind."""
        plans = [plan] * len(chunk)
        n_rows = len(steps.rows)
        steps.start_batch(chunk, plans)
        hooks = [steps]
        if recorder:
            recorder.start_batch([it.image_id for it in chunk])
            hooks.append(recorder)
        batch = Batch([it.prompt for it in chunk], [it.negative for it in chunk], [it.seed for it in chunk], plans)
        try:
            return to_uint8(sampler.generate(batch, hooks))
        except BaseException:
            del steps.rows[n_rows:]
            raise

    bar = tqdm(total=len(items), desc="images", unit="image")
    for chunk, images in halve_on_oom(items, cfg.batch_size, sample):  # out of memory: the batch is halved
        bar.update(len(chunk))
        for it, image, extra in zip(chunk, images, evaluator.evaluate(images, chunk)):
            row = {
                "image_id": it.image_id, "pair": it.pair, "prompt": it.prompt, "negative": it.negative,
                "category": it.category, "seed": it.seed, "schedule": schedule.describe(),
                "steps": cfg.steps, "n_calls": sampler.n_calls, "guidance_scale": cfg.guidance_scale,
                "model": cfg.model.name, "scheduler": type(pipe.scheduler).__name__,
            }
            if cfg.save_images:
                name = f"images/{it.image_id:05d}_{slug(it.prompt)}_neg-{slug(it.negative, 20)}_s{it.seed}.png"
                save_png(image, out_dir / name, {k: row[k] for k in ("prompt", "negative", "schedule", "seed", "steps",
                                                                      "guidance_scale", "model", "scheduler")})
                row["file"] = name
            rows.append(row | extra)
    bar.close()
    table = pd.DataFrame(rows)
    write_table(table, out_dir / "images.parquet")
    # sorted, so that the table does not depend on how the images were batched
    write_table(pd.DataFrame(steps.rows).sort_values(["image_id", "step"], kind="stable", ignore_index=True),
                out_dir / "steps.parquet")
    if recorder:
        from safetensors.torch import save_file

        with atomic_path(out_dir / "tensors.safetensors") as tmp:
            save_file(recorder.tensors, str(tmp))
    return table
