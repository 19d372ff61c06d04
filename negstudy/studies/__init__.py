"""Studies: each one a module here plus an overlay ``conf/sweep/<name>.yaml`` that names its ``run``.

The overlay chooses the study by ``_target_`` (built by :func:`negstudy.targets.build`)::

    sweep:
      name: critical_step                 # display: W&B group, report text
      study:
        _target_: negstudy.studies.critical_step.run
        _partial_: true                   # other keys here become keyword arguments of run

A study module exports

- ``run(cfg, sampler, out_dir, **prepared) -> dict[str, DataFrame]``: the job; writes its tables
  as ``out_dir/<table>.parquet`` and returns them;
- ``prepare(cfg, world) -> dict`` (optional): before the model loads, checks that need the model's
  world and objects built early (the study's reader, :func:`reader_for`); the dict becomes
  ``run``'s keyword arguments;
- ``check(cfg)`` (optional): config checks without a model, run by :func:`negstudy.checks.validate`;
- ``REPORT`` (optional): a :class:`StudyReport`, how ``negstudy.report`` pools, summarises, draws
  and prints its tables, and what the job logs to W&B.

Nothing else names a study: ``python -m negstudy`` and ``negstudy.report`` find them from the
jobs' configs (``sweep.study._target_``), or, for a directory of bare tables (no job config), among
this package's modules. The report pools a table over every ``<name>.parquet`` below the run
directory, so a study's table names must be its own (another study's ``ratio`` would be pooled too).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

from negstudy.errors import ConfigError


@dataclass
class Summary:
    """What a study adds to the report."""

    sections: list = field(default_factory=list)  # (title, DataFrame): report.md and report.html
    figures: dict = field(default_factory=dict)  # key -> base64 PNG (its file written in the report directory)
    page: dict = field(default_factory=dict)  # keyword inputs of negstudy.report_html.page it supplies (ratio, crit, ...)


@dataclass(frozen=True)
class StudyReport:
    """How the report handles a study's tables.

    tables: parquet stems its jobs write; the report pools each over every job below the run directory.
    summarise(pooled, out, variant) -> Summary: pooled tables by stem (absent ones are empty frames),
        the report directory (write CSV / parquet / PNG there), the ratio variant of the report.
    lines(out) -> list[str]: one-line results read back from the report directory (console, W&B-free).
    track(tracker, tables, out_dir, cfg): W&B extras after the job, from the tables ``run`` returned.
    """

    tables: tuple[str, ...]
    summarise: Callable[..., Summary]
    lines: Callable[[Path], list[str]] | None = None
    track: Callable[..., None] | None = None


def reader_for(cfg, world: str | None):
    """The study's reader (:func:`negstudy.evaluators.reader.study_reader`), built and checked before the
    model loads; None for ``evaluator=none``."""
    from negstudy.evaluators.reader import study_reader

    return study_reader(cfg.get("evaluator"), world)


LIMITS_TABLE = "reader_limits"  # every study's: what its reader could not measure (the report lists it once)


def note_limits(out_dir, study: str, reader, needs: dict[str, str], categories=("object", "attribute")) -> list[str]:
    """Log once, and write ``reader_limits.parquet``, what ``study`` leaves out with ``reader``
    (:func:`negstudy.evaluators.reader.capabilities`). Returns the lines."""
    import pandas as pd

    from negstudy.evaluators.reader import capabilities
    from negstudy.records import write_table

    lines = capabilities(reader, needs, list(categories))
    frame = pd.DataFrame({"study": [study] * len(lines), "reader": [reader.name if reader else "none"] * len(lines),
                          "left_out": lines}, columns=["study", "reader", "left_out"])
    write_table(frame, Path(out_dir) / f"{LIMITS_TABLE}.parquet")
    return lines


def module_of(node) -> ModuleType:
    """The module of a study node's ``_target_`` (``negstudy.studies.removal.run`` -> the removal module)."""
    target = str(node["_target_"])
    module = target.rsplit(".", 1)[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"sweep.study._target_={target!r}: its module does not import ({err})") from None


def modules(targets: Iterable[str] = ()) -> list[ModuleType]:
    """The modules of ``targets`` (the studies a run's configs name), once each; without targets
    (a directory of bare tables), every study module of this package."""
    names = [t.rsplit(".", 1)[0] for t in targets]
    if not names:
        names = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return [importlib.import_module(n) for n in dict.fromkeys(names)]


def reports(targets: Iterable[str] = ()) -> list[tuple[str, StudyReport]]:
    """(module name, REPORT) of every study module of :func:`modules` that has one."""
    return [(m.__name__, m.REPORT) for m in modules(targets) if getattr(m, "REPORT", None) is not None]


def job_targets(root: Path) -> list[str]:
    """``sweep.study._target_`` of every job config below ``root`` (a run or a sweep directory)."""
    import yaml

    found = []
    for path in sorted(Path(root).rglob("config.yaml")):
        if {"report", ".hydra"} & set(path.relative_to(root).parts):
            continue
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        target = ((cfg.get("sweep") or {}).get("study") or {}).get("_target_") if isinstance(cfg, dict) else None
        if target:
            found.append(str(target))
    return found


def prepared(module: ModuleType, cfg, world: str | None) -> dict[str, Any]:
    """The study's ``prepare(cfg, world)``, or nothing when it has none."""
    prepare = getattr(module, "prepare", None)
    return prepare(cfg, world) if prepare is not None else {}


# ----------------------------------------------------------------------------- seed screening


@dataclass
class Screened:
    """One screened (prompt, negative, seed): the image WITHOUT the negative and what the reader says."""

    image: Any  # uint8 (H, W, 3)
    present: bool | None  # the negative's concept appears (None: the reader is unsure; counted, never guessed)
    region: Any  # bool (H, W) region of the concept where it is an object surely present and located, else None
    word_region: Any = None  # bool (H, W) region of the asked word's object (the prompt's own), else None
    # step -> Snapshot of the image's trajectory (``keep``): shared by every item of one (prompt, seed), never
    # consumed by a resume (negstudy.sampler.Batch.resume restores copies)
    states: dict = field(default_factory=dict)


def screen_without_negative(sampler, reader, prompts, negatives, categories, seeds, chunk: int, keep=(),
                            words=None, desc: str = "screen (no negative)") -> list[Screened]:
    """Seed screening, written once for every study: does the negative's concept appear WITHOUT the
    negative? Each (prompt, negative, seed) is generated under the ``never`` schedule (plain CFG with
    the empty prompt; the negative is not used) and read by ``reader``
    (:class:`negstudy.evaluators.reader.StudyReader`; None: nothing is read, every ``present`` is
    None). ``categories``: object | attribute per item; ``words``: per item, a word whose object's
    region is wanted too (the prompt's own object). Items that share a (prompt, seed) share one image:
    the never schedule makes it whatever the negative (pairs with one prompt and several negatives
    cost one screen image a seed; with fixed rows the image is the one a separate run gives, bit for
    bit). ``chunk`` images per sampler call (and items per read); ``keep``: steps at which each
    image's trajectory state is kept (``Screened.states``, for ``Batch.resume``). Returns one
    :class:`Screened` per item, in order."""
    import contextlib

    import numpy as np
    from tqdm.auto import tqdm

    from negstudy.evaluators.reader import Look
    from negstudy.records import to_uint8
    from negstudy.sampler import Batch, KeepStates
    from negstudy.schedules import Never

    never = Never().plan(sampler.n_calls)
    prompts, negatives, seeds = list(prompts), list(negatives), [int(s) for s in seeds]
    categories, words = list(categories), (list(words) if words is not None else None)
    chunk = max(1, int(chunk))
    first: dict[tuple[str, int], int] = {}  # (prompt, seed) -> its first item
    for i, key in enumerate(zip(prompts, seeds)):
        first.setdefault(key, i)
    unique = list(first.values())
    images, states = {}, {}
    with tqdm(total=len(unique), desc=desc, unit="img", leave=False) as bar:
        for start in range(0, len(unique), chunk):
            part = unique[start : start + chunk]
            kept = KeepStates(keep) if keep else None
            batch = Batch([prompts[i] for i in part], [negatives[i] for i in part], [seeds[i] for i in part], [never] * len(part))
            for j, (i, image) in enumerate(zip(part, to_uint8(sampler.generate(batch, [kept] if kept else ())))):
                images[i], states[i] = image, (kept.states.get(j, {}) if kept else {})
            bar.update(len(part))
    found = []
    with reader.reusing() if reader is not None else contextlib.nullcontext():  # a shared image is read once
        for start in range(0, len(prompts), chunk):
            part = range(start, min(start + chunk, len(prompts)))
            of = [first[(prompts[i], seeds[i])] for i in part]
            batch_images = np.stack([images[u] for u in of])
            looks = (reader.look(batch_images, [negatives[i] for i in part], [categories[i] for i in part],
                                 [words[i] for i in part] if words else None)
                     if reader is not None else [Look(None)] * len(of))
            found += [Screened(images[u], look.present, look.region, look.word_region, states[u]) for u, look in zip(of, looks)]
    return found
