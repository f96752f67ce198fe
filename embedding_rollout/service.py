"""The application's use cases over the adapters: search one version, write to every target.

A request's version decides both the generator and the index it uses, never a mix. Writes embed the
document with every write target's generator before writing anything, so a generator failure leaves
no partial state; a store failure part-way is safe to retry with the same document version.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .domain.state import DeploymentState, StateError, StateFile, VersionSpec
from .domain.traffic import validate_weights
from .generator.client import GeneratorError, GeneratorTarget, generator_client
from .pipeline.indexing import embedding_text
from .store.base import (Filters, Hit, IndexNotFound, InvalidDocument, StoredDocument, StoreUnavailable, VectorStore,
                         is_date)

log = logging.getLogger(__name__)


class NotReady(StateError):
    """A weight change would send more traffic to a version that cannot serve it."""


@dataclass(frozen=True)
class SearchResult:
    model_version: str
    hits: list[Hit]
    fallback_from: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent in the generator and the store


@dataclass(frozen=True)
class WriteResult:
    id: str
    seq: int
    applied: dict[str, bool]  # per write target: False when the index already held a newer version
    missed: dict[str, str] = field(default_factory=dict)  # candidate version -> why its write failed


def new_seq() -> int:
    """A document version for writes that bring none: microseconds since the epoch."""
    return time.time_ns() // 1_000


CLOCK_AHEAD_SECONDS = 60  # how far ahead of the server clock a caller's version may be


def checked_seq(seq: int | None) -> int:
    """The write's version: server time, or the caller's own if it is not ahead of the server clock
    (a version far in the future would freeze the document until then)."""
    now = new_seq()
    if seq is None:
        return now
    bound = now + CLOCK_AHEAD_SECONDS * 1_000_000
    if not 1 <= seq <= bound:
        raise InvalidDocument(f"version {seq} is outside 1..{bound}: versions are microseconds of server time, "
                              f"and may be ahead of the server clock by {CLOCK_AHEAD_SECONDS} s at most")
    return seq


class EmbeddingService:
    def __init__(self, state: StateFile, store: VectorStore, protocol: str = "grpc",
                 timeout: float = 2.0, client_factory: Callable | None = None):
        self.state_file = state
        self.store = store
        self.protocol = protocol
        self.timeout = timeout
        self._client_factory = client_factory or generator_client
        self._clients: dict[GeneratorTarget, object] = {}
        self._lock = threading.Lock()

    def state(self) -> DeploymentState:
        return self.state_file.read()

    def set_weights(self, weights: dict[str, int], run_id: str | None = None,
                    step: int | None = None) -> DeploymentState:
        """The router's split; the versions listed become the live ones. ``run_id`` (and ``step``):
        a rollout task's change, applied only while its rollout (and step) allows it."""
        weights = validate_weights(weights)
        self.state().with_weights(weights, run_id, step)  # the state's own refusals (phase, rollout) first
        self._refuse_raising_unready_candidates(weights)
        return self.state_file.update(lambda s: s.with_weights(weights, run_id, step))

    def _refuse_raising_unready_candidates(self, weights: dict[str, int]) -> None:
        """A candidate whose generator or index is not ready gets no more traffic than it has: in
        the cluster the mesh router asks the app before Istio, so neither sends it any. Lowering
        a weight, and all traffic to the stable version (a rollback), always go through."""
        state = self.state()
        rising = [v for v, w in sorted(weights.items())
                  if v != state.stable and v in state.versions and w > state.weights.get(v, 0)]
        store_problem = self._store_problem() if rising else None
        for version in rising:
            health = self._health(state.spec(version), store_problem)
            if not health["ready"]:
                raise NotReady(f"{version} is not ready (generator: {health['generator']}; index: "
                               f"{health['index']}): its weight may not rise above {state.weights.get(version, 0)} %")

    def change_rollout(self, transition: str, run_id: str, **arguments) -> DeploymentState:
        now = time.time()
        return self.state_file.update(lambda s: s.change_rollout(transition, run_id, now, **arguments))

    def generator(self, spec: VersionSpec):
        """A client per generator target; a changed address gets a new client (a new phase does not)."""
        target = GeneratorTarget(spec.name, spec.generator_grpc, spec.generator_rest, spec.model_name)
        with self._lock:
            client = self._clients.get(target)
            if client is None:
                client = self._client_factory(target, protocol=self.protocol, timeout=self.timeout)
                self._clients[target] = client
            return client

    # -- reads ---------------------------------------------------------------------------------
    def search(self, version: str, query: str, k: int, filters: Filters, allow_fallback: bool = True) -> SearchResult:
        state = self.state()
        try:
            hits, timings = self._search(state.spec(version), query, k, filters)
            return SearchResult(version, hits, timings=timings)
        except GeneratorError:
            stable = state.stable
            if not allow_fallback or stable is None or stable == version or not state.is_live(stable):
                raise
            log.warning("generator %s failed; serving the request wholly from stable %s", version, stable)
            hits, timings = self._search(state.spec(stable), query, k, filters)
            return SearchResult(stable, hits, fallback_from=version, timings=timings)

    def _search(self, spec: VersionSpec, query: str, k: int, filters: Filters) -> tuple[list[Hit], dict]:
        started = time.perf_counter()
        vector = self.generator(spec).embed([query])[0]
        embedded = time.perf_counter()
        hits = self.store.search(spec.index, vector, k, filters)
        return hits, {"generator": embedded - started, "store": time.perf_counter() - embedded}

    # -- writes --------------------------------------------------------------------------------
    # The primary write target (the stable version) must take the write, or the request fails and
    # nothing is written. A candidate's failure does not fail the live system's writes: it is
    # reported as missed, and `index repair` (run by the backfill and the promote steps) brings the
    # candidate's index up to date from the primary's before it can become stable.
    def put_document(self, doc_id: str, fields: dict, seq: int | None = None) -> WriteResult:
        if not is_date(fields.get("date")):
            raise InvalidDocument(f"date {fields.get('date')!r} is not a calendar date YYYY-MM-DD")
        seq = checked_seq(seq)
        text = embedding_text(fields)

        def write(spec: VersionSpec, seq: int) -> bool:
            vector = self.generator(spec).embed([text])[0]
            return self.store.upsert(spec.index, StoredDocument(doc_id, seq, fields, vector))
        return self._write_all(doc_id, seq, write)

    def delete_document(self, doc_id: str, seq: int | None = None) -> WriteResult:
        return self._write_all(doc_id, checked_seq(seq), lambda spec, seq: self.store.delete(spec.index, doc_id, seq))

    def _write_all(self, doc_id: str, seq: int, write: Callable[[VersionSpec, int], bool]) -> WriteResult:
        state = self.state()
        if not state.write_targets:
            raise StateError("no write target: the deployment has no version to write to")
        primary = state.stable if state.stable in state.write_targets else state.write_targets[0]
        result = WriteResult(doc_id, seq, {primary: write(state.spec(primary), seq)})
        for version in (v for v in state.write_targets if v != primary):
            try:
                result.applied[version] = write(state.spec(version), seq)
            except (GeneratorError, StoreUnavailable, IndexNotFound) as exc:
                log.warning("write of %s to candidate %s missed (%s); index repair will bring it", doc_id, version, exc)
                result.missed[version] = str(exc)
        return result

    # -- health --------------------------------------------------------------------------------
    def readiness(self, state: DeploymentState | None = None) -> dict[str, dict]:
        """Per live version: its generator's state, its index's, whether both are ready, and its
        role. Only the versions in ``serving_versions`` gate the app's readiness: a candidate
        that fails must not take the app, and with it the stable version, out of service."""
        state = state or self.state()
        store_problem = self._store_problem()
        return {version: {"role": "stable" if version == state.stable else "candidate",
                          **self._health(state.spec(version), store_problem)} for version in state.live_versions}

    def _store_problem(self) -> str | None:
        try:
            self.store.ready()
            return None
        except StoreUnavailable as exc:
            return str(exc)

    def _health(self, spec: VersionSpec, store_problem: str | None) -> dict:
        """The version's generator state, its index's, and whether both are ready."""
        entry: dict = {}
        try:
            entry["generator"] = self.generator(spec).status()
        except GeneratorError as exc:
            entry["generator"] = f"unavailable: {exc}"
        if store_problem:
            entry["index"] = f"unavailable: {store_problem}"
        else:
            try:
                entry["index"] = f"ready ({self.store.count(spec.index)} docs)"
            except Exception as exc:  # a missing index or an unreachable server: not ready
                entry["index"] = f"unavailable: {exc}"
        entry["ready"] = entry["generator"] == "AVAILABLE" and entry["index"].startswith("ready")
        return entry


def serving_versions(state: DeploymentState) -> list[str]:
    """The versions the app's readiness stands for: the stable one (a candidate's failure falls back
    to it), or before there is one, every live version that takes traffic."""
    if state.stable and state.is_live(state.stable):
        return [state.stable]
    return [v for v in state.live_versions if state.weights.get(v, 0) > 0]
