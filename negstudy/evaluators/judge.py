"""A vision-language judge behind any OpenAI-compatible chat-completions endpoint.

The paper (section 6) asks GPT-4V about generated images; this evaluator asks the same questions
of any model served through ``openai.OpenAI`` (OpenAI itself, or a local vLLM / ollama through
``base_url``). Four tasks, each one request per image (or image pair / triple):

- ``objects``: the prominent objects of an image, named only from a label set (COCO's 80 classes,
  the shapes world's 5, or a file). Answer ``{"objects": [label, ...]}``.
- ``present``: is object ``name`` in the image? Answer ``{"present": true | false}``.
- ``attribute``: does the whole image have the property ``name`` ("blurry", "unpleasant")? Answer
  ``{"present": true | false}`` (``present(..., kind="attribute")``).
- ``closer``: given the original and two edits A and B of it, which edit looks more like the
  original (the paper's preference question)? Answer ``{"closer": "a" | "b"}``.
- ``background_rating``: how well does an edit keep the original's background and everything but
  the removed object, 0 (nothing kept) to 10 (identical)? Answer ``{"rating": 0..10}``.

The author's wording (``removal.protocol=paper``; banyuanhao/daam ``scripts/autotesting.py``),
free text without ``response_format``, the question first and the images after it, as the
author's ``gpt4_vision`` sends them (``max_tokens`` 300):

- ``present_paper``: "tell me 'yes' if the image contains the {object}, otherwise, tell me 'no'.";
  the answer is ``'yes' in text.lower()`` (``get_check``);
- ``closer_paper``: images [original, a, b] and "which pic looks more similar to the first one,
  please answer with 'the second one' or 'the third one'."; the answer is "a" when the text
  contains "second" (case-sensitive, ``get_compare``), else "b".

Images are uint8 arrays (B, H, W, 3), sent as base64 PNG data URLs. Every request asks for strict
JSON through ``response_format`` (a JSON schema named after the task) and the parsed object is
validated again here (labels in the set, a JSON boolean, a rating in [0, 10], a choice a/b). A
malformed answer is asked once more, then recorded as missing (None) with the model's raw text;
it is never guessed. HTTP 429 / 5xx / timeouts are retried by the openai client itself
(``max_retries``, exponential backoff with jitter, honouring Retry-After); an error that survives
the retries makes that image's answer None with the error recorded, and never raises.

Cache. Every valid answer is written to ``cache_dir`` as one small JSON file named by the sha256 of
(endpoint base_url, model, task, PROMPT_VERSION, labels, image detail, sha256 of each image's
pixels), so a rerun sends no request for an answer it already has and never pays twice. Files are
written to a temporary name and renamed (a kill never leaves half a file); a file that cannot be
read or fails validation is a miss (logged) and is rewritten. Missing answers are not cached: a
rerun asks again. Change PROMPT_VERSION whenever the wording or the schemas change.

Accounting. Each answer is a :class:`Call` holding the tokens and the cost (USD, from the config's
prices) paid for it in this process (0 on a cache hit), whether it came from the cache, the error
and the raw text of an invalid answer. ``last_calls`` holds the calls of the latest batch,
``usage`` the running totals; ``evaluate`` puts them in per-image columns.

The API key is read only from the environment variable ``api_key_env`` or the file
``api_key_file``; it is never logged, cached, or put in an error message.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
from PIL import Image

from negstudy.errors import ConfigError
from negstudy.labels import label_set
from negstudy.records import write_text

log = logging.getLogger(__name__)

PROMPT_VERSION = "1"  # part of every cache key: bump it when a prompt or a schema changes
DEFAULT_BASE_URL = "https://api.openai.com/v1"
PLACEHOLDER_KEY = "not-needed"  # local servers (vLLM, ollama) accept any key, the client wants one
TASKS = ("objects", "present", "attribute", "closer", "background_rating", "present_paper", "closer_paper")
PAPER_TASKS = {"present_paper": "present", "closer_paper": "closer"}  # the author's free-text questions -> answer kind
ANSWER_FORMS = {**PAPER_TASKS, "attribute": "present"}  # tasks answered in another task's form
DETAILS = ("low", "high", "auto")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MALFORMED_ATTEMPTS = 2  # a malformed answer is asked once more, then recorded as missing


class InvalidAnswer(ValueError):
    """The model's text is not the strict JSON answer the task asks for."""


@dataclass
class Call:
    """One answer: what it cost in this process, where it came from, why it is missing."""

    task: str
    answer: Any = None  # None = missing (error or invalid answer)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False  # answered from the cache (or by an identical request of the same batch)
    requests: int = 0  # chat completions requested (a malformed answer makes 2)
    http_retries: int = 0  # retries the openai client made on 429 / 5xx / timeouts
    error: str | None = None
    raw: str | None = None  # the model's text when it was not a valid answer


@dataclass(frozen=True)
class _Request:
    task: str
    images: tuple[np.ndarray, ...]  # each uint8 (H, W, 3)
    labels: tuple[str, ...]  # objects: the label set; present: the one name asked about


# ----------------------------------------------------------------------------- prompts and answers


def _question(task: str, labels: tuple[str, ...]) -> tuple[list[str], dict]:
    """(text parts, one before each image and one after the last, JSON schema) of a task."""
    strict = "Reply with the JSON object only, no other text."
    if task == "objects":
        names = ", ".join(labels)
        text = (
            "List the objects that are clearly visible and prominent in this image. Name them only "
            f"with words from this list: {names}. Leave out anything that is not in the list, tiny or "
            'ambiguous. Answer {"objects": [...]} with each name at most once ([] if none of them is '
            f"there). {strict}"
        )
        schema = {"objects": {"type": "array", "items": {"type": "string", "enum": list(labels)}}}
        return [text], schema
    if task == "present":
        text = (
            f"Does this image contain the following object: {json.dumps(labels[0], ensure_ascii=False)}? Count it only if it is "
            f'actually visible, not merely suggested. Answer {{"present": true}} or {{"present": false}}. {strict}'
        )
        return [text], {"present": {"type": "boolean"}}
    if task == "attribute":
        text = (
            f"Does this image as a whole look {json.dumps(labels[0], ensure_ascii=False)}? This is a property of the "
            "whole picture (its quality, style or mood), not an object in it. Count it only if it clearly applies. "
            f'Answer {{"present": true}} or {{"present": false}}. {strict}'
        )
        return [text], {"present": {"type": "boolean"}}
    if task == "closer":
        text = (
            "The first image is an original. Images A and B are two edits of it, each meant to remove one "
            "object. Ignoring the removed object, which edit looks more like the original (background, "
            'layout, colours, the other objects)? Answer {"closer": "a"} or {"closer": "b"}. ' + strict
        )
        schema = {"closer": {"type": "string", "enum": ["a", "b"]}}
        return [text + "\nOriginal:", "Edit A:", "Edit B:", ""], schema
    if task == "background_rating":
        text = (
            "The first image is an original, the second an edit of it that may remove an object. Rate how "
            "well the edit keeps the original's background and everything other than the removed object, "
            'from 0 (nothing kept) to 10 (identical). Answer {"rating": <integer from 0 to 10>}. ' + strict
        )
        schema = {"rating": {"type": "integer", "description": "0 = nothing kept, 10 = identical"}}
        return [text + "\nOriginal:", "Edit:", ""], schema
    if task == "present_paper":  # the author's words (scripts/autotesting.py, get_check)
        return [f"tell me 'yes' if the image contains the {labels[0]}, otherwise, tell me 'no'.", ""], None
    if task == "closer_paper":  # scripts/autotesting.py, text_compare: the question, then the three images
        return ["which pic looks more similar to the first one, please answer with 'the second one' or 'the third one'.",
                "", "", ""], None
    raise ValueError(f"unknown judge task {task!r}")


def _response_format(task: str, properties: dict) -> dict:
    schema = {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": task, "strict": True, "schema": schema}}


def parse_answer(task: str, text: str | None, labels: Sequence[str] = ()) -> Any:
    """The validated answer in ``text``: objects -> dict name -> None (label order of the answer),
    present -> bool, closer -> "a" | "b", background_rating -> float in [0, 10].
    Raises InvalidAnswer with the reason; never guesses."""
    if not text or not text.strip():
        raise InvalidAnswer("empty answer")
    if task == "present_paper":  # the author's substring rules: any text is an answer
        return "yes" in text.lower()
    if task == "closer_paper":
        return "a" if "second" in text else "b"
    try:
        obj = json.loads(_strip_fence(text))
    except json.JSONDecodeError as err:
        raise InvalidAnswer(f"not JSON ({err.msg})") from None
    return validate_answer(task, obj, labels)


def _strip_fence(text: str) -> str:
    body = text.strip()  # a fenced block around the JSON is formatting, not content
    return body.strip("`").removeprefix("json").strip() if body.startswith("```") else body


ANSWER_KEYS = {"objects": "objects", "present": "present", "attribute": "present", "closer": "closer",
               "background_rating": "rating", "present_paper": "present", "closer_paper": "closer"}


def validate_answer(task: str, obj: Any, labels: Sequence[str] = ()) -> Any:
    """Check a parsed JSON answer against the task (see :func:`parse_answer`)."""
    key = ANSWER_KEYS[task]
    task = ANSWER_FORMS.get(task, task)  # a cached answer of the author's question (or an attribute's) has this form
    if not isinstance(obj, dict) or set(obj) != {key}:
        raise InvalidAnswer(f"expected a JSON object with the single key {key!r}")
    value = obj[key]
    if task == "objects":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidAnswer("'objects' is not a list of strings")
        canonical = {label.casefold(): label for label in labels}
        names = []
        for v in value:
            name = canonical.get(v.strip().casefold())
            if name is None:
                raise InvalidAnswer(f"{v!r} is not in the label set")
            names.append(name)
        return dict.fromkeys(names)
    if task == "present":
        if not isinstance(value, bool):
            raise InvalidAnswer("'present' is not a JSON boolean")
        return value
    if task == "closer":
        if not isinstance(value, str) or value.strip().lower() not in ("a", "b"):
            raise InvalidAnswer("'closer' is neither 'a' nor 'b'")
        return value.strip().lower()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 10:
        raise InvalidAnswer("'rating' is not a number from 0 to 10")
    return float(value)


def _jsonable(answer: Any) -> Any:
    return list(answer) if isinstance(answer, dict) else answer


def _png_data_url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_hash(image: np.ndarray) -> str:
    """sha256 of the pixels (shape included): the same image gives the same key however it is encoded."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()


# ----------------------------------------------------------------------------- cache, rate limit, key


class AnswerCache:
    """One JSON file per answer, ``<dir>/<key[:2]>/<key>.json``, written atomically."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str, task: str, labels: Sequence[str]) -> Any | None:
        """The cached answer, or None on a miss (a corrupted file is a miss, with a warning)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            log.warning("judge cache: cannot read %s (%s); asking again", path, err.strerror)
            return None
        try:
            record = json.loads(data.decode("utf-8"))
            if record.get("task") != task:
                raise InvalidAnswer(f"task {record.get('task')!r} != {task!r}")
            return validate_answer(task, record["answer"], labels)
        except (ValueError, KeyError, AttributeError, TypeError) as err:
            log.warning("judge cache: %s is corrupted (%s); asking again and rewriting it", path, err)
            return None

    def put(self, key: str, record: dict) -> None:
        try:
            write_text(json.dumps(record, sort_keys=True), self.path(key))
        except OSError as err:  # a read-only or full disk costs a rerun, not the job
            log.warning("judge cache: cannot write %s (%s)", self.path(key), err.strerror)


class RateLimiter:
    """At most ``per_minute`` request starts per minute, shared by all threads (evenly spaced)."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


def _is_default_endpoint(base_url: str) -> bool:
    return base_url.rstrip("/") == DEFAULT_BASE_URL


def resolve_api_key(api_key_env: str, api_key_file: str | None, base_url: str) -> str:
    """The key from ``api_key_file`` when one is configured, else from the environment variable
    ``api_key_env``; a placeholder for a custom endpoint without one. ConfigError (naming where
    the key was looked for, never the key) when OpenAI's own endpoint gets none."""
    if api_key_env and not ENV_NAME.match(api_key_env):  # never echo it: it may be the key itself, pasted
        raise ConfigError("evaluator.api_key_env: not an environment variable name (give the variable that holds the key)")
    key = ""
    if api_key_file:
        path = Path(api_key_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"evaluator.api_key_file={api_key_file!r}: no such file")
        key = path.read_text(encoding="utf-8").strip()
        if not key:
            raise ConfigError(f"evaluator.api_key_file={api_key_file!r}: the file is empty")
    elif api_key_env:
        key = os.environ.get(api_key_env, "").strip()
    if key:
        return key
    if _is_default_endpoint(base_url):
        raise ConfigError(
            f"evaluator.api_key_env={api_key_env!r}: the environment variable {api_key_env} is not set and "
            f"{DEFAULT_BASE_URL} needs an API key (export {api_key_env}=..., or set evaluator.api_key_file)"
        )
    return PLACEHOLDER_KEY


# ----------------------------------------------------------------------------- the evaluator


class JudgeEvaluator:
    """Asks a vision-language model about images; see the module docstring for tasks and cache."""

    name = "judge"
    locates = False
    kinds = ("object", "attribute")

    def __init__(
        self,
        *,
        base_url: str = DEFAULT_BASE_URL,
        model: str = "gpt-4o",
        api_key: str,
        labels: Sequence[str],
        cache_dir: str | Path,
        concurrency: int = 4,
        requests_per_minute: float = 60.0,
        max_retries: int = 4,
        timeout_s: float = 60.0,
        image_detail: str = "low",
        temperature: float | None = 0.0,
        price_input_per_mtok: float = 0.0,
        price_output_per_mtok: float = 0.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.labels = tuple(labels)
        self.cache = AnswerCache(cache_dir)
        self.concurrency = concurrency
        self.image_detail = image_detail
        self.temperature = temperature
        self.prices = (price_input_per_mtok, price_output_per_mtok)
        self._secret = api_key if api_key != PLACEHOLDER_KEY else None
        # the client retries 429 / 408 / 409 / 5xx / timeouts / connection errors itself, with backoff
        self._client = openai.OpenAI(api_key=api_key, base_url=self.base_url, max_retries=max_retries, timeout=timeout_s)
        self._limiter = RateLimiter(requests_per_minute)
        self._lock = threading.Lock()
        self._usage = dict.fromkeys(
            ("answers", "cache_hits", "missing", "requests", "http_retries", "input_tokens", "output_tokens"), 0
        ) | {"cost_usd": 0.0}
        self.last_calls: list[Call] = []

    @classmethod
    def build(cls, *, world: str | None = None, **settings) -> JudgeEvaluator:
        """The target of conf/evaluator/judge.yaml: JudgeConfig's keys as keyword arguments (any world)."""
        from negstudy.config import JudgeConfig
        from negstudy.evaluators import settings_node

        return cls.from_config(settings_node(JudgeConfig, settings, "judge"))

    @classmethod
    def from_config(cls, cfg) -> JudgeEvaluator:
        """From ``cfg.evaluator`` (JudgeConfig's fields); ConfigError (one line) on a bad value."""
        if cfg.image_detail not in DETAILS:
            raise ConfigError(f"evaluator.image_detail={cfg.image_detail!r}: allowed values are {', '.join(DETAILS)}")
        for key, low, strict in [("concurrency", 1, False), ("requests_per_minute", 0, True), ("max_retries", 0, False),
                                 ("timeout_s", 0, True), ("price_input_per_mtok", 0, False), ("price_output_per_mtok", 0, False)]:
            value = getattr(cfg, key)
            if value < low or (strict and value == low):
                raise ConfigError(f"evaluator.{key}={value}: must be {'>' if strict else '>='} {low}")
        if not cfg.model:
            raise ConfigError("evaluator.model='': name the judge model")
        base_url = (cfg.base_url or DEFAULT_BASE_URL).rstrip("/")
        labels = label_set(cfg.labels, "evaluator.labels")
        api_key = resolve_api_key(cfg.api_key_env, cfg.api_key_file, base_url)
        return cls(
            base_url=base_url, model=cfg.model, api_key=api_key, labels=labels, cache_dir=cfg.cache_dir,
            concurrency=int(cfg.concurrency), requests_per_minute=float(cfg.requests_per_minute),
            max_retries=int(cfg.max_retries), timeout_s=float(cfg.timeout_s), image_detail=cfg.image_detail,
            temperature=cfg.temperature, price_input_per_mtok=float(cfg.price_input_per_mtok),
            price_output_per_mtok=float(cfg.price_output_per_mtok),
        )

    # ------------------------------------------------------------------ the tasks

    def objects(self, images: np.ndarray, labels: Sequence[str] | None = None) -> list[dict[str, None] | None]:
        """Prominent objects of each image among ``labels`` (default: the config's label set),
        as name -> None (the judge gives no masks); None for an image without a valid answer."""
        labels = tuple(labels) if labels is not None else self.labels
        return self._answers([_Request("objects", (im,), labels) for im in images])

    def present(self, images: np.ndarray, names: Sequence[str], kind: str = "object") -> list[bool | None]:
        """Whether object ``names[i]`` (or, with ``kind="attribute"``, the property ``names[i]`` of the
        whole image) is in ``images[i]`` (None = no valid answer)."""
        task = "attribute" if kind == "attribute" else "present"
        return self._answers([_Request(task, (im,), (str(n),)) for im, n in zip(images, names, strict=True)])

    def closer(self, originals: np.ndarray, a: np.ndarray, b: np.ndarray) -> list[str | None]:
        """Which edit, "a" or "b", looks more like its original (None = no valid answer)."""
        return self._answers([_Request("closer", (o, x, y), ()) for o, x, y in zip(originals, a, b, strict=True)])

    def present_paper(self, images: np.ndarray, names: Sequence[str]) -> list[bool | None]:
        """:meth:`present` asked in the author's words, answered by the author's "yes" substring rule."""
        return self._answers([_Request("present_paper", (im,), (str(n),)) for im, n in zip(images, names, strict=True)])

    def closer_paper(self, originals: np.ndarray, a: np.ndarray, b: np.ndarray) -> list[str | None]:
        """:meth:`closer` asked in the author's words on [original, a, b]: "a" if the answer says "second"."""
        return self._answers([_Request("closer_paper", (o, x, y), ()) for o, x, y in zip(originals, a, b, strict=True)])

    def background_rating(self, originals: np.ndarray, edited: np.ndarray) -> list[float | None]:
        """How well each edit keeps its original's background, 0..10 (None = no valid answer)."""
        return self._answers([_Request("background_rating", (o, e), ()) for o, e in zip(originals, edited, strict=True)])

    def evaluate(self, images: np.ndarray, items) -> list[dict]:
        """Per-image columns of a generation job (``items`` have .negative and .category):
        judge_objects (comma-separated, config label set), negative_present (is the object
        negative's object still there; None for attribute negatives), and the accounting columns
        judge_input_tokens, judge_output_tokens, judge_cost_usd (paid in this run), judge_cached
        (every answer from the cache), judge_error and judge_raw (of a missing answer)."""
        requests = [_Request("objects", (im,), self.labels) for im in images]
        asked = [i for i, it in enumerate(items) if it.category == "object"]
        requests += [_Request("present", (images[i],), (items[i].negative,)) for i in asked]
        calls = self._run(requests)
        per_image = [[c] for c in calls[: len(images)]]
        present: list[bool | None] = [None] * len(images)
        for i, call in zip(asked, calls[len(images) :]):
            present[i] = call.answer
            per_image[i].append(call)
        rows = []
        for found, negative_present, cs in zip(calls, present, per_image):
            errors = [f"{c.task}: {c.error}" for c in cs if c.error]
            raws = [f"{c.task}: {c.raw}" for c in cs if c.raw is not None]
            rows.append({
                "judge_objects": None if found.answer is None else ",".join(found.answer),
                "negative_present": negative_present,
                "judge_input_tokens": sum(c.input_tokens for c in cs),
                "judge_output_tokens": sum(c.output_tokens for c in cs),
                "judge_cost_usd": sum(c.cost_usd for c in cs),
                "judge_cached": all(c.cached for c in cs),
                "judge_error": "; ".join(errors) or None,
                "judge_raw": "; ".join(raws) or None,
            })
        return rows

    @property
    def usage(self) -> dict:
        """Running totals: answers, cache_hits, missing, requests, http_retries, input_tokens,
        output_tokens, cost_usd (paid by this evaluator; cache hits cost nothing)."""
        with self._lock:
            return dict(self._usage)

    # ------------------------------------------------------------------ machinery

    def _answers(self, requests: list[_Request]) -> list:
        return [c.answer for c in self._run(requests)]

    def _key(self, request: _Request) -> str:
        fields = {
            "endpoint": self.base_url, "model": self.model, "task": request.task, "prompt_version": PROMPT_VERSION,
            "labels": list(request.labels), "detail": self.image_detail,
            "images": [image_hash(im) for im in request.images],
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def _run(self, requests: list[_Request]) -> list[Call]:
        """Answer every request: cache first, then the misses on the thread pool (one request per
        distinct key). Sets ``last_calls``; never raises for an API error."""
        keys = [self._key(r) for r in requests]
        calls: dict[str, Call] = {}
        misses: dict[str, _Request] = {}
        for key, request in zip(keys, requests):
            if key in calls or key in misses:
                continue
            answer = self.cache.get(key, request.task, request.labels)
            if answer is not None:
                calls[key] = Call(request.task, answer, cached=True)
            else:
                misses[key] = request
        if misses:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(misses))) as pool:
                for key, call in zip(misses, pool.map(self._ask, misses.keys(), misses.values())):
                    calls[key] = call
        out, seen = [], set()
        for key in keys:
            call = calls[key]
            if key in seen:  # an identical request of this batch: answered once, paid once
                call = Call(call.task, call.answer, cached=True, error=call.error, raw=call.raw)
            seen.add(key)
            out.append(call)
        self._account(out)
        return out

    def _account(self, calls: list[Call]) -> None:
        missing = [c for c in calls if c.answer is None]
        with self._lock:
            u = self._usage
            u["answers"] += len(calls)
            u["cache_hits"] += sum(c.cached for c in calls)
            u["missing"] += len(missing)
            for c in calls:
                u["requests"] += c.requests
                u["http_retries"] += c.http_retries
                u["input_tokens"] += c.input_tokens
                u["output_tokens"] += c.output_tokens
                u["cost_usd"] += c.cost_usd
        self.last_calls = calls
        if missing:
            first = missing[0]
            log.warning("judge: %d of %d answers missing (first: %s: %s)", len(missing), len(calls), first.task, first.error)

    def _messages(self, request: _Request) -> tuple[list[dict], dict]:
        texts, properties = _question(request.task, request.labels)
        content: list[dict] = []
        for text, image in zip(texts, request.images + (None,)):
            if text:
                content.append({"type": "text", "text": text})
            if image is not None:
                content.append({"type": "image_url", "image_url": {"url": _png_data_url(image), "detail": self.image_detail}})
        return [{"role": "user", "content": content}], (_response_format(request.task, properties) if properties else None)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "[api key]") if self._secret else text

    def _ask(self, key: str, request: _Request) -> Call:
        """One answer from the endpoint: a malformed one is asked once more, then recorded missing."""
        call = Call(request.task)
        messages, response_format = self._messages(request)
        extra = {} if self.temperature is None else {"temperature": self.temperature}
        if response_format is None:  # the author's free-text questions
            extra["max_tokens"] = 300
        else:
            extra["response_format"] = response_format
        for _ in range(MALFORMED_ATTEMPTS):
            self._limiter.wait()
            call.requests += 1
            try:
                response = self._client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, **extra
                )
                call.http_retries += response.retries_taken
                completion = response.parse()
            except (openai.OpenAIError, ValueError) as err:  # after the client's own retries
                call.error = self._scrub(f"{type(err).__name__}: {err}")
                call.raw = None
                return call
            if completion.usage is not None:
                call.input_tokens += completion.usage.prompt_tokens or 0
                call.output_tokens += completion.usage.completion_tokens or 0
            call.cost_usd = (call.input_tokens * self.prices[0] + call.output_tokens * self.prices[1]) / 1e6
            message = completion.choices[0].message if completion.choices else None
            text = None if message is None else (message.content if message.content is not None else message.refusal)
            try:
                call.answer = parse_answer(request.task, text, request.labels)
            except InvalidAnswer as why:
                call.error, call.raw = f"invalid answer: {why}", self._scrub(text or "")
                continue
            call.error = call.raw = None
            self.cache.put(key, {
                "task": request.task, "answer": {ANSWER_KEYS[request.task]: _jsonable(call.answer)},
                "model": completion.model or self.model, "prompt_version": PROMPT_VERSION,
                "input_tokens": call.input_tokens, "output_tokens": call.output_tokens,
                "images": [image_hash(im) for im in request.images],
            })
            return call
        return call
