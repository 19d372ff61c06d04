"""Object removal with the background kept (PAPER.md section 6): the delayed negative as an editor.

Per caption and seed:

1. **original**: generate without a negative; the evaluator lists the objects in it among the label
   set (oracle on the shapes world; judge or detector on real images) and those the caption names,
   or ``removal.drop`` lists, are left alone;
2. per remaining object (the negative prompt is the object's name), in ONE shared-prefix batch:
   ``from0`` (the negative at every step) and ``window`` (the paper's fixed window, steps 5..15 of 31
   calls, scaled to the loop). The from-0 image's negative-branch cross-attention gives this
   sample's **critical step** k*: the first step at which the object word's map puts
   ``removal.hit_lift`` times a uniform map's mass on the object's region (the original's mask);
   without a mask, or if it never does, k* = ``removal.fallback_start``;
3. ``adaptive``: the negative in [k*, k* + length - 1], its end extended by ``extend`` per
   regeneration until the evaluator says the object is gone, at most ``max_regenerations`` times.
   All candidate windows share steps 0..k* + length - 1 in one batch (they differ only in where
   they end), and they are judged in order, stopping at the first success, so a paid judge sees
   exactly the calls of the sequential algorithm;
4. each edited image vs the original: is the object still there (the evaluator), PSNR / SSIM
   outside the object (``negstudy.metrics``), whether another object took its place (evaluators
   that locate objects: an object absent from the original appears), and which of window / adaptive vs from-0 is closer to
   the original (the judge's ``closer`` when the evaluator is a judge, else higher PSNR outside).

The author's protocol (``removal.protocol=paper``; negstudy's stays the default)
--------------------------------------------------------------------------------
Read in the author's public code (GitHub banyuanhao/daam):

- objects: every listed object whose name is a SUBSTRING of the lowercased caption is left alone
  ("car" is dropped from "a cart in the street"), "people" and "person" are dropped (with
  ``removal.drop``), repeats removed, no cap (``scripts/autotesting.py``, ``filter_objects``).
  negstudy: whole words with plurals (:func:`named_in`), ``removal.max_objects`` (3) per image.
  The author's loop removes items from the list it iterates over, which skips the object after
  each dropped one (so a few named objects were kept); negstudy implements the intended rule.
- removal: the judge is asked "tell me 'yes' if the image contains the {object}, otherwise, tell me
  'no'." (``get_check``) and the object counts as removed unless the answer contains "yes": a
  missing or unclear answer counts as removed. Here: ``removed = (present is not True)`` for any
  evaluator (the oracle's "unsure" counts as removed); with ``evaluator=judge`` the question is
  the author's (the judge's ``present_paper`` task, free text, no JSON).
- preference: ONE request with the images in the fixed order [original, from-0, windowed] and
  "which pic looks more similar to the first one, please answer with 'the second one' or 'the
  third one'." (``get_compare``); the windowed image is preferred unless the answer contains
  "second" (case-sensitive), so a missing or off-format answer counts for the windowed image.
  negstudy: the strict-JSON ``closer`` question with the order balanced (every other object shows
  from-0 first) and a missing answer left missing. Without a judge both protocols compare PSNR
  outside the object; under ``paper`` a tie counts for the windowed image, as an answer without
  "second" would.
- adaptive window: starts at step 6 (``scripts/gpt4v_removing_app.py``, ``--negative_start``
  default 6; ``removal.fallback_start``) whatever the attention says, and its end grows by ONE step
  per try, ``range(negative_start + 1, 30)``, i.e. ends 7..29 of 31 calls (23 tries at most; scaled
  to the loop), stopping at the first image the evaluator calls free of the object. negstudy: the
  sample's critical step from attention, a first window of ``length`` steps, ``extend`` (5) steps
  per try, ``max_regenerations`` tries. (The app asks "tell me 'yes' if the {object} is the image"
  and stops when the answer contains "no"; here the adaptive tries use the same ``present``
  question as the other methods.)
- the fixed window is the same in both: steps 5..15 inclusive of 31 calls (``time = [5, 15]``).

Tables under ``paper`` carry a ``protocol`` column ("paper"); the image order is recorded in
``shown_first`` (always "from0").

Tables: ``originals.parquet`` (caption, seed, objects found, targets) and ``removal_targets.parquet``
(one row per object and method); with a judge, ``judge_usage.json`` (requests, cache hits, tokens, cost). Image strips (original | from0 | window | adaptive) go to
``triples/``. The report (``negstudy.report``) turns them into the paper's table with 95 % CIs.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from negstudy.attention import AttentionRecorder, mass_in_mask
from negstudy.datasets import captions_of
from negstudy.evaluators import Evaluator, make_evaluator
from negstudy.labels import label_set
from negstudy.metrics import background_scores
from negstudy.records import save_png, slug, to_uint8, write_table, write_text
from negstudy.sampler import Batch, NegativeSampler
from negstudy.schedules import Always, Never, Window

log = logging.getLogger("negstudy")
METHODS = ("from0", "window", "adaptive")
PROTOCOLS = ("negstudy", "paper")
PAPER_DROP = ("people", "person")  # scripts/autotesting.py, filter_objects


@dataclass
class Target:
    """One object to remove from one original image."""

    caption: int
    prompt: str
    seed: int
    object: str
    mask: np.ndarray | None  # bool (H, W) region of the object in the original, if the evaluator locates
    original: np.ndarray  # uint8 (H, W, 3)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, dict] = field(default_factory=dict)
    critical_step: int = 0
    critical_source: str = "fallback"
    found: tuple[str, ...] = ()  # every object the evaluator found in the original


def scale(step: int, of: int, n: int) -> int:
    """A step index of a loop of ``of`` calls mapped to a loop of ``n`` calls (as a fraction)."""
    return min(n - 1, int(np.floor(step / of * n)))


def named_in(caption: str, label: str) -> bool:
    """Whether the caption names the label (whole words, plural allowed)."""
    return re.search(rf"\b{re.escape(label.lower())}(e?s)?\b", caption.lower()) is not None


def paper_targets(caption: str, found, drop=()) -> list[str]:
    """The author's object selection: every found object not a substring of the lowercased caption,
    without people / person (and ``drop``), each once, no cap (module docstring)."""
    dropped = set(PAPER_DROP) | set(drop)
    return [o for o in dict.fromkeys(found) if o.lower() not in caption.lower() and o not in dropped]


def paper_window_ends(start: int, of: int, n: int) -> list[int]:
    """Ends of the author's adaptive window from ``start`` (of a loop of ``of`` calls): start + 1, start + 2,
    ..., of - 2 (``range(negative_start + 1, 30)`` for 31 calls), scaled to ``n`` calls, each once."""
    ends = [scale(e, of, n) for e in range(start + 1, of - 1)]
    first = scale(start, of, n)
    return sorted({e for e in ends if e > first}) or [min(n - 1, first + 1)]


def paper_removed(present: bool | None) -> bool:
    """The author's count: removed unless the answer says "yes" (a missing answer counts as removed)."""
    return present is not True


def paper_prefers_window(pick: str | None) -> bool:
    """The author's count for [original, from-0, windowed]: windowed unless the answer names the second
    image ("a", the from-0 edit); a missing answer counts for the windowed image."""
    return pick != "a"


def labels_for(cfg: DictConfig, world: str | None) -> tuple[str, ...]:
    if cfg.removal.labels:
        return label_set(cfg.removal.labels, "removal.labels")
    if world == "shapes":
        return label_set("shapes")
    return label_set(cfg.evaluator.get("labels", "coco"))


def critical_step(neg_maps: np.ndarray, mask: np.ndarray | None, hit_lift: float) -> int | None:
    """First step whose map (steps, h, w) puts ``hit_lift`` x the region's share of its mass in ``mask``."""
    if mask is None or not mask.any():
        return None
    share = float(mask.mean())
    for step, heat in enumerate(neg_maps):
        if np.isfinite(heat).all() and mass_in_mask(heat, mask) >= hit_lift * share:
            return step
    return None


def run(cfg: DictConfig, sampler: NegativeSampler, out_dir: Path, evaluator: Evaluator | None = None,
        world: str | None = None) -> dict[str, pd.DataFrame]:
    r = cfg.removal
    n = sampler.n_calls
    evaluator = evaluator or make_evaluator(cfg.evaluator, world)
    labels = labels_for(cfg, world)
    window = (scale(r.window[0], r.window_of, n), scale(r.window[1], r.window_of, n))
    fallback = scale(r.fallback_start, r.window_of, n)
    captions = captions_of(cfg.dataset)
    chunk = max(1, cfg.batch_size)
    paper = r.get("protocol", "negstudy") == "paper"  # the author's protocol (module docstring)
    if r.get("protocol", "negstudy") not in PROTOCOLS:
        raise ValueError(f"removal.protocol={r.protocol!r}: allowed values are {', '.join(PROTOCOLS)}")
    present_of = getattr(evaluator, "present_paper", evaluator.present) if paper else evaluator.present

    # 1. originals, and the objects to remove from each
    items = [(c, int(seed)) for c in range(len(captions)) for seed in cfg.seeds]
    originals, targets = [], []
    for i in tqdm(range(0, len(items), chunk), desc="originals (no negative)", unit="batch"):
        part = items[i : i + chunk]
        plan = Never().plan(n)
        images = to_uint8(sampler.generate(Batch([captions[c] for c, _ in part], [""] * len(part), [s for _, s in part],
                                                 [plan] * len(part))))
        for (c, seed), image, found in zip(part, images, evaluator.objects(images, labels)):
            if found is None:
                kept = []
            elif paper:
                kept = paper_targets(captions[c], found, r.drop)
            else:
                kept = [o for o in found if not named_in(captions[c], o) and o not in r.drop][: r.max_objects]
            originals.append({"caption": c, "prompt": captions[c], "seed": seed, "judged": found is not None,
                              "objects": ",".join(found or []), "targets": ",".join(kept)})
            targets += [Target(c, captions[c], seed, o, found[o], image, found=tuple(found)) for o in kept]
    log.info("removal: %d originals, %d objects to remove", len(originals), len(targets))

    # 2. from-0 and the fixed window, with the from-0 image's attention -> this sample's critical step
    plans = {"from0": Always().plan(n), "window": Window(*window).plan(n)}
    per = max(1, chunk // 2)
    for i in tqdm(range(0, len(targets), per), desc="from-0 and fixed window", unit="batch"):
        part = targets[i : i + per]
        recorder = AttentionRecorder(sampler.unet, layers=cfg.sweep.layers, words=sorted({t.object for t in part}))
        rows = [(t, m) for t in part for m in ("from0", "window")]
        batch = Batch([t.prompt for t, _ in rows], [t.object for t, _ in rows], [t.seed for t, _ in rows],
                      [plans[m] for _, m in rows])
        images = to_uint8(sampler.generate(batch, [] if paper else [recorder]))
        for j, ((t, m), image) in enumerate(zip(rows, images)):
            t.images[m] = image
            t.rows[m] = {"start": 0 if m == "from0" else window[0], "end": n - 1 if m == "from0" else window[1], "regenerations": 0}
            if m == "from0" and paper:  # the author's adaptive window starts at a fixed step
                t.critical_step, t.critical_source = fallback, "fixed"
            elif m == "from0":
                k = critical_step(recorder.maps(j, "negative", t.object).float().numpy(), t.mask, r.hit_lift)
                t.critical_step, t.critical_source = (k, "attention") if k is not None else (fallback, "fallback")
        _judge_removed(evaluator, part, ("from0", "window"), present_of, paper)

    # 3. the adaptive window: candidates [k*, k* + length - 1 + extend * j], judged in order
    def ends(t: Target) -> list[int]:
        if paper:  # one step more per try, up to step 29 of 31
            return paper_window_ends(r.fallback_start, r.window_of, n)
        return sorted({min(n - 1, t.critical_step + r.length - 1 + r.extend * j) for j in range(r.max_regenerations + 1)})

    tries = len(paper_window_ends(r.fallback_start, r.window_of, n)) if paper else r.max_regenerations + 1
    per = max(1, chunk // tries)
    for i in tqdm(range(0, len(targets), per), desc="adaptive window", unit="batch"):
        part = targets[i : i + per]
        rows = [(t, e) for t in part for e in ends(t)]
        batch = Batch([t.prompt for t, _ in rows], [t.object for t, _ in rows], [t.seed for t, _ in rows],
                      [Window(t.critical_step, e).plan(n) for t, e in rows])
        images = to_uint8(sampler.generate(batch))
        candidates = {id(t): [] for t in part}
        for (t, e), image in zip(rows, images):
            candidates[id(t)].append((e, image))
        pending = list(part)
        for attempt in range(tries):
            now = [t for t in pending if attempt < len(candidates[id(t)])]
            if not now:
                break
            verdicts = present_of(np.stack([candidates[id(t)][attempt][1] for t in now]), [t.object for t in now])
            pending = []
            for t, present in zip(now, verdicts):
                end, image = candidates[id(t)][attempt]
                t.images["adaptive"] = image
                t.rows["adaptive"] = {"start": t.critical_step, "end": end, "regenerations": attempt,
                                      "removed": paper_removed(present) if paper else (None if present is None else not present)}
                if present is not False and attempt + 1 < len(candidates[id(t)]):
                    pending.append(t)

    # 4. background preservation and preference against from-0
    closer = getattr(evaluator, "closer", None)
    closer_paper = getattr(evaluator, "closer_paper", closer) if paper else None
    for i in range(0, len(targets), chunk):
        part = targets[i : i + chunk]
        for m in ("window", "adaptive"):
            if closer is not None and paper:  # [original, from-0, windowed] in this fixed order, one request
                picks = closer_paper(np.stack([t.original for t in part]), np.stack([t.images["from0"] for t in part]),
                                     np.stack([t.images[m] for t in part]))
                for t, pick in zip(part, picks):
                    t.rows[m]["prefers_over_from0"] = paper_prefers_window(pick)
                    t.rows[m]["shown_first"] = "from0"
            elif closer is not None:
                # judges favour a position: every other object shows from-0 first, so a position bias cancels
                flip = [(i + k) % 2 == 1 for k in range(len(part))]
                picks = closer(np.stack([t.original for t in part]),
                               np.stack([t.images["from0" if f else m] for t, f in zip(part, flip)]),
                               np.stack([t.images[m if f else "from0"] for t, f in zip(part, flip)]))
                for t, pick, f in zip(part, picks, flip):
                    t.rows[m]["prefers_over_from0"] = None if pick is None else pick == ("b" if f else "a")
                    t.rows[m]["shown_first"] = "from0" if f else m
        if evaluator.locates:  # substitution: an object the original did not have appears in the edit
            for m in METHODS:
                for t, objs in zip(part, evaluator.objects(np.stack([t.images[m] for t in part]), labels)):
                    new = sorted(set(objs or ()) - set(t.found))
                    t.rows[m].update(new_objects=",".join(new), substituted=None if objs is None else bool(new))
        for t in part:
            for m in METHODS:
                t.rows[m].update(background_scores(t.original, t.images[m], t.mask))
            for m in ("window", "adaptive"):
                if closer is None:  # higher PSNR outside the object is closer; a tie (e.g. both untouched) is no answer
                    a, b = t.rows[m]["psnr_out"], t.rows["from0"]["psnr_out"]
                    t.rows[m]["prefers_over_from0"] = None if a == b or np.isnan(a) or np.isnan(b) else bool(a > b)
                    if paper:  # no answer naming from-0 counts for the windowed image
                        t.rows[m]["prefers_over_from0"] = paper_prefers_window({True: "b", False: "a"}.get(t.rows[m]["prefers_over_from0"]))

    rows = []
    for t in targets:
        for m in METHODS:
            rows.append({"dataset": cfg.dataset.name, "caption": t.caption, "prompt": t.prompt, "seed": t.seed,
                         "object": t.object, "method": m, "critical_step": t.critical_step,
                         "critical_source": t.critical_source, "evaluator": evaluator.name,
                         "preference_source": "judge" if closer is not None else "psnr_out",
                         "region_fraction": float(t.mask.mean()) if t.mask is not None else np.nan, **t.rows[m],
                         **({"protocol": "paper"} if paper else {})})
        if cfg.save_images:
            strip = np.concatenate([t.original] + [t.images[m] for m in METHODS], axis=1)
            save_png(strip, out_dir / "triples" / strip_name(t.caption, t.prompt, t.seed, t.object),
                     {"prompt": t.prompt, "seed": t.seed, "object": t.object, "columns": "original,from0,window,adaptive",
                      "critical_step": t.critical_step,
                      **{f"{m}_window": f"{t.rows[m]['start']}..{t.rows[m]['end']}" for m in METHODS}})
    usage = getattr(evaluator, "usage", None)
    if usage:  # a paid judge: requests, cache hits, tokens and cost of this job
        write_text(json.dumps(dict(usage), indent=1, default=float), out_dir / "judge_usage.json")
        log.info("judge usage: %s", ", ".join(f"{k} {v}" for k, v in dict(usage).items()))
    tables = {"originals": pd.DataFrame(originals), "removal_targets": pd.DataFrame(rows)}
    for name, frame in tables.items():
        write_table(frame, out_dir / f"{name}.parquet")
    return tables


def strip_name(caption: int, prompt: str, seed: int, obj: str) -> str:
    return f"{caption:03d}_{slug(prompt)}_s{seed}_{slug(obj, 20)}.png"


def _judge_removed(evaluator: Evaluator, part: list[Target], methods, present_of=None, paper: bool = False) -> None:
    pairs = [(t, m) for t in part for m in methods]
    verdicts = (present_of or evaluator.present)(np.stack([t.images[m] for t, m in pairs]), [t.object for t, _ in pairs])
    for (t, m), present in zip(pairs, verdicts):
        t.rows[m]["removed"] = paper_removed(present) if paper else (None if present is None else not present)
