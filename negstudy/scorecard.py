"""The replication scorecard: each claim of Ban et al. (PAPER.md), measured on THIS run, with a verdict.

    python -m negstudy.scorecard <run or multirun directory>     # also written by python -m negstudy.report

One row per claim: the paper's value, negstudy's measured value with its 95 % interval and n on
this run, a verdict computed by the rule written in the row, and the table it comes from. Nothing
is typed by hand: every measured value is computed here from the run's tables (ratio.parquet,
attention.parquet, reverse.parquet, inducing/momentum/energy.parquet, removal_targets.parquet), with
negstudy.report's pooling (one unit per (job, pair, seed); intervals resample pairs, then seeds
within pairs; removal: captions, then objects). The header names the model(s) the run used (the
jobs' config.yaml), the model's measured quality (its card) and the reader's measured agreement.

Verdicts, in this order:

1. ``not measured in this run``: the table the claim needs is absent (the row names the sweep that
   writes it), or the run's tables lack what the claim needs (the row says what).
2. ``inconclusive (instrument: <the check that failed, its value and threshold>)``: a check the
   claim needs fails, whatever the n and the interval. Each claim declares its checks
   (CLAIM_CHECKS), each a measured number with a threshold (CHECKS, the project plan's): the
   model's ``quality.json`` (``scripts/measure_shapes.py --json``: does a negative act on this
   model, are the attributes drawn when named, does a word's map reach its object, are there
   unnamed objects to remove), the reader's agreement with by-eye labels on the model's own images
   (``reader_agreement.json``, held-out split), or the run itself (the attention lag needs
   MIN_UNITS pair-seeds where both words' maps reach their regions). The ratio claims need the
   reader only when the run screened its seeds with it (``screen.parquet``; the paper's protocol
   reads nothing). A model whose quality was never measured (no ``quality.json`` beside it: a hub
   checkpoint) is not held against a claim, and the header says "not measured"; a reader never
   validated on the model is ("reader not validated").
3. ``inconclusive at this n``: fewer than MIN_CLUSTERS pairs (captions) or MIN_UNITS pair-seeds
   (objects) behind the number, whatever its interval.
4. ``holds``: the 95 % interval satisfies the row's "holds" condition; for a claimed value with a
   band, the interval lies INSIDE the band (an equivalence rule: the data pin the value near the
   paper's, not merely fail to exclude it).
5. ``does not hold``: the interval satisfies the row's "does not hold" condition (for a band: the
   interval lies entirely OUTSIDE it).
6. ``inconclusive at this n``: anything else (the interval straddles an edge); the row's "n to
   decide" scales the measured spread to the n that would clear the nearest edge (n_to_decide).

The reader's agreement comes from ``reader_agreement.json`` beside the model
(``negstudy/models/<model>/reader_agreement.json``, written by
``scripts/reader_agreement.py --out negstudy/models/<model>/reader_agreement.md``):
``{"holdout": {reader: {"object": {"rate", "lo", "hi", "n"}, "background": {...}, ...}}, "tune": ...}``.
The reader of a run is its jobs' ``evaluator.name`` (removal: the ``evaluator`` column).

Steps are UNet-call indices (negstudy.schedules); the paper's are those of 31 calls. A run with
another loop length is compared on the paper's grid: step x 30 / (n_calls - 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from negstudy.tables import DEFAULT_VARIANT, HIT_LIFT, METHOD_NAMES, UNIT, _read, critical_steps, drawn, pair_labels, removal_methods
from negstudy.critical import cluster_mean_ci, cluster_rate_ci

MIN_CLUSTERS = 3  # pairs (captions): fewer, and a bootstrap over them says little
MIN_UNITS = 10  # pair-seeds (objects)
PAPER_CALLS = 31  # the paper's loop: 30 PNDM steps, 31 UNet calls
MODEL_TARGETS = {"object_recall": 0.95, "background_right": 0.95}  # the shipped model's plan (shown, not a gate)
READER_TARGETS = {"object": 0.98, "background": 0.97, "attribute": 0.95}
READER_SPLIT = "holdout"
REVERSE_EARLY = 10  # the paper's reverse-activation ks: 1..10 of 31 calls (plus 20, 30)
READER_ERROR = 0.02  # object decisions the reader may get wrong at its target (1 - 0.98)

HOLDS, FAILS, OPEN, INSTRUMENT, ABSENT = ("holds", "does not hold", "inconclusive at this n",
                                          "inconclusive (instrument", "not measured in this run")
# INSTRUMENT is the prefix of "inconclusive (instrument: <the failed check>)"
ATTRIBUTES = ("blurry", "noisy", "dark", "striped")  # the shapes world's (negstudy.shapes.world.ATTRIBUTES)


@dataclass(frozen=True)
class Check:
    """One instrument check: a measured number that a claim needs at or above ``threshold``."""

    key: str
    threshold: float
    source: str  # "quality" (quality.json beside the model) or "reader" (reader_agreement.json, held-out split)
    field: str  # the quality.json key, or the reader's decision ("object", "background", "attribute")
    says: str  # one line: what it measures and why a claim needs it
    min_n: int = 0  # a reader check: the fewest sure decisions behind the rate


MIN_SURE_PER_ATTRIBUTE = 20
CHECKS = {c.key: c for c in (
    Check("negative_acts", 0.50, "quality", "object_removal",
          "an object negative at every step removes an unnamed object of its class: a negative acts on this model"),
    Check("attribute_negative_acts", 0.50, "quality", "attribute_removal",
          "an attribute negative at every step removes an unnamed attribute: attribute negatives act on this model"),
    *(Check(f"{a}_drawn", 0.80, "quality", f"attribute_{a}",
            f"'{a}' is drawn when the caption names it: the model knows the adjective it is asked to remove")
      for a in ATTRIBUTES),
    Check("words_localize", 0.80, "quality", "object_localization",
          "the prompt's object word reaches its own object (lift >= 2, mean map of the last five steps): maps that "
          "could show an arrival"),
    Check("unnamed_objects", 0.20, "quality", "images_with_unnamed_object",
          "images hold an object the caption does not name: something to remove"),
    Check("reader_objects", READER_TARGETS["object"], "reader", "object",
          "the reader's object decisions agree with labels by eye on this model's held-out images"),
    Check("reader_backgrounds", READER_TARGETS["background"], "reader", "background",
          "the reader's background decisions agree with labels by eye (held-out)"),
    Check("reader_attributes", READER_TARGETS["attribute"], "reader", "attribute",
          "the reader's attribute decisions agree with labels by eye (held-out)"),
    *(Check(f"reader_{a}", READER_TARGETS["attribute"], "reader", f"attribute_{a}",
            f"the reader says '{a}' on the held-out images labelled '{a}' by eye, over at least "
            f"{MIN_SURE_PER_ATTRIBUTE} sure decisions", MIN_SURE_PER_ATTRIBUTE)
      for a in ATTRIBUTES),
)}
RUN_CHECK = "both_words_arrive"  # the attention lag's check on the run itself (Measure.unresolved)
SCREENED = "screened"  # checks a ratio claim needs only when the run screened its seeds with the reader
CLAIM_CHECKS = {
    "noun_peak_step": ("negative_acts", SCREENED, "reader_objects"),
    "noun_peak_height": ("negative_acts", SCREENED, "reader_objects"),
    "adjective_crossing": ("attribute_negative_acts", "<attributes>_drawn", SCREENED, "reader_attributes", "reader_<attributes>"),
    "attention_later": ("words_localize", "reader_objects"),
    "reverse_activation": ("negative_acts", "reader_objects"),
    "inducing": ("negative_acts",),
    "momentum": (),
    "energy_barrier": ("reader_objects", "reader_backgrounds"),
    "removal": ("unnamed_objects", "reader_objects", "reader_backgrounds"),
}


@dataclass(frozen=True)
class Measure:
    """A measured value with its 95 % interval (inf / -inf for an open end) and its n."""

    value: float
    low: float
    high: float
    n_clusters: int
    n_units: int
    text: str  # the value as the row shows it
    unit: str = "pairs x pair-seeds"
    missing: str = ""  # measured in part: what the verdict would need that the run's tables lack
    unresolved: str = ""  # measured, but the instrument cannot resolve the claim: why (verdict "inconclusive (instrument)")


@dataclass(frozen=True)
class Claim:
    key: str
    claim: str
    paper: str
    rule: str  # shown in the row
    holds: Rule
    fails: Rule
    table: str
    sweep: str


@dataclass(frozen=True)
class Rule:
    """A verdict's condition on the 95 % interval (lo, hi), and the edges it compares the interval with."""

    test: Callable[[float, float], bool]
    edges: tuple[float, ...]

    def __call__(self, lo: float, hi: float) -> bool:
        return self.test(lo, hi)


def inside(a: float, b: float) -> Rule:
    return Rule(lambda lo, hi: a <= lo and hi <= b, (a, b))


def outside(a: float, b: float) -> Rule:
    return Rule(lambda lo, hi: hi < a or lo > b, (a, b))


def above(x: float) -> Rule:
    return Rule(lambda lo, hi: lo > x, (x,))


def below(x: float, or_at: bool = False) -> Rule:
    return Rule((lambda lo, hi: hi <= x) if or_at else (lambda lo, hi: hi < x), (x,))


def _grid(x, n_calls: int) -> float:
    """A step of a loop of n_calls on the paper's 31-call grid; None (never) -> inf."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return math.inf
    return float(x) * (PAPER_CALLS - 1) / (n_calls - 1)


def _steps_text(step, low, high, n_calls: int) -> str:
    def s(x):
        return "never" if x is None or pd.isna(x) else f"{int(x)}"

    text = f"step {s(step)} (95 % CI {s(low)}..{s(high)}) of {n_calls} calls"
    if n_calls != PAPER_CALLS:
        def g(x):
            v = _grid(None if x is None or pd.isna(x) else x, n_calls)
            return "never" if math.isinf(v) else f"{v:.1f}"
        text += f" = {g(step)} ({g(low)}..{g(high)}) of {PAPER_CALLS}"
    return text


# ----------------------------------------------------------------------------- the claims

CLAIMS = (
    Claim("noun_peak_step", "Object (noun) negatives: the strength ratio peaks early",
          "peak at step 5 of 31 calls (10 pairs x 10 seeds, SD 2 base)",
          "holds if the 95 % CI of the peak step (31-call grid) lies within steps 2..8 (paper +-3); "
          "does not hold if it lies entirely outside",
          inside(2, 8), outside(2, 8), "ratio", "+sweep=critical_step (the main job)"),
    Claim("noun_peak_height", "Object (noun) negatives: the peak strength ratio",
          "max ~1.07", "holds if the 95 % CI of the mean curve's maximum lies within 1.02..1.12 (paper +-0.05); "
          "does not hold if it lies entirely outside",
          inside(1.02, 1.12), outside(1.02, 1.12), "ratio", "+sweep=critical_step (the main job)"),
    Claim("adjective_crossing", "Attribute (adjective) negatives: the ratio starts below 1 and crosses it near step 10",
          "crosses 1 near step 10 of 31 calls, then plateaus",
          "crossing by the default rule (stays >= 1 up to dips of 0.01); holds if its 95 % CI (31-call grid) lies "
          "within steps 7..13 (paper +-3); does not hold if it lies entirely outside (never crossing counts as outside)",
          inside(7, 13), outside(7, 13), "ratio", "+sweep=critical_step (the main job)"),
    Claim("attention_later", "The negative word's attention reaches the object's region later than the positive prompt's",
          "several steps later (Figures 1 and 4, judged by eye)",
          "per pair-seed, lag = the step at which the negative word's map reaches the concept's region (negative "
          "branch) - the step at which the prompt's first object word reaches its own object (positive branch), lift >= 2; "
          "holds if the 95 % CI of the mean lag is above 0, does not hold if below 0",
          above(0), below(0), "attention", "+sweep=critical_step (the main job)"),
    Claim("reverse_activation", "Reverse activation: the negative in the first steps only CREATES the object it names",
          "shown qualitatively (e.g. office woman + 'glasses' for the first k steps: she wears glasses)",
          f"rate of pair-seeds (object absent without the negative) in which it appears for some k in 1..{REVERSE_EARLY} "
          f"of 31 calls; holds if the 95 % CI is above the reader's error allowance {READER_ERROR:.0%}, does not hold if "
          f"it lies below it",
          above(READER_ERROR), below(READER_ERROR, or_at=True), "reverse", "+sweep=reverse_activation"),
    Claim("inducing", "Inducing: D(t) starts at 0 and grows",
          "D(0) = 0, grows to ~0.37 (L2 norm on SD 2 latents; negstudy's D is in RMS units: magnitudes do not compare)",
          "mean D(t) over the second half of the steps; holds if its 95 % CI is above 0, does not hold if it is at or below 0",
          above(0), below(0, or_at=True), "inducing", "+sweep=mechanisms"),
    Claim("momentum", "Momentum: m(t) = cos(eps_pos(t), eps_pos(t+1)) stays ~1 until the last steps",
          "~0.999 until the last steps, then ~0.92 (the author's code: cosine of signs)",
          "mean m(t) over the first 80 % of the steps, negative at every step, as the cosine of signs (m_sign, the "
          "paper's) when the table has it, else of the raw vectors (m); holds if its 95 % CI lies within 0.98..1, "
          "does not hold if it lies below 0.98",
          inside(0.98, 1.0), below(0.98), "momentum", "+sweep=mechanisms"),
    Claim("energy_barrier", "Energy barrier: the denoising error of a background/object mix peaks near theta 0.5",
          "a barrier of ~+20 % at theta ~0.5 (t = 100)",
          "error at theta 0.5 relative to the mean of the ends (theta 0 and 1), minus 1, at the least-noised step "
          "measured; holds if its 95 % CI is above 0, does not hold if it is at or below 0",
          above(0), below(0, or_at=True), "energy", "+sweep=mechanisms"),
)
REMOVAL_CLAIMS = (
    ("vs_from0", "Windowed removal: removal rate relative to the negative from step 0",
     "83-87 % (5 prompt sets, 877-3154 objects each)",
     "holds if the 95 % CI of (windowed rate / from-0 rate) lies within 0.75..0.95 (paper 85 % +-10 points); "
     "does not hold if it lies entirely outside", inside(0.75, 0.95), outside(0.75, 0.95)),
    ("preferred", "Windowed removal is preferred to from-0 as closer to the original",
     "82-83 % (GPT-4V judge)",
     "holds if the 95 % CI of the preference rate lies within 0.73..0.93 (paper 83 % +-10 points); "
     "does not hold if it lies entirely outside", inside(0.73, 0.93), outside(0.73, 0.93)),
)


# ----------------------------------------------------------------------------- the instrument


def run_configs(root: Path) -> list[dict]:
    """The config.yaml of every job under ``root`` (resolved, as the jobs wrote them)."""
    import yaml

    paths = sorted(p for p in Path(root).rglob("config.yaml") if not {"report", ".hydra"} & set(p.relative_to(root).parts))
    return [yaml.safe_load(p.read_text()) or {} for p in paths]


def shareable(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` as a shared report shows it, never absolute: below the run ``root``, relative to it;
    inside the negstudy package (a shipped model's card), from ``negstudy/``; a relative path as
    given; anything else, its folder's name and its own (``sd2-base/README.md``)."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    for base in ([Path(root)] if root is not None else []) + [Path(__file__).resolve().parents[1]]:
        try:
            return p.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return "/".join(p.parts[-2:])


def model_dir(model: dict) -> Path | None:
    """The directory of a shipped or local model (its card, quality.json, reader_agreement.json); None for a hub id."""
    from negstudy.models import BUILTIN_PREFIX, builtin_model_dir

    path = str(model.get("path") or "")
    if path.startswith(BUILTIN_PREFIX):
        return builtin_model_dir(path[len(BUILTIN_PREFIX):])
    if path and Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    name = builtin_model_dir(str(model.get("name") or "_"))
    return name if name.is_dir() else None


CARD_ROWS = {"object_recall": "per-object recall", "background_right": "background right"}


def model_quality(directory: Path | None) -> tuple[dict, str]:
    """({measure: rate}, source): every rate of quality.json beside the model, else the rows of its card's table
    (object recall and background right: shown, not checks)."""
    if directory is None:
        return {}, "not measured (no model card)"
    path = directory / "quality.json"
    if path.exists():
        data = json.loads(path.read_text())
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, shareable(path)
    card = directory / "README.md"
    found = {}
    if card.exists():
        for line in card.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            for key, label in CARD_ROWS.items():
                if len(cells) > 1 and cells[0].lower().startswith(label):
                    m = re.match(r"([\d.]+)\s*%", cells[1])
                    if m:
                        found.setdefault(key, float(m.group(1)) / 100)
    return found, (shareable(card) if found else "not measured (no quality.json, no quality table in the card)")


def reader_agreement(directory: Path | None, reader: str) -> tuple[dict, str]:
    """({decision: rate}, source) of ``reader`` on the held-out labels; {} when not validated."""
    path = directory / "reader_agreement.json" if directory is not None else None
    if path is None or not path.exists():
        return {}, "reader not validated (no reader_agreement.json beside the model)"
    data = json.loads(path.read_text())
    split = data.get(READER_SPLIT, data)
    entry = split.get(reader) if isinstance(split, dict) else None
    if not isinstance(entry, dict):
        return {}, f"reader not validated ({shareable(path)} has no {READER_SPLIT} agreement of reader {reader!r})"
    rates = {}
    for decision, v in entry.items():
        rate = v.get("rate") if isinstance(v, dict) else v
        if isinstance(rate, (int, float)) and not (isinstance(v, dict) and v.get("n", 1) == 0):
            rates[decision] = float(rate)
    for a, v in ((split.get("per_attribute") or {}).get(reader) or {}).items():  # scripts/reader_agreement.py
        rates[f"attribute_{a}_n"] = float(v.get("n", 0))
        if v.get("n", 0):
            rates[f"attribute_{a}"] = float(v["rate"])
    return rates, shareable(path)


@dataclass(frozen=True)
class CheckResult:
    """A check on one run: its value (None: not measured), whether it passed, and where the value comes from."""

    check: Check
    value: float | None
    passed: bool
    where: str  # the file the value comes from, or why there is none
    reader: str = ""
    sure: int | None = None  # a reader check with too few sure decisions: how many there were

    @property
    def failure(self) -> str:
        """The verdict's parenthesis when the check fails: the check, its value and threshold."""
        c = self.check
        who = f" ({self.reader})" if self.reader else ""
        if self.value is None and self.sure is not None:
            return f"{c.key}{who} {self.sure} sure decisions < {c.min_n}"
        if self.value is None:
            return f"{c.key}{who} not measured: {self.where}"
        return f"{c.key}{who} {self.value:.1%} < {c.threshold:.0%}"

    @property
    def text(self) -> str:
        c = self.check
        who = f" of reader {self.reader}" if self.reader else ""
        if self.value is None:
            return f"{c.key}{who}: {self.where}" + ("" if self.passed else ": FAILS")
        return (f"{c.key}{who} {self.value:.1%} (>= {c.threshold:.0%}: {'passes' if self.passed else 'FAILS'}) "
                f"[{self.where}]")


def _check(check: Check, quality: dict, quality_source: str, has_quality: bool, readers: dict[str, tuple[dict, str]]) -> list[CheckResult]:
    """The check's results on one model: one per reader for a reader check."""
    if check.source == "quality":
        if not has_quality:  # a model never measured (a hub checkpoint) is not held against a claim
            return [CheckResult(check, None, True, "not measured (no quality.json beside the model): not held against the claims")]
        if check.field not in quality:
            return [CheckResult(check, None, False, f"{check.field} not in {quality_source} (scripts/measure_shapes.py --json)")]
        v = quality[check.field]
        return [CheckResult(check, v, v >= check.threshold, quality_source)]
    out = []
    for reader, (rates, source) in readers.items():
        sure = int(rates.get(f"{check.field}_n", 0))
        if not rates:
            out.append(CheckResult(check, None, False, source, reader))
        elif check.min_n and sure < check.min_n:
            out.append(CheckResult(check, None, False, f"{sure} sure decisions in {source}, fewer than {check.min_n}", reader, sure))
        elif check.field not in rates:
            out.append(CheckResult(check, None, False, f"no {check.field} agreement in {source}", reader))
        else:
            v = rates[check.field]
            out.append(CheckResult(check, v, v >= check.threshold, source, reader))
    return out


def _worst(results: list[CheckResult]) -> CheckResult:
    """The result that decides: a failure before a pass, then the lowest value."""
    return min(results, key=lambda r: (r.passed, -1.0 if r.value is None else r.value))


@dataclass(frozen=True)
class Instrument:
    models: list[str]
    model_text: str
    readers: list[str]
    reader_text: str
    checks: dict  # check key -> CheckResult (the worst over the run's models and readers)

    def failed(self, keys) -> list[CheckResult]:
        return [self.checks[k] for k in keys if k in self.checks and not self.checks[k].passed]


def instrument(root: Path, targets: pd.DataFrame | None = None) -> Instrument:
    configs = run_configs(root)
    models = list(dict.fromkeys(f"{c.get('model', {}).get('name', '?')} ({shareable(c.get('model', {}).get('path') or '?')})"
                                for c in configs)) or ["unknown (no config.yaml in the run)"]
    readers = list(dict.fromkeys(str(c.get("evaluator", {}).get("name", "?")) for c in configs))
    if targets is not None and not targets.empty and "evaluator" in targets:
        readers = list(dict.fromkeys(list(targets.evaluator.astype(str)) + [r for r in readers if r != "?"]))
    readers = readers or ["unknown"]
    mtexts, rtexts, results = [], [], {k: [] for k in CHECKS}
    per_model = {json.dumps(c.get("model", {}), sort_keys=True, default=str): c for c in configs}  # jobs share a model
    for c in list(per_model.values()) or [{}]:
        directory = model_dir(c.get("model", {}))
        quality, source = model_quality(directory)
        has_quality = directory is not None and (directory / "quality.json").exists()
        shown = ", ".join(f"{k} {quality[k]:.1%}" for k in MODEL_TARGETS if k in quality)
        mtexts.append(f"{c.get('model', {}).get('name', 'unknown model')}: {shown or source}" + (f" [{source}]" if shown else ""))
        agreement = {reader: reader_agreement(directory, reader) for reader in readers}
        for reader, (rates, rsource) in agreement.items():
            rtexts.append(f"{reader}: {rsource}" if not rates else f"{reader} on the {READER_SPLIT} labels: " + ", ".join(
                f"{d} {rates[d]:.1%}" if d in rates else f"{d} not measured" for d in READER_TARGETS) + f" [{rsource}]")
        for key, check in CHECKS.items():
            results[key] += _check(check, quality, source, has_quality, agreement)
    return Instrument(models, "; ".join(dict.fromkeys(mtexts)), readers, "; ".join(dict.fromkeys(rtexts)),
                      {k: _worst(v) for k, v in results.items() if v})


def claim_checks(key: str, screened: bool, attributes=()) -> tuple[str, ...]:
    """The checks claim ``key`` needs on a run: the reader's only where it read the claim's images (the ratio
    claims: when the run screened its seeds); the attribute claim's per-attribute checks (drawn when named, read
    by the reader) for the attributes whose seeds it pools (drawn: negstudy.tables.drawn)."""
    out, skip = [], False
    for k in CLAIM_CHECKS[key]:
        if k == SCREENED:
            skip = not screened
        elif "<attributes>" in k:
            if not skip:
                out += [k.replace("<attributes>", a) for a in ATTRIBUTES if a in set(attributes)]
        elif not skip:
            out.append(k)
    return tuple(out)


# ----------------------------------------------------------------------------- measurements


def _ratio_measures(crit: pd.DataFrame) -> dict[str, Measure | str]:
    out: dict[str, Measure | str] = {}
    rows = crit[crit.level == "category"].set_index("category") if not crit.empty else pd.DataFrame()
    paired = set(crit[crit.level == "pair"].category) if not crit.empty else set()
    absent = lambda c: (f"ratio.parquet has {c} negatives only on the screen's padding (no seed where the concept was drawn)"
                        if c in paired else f"ratio.parquet has no {c} negatives")
    if "object" in rows.index:
        r = rows.loc["object"]
        n = int(r.n_steps)
        out["noun_peak_step"] = Measure(_grid(r.critical_step, n), _grid(r.ci_low, n), _grid(r.ci_high, n), int(r.n_pairs),
                                        int(r.n_pair_seeds), _steps_text(r.critical_step, r.ci_low, r.ci_high, n))
        out["noun_peak_height"] = Measure(float(r.peak_ratio), float(r.peak_ratio_low), float(r.peak_ratio_high), int(r.n_pairs),
                                          int(r.n_pair_seeds), f"{r.peak_ratio:.3f} (95 % CI {r.peak_ratio_low:.3f}.."
                                                               f"{r.peak_ratio_high:.3f}) at step {int(r.critical_step)}")
        if pd.notna(r.get("lag_n", np.nan)) and r.lag_n >= MIN_UNITS:
            out["attention_later"] = Measure(
                float(r.lag_mean), float(r.lag_low), float(r.lag_high), int(r.lag_n_pairs), int(r.lag_n),
                f"the negative word reaches the concept's region {r.lag_mean:+.1f} steps (95 % CI {r.lag_low:+.1f}.."
                f"{r.lag_high:+.1f}) after the positive word reaches its own object (lift >= {HIT_LIFT:g}; {n} calls), "
                f"over the {int(r.lag_n)} pair-seeds where both arrive; the negative never arrives in "
                f"{int(r.attention_never)} of {int(r.attention_n)}")
        elif pd.notna(r.get("positive_n", np.nan)) and r.positive_n > 0:
            # both words' maps were recorded, and (almost) no pair-seed has both arriving by the lift rule:
            # the maps do not concentrate on the regions enough for this model to show an arrival
            neg = (f"at step {r.attention_step_mean:.1f} of {n} calls in the {int(r.attention_n - r.attention_never)} "
                   f"pair-seeds where it does" if pd.notna(r.attention_step_mean) else "in no pair-seed")
            out["attention_later"] = Measure(
                np.nan, np.nan, np.nan, int(r.attention_n_pairs), int(r.attention_n),
                f"neither word's map concentrates on its region: the negative word reaches the concept's region (lift >= "
                f"{HIT_LIFT:g}) {neg}, never in {int(r.attention_never)} of {int(r.attention_n)}; the positive word "
                f"reaches its own object in {int(r.positive_n - r.positive_never)} of {int(r.positive_n)} pair-seeds with "
                f"that object; lags over {int(r.lag_n)} pair-seeds where both arrive",
                unresolved=f"{RUN_CHECK} (this run): fewer than {MIN_UNITS} pair-seeds where both words' maps reach their regions")
        elif pd.notna(r.get("attention_n", np.nan)):
            reached = (f"at step {r.attention_step_mean:.1f} (95 % CI {r.attention_step_low:.1f}..{r.attention_step_high:.1f}) "
                       f"of {n} calls where it does" if pd.notna(r.attention_step_mean) else "never")
            out["attention_later"] = Measure(
                _grid(r.attention_step_mean, n), _grid(r.attention_step_low, n), _grid(r.attention_step_high, n),
                int(r.attention_n_pairs), int(r.attention_n),
                f"the negative word reaches the object's region (lift >= {HIT_LIFT:g}) {reached}; never in "
                f"{int(r.attention_never)} of {int(r.attention_n)} pair-seeds",
                missing="a pair-seed where both the positive and the negative word reach their regions")
    else:
        out["noun_peak_step"] = out["noun_peak_height"] = absent("object")
    if "attribute" in rows.index:
        r = rows.loc["attribute"]
        n = int(r.n_steps)
        low = _grid(r.ci_low, n)
        out["adjective_crossing"] = Measure(_grid(r.critical_step, n), low, _grid(r.ci_high, n), int(r.n_pairs),
                                            int(r.n_pair_seeds), _steps_text(r.critical_step, r.ci_low, r.ci_high, n)
                                            + f"; ratio at step 0 {r.ratio_at_step0:.3f}")
    else:
        out["adjective_crossing"] = absent("attribute")
    return out


def _units(frame: pd.DataFrame, value: str) -> tuple[np.ndarray, np.ndarray]:
    """Per (job, pair, seed): the mean of ``value`` and the pair label."""
    g = frame.assign(pair_label=pair_labels(frame)).groupby(UNIT + ["pair_label"])[value].mean().reset_index()
    return g[value].to_numpy(dtype=float), g.pair_label.to_numpy()


def _mean_measure(frame: pd.DataFrame, value: str, fmt: str, extra: str = "") -> Measure:
    values, pairs = _units(frame, value)
    m, lo, hi = cluster_mean_ci(values, pairs)
    return Measure(m, lo, hi, len(set(pairs)), len(values), f"{fmt.format(m)} (95 % CI {fmt.format(lo)}..{fmt.format(hi)}){extra}")


def _reverse(reverse: pd.DataFrame) -> Measure | str:
    n_calls = int(reverse.k.max())  # k = n_calls: the negative at every step
    top = max(1, round(REVERSE_EARLY * n_calls / PAPER_CALLS))
    early = reverse[(reverse.k >= 1) & (reverse.k <= top) & (reverse.k < n_calls)]
    if early.empty:
        return f"reverse.parquet has no k in 1..{top} of {n_calls} calls (the sweep's stride skips them)"
    frame = reverse[reverse.appears.notna()]  # the reader's "unsure" is left out
    frame = frame.assign(pair_label=pair_labels(frame), appears=frame.appears.astype(bool))
    key = UNIT + ["pair_label"]
    base = frame[frame.k == 0].groupby(key).appears.any()
    seen = frame[frame.k.isin(early.k.unique())].groupby(key).appears.any()
    seen = seen[~base.reindex(seen.index, fill_value=False)]  # the object was absent without the negative
    pairs = seen.index.get_level_values("pair_label").to_numpy()
    rate, lo, hi = cluster_rate_ci(seen.to_numpy(dtype=bool), pairs)
    ks = ", ".join(str(k) for k in sorted(early.k.unique()))
    return Measure(rate, lo, hi, len(set(pairs)), len(seen), f"{rate:.0%} (95 % CI {lo:.0%}..{hi:.0%}) of pair-seeds, "
                                                            f"k in {{{ks}}} of {n_calls} calls")


def _energy(energy: pd.DataFrame) -> Measure | str:
    energy = energy.dropna(subset=["relative"])
    if energy.empty:
        return "energy.parquet has no relative errors (no confirmed background and object images)"
    timestep = int(energy.timestep.min())  # the least-noised mix measured (the paper: t = 100)
    at = energy[energy.timestep == timestep]
    thetas = np.sort(at.theta.unique())
    theta = float(thetas[np.argmin(np.abs(thetas - 0.5))])
    curve = at.groupby("theta").relative.mean()
    variant = f", variant {', '.join(sorted(at.variant.astype(str).unique()))}" if "variant" in at else ""
    return _mean_measure(at[at.theta == theta].assign(barrier=lambda d: d.relative - 1), "barrier", "{:+.1%}",
                         f" at theta {theta:g}, timestep {timestep} (step {int(at.step.iloc[0])}{variant}); the mean curve "
                         f"peaks at theta {float(curve.idxmax()):g}")


def _removal(targets: pd.DataFrame) -> list[tuple[str, tuple[str, str], Measure | str]]:
    """(key suffix, (method, dataset), measure) per dataset and windowed method, for REMOVAL_CLAIMS."""
    methods = removal_methods(targets)
    out = []
    for r in methods[methods.method != METHOD_NAMES["from0"]].itertuples():
        label = (r.method, r.dataset)
        if not r.objects or pd.isna(r.vs_from0):
            out.append(("vs_from0", label, "no object with a removal verdict from every method (an unsure reader), "
                                           "or none removed from step 0"))
        else:
            from0 = methods[(methods.dataset == r.dataset) & (methods.method == METHOD_NAMES["from0"])].removed.iloc[0]
            out.append(("vs_from0", label, Measure(
                r.vs_from0, r.vs_from0_low, r.vs_from0_high, int(r.n_captions), int(r.objects),
                f"{r.vs_from0:.0%} (95 % CI {r.vs_from0_low:.0%}..{r.vs_from0_high:.0%}): {r.removed:.0%} vs from-0's {from0:.0%}",
                "captions x objects")))
        if pd.notna(getattr(r, "preferred", np.nan)):
            by = "the judge" if r.preference_by == "judge" else "higher PSNR outside the object (no judge)"
            code = next(k for k, v in METHOD_NAMES.items() if v == r.method)
            judged = targets[(targets.dataset == r.dataset) & (targets.method == code) & targets.prefers_over_from0.notna()]
            out.append(("preferred", label, Measure(
                r.preferred, r.preferred_low, r.preferred_high, int(judged.prompt.nunique()), int(r.preferred_n),
                f"{r.preferred:.0%} (95 % CI {r.preferred_low:.0%}..{r.preferred_high:.0%}), by {by}", "captions x objects")))
        else:
            out.append(("preferred", label, "no preference recorded (removal_targets.prefers_over_from0 empty)"))
    return out


# ----------------------------------------------------------------------------- verdicts


def verdict(m: Measure | str | None, holds, fails, failed: list[CheckResult] = ()) -> str:
    """The verdict of one measured claim by the rules of the module docstring; ``failed``: its failed checks."""
    if not isinstance(m, Measure) or m.missing or (not m.unresolved and all(np.isnan(x) for x in (m.value, m.low, m.high))):
        return ABSENT
    if m.unresolved or failed:
        reasons = ([m.unresolved] if m.unresolved else []) + [r.failure for r in failed]
        return f"{INSTRUMENT}: {'; '.join(reasons)})"
    if m.n_clusters < MIN_CLUSTERS or m.n_units < MIN_UNITS:
        return OPEN
    if holds(m.low, m.high):
        return HOLDS
    if fails(m.low, m.high):
        return FAILS
    return OPEN


Z95 = 1.959964


def n_to_decide(m: Measure | str | None, edges: tuple[float, ...]) -> tuple[int, int] | None:
    """(clusters, units) at which the interval would clear the rule's nearest edge, if the value and the spread per
    unit stay as measured: the half-width facing that edge shrinks as 1 / sqrt(n), so n grows by (half-width / gap)^2,
    clusters and units alike. A rate measured at 0 (no event yet) is decided when zero events in n units put the
    upper 95 % bound under the edge (Wilson at 0: n = z^2 (1 - e) / e; 188 for e = 2 %). None when the value sits on
    an edge or the interval is open."""
    if not isinstance(m, Measure) or not all(np.isfinite(x) for x in (m.value, m.low, m.high)) or m.n_units == 0:
        return None
    edge = min(edges, key=lambda e: abs(m.value - e))
    gap = abs(m.value - edge)
    if gap == 0:
        return None
    if m.value == 0 and m.low == 0 and 0 < edge < 1:
        units = math.ceil(Z95 ** 2 * (1 - edge) / edge)
        factor = units / m.n_units
    else:
        half = m.high - m.value if edge > m.value else m.value - m.low
        if half <= 0:
            return None
        factor = max((half / gap) ** 2, 1.0)  # under 1: the spread already suffices, the n minimums decide
        units = math.ceil(m.n_units * factor)
    return max(MIN_CLUSTERS, math.ceil(m.n_clusters * max(factor, 1.0))), max(MIN_UNITS, units)


def _row(key: str, claim: str, paper: str, rule: str, m: Measure | str | None, v: str, source: str, sweep: str, checks=(),
         edges: tuple[float, ...] = (), failed: list[CheckResult] = (), family: str | None = None) -> dict:
    """m: the measure, a sentence saying why the run's tables cannot give it, or None (the table is absent).
    family: the claim whatever the dataset it was measured on (default: the claim itself)."""
    measured = isinstance(m, Measure)
    if v == ABSENT:
        v = (f"{ABSENT} ({sweep} writes {source})" if m is None else f"{ABSENT} ({m})" if not measured
             else f"{ABSENT} (needs {m.missing})" if m.missing else f"{ABSENT} (no value)")
    clusters, units = m.unit.split(" x ") if measured else ("", "")
    need = n_to_decide(m, edges) if v == OPEN else None
    return {"key": key, "claim": claim, "family": family or claim, "paper": paper, "measured": m.text if measured else "-",
            "n": f"{m.n_clusters} {clusters} x {m.n_units} {units}" if measured else "-", "verdict": v,
            "rule": rule, "checks": ", ".join(checks) or "-", "source": source,
            "n to decide": f"~{need[0]} {clusters} x {need[1]} {units}" if need else "-",
            "failed checks": ", ".join(([RUN_CHECK] if measured and m.unresolved else []) + [r.check.key for r in failed])
            if v.startswith(INSTRUMENT) else "",
            "value": m.value if measured else np.nan, "low": m.low if measured else np.nan, "high": m.high if measured else np.nan,
            "n_clusters": m.n_clusters if measured else 0, "n_units": m.n_units if measured else 0}


def scorecard(root: str | Path, variant: str = DEFAULT_VARIANT) -> tuple[pd.DataFrame, Instrument]:
    """The scorecard of the run under ``root``: one row per claim (see the module docstring), and the instrument."""
    root = Path(root)
    tables = {name: _read(root, name) for name in
              ("ratio", "attention", "screen", "reverse", "inducing", "momentum", "energy", "removal_targets")}
    inst = instrument(root, tables["removal_targets"])
    measures: dict[str, Measure | str | None] = {}
    ratio = tables["ratio"]
    if not ratio.empty:
        ratio = ratio[ratio.variant == variant] if "variant" in ratio else ratio
        crit = critical_steps(ratio, tables["attention"], variant, screen=tables["screen"]) if len(ratio) else pd.DataFrame()
        measures.update(_ratio_measures(crit))
    if not tables["reverse"].empty:
        measures["reverse_activation"] = _reverse(tables["reverse"])
    if not tables["inducing"].empty:
        ind = tables["inducing"]
        late = ind[ind.step >= ind.step.max() / 2]
        d0 = ind[ind.step == 0].D.abs().max()
        l2 = (f"; the author's unit (L2, mean over steps 0..9): {ind[ind.step < 10].D_l2.mean():.3f}"
              if "D_l2" in ind and ind.D_l2.notna().any() else "")
        measures["inducing"] = _mean_measure(late, "D", "{:.4f}", f" RMS units, steps {int(late.step.min())}..{int(ind.step.max())}; "
                                                                  f"max |D(0)| {d0:.1e}{l2}")
    if not tables["momentum"].empty:
        mom = tables["momentum"]
        mom = mom[mom.schedule == "always"] if "schedule" in mom else mom
        last = int(mom.step.max())
        early = mom[mom.step <= 0.8 * last]
        # the paper's number is the cosine of the SIGNS (the author's code), written as m_sign; negstudy's m beside it
        col = "m_sign" if "m_sign" in mom and mom.m_sign.notna().any() else "m"
        other = f"; negstudy's raw-vector m {early.m.mean():.4f}" if col == "m_sign" else ""
        measures["momentum"] = _mean_measure(early, col, "{:.4f}", f" ({col}), steps 0..{int(early.step.max())}; at the last step "
                                                                   f"{mom[mom.step == last][col].mean():.4f}{other}")
    if not tables["energy"].empty:
        measures["energy_barrier"] = _energy(tables["energy"])
    screen = tables["screen"]
    screened = not screen.empty and ("protocol" not in screen or (screen.protocol.astype(str) == "screened").any())
    # the attributes whose seeds the attribute category pools (seeds where the adjective was drawn; not the
    # screen's padding of pairs that never showed theirs): their checks are the claim's
    pooled = drawn(tables["ratio"])
    attributes = (sorted(set(pooled.loc[pooled.category == "attribute", "negative"].astype(str)))
                  if {"category", "negative"} <= set(pooled.columns) else [])
    if isinstance(measures.get("adjective_crossing"), Measure) and attributes:  # which adjectives the verdict speaks for
        m = measures["adjective_crossing"]
        measures["adjective_crossing"] = dataclasses.replace(m, text=f"on {', '.join(attributes)}: {m.text}")
    rows = []
    for c in CLAIMS:
        m = measures.get(c.key)
        keys = claim_checks(c.key, screened, attributes)
        failed = inst.failed(keys)
        v = verdict(m, c.holds, c.fails, failed)
        rows.append(_row(c.key, c.claim, c.paper, c.rule, m, v, f"{c.table}.parquet", c.sweep, keys,
                         c.holds.edges + c.fails.edges, failed))
    removal = _removal(tables["removal_targets"]) if not tables["removal_targets"].empty else []
    keys = claim_checks("removal", True)
    for key, claim, paper, rule, holds, fails in REMOVAL_CLAIMS:
        found = [(label, m) for k, label, m in removal if k == key] or [(None, None)]
        for label, m in found:
            failed = inst.failed(keys)
            v = verdict(m, holds, fails, failed)
            method, dataset = label or (None, None)
            rows.append(_row(f"removal_{key}", claim + (f" ({method}, {dataset})" if label else ""), paper, rule, m, v,
                             "removal_targets.parquet", "+sweep=removal", keys, holds.edges + fails.edges, failed,
                             family=claim + (f" ({method})" if label else "")))
    return pd.DataFrame(rows), inst


SHOWN = ["claim", "paper", "measured", "n", "verdict", "n to decide", "rule", "checks"]


def run_name(root: str | Path) -> str:
    """The run as a shared report names it: the last two parts of its directory (``<date>/<time>``)."""
    return "/".join(Path(root).resolve().parts[-2:])


def _header(root: Path, inst: Instrument) -> list[str]:
    return [f"Run: `{run_name(root)}`. Model: {', '.join(inst.models)}" + (" (POOLED OVER MODELS)" if len(inst.models) > 1 else "") + ".",
            f"Model quality: {inst.model_text}.", f"Reader ({', '.join(inst.readers)}): {inst.reader_text}.",
            f"Verdicts: holds = the 95 % interval is inside the claim's band; does not hold = entirely outside; otherwise, or "
            f"with fewer than {MIN_CLUSTERS} pairs (captions) or {MIN_UNITS} pair-seeds (objects), inconclusive at this n. "
            "A verdict is given only when every instrument check its row names passes; otherwise the row reads "
            "'inconclusive (instrument: <the failed check, its value and threshold>)'. Intervals resample pairs, then seeds "
            "within pairs (removal: captions, then objects). Steps are UNet-call indices, compared on the paper's 31-call grid.",
            "Instrument checks: " + "; ".join(r.text for r in inst.checks.values()) + "."]


def _markdown(table: pd.DataFrame, inst: Instrument, root: Path) -> str:
    lines = ["# Replication scorecard (Ban et al., ECCV 2024)", ""] + [f"{h}\n" for h in _header(root, inst)]
    return "\n".join(lines + [table[SHOWN].to_markdown(index=False), ""])


def markdown(root: str | Path, variant: str = DEFAULT_VARIANT) -> tuple[pd.DataFrame, str]:
    """The scorecard and its Markdown (header lines, then the table)."""
    table, inst = scorecard(root, variant)
    return table, _markdown(table, inst, Path(root))


def scorecard_html(root: str | Path, variant: str = DEFAULT_VARIANT) -> str:
    """The scorecard as an HTML fragment (a heading, the header lines and the table), for report.html."""
    table, inst = scorecard(root, variant)
    return _html(table, inst, Path(root))


html_fragment = scorecard_html  # the name negstudy.report_html looks for


def _html(table: pd.DataFrame, inst: Instrument, root: Path) -> str:
    """A table that fits the page (claim, paper, measured, n, verdict; each row's rule and checks fold
    under its claim), then the verdict rules and the instrument checks folded below it: one line of
    pass / fail counts, a table of check, value, threshold and source when opened."""
    colours = {HOLDS: "#d7f5d7", FAILS: "#f8d4d4", OPEN: "#fff3c4", INSTRUMENT: "#fff3c4"}
    esc = html.escape
    head = "".join(f"<th class='{c}'>{esc(c)}</th>" for c in ("claim", "paper", "measured", "n", "verdict"))
    body, absent = [], []
    for r in table.to_dict("records"):
        verdict = r["verdict"]
        if verdict.startswith(ABSENT):  # one line under the table, not a row each: a study's run shows its own claims
            absent.append(f"{r['claim']} {verdict[len(ABSENT):].strip()}")
            continue
        colour = next((v for k, v in colours.items() if verdict.startswith(k) and verdict[len(k):len(k) + 1] in ("", ":")),
                      "#eeeeee")
        more = f"<br><small>n to decide: {esc(r['n to decide'])}</small>" if r["n to decide"] != "-" else ""
        fold = (f"<details><summary>rule, checks</summary><small>{esc(r['rule'])}<br>checks: {esc(r['checks'])}"
                "</small></details>")
        body.append(f"<tr><td>{esc(r['claim'])}{fold}</td><td>{esc(r['paper'])}</td><td>{esc(r['measured'])}</td>"
                    f"<td>{esc(r['n'])}</td><td style='background:{colour}'><b>{esc(verdict)}</b>{more}</td></tr>")
    header = _header(root, inst)
    results = list(inst.checks.values())
    fails = [r for r in results if not r.passed]
    rows = "".join(
        f"<tr><td>{esc(r.check.key)}{esc(f' ({r.reader})' if r.reader else '')}</td>"
        f"<td>{'-' if r.value is None else f'{r.value:.1%}'}</td><td>&gt;= {r.check.threshold:.0%}</td>"
        f"<td>{'passes' if r.passed else '<b>FAILS</b>'}</td><td><small>{esc(r.check.says)}; {esc(r.where)}</small></td></tr>"
        for r in results)
    summary = (f"How verdicts are given; instrument checks: {len(results) - len(fails)} pass, {len(fails)} fail"
               + (f" ({', '.join(r.check.key for r in fails)})" if fails else ""))
    shown = header[0].partition(". Model: ")[2] or header[0]  # the report's first line names the run already
    return (f"<h2>Replication scorecard</h2><p>Model: {esc(shown)}</p>"
            f"<table class='card'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            + (f"<p class='absent'><small>{esc(ABSENT.capitalize())}: {esc('; '.join(absent))}.</small></p>" if absent else "")
            + f"<details class='how'><summary>{esc(summary)}</summary>"
            + "".join(f"<p>{esc(h)}</p>" for h in header[1:-1])
            + "<table class='checks'><thead><tr><th>check</th><th>value</th><th>threshold</th><th>result</th>"
              f"<th>what it measures; source</th></tr></thead><tbody>{rows}</tbody></table></details>")


def write(root: str | Path, out: str | Path | None = None, variant: str = DEFAULT_VARIANT) -> str:
    """Write ``scorecard.md`` and ``scorecard.csv`` (every column) into ``out`` (default <root>/report);
    return the HTML fragment of :func:`scorecard_html`."""
    root = Path(root)
    out = Path(out) if out is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    table, inst = scorecard(root, variant)
    from negstudy.records import write_text

    write_text(_markdown(table, inst, root), out / "scorecard.md")
    table.to_csv(out / "scorecard.csv", index=False)
    return _html(table, inst, root)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m negstudy.scorecard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory")
    ap.add_argument("--variant", default=DEFAULT_VARIANT)
    args = ap.parse_args(argv)
    if not Path(args.directory).is_dir():
        print(f"negstudy.scorecard: error: {args.directory}: not a directory", file=sys.stderr)
        sys.exit(2)
    write(args.directory, variant=args.variant)
    print((Path(args.directory) / "report" / "scorecard.md").read_text())


if __name__ == "__main__":
    main()
