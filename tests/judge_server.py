"""A small OpenAI-compatible chat-completions server that answers the judge's questions exactly.

It reads the PNG images of each request with the shapes-world oracle (images are 32x32 RGB),
recognises the task from the ``response_format`` JSON schema's name, and answers in the JSON the
judge asks for, with a ``usage`` block. ``closer`` picks the edit with the smaller mean absolute
pixel difference to the original outside every object (of the three images); ``background_rating``
is 10 - that difference / 5, rounded and clipped to 0..10. The author's free-text questions (no
``response_format``; ``removal.protocol=paper``) are recognised by their words and answered in
prose: "Yes, ..." / "No, ..." and "The second one." / "The third one.".

Faults for the tests, queued with :meth:`JudgeServer.fail` and consumed one per request in order:
``429`` (Retry-After: 0), ``500``, ``401`` (echoes the Authorization header in its message, as a
careless server might), ``hang`` (answers nothing until the client has given up), ``garbage``
(prose instead of JSON), ``bad_json`` (truncated JSON), ``bad_label`` (well-formed JSON with an
invalid value: a label outside the set, "maybe", "c", 42). With ``faults_on_new_requests=True`` a
fault is served only to a request body the server has not received before: a client's retries and
re-asks of one question send the same body and are answered, so each fault hits another question
whatever the timing (concurrent requests, no rate limit).

    with JudgeServer() as server:
        server.fail("429", times=2)
        ... OpenAI(base_url=server.base_url) ...
        server.requests  # POSTs received, faults included
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import numpy as np
from PIL import Image

from negstudy.shapes import oracle, world

FAULTS = ("429", "500", "401", "hang", "garbage", "bad_json", "bad_label")
TOKENS_PER_IMAGE = 85  # OpenAI's price of a low-detail image


def _decode(url: str) -> np.ndarray:
    head, data = url.split(",", 1)
    assert head == "data:image/png;base64", head
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def background_difference(original: np.ndarray, edited: np.ndarray, *others: np.ndarray) -> float:
    """Mean absolute difference (uint8 units) between two images outside every object of all images."""
    images = (original, edited, *others)
    objects = np.zeros(original.shape[:2], dtype=bool)
    for verdict in oracle.inspect_batch(np.stack(images)):
        for mask in verdict.objects.values():
            objects |= mask
    keep = ~objects if (~objects).any() else np.ones_like(objects)
    diff = np.abs(original.astype(np.float64) - edited.astype(np.float64)).mean(-1)
    return float(diff[keep].mean())


def rating_of(difference: float) -> int:
    return int(np.clip(round(10 - difference / 5), 0, 10))


def answer(task: str, images: list[np.ndarray], text: str, schema: dict) -> dict:
    """The exact answer of a judge task, as the JSON object the judge expects."""
    if task == "objects":
        labels = set(schema["properties"]["objects"]["items"]["enum"])
        verdict = oracle.inspect_batch(np.stack(images))[0]
        return {"objects": [o for o in verdict.objects if o in labels]}
    if task == "present":
        name = json.loads(re.search(r'object: ("(?:[^"\\]|\\.)*")', text).group(1))
        verdict = oracle.inspect_batch(np.stack(images))[0]
        return {"present": any(verdict.present(o) for o in world.parse_caption(name).objects)}
    if task == "attribute":  # the oracle's attribute ("none" when it sees none, so any name is then absent)
        name = json.loads(re.search(r'look ("(?:[^"\\]|\\.)*")\?', text).group(1))
        return {"present": oracle.inspect_batch(np.stack(images))[0].attribute == name}
    if task == "closer":
        original, a, b = images
        return {"closer": "a" if background_difference(original, a, b) <= background_difference(original, b, a) else "b"}
    if task == "background_rating":
        return {"rating": rating_of(background_difference(*images))}
    raise ValueError(task)


PAPER_PRESENT = re.compile(r"tell me 'yes' if the image contains the (.+), otherwise, tell me 'no'\.")
PAPER_CLOSER = "which pic looks more similar to the first one"


def paper_answer(images: list[np.ndarray], text: str) -> tuple[str, str]:
    """(task, prose answer) of one of the author's free-text questions."""
    found = PAPER_PRESENT.search(text)
    if found:
        present = answer("present", images, f"object: {json.dumps(found.group(1))}", {})["present"]
        return "present_paper", (f"Yes, the image contains a {found.group(1)}." if present else
                                 f"No, there is no {found.group(1)} in this image.")
    if PAPER_CLOSER in text:
        pick = answer("closer", images, text, {})["closer"]
        return "closer_paper", "The second one." if pick == "a" else "The third one."
    raise ValueError(f"unknown free-text question {text[:80]!r}")


INVALID = {"objects": {"objects": ["unicorn"]}, "present": {"present": "maybe"}, "closer": {"closer": "c"},
           "background_rating": {"rating": 42}}


class JudgeServer:
    """Context manager: a threaded server on 127.0.0.1 (a free port) in a background thread.

    delay_s: seconds each answer takes (to observe concurrency); hang_s: how long a ``hang`` fault
    holds its request (released early when the server closes); faults_on_new_requests: queued
    faults go only to request bodies not received before (module docstring)."""

    def __init__(self, delay_s: float = 0.0, hang_s: float = 5.0, faults_on_new_requests: bool = False):
        self.delay_s = delay_s
        self.hang_s = hang_s
        self.faults_on_new_requests = faults_on_new_requests
        self._seen: set[str] = set()  # sha256 of every request body received
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.tasks: list[str] = []
        self.authorizations: list[str] = []
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, address: None  # a client that gave up closes its socket
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def fail(self, kind: str, times: int = 1) -> None:
        """Answer the next ``times`` requests with fault ``kind`` (one of FAULTS)."""
        assert kind in FAULTS, kind
        with self._lock:
            self._faults.extend([kind] * times)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: dict | str, headers: dict | None = None):
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                with server._lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.authorizations.append(self.headers.get("Authorization", ""))
                    digest = hashlib.sha256(body).hexdigest()
                    eligible = digest not in server._seen or not server.faults_on_new_requests
                    server._seen.add(digest)
                    fault = server._faults.popleft() if server._faults and eligible else None
                try:
                    self._answer(json.loads(body), fault)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, request: dict, fault: str | None):
                if fault == "429":
                    return self._send(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                                      "code": "rate_limit_exceeded"}}, {"Retry-After": "0"})
                if fault == "500":
                    return self._send(500, {"error": {"message": "The server had an error", "type": "server_error"}})
                if fault == "401":
                    auth = self.headers.get("Authorization", "")
                    return self._send(401, {"error": {"message": f"Incorrect API key provided: {auth}",
                                                      "code": "invalid_api_key"}})
                if fault == "hang":
                    server._closing.wait(server.hang_s)
                    return self._send(500, {"error": {"message": "too late"}})
                parts = [p for m in request["messages"] for p in (m["content"] if isinstance(m["content"], list) else [])]
                text = "\n".join(p["text"] for p in parts if p["type"] == "text")
                images = [_decode(p["image_url"]["url"]) for p in parts if p["type"] == "image_url"]
                if "response_format" in request:
                    fmt = request["response_format"]["json_schema"]
                    task = fmt["name"]
                    content = json.dumps(answer(task, images, text, fmt["schema"]))
                else:  # the author's free-text questions
                    task, content = paper_answer(images, text)
                with server._lock:
                    server.tasks.append(task)
                if server.delay_s:
                    time.sleep(server.delay_s)
                if fault == "garbage":
                    content = "Sure! I can see a few colourful shapes in this picture."
                elif fault == "bad_json":
                    content = content[: len(content) // 2]
                elif fault == "bad_label":
                    content = json.dumps(INVALID[task]) if task in INVALID else "Maybe."
                prompt_tokens = TOKENS_PER_IMAGE * len(images) + len(text) // 4
                completion_tokens = max(1, len(content) // 4)
                self._send(200, {
                    "id": f"chatcmpl-{server.requests}", "object": "chat.completion", "created": int(time.time()),
                    "model": request["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                })

        return Handler
