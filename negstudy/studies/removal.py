"""Object removal with the background kept (PAPER.md section 6): the delayed negative as an editor.

Per caption and seed:

1. **original**: generate without a negative; the evaluator lists the objects in it among the label
   set (oracle on the shapes world; judge or detector on real images) and those the caption names,
   or ``removal.drop`` lists, are left alone;
2. per remaining object (the negative prompt is the object's name): ``from0`` (the negative at every
   step), with cross-attention recorded: the from-0 image's negative-branch cross-attention gives
   this sample's **critical step** k*: the first step at which the object word's map puts
   ``removal.hit_lift`` times a uniform map's mass on the object's region (the original's mask);
   without a mask, or if it never does, k* = ``removal.fallback_start``;
3. ``window`` (the paper's fixed window, steps 5..15 of 31 calls, scaled to the loop) and
   ``adaptive``: the negative in [k*, k* + length - 1], its end extended by ``extend`` per
   regeneration until the evaluator says the object is gone, at most ``max_regenerations`` times;
   the tries are made and judged in order, stopping at the first success, so a paid judge sees
   exactly the calls of the sequential algorithm.
   No prefix is computed twice: the original's trajectory state (x_t and the scheduler's per-sample
   state, :class:`negstudy.sampler.KeepStates`) is kept at the windows' start steps, and the fixed
   window and the first try CONTINUE it from there (their steps before the start are the
   original's); try j continues the negative's trajectory [k*, ...] kept at step e_{j-1} + 1 while
   making try j - 1. Images equal fresh runs bit for bit with fixed rows (tests/test_removal.py).
   UNet rows per object: 2 n_calls (from-0), 2 (n_calls - window start), and for try j
   2 (n_calls - its first new step); images of several objects share each UNet call (``batch_size``
   images; :func:`pack` cuts them so that the fixed row blocks are full). The log's last
   ``removal:`` line counts the job's UNet rows;
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

from negstudy.attention import AttentionRecorder
from negstudy.critical import maps_hit_step
from negstudy.datasets import captions_of
from negstudy.errors import ConfigError
from negstudy.evaluators import Evaluator
from negstudy.labels import label_set
from negstudy.metrics import background_scores
from negstudy.records import save_png, strip_name, to_uint8, write_table, write_text
from negstudy.sampler import Batch, KeepStates, NegativeSampler, Snapshot, UNetRows
from negstudy.schedules import Always, Never, StepPlan, Window
from negstudy.studies import StudyReport, Summary

log = logging.getLogger("negstudy")
METHODS = ("from0", "window", "adaptive")
PROTOCOLS = ("negstudy", "paper")
PAPER_DROP = ("people", "person")  # scripts/autotesting.py, filter_objects
WAVE = 8  # originals are processed in waves of WAVE x batch_size: their kept states stay bounded


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
    trunk: dict[int, Snapshot] = field(default_factory=dict)  # the adaptive negative's trajectory, kept for the next try


@dataclass
class Job:
    """One image to make: a target's plan, continued where possible from a kept trajectory.

    start: the first step at which ``plan`` may differ from the trajectories in ``states`` (step ->
    :class:`Snapshot`, each made by a plan that agrees with ``plan`` before its step). keep: a step
    at which to keep this image's own state (``snapshot``), for the next adaptive try.
    """

    target: Target
    plan: StepPlan
    start: int
    states: dict[int, Snapshot] = field(default_factory=dict)
    keep: int | None = None
    end: int = 0
    image: np.ndarray | None = None
    snapshot: Snapshot | None = None


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
    """First step whose map (steps, h, w) puts ``hit_lift`` x the region's share of its mass in ``mask``
    (an image-space mask, pooled onto the maps' grid: SD's 64x64 latents under a 512x512 box)."""
    from negstudy.attention import mask_on_grid

    return maps_hit_step(neg_maps, mask_on_grid(mask, neg_maps.shape[1:]) if mask is not None else None, hit_lift)


def run(cfg: DictConfig, sampler: NegativeSampler, out_dir: Path, evaluator: Evaluator | None = None,
        world: str | None = None) -> dict[str, pd.DataFrame]:
    r = cfg.removal
    n = sampler.n_calls
    evaluator = evaluator or prepare(cfg, world)["evaluator"]
    labels = labels_for(cfg, world)
    window = (scale(r.window[0], r.window_of, n), scale(r.window[1], r.window_of, n))
    fallback = scale(r.fallback_start, r.window_of, n)
    captions = captions_of(cfg.dataset)
    chunk = max(1, cfg.batch_size)
    paper = r.get("protocol", "negstudy") == "paper"  # the author's protocol (module docstring)
    if r.get("protocol", "negstudy") not in PROTOCOLS:
        raise ValueError(f"removal.protocol={r.protocol!r}: allowed values are {', '.join(PROTOCOLS)}")
    present_of = getattr(evaluator, "present_paper", evaluator.present) if paper else evaluator.present

    def ends(t: Target) -> list[int]:
        """Ends of the adaptive window's candidates, in the order they are tried."""
        if paper:  # one step more per try, up to step 29 of 31
            return paper_window_ends(r.fallback_start, r.window_of, n)
        return sorted({min(n - 1, t.critical_step + r.length - 1 + r.extend * j) for j in range(r.max_regenerations + 1)})

    # 1-3 in waves of originals, so the kept trajectory states stay bounded (a few MB per original)
    items = [(c, int(seed)) for c in range(len(captions)) for seed in cfg.seeds]
    rows_per_image = 3 if sampler.three_branches else 2
    originals, targets = [], []
    with UNetRows(sampler) as counter:  # the UNet rows and calls of every generate call below
        for w in range(0, len(items), WAVE * chunk):
            wave_items = items[w : w + WAVE * chunk]

            # 1. originals, and the objects to remove from each; each original's state is kept at every
            #    step a window may start from (window[0], and k* anywhere under negstudy's protocol)
            keep_steps = {window[0], fallback} if paper else set(range(1, n))
            new, states = [], {}
            for i in tqdm(range(0, len(wave_items), chunk), desc="originals (no negative)", unit="batch"):
                part = wave_items[i : i + chunk]
                keep = KeepStates(keep_steps - {0})
                plan = Never().plan(n)
                images = to_uint8(sampler.generate(Batch([captions[c] for c, _ in part], [""] * len(part), [s for _, s in part],
                                                         [plan] * len(part)), [keep]))
                for j, ((c, seed), image, found) in enumerate(zip(part, images, evaluator.objects(images, labels))):
                    if found is None:
                        kept = []
                    elif paper:
                        kept = paper_targets(captions[c], found, r.drop)
                    else:
                        kept = [o for o in found if not named_in(captions[c], o) and o not in r.drop][: r.max_objects]
                    originals.append({"caption": c, "prompt": captions[c], "seed": seed, "judged": found is not None,
                                      "objects": ",".join(found or []), "targets": ",".join(kept)})
                    new += [Target(c, captions[c], seed, o, found[o], image, found=tuple(found)) for o in kept]
                    if kept:  # the other originals' states are freed
                        states[(c, seed)] = keep.states.get(j, {})
            log.info("removal: %d originals, %d objects to remove", len(wave_items), len(new))

            # 2. from-0, with its negative-branch attention -> this sample's critical step
            def record(jobs):
                return [] if paper else [AttentionRecorder(sampler.unet, layers=cfg.sweep.layers,
                                                           words=sorted({job.target.object for job in jobs}))]

            def critical(jobs, images, hooks):
                for j, job in enumerate(jobs):
                    t = job.target
                    if paper:  # the author's adaptive window starts at a fixed step
                        t.critical_step, t.critical_source = fallback, "fixed"
                    else:
                        k = critical_step(hooks[0].maps(j, "negative", t.object).float().numpy(), t.mask, r.hit_lift)
                        t.critical_step, t.critical_source = (k, "attention") if k is not None else (fallback, "fallback")

            from0 = [Job(t, Always().plan(n), 0) for t in new]
            _run_jobs(sampler, from0, 2 * chunk, rows_per_image, "from-0", hooks=record, after=critical)
            for t, job in zip(new, from0):
                t.images["from0"] = job.image
                t.rows["from0"] = {"start": 0, "end": n - 1, "regenerations": 0}
            for s in range(0, len(new), chunk):
                _judge_removed(evaluator, new[s : s + chunk], ("from0",), present_of, paper)
            for key, kept in states.items():  # only the steps a window of this original starts from
                starts = {window[0]} | {t.critical_step for t in new if (t.caption, t.seed) == key}
                states[key] = {k: v for k, v in kept.items() if k in starts}

            # 3. the fixed window and the adaptive window's candidates [k*, e_0], [k*, e_1], ..., judged in
            #    order, stopping at the first success (a paid judge sees exactly the sequential algorithm's
            #    calls). Every candidate continues a kept trajectory: the window and the first candidate the
            #    original's at their start step (their prefix IS the original's), candidate j the negative's
            #    trunk [k*, ...] at step e_{j-1} + 1 kept while making candidate j - 1; so no prefix is
            #    recomputed, and candidates after the first success are never made
            pending, attempt = list(new), 0
            jobs = [Job(t, Window(*window).plan(n), window[0], states[(t.caption, t.seed)]) for t in new]
            while pending:
                adaptive = []
                for t in pending:
                    e = ends(t)
                    trunk = t.trunk if attempt else states[(t.caption, t.seed)]
                    adaptive.append(Job(t, Window(t.critical_step, e[attempt]).plan(n),
                                        e[attempt - 1] + 1 if attempt else t.critical_step, trunk,
                                        keep=e[attempt] + 1 if attempt + 1 < len(e) else None, end=e[attempt]))
                _run_jobs(sampler, jobs + adaptive, 2 * chunk, rows_per_image,
                          "fixed and adaptive windows" if attempt == 0 else f"adaptive window, try {attempt + 1}")
                if attempt == 0:
                    for t, job in zip(new, jobs):
                        t.images["window"] = job.image
                        t.rows["window"] = {"start": window[0], "end": window[1], "regenerations": 0}
                    for s in range(0, len(new), chunk):
                        _judge_removed(evaluator, new[s : s + chunk], ("window",), present_of, paper)
                    states = {}  # the originals' states are no longer needed
                verdicts = []
                for s in range(0, len(adaptive), chunk):
                    part = adaptive[s : s + chunk]
                    verdicts += present_of(np.stack([job.image for job in part]), [job.target.object for job in part])
                pending = []
                for job, present in zip(adaptive, verdicts):
                    t = job.target
                    t.images["adaptive"] = job.image
                    t.rows["adaptive"] = {"start": t.critical_step, "end": job.end,
                                          "regenerations": attempt,
                                          "removed": paper_removed(present) if paper else (None if present is None else not present)}
                    t.trunk = {job.keep: job.snapshot} if job.keep is not None else {}
                    if present is not False and job.keep is not None:
                        pending.append(t)
                jobs, attempt = [], attempt + 1
            for t in new:
                t.trunk = {}
            targets += new
    log.info("removal: %d originals, %d objects, %d UNet rows (%d in blocks of %d rows), %d UNet calls",
             len(originals), len(targets), counter.rows, counter.padded, sampler.fixed_rows, counter.calls)

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


def pack(starts: list[int], available: list, n: int, rows_per_image: int, block: int, max_rows: int) -> list[range]:
    """UNet calls for jobs sorted by start step: consecutive runs with the fewest UNet rows padded to
    blocks of ``block`` rows (ties: fewer calls), at most ``max_rows`` rows a step each.

    A call continues all its images from ONE step (the scheduler's state, e.g. PNDM's step counter,
    is shared), its first job's start ``s``: every job in it needs a state at ``s`` (``available[j]``
    holds the steps it has) unless ``s`` = 0 (from x_T), and a job that starts later recomputes the
    steps between, which its plan shares with its state. Counted as one lane per image from ``s``
    (images of one target may share a lane for a while: the sampler merges them, so calls cost at most this).
    """
    m_max = max(1, max_rows // rows_per_image)
    pad = (lambda rows: -(-rows // block) * block) if block else (lambda rows: rows)
    best: list[tuple[int, int] | None] = [(0, 0)] + [None] * len(starts)
    cut = [0] * (len(starts) + 1)
    for j in range(1, len(starts) + 1):
        for i in range(j - 1, max(0, j - m_max) - 1, -1):
            s = starts[i]
            if s and any(s not in available[x] for x in range(i + 1, j) if starts[x] != s):
                continue
            cost = (best[i][0] + (n - s) * pad(rows_per_image * (j - i)), best[i][1] + 1)
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    calls, j = [], len(starts)
    while j:
        calls.append(range(cut[j], j))
        j = cut[j]
    return calls[::-1]


def _run_jobs(sampler: NegativeSampler, jobs: list[Job], max_rows: int, rows_per_image: int,
              desc: str, hooks=None, after=None) -> None:
    """Make every job's image (and the state it keeps), in the UNet calls :func:`pack` plans.

    hooks(jobs) -> extra hooks of a call; after(jobs, images, hooks) reads them once the call is done.
    Images equal fresh generations (bit for bit with fixed rows; tests/test_removal.py).
    """
    ordered = sorted(jobs, key=lambda job: job.start)
    calls = pack([job.start for job in ordered], [job.states for job in ordered], sampler.n_calls, rows_per_image,
                 sampler.fixed_rows, max_rows)
    for call in tqdm(calls, desc=desc, unit="batch"):
        part = [ordered[j] for j in call]
        step = part[0].start
        keep = KeepStates({job.keep for job in part if job.keep is not None})
        extra = hooks(part) if hooks else []
        t = [job.target for job in part]
        batch = Batch([x.prompt for x in t], [x.object for x in t], [x.seed for x in t], [job.plan for job in part],
                      resume=[job.states[step] for job in part] if step else None)
        images = to_uint8(sampler.generate(batch, [*extra, keep]))
        for j, (job, image) in enumerate(zip(part, images)):
            job.image = image
            if job.keep is not None:
                job.snapshot = keep.states[j][job.keep]
        if after:
            after(part, images, extra)


def _judge_removed(evaluator: Evaluator, part: list[Target], methods, present_of=None, paper: bool = False) -> None:
    pairs = [(t, m) for t in part for m in methods]
    verdicts = (present_of or evaluator.present)(np.stack([t.images[m] for t, m in pairs]), [t.object for t, _ in pairs])
    for (t, m), present in zip(pairs, verdicts):
        t.rows[m]["removed"] = paper_removed(present) if paper else (None if present is None else not present)


def check(cfg: DictConfig) -> None:
    """The removal settings (``cfg.removal``), before any model loads."""
    r = cfg.removal
    if len(r.window) != 2 or not 0 <= r.window[0] <= r.window[1] < r.window_of:
        raise ConfigError(f"removal.window={list(r.window)}: give [start, end] with 0 <= start <= end < removal.window_of={r.window_of}")
    if not 0 <= r.fallback_start < r.window_of:
        raise ConfigError(f"removal.fallback_start={r.fallback_start}: must be in 0..{r.window_of - 1}")
    if r.protocol not in PROTOCOLS:
        raise ConfigError(f"removal.protocol={r.protocol!r}: allowed values are {', '.join(PROTOCOLS)}")
    for key in ("length", "extend", "max_objects"):
        if r[key] < 1:
            raise ConfigError(f"removal.{key}={r[key]}: must be >= 1")
    if r.max_regenerations < 0:
        raise ConfigError(f"removal.max_regenerations={r.max_regenerations}: must be >= 0")
    if r.labels is not None:
        label_set(r.labels, "removal.labels")


def prepare(cfg: DictConfig, world: str | None) -> dict:
    """Any model; the evaluator is built (and checked) before the model loads."""
    from negstudy.targets import build

    evaluator = build(cfg.evaluator, "evaluator", world=world)
    if getattr(evaluator, "name", None) == "none":
        raise ConfigError(f"evaluator=none: sweep.name={cfg.sweep.name!r} needs a reader to list the objects of each "
                          "original and say whether each edit removed them (allowed: evaluator=owl|clip|judge on any "
                          "model; ensemble|oracle on model=shapes)")
    return {"evaluator": evaluator, "world": world}


def summarise(tables: dict[str, pd.DataFrame], out: Path, variant: str) -> Summary:
    """The removal table per dataset and method (from-0, fixed window, adaptive) and its figures."""
    from negstudy.report_html import fig_examples
    from negstudy.tables import _figure_methods, _png, removal_methods

    targets = tables["removal_targets"]
    if targets.empty:  # the originals showed no object to remove
        return Summary()
    methods = removal_methods(targets)
    write_table(methods, out / "removal_methods.parquet")
    methods.to_csv(out / "removal_methods.csv", index=False)
    summary = Summary(sections=[("Object removal: negative from step 0, fixed window, adaptive window", methods)])
    summary.figures["removal_methods"] = _png(_figure_methods(methods), out / "removal_methods.png")
    examples = fig_examples(Path(out).parent, targets, 6)  # original | from-0 | window | adaptive, from the jobs' strips
    if examples is not None:
        summary.figures["removal_examples"] = _png(examples, out / "removal_examples.png")
    return summary


def lines(out: Path) -> list[str]:
    """One line per dataset and method: removal rate with its CI, vs from-0, preference, background."""
    from negstudy.tables import METHOD_NAMES

    path = Path(out) / "removal_methods.parquet"
    if not path.exists():
        return []
    found = []
    for row in pd.read_parquet(path).itertuples():
        line = (f"removal, {row.dataset}, {row.method}: {row.removed:.0%} (95 % CI {row.ci_low:.0%}..{row.ci_high:.0%}, "
                f"{getattr(row, 'n_captions', '?')} captions x {row.objects} objects)")
        if row.method != METHOD_NAMES["from0"]:
            line += f", {row.vs_from0:.0%} of from-0's rate"
            if pd.notna(getattr(row, "preferred", np.nan)):
                line += f", preferred to from-0 in {row.preferred:.0%} ({row.preference_by})"
        if pd.notna(getattr(row, "psnr_out", np.nan)):
            line += f", PSNR outside {row.psnr_out:.1f} dB"
        if pd.notna(getattr(row, "substituted", np.nan)):
            line += f", another object appeared in {row.substituted:.0%}"
        found.append(line)
    return found


REPORT = StudyReport(tables=("removal_targets", "originals"), summarise=summarise, lines=lines)

