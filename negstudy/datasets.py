"""Prompt sets: the pairs of a dataset config, inline (``dataset.pairs``) or from a file (``dataset.path``).

Files are parsed as data, never executed: CSV with a header ``prompt,negative[,category]``; JSONL
with one object per line holding those keys; TXT with one pair per line, ``prompt<TAB>negative[<TAB>category]``
(lines starting with ``#`` are comments). ``category`` defaults to ``object``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from negstudy.errors import ConfigError

CATEGORIES = ("object", "attribute")
FORMATS = (".csv", ".jsonl", ".txt")


@dataclass(frozen=True)
class Pair:
    prompt: str
    negative: str
    category: str = "object"


def _check(pairs: list[Pair], where: str, name: str = "") -> list[Pair]:
    if not pairs:
        raise ConfigError(f"{where}: the prompt set is empty{name}")
    for i, p in enumerate(pairs):
        if not p.prompt.strip():
            raise ConfigError(f"{where}[{i}].prompt={p.prompt!r}: must be non-empty")
        if p.category not in CATEGORIES:
            raise ConfigError(f"{where}[{i}].category={p.category!r}: allowed values are {', '.join(CATEGORIES)}")
    return pairs


def read_pairs(path: str | Path) -> list[Pair]:
    path = Path(path).expanduser()
    key = f"dataset.path={str(path)!r}"
    if path.suffix not in FORMATS:
        raise ConfigError(f"{key}: unknown format {path.suffix!r} (allowed: {', '.join(FORMATS)})")
    if not path.is_file():
        raise ConfigError(f"{key}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".csv":
            records = list(csv.DictReader(text.splitlines()))
        elif path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = []
            for line in text.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    fields = line.rstrip("\n").split("\t")
                    records.append(dict(zip(("prompt", "negative", "category"), fields)))
        pairs = [Pair(str(r["prompt"]), str(r.get("negative") or ""), str(r.get("category") or "object")) for r in records]
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"{key}: cannot read pairs ({type(err).__name__}: {err}); expected columns prompt, negative[, category]") from None
    return _check(pairs, key)


def captions_of(dataset_cfg) -> list[str]:
    """Captions for the removal sweep: a caption file when ``dataset.format`` names one (Conceptual
    Captions, MSVD, VATEX, Places365, NoCaps, COCO-object scenes, TXT: see :mod:`negstudy.captions`),
    else the distinct prompts of the dataset's pairs; cut to ``dataset.limit``."""
    if dataset_cfg.get("format"):
        if not dataset_cfg.get("path"):
            raise ConfigError(f"dataset.format={dataset_cfg.format!r} needs dataset.path=<file>")
        from negstudy.captions import read_captions

        return _shard(read_captions(dataset_cfg.path, dataset_cfg.format, limit=dataset_cfg.limit), dataset_cfg)
    if dataset_cfg.get("captions"):
        return _shard([str(c) for c in dataset_cfg.captions][: dataset_cfg.limit], dataset_cfg)
    return list(dict.fromkeys(p.prompt for p in pairs_of(dataset_cfg)))


def pairs_of(dataset_cfg) -> list[Pair]:
    """The dataset's pairs (file or inline), cut to ``dataset.limit``."""
    if dataset_cfg.get("format") or (dataset_cfg.get("captions") and not dataset_cfg.get("pairs")):
        return [Pair(c, "", "object") for c in captions_of(dataset_cfg)]  # captions: prompts without a negative
    if dataset_cfg.get("path"):
        pairs = read_pairs(dataset_cfg.path)
    else:
        pairs = _check([Pair(str(p.prompt), str(p.negative), str(p.category)) for p in dataset_cfg.pairs],
                       "dataset.pairs", f" (dataset {dataset_cfg.name!r})")
    return _shard(pairs[: dataset_cfg.limit], dataset_cfg)


def _shard(items: list, dataset_cfg) -> list:
    """Items ``shard, shard + shards, ...``: the prompt-set shard of one multirun job."""
    shard, shards = dataset_cfg.get("shard", 0), dataset_cfg.get("shards", 1)
    return items[shard::shards]
