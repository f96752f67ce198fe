"""Live traffic for rollouts: continuous searches and streaming updates from a background thread.

Used by the demo and the deployment tests. It records every answer (status, the version it reports,
its top hit), every write it made, and the traffic split it saw, so a rollout can be judged after
the fact: every request answered 2xx, every answer from one version, the split rising in steps.
"""
from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import requests

RETRIES_ON_503 = 2
QUERIES = ["asyncio event loop", "unicode decode error", "reference leak in the C API", "IDLE editor",
           "pathlib glob", "Windows installer", "typing generics", "ssl certificates"]


@dataclass
class TrafficRecord:
    started: float = field(default_factory=time.monotonic)
    responses: list[dict] = field(default_factory=list)   # at, user, version, query, top hit
    failures: list[str] = field(default_factory=list)
    weights_seen: list[dict] = field(default_factory=list)
    weights_at: list[float] = field(default_factory=list)  # when each of weights_seen was first seen
    written: dict[str, int] = field(default_factory=dict)  # doc id -> seq, live
    deleted: dict[str, int] = field(default_factory=dict)  # doc id -> seq of the delete
    missed: dict[str, list[str]] = field(default_factory=dict)  # doc id -> versions that missed its write
    retried: list[str] = field(default_factory=list)  # 503s answered in time on a retry after Retry-After

    def per_version_over_time(self, bucket_seconds: float = 5.0) -> dict[int, dict[str, int]]:
        buckets: dict[int, dict[str, int]] = {}
        for response in self.responses:
            slot = buckets.setdefault(int(response["at"] // bucket_seconds), {})
            slot[response["version"]] = slot.get(response["version"], 0) + 1
        return dict(sorted(buckets.items()))

    def users_moved_back(self, old: str, new: str) -> dict[str, list[str]]:
        """Users whose answers did not go ``old``… then ``new``… (at most one move, old to new):
        each with its versions in order. Empty while assignment is sticky and the weights rise."""
        versions: dict[str, list[str]] = {}
        for response in sorted(self.responses, key=lambda r: r["at"]):
            versions.setdefault(response["user"], []).append(response["version"])
        order = {old: 0, new: 1}
        return {user: seen for user, seen in versions.items()
                if not set(seen) <= order.keys() or any(order[b] < order[a] for a, b in zip(seen, seen[1:]))}


def _writer_token() -> str | None:
    from .auth import InvalidTokenFile, token_for
    from .config import Settings
    try:
        return token_for(Settings().tokens_path, "writer")
    except InvalidTokenFile:
        return None


class Traffic:
    """Context manager: searches (sticky by user) and, every fifth request, a write or a delete."""

    def __init__(self, app_url: str, read_weights, seed: int = 3, on_weights=None, pause: float = 0.01,
                 version: str | None = None, token: str | None = None):
        """``version``: every search asks for it (``x-model-version``), whatever the weights.
        ``token``: the writes' bearer token (default: the token file's ``writer``)."""
        self.app_url, self.read_weights, self.on_weights = app_url, read_weights, on_weights
        self.version = version
        # Document versions in microseconds since the epoch, as the app's own; ids unique per session.
        self.first_seq, self.tag = time.time_ns() // 1_000, uuid.uuid4().hex[:8]
        self.rng, self.pause = random.Random(seed), pause
        self.record, self._stop = TrafficRecord(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self.session = requests.Session()
        token = token or _writer_token()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def __enter__(self) -> TrafficRecord:
        self._thread.start()
        return self.record

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            weights = self.read_weights()
            if not self.record.weights_seen or self.record.weights_seen[-1] != weights:
                self.record.weights_seen.append(dict(weights))
                self.record.weights_at.append(time.time())
                if self.on_weights:
                    self.on_weights(weights)
            try:
                self._write(n) if n % 5 == 0 else self._search(n)
            except Exception as exc:  # a transport failure is a failed request too
                self.record.failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(self.pause)

    def _send(self, method: str, path: str, **request) -> requests.Response:
        """One request as a well-behaved client sends it: a 503 with ``Retry-After`` (a generator or
        store that did not answer in time) is sent again after that delay, at most RETRIES_ON_503
        times. Writes carry their version, so a retried write is idempotent. Only a request that
        still fails counts as a failure; the retries are recorded."""
        for _ in range(RETRIES_ON_503):
            reply = self.session.request(method, f"{self.app_url}{path}", timeout=10, **request)
            if reply.status_code != 503 or "Retry-After" not in reply.headers or self._stop.is_set():
                return reply
            self.record.retried.append(f"{method} {path}: {reply.text[:200]}")
            time.sleep(min(float(reply.headers["Retry-After"]), 5.0))
        return self.session.request(method, f"{self.app_url}{path}", timeout=10, **request)

    def _search(self, n: int) -> None:
        query = self.rng.choice(QUERIES)
        user = f"user-{n % 50}"
        headers = {"x-user-id": user, **({"x-model-version": self.version} if self.version else {})}
        reply = self._send("POST", "/search", json={"query": query, "k": 3}, headers=headers)
        if reply.status_code != 200:
            self.record.failures.append(f"search {reply.status_code}: {reply.text[:200]}")
            return
        body = reply.json()
        if body["model_version"] != reply.headers.get("x-model-version"):
            self.record.failures.append(f"header {reply.headers.get('x-model-version')} != body {body['model_version']}")
        top = body["results"][0] if body["results"] else None
        self.record.responses.append({"at": time.monotonic() - self.record.started, "user": user,
                                      "version": body["model_version"], "query": query, "top": top})

    def _write(self, n: int) -> None:
        seq = self.first_seq + n  # newer than any earlier session's writes, as real updates are
        if n % 15 == 0 and self.record.written:
            doc_id = self.rng.choice(sorted(self.record.written))
            reply = self._send("DELETE", f"/documents/{doc_id}", params={"version": seq})
            if reply.status_code == 200:
                self.record.written.pop(doc_id)
                self.record.deleted[doc_id] = seq
        else:
            doc_id = f"stream-{self.tag}-{n}"
            reply = self._send("PUT", f"/documents/{doc_id}", json={
                "title": f"Streaming update {n}", "text": f"Live change number {n} during the rollout.",
                "category": "Library", "date": "2024-06-01", "version": seq})
            if reply.status_code == 200:
                self.record.written[doc_id] = seq
        if reply.status_code != 200:
            self.record.failures.append(f"write {reply.status_code}: {reply.text[:200]}")
        elif reply.json().get("missed"):
            self.record.missed[doc_id] = sorted(reply.json()["missed"])


def verify_consistency(record: TrafficRecord, model_dir, sample: int = 40) -> tuple[int, list[str]]:
    """Recompute sampled answers with the SavedModel of the version each one reports: the top hit's
    score must be the cosine of that version's query and document vectors (a mix of versions, e.g.
    a v2 query vector against v1's index, cannot produce it). Returns (checked, mismatches)."""
    import numpy as np

    from .domain.versions import parse_version
    from .model.training import saved_model_embedder
    from .pipeline.indexing import embedding_text

    embedders, checked, mismatches = {}, 0, []
    answered = [r for r in record.responses if r["top"] is not None]
    for response in answered[:: max(1, len(answered) // sample)]:
        version, top = response["version"], response["top"]
        if version not in embedders:
            embedders[version] = saved_model_embedder(model_dir / str(parse_version(version)))
        vectors = embedders[version]([response["query"], embedding_text(top["fields"])])
        if abs(float(np.dot(vectors[0], vectors[1])) - top["score"]) > 2e-3:
            mismatches.append(f"{version}: {response['query']!r} -> {top['id']} score {top['score']}")
        checked += 1
    return checked, mismatches
