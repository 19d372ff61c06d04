"""The studies' reader: is a concept in an image, and where. One interface over every evaluator.

A study never asks which evaluator it has. It asks :meth:`StudyReader.look` whether each image
shows a concept (a negative prompt: an object such as "glasses" or an attribute such as "blurry")
and, where the reader can locate it, the concept's region; and optionally the region of another
word's object (the prompt's own object, for the attention lag). Answers are ``True`` / ``False`` or
``None`` (unsure, or a question the reader cannot answer): counted by the studies, never guessed.

Two readers:

- :class:`ShapesReader` on the shapes world: the readings of :mod:`negstudy.evaluators.ensemble`
  (the validated ensemble by default, the oracle, or the shapes CLIP with its margin and unsure
  band) judged by :func:`~negstudy.evaluators.ensemble.concept_present`. The ensemble and the
  oracle locate objects (pixel masks); CLIP does not.
- :class:`EvaluatorReader` on any model: the evaluator's ``present(images, names, kind)`` and, for
  evaluators that locate (OWLv2: boxes filled as masks), its ``objects``. What it can judge is
  the evaluator's ``kinds`` (OWLv2: objects only; CLIP and the judge: objects and attributes).

:func:`study_reader` picks one from the evaluator node; :func:`capabilities` says, in one line per
missing capability, what a study leaves out with it (logged once and shown in the report).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from negstudy.errors import ConfigError

log = logging.getLogger("negstudy")

KINDS = ("object", "attribute")


@dataclass(frozen=True)
class Look:
    """One image read for one concept (see the module docstring)."""

    present: bool | None  # the concept is in the image (None: unsure, or not judged by this reader)
    region: np.ndarray | None = None  # bool (H, W): where it is, when surely present and the reader locates
    word_region: np.ndarray | None = None  # bool (H, W): the asked word's object, when surely present and located
    # (a detector is asked only where the concept is present: the attention lag compares the two there)


class StudyReader:
    """name: shown in tables; locates: gives regions; kinds: the concept categories it judges."""

    name: str = "reader"
    locates: bool = False
    kinds: tuple[str, ...] = KINDS

    def look(self, images: np.ndarray, concepts: Sequence[str], categories: Sequence[str],
             words: Sequence[str | None] | None = None) -> list[Look]:
        """images uint8 (B, H, W, 3); concept i (category i: object | attribute) in image i; with
        ``words``, also the region of word i's object in image i (None to skip an image)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def reusing(self):
        """Inside: an image seen before is not read again where the reader's reading of an image answers
        every concept (the shapes readers); a no-op for the others."""
        yield self


class Unread(StudyReader):
    """``evaluator=none`` where a study can go on without reading: every answer is None."""

    name = "none"
    kinds = ()

    def look(self, images, concepts, categories, words=None) -> list[Look]:
        return [Look(None) for _ in images]


class ShapesReader(StudyReader):
    """Readings of the shapes world (``read``: images -> :class:`~negstudy.evaluators.ensemble.Reading`)."""

    def __init__(self, name: str, read: Callable[[np.ndarray], list], locates: bool):
        self.name, self.read, self.locates = name, read, locates
        self._seen: dict[bytes, object] | None = None

    @contextlib.contextmanager
    def reusing(self):
        """One reading per distinct image inside (e.g. a screen image shared by several pairs' negatives);
        the images a call has not seen are read together, in their order."""
        self._seen = {}
        try:
            yield self
        finally:
            self._seen = None

    def _readings(self, images) -> list:
        if self._seen is None:
            return self.read(images)
        images = np.asarray(images)
        keys = [hashlib.sha1(np.ascontiguousarray(im).tobytes()).digest() for im in images]
        unseen: dict[bytes, int] = {}  # key -> its first image in this call
        for i, k in enumerate(keys):
            if k not in self._seen:
                unseen.setdefault(k, i)
        if unseen:
            self._seen.update(zip(unseen, self.read(images[list(unseen.values())])))
        return [self._seen[k] for k in keys]

    def look(self, images, concepts, categories, words=None) -> list[Look]:
        from negstudy.evaluators.ensemble import concept_present

        words = list(words) if words is not None else [None] * len(images)
        found = []
        for reading, concept, word in zip(self._readings(images), concepts, words, strict=True):
            present, region = concept_present(reading, concept)
            own = reading.masks.get(word) if word and reading.objects.get(word) else None
            found.append(Look(present, region if self.locates else None, own if self.locates else None))
        return found


class EvaluatorReader(StudyReader):
    """Any evaluator with ``present(images, names, kind=...)`` (and ``objects`` if it locates)."""

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.name = str(getattr(evaluator, "name", type(evaluator).__name__))
        self.locates = bool(getattr(evaluator, "locates", False))
        self.kinds = tuple(getattr(evaluator, "kinds", ("object",)))

    def look(self, images, concepts, categories, words=None) -> list[Look]:
        images, concepts, categories = np.asarray(images), list(concepts), list(categories)
        present: list[bool | None] = [None] * len(images)
        for kind in self.kinds:
            idx = [i for i, c in enumerate(categories) if c == kind]
            if idx:
                for i, answer in zip(idx, self.evaluator.present(images[idx], [concepts[i] for i in idx], kind=kind)):
                    present[i] = answer
        regions = self._regions(images, [c if p and k == "object" else None
                                         for c, p, k in zip(concepts, present, categories)])
        own = (self._regions(images, [w if p else None for w, p in zip(words, present)])  # what the attention lag needs
               if words is not None else [None] * len(images))
        return [Look(p, r, w) for p, r, w in zip(present, regions, own)]

    def _regions(self, images: np.ndarray, names: list[str | None]) -> list[np.ndarray | None]:
        """The located region of names[i] in image i (None where not asked, not found or not located)."""
        out: list[np.ndarray | None] = [None] * len(images)
        if not self.locates:
            return out
        idx = [i for i, n in enumerate(names) if n]
        for i in idx:  # one query per image: the evaluator's objects() takes one label list for a batch
            found = self.evaluator.objects(images[i : i + 1], [names[i]])[0] or {}
            mask = found.get(names[i])
            out[i] = np.asarray(mask, bool) if mask is not None and np.any(mask) else None
        return out


def study_reader(cfg_evaluator, world: str | None) -> StudyReader | None:
    """The reader of a study, built from the evaluator node (None for ``evaluator=none`` or no node)."""
    from negstudy.targets import build

    if cfg_evaluator is None or "_target_" not in cfg_evaluator:
        return None
    return reader_of(build(cfg_evaluator, "evaluator", world=world), world, cfg_evaluator.get("name"))


def reader_of(evaluator, world: str | None, name: str | None = None) -> StudyReader | None:
    """The reader over a built evaluator: None for the ``none`` evaluator.

    On the shapes world the readers that read into Readings (ensemble, oracle) keep their own
    rules, and ``clip`` reads with the shapes CLIP's margin and unsure band
    (:func:`~negstudy.evaluators.ensemble.clip_readings`); every other evaluator, and every
    evaluator on another model, is read through its ``present`` / ``objects``.
    """
    if evaluator is None or getattr(evaluator, "name", None) == "none":
        return None
    name = str(name or getattr(evaluator, "name", "evaluator"))
    if world == "shapes":
        if callable(getattr(evaluator, "read", None)):  # the ensemble, the oracle
            return ShapesReader(name, evaluator.read, locates=bool(evaluator.locates))
        if getattr(evaluator, "name", None) == "clip":  # the shapes CLIP, with its margins and unsure band
            from negstudy.evaluators.ensemble import clip_readings

            return ShapesReader(name, lambda images: clip_readings(evaluator, images), locates=False)
    return EvaluatorReader(evaluator)


def require_reader(cfg, reader: StudyReader | None, what: str) -> StudyReader:
    """A study that cannot run without a reader stops, before loading, with one line naming ``evaluator``."""
    if reader is None:
        raise ConfigError(f"evaluator={cfg.evaluator.get('name', 'none')}: sweep.name={cfg.sweep.name!r} needs a reader "
                          f"to {what} (allowed: evaluator=owl|clip|judge on any model; ensemble|oracle on model=shapes)")
    return reader


def capabilities(reader: StudyReader | None, needs: dict[str, str], categories: Sequence[str] = KINDS) -> list[str]:
    """What a study leaves out with this reader, one line each.

    needs: capability -> what the study measures with it; capabilities are ``presence`` (any
    reader), ``regions`` (a reader that locates) and ``attributes`` (a reader that judges
    attribute concepts; asked only when ``categories`` include attributes)."""
    name = reader.name if reader is not None else "none"
    lines = []
    for capability, measures in needs.items():
        if capability == "presence" and reader is None:
            lines.append(f"evaluator={name} reads no image: {measures} left out")
        elif capability == "regions" and (reader is None or not reader.locates):
            lines.append(f"evaluator={name} gives no region: {measures} left out")
        elif (capability == "attributes" and "attribute" in categories
              and (reader is None or "attribute" not in reader.kinds)):
            lines.append(f"evaluator={name} does not judge attributes: {measures} left out")
    for line in lines:
        log.warning("%s", line)
    return lines
