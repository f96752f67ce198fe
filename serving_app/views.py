"""Thin HTTP views: parse, pick the version, call the service, shape the response."""
from __future__ import annotations

import logging
import time
from functools import wraps
from pathlib import Path

from dataclasses import asdict

from flask import Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from embedding_rollout.domain.decisions import InvalidDecision
from embedding_rollout.feedback import AlreadyCounted, InvalidReference
from embedding_rollout.domain.rollout import RolloutError
from embedding_rollout.domain.state import StateError
from embedding_rollout.domain.traffic import InvalidWeights
from embedding_rollout.model.repository import ModelNotFound, catalogue, find
from embedding_rollout.pipeline.indexing import Checkpoint
from embedding_rollout.service import serving_versions
from embedding_rollout.statestore import checkpoint_slot
from embedding_rollout.generator.client import VERSION_HEADER, GeneratorError, GeneratorUnavailable
from embedding_rollout.store.base import Filters, IndexNotFound, InvalidDocument, InvalidFilter, StoreUnavailable

from .security import caller

log = logging.getLogger(__name__)
USER_HEADER, USER_COOKIE = "x-user-id", "uid"
JSON = {"Content-Type": "application/json"}  # operations also declare problem+json: say which


def _ctx():
    return current_app.extensions["embedding_rollout"]


def problem(status: int, title: str, detail: str, headers: dict | None = None):
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return body, status, {"Content-Type": "application/problem+json", **(headers or {})}


_FAILURES = [  # (exception, status, title): what a client can do about it decides the status
    (InvalidFilter, 400, "Bad Request"),
    (InvalidDocument, 400, "Bad Request"),
    (GeneratorUnavailable, 503, "Generator Unavailable"),
    (GeneratorError, 503, "Generator Error"),
    (StoreUnavailable, 503, "Store Unavailable"),
    (IndexNotFound, 503, "Index Unavailable"),
    (StateError, 503, "No Live Version"),
]


def observed(endpoint: str):
    """Record requests, errors and latency by model version; map failures to problem responses."""
    def decorate(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            metrics, started = _ctx().metrics, time.perf_counter()
            labels = {"endpoint": endpoint, "model_version": "none"}
            try:
                body, status, headers = view(labels, *args, **kwargs)
            except tuple(e for e, _, _ in _FAILURES) as exc:
                status, title = next((s, t) for e, s, t in _FAILURES if isinstance(exc, e))
                metrics.errors.labels(cause=type(exc).__name__, **labels).inc()
                busy = {"Retry-After": "1"} if status == 503 else None  # the same versioned write may be sent again
                body, status, headers = problem(status, title, str(exc), busy)
            except Exception as exc:  # a bug: still a 5xx of this version, so the analysis sees it
                log.exception("%s failed unexpectedly (model version %s)", endpoint, labels["model_version"])
                metrics.errors.labels(cause=type(exc).__name__, **labels).inc()
                body, status, headers = problem(500, "Internal Server Error", f"unexpected {type(exc).__name__}")
            metrics.requests.labels(status=str(status), **labels).inc()
            metrics.latency.labels(**labels).observe(time.perf_counter() - started)
            return body, status, headers
        return wrapper
    return decorate


@observed("search")
def search(labels: dict, body: dict):
    ctx = _ctx()
    state = ctx.service.state()
    ctx.metrics.prepare(state)
    user_key = request.headers.get(USER_HEADER) or request.cookies.get(USER_COOKIE)
    version = state.assign(request.headers.get(VERSION_HEADER), user_key)
    labels["model_version"] = version
    filters = Filters.from_dict(body.get("filters"))
    result = ctx.service.search(version, body["query"], body.get("k", 10), filters)
    if result.fallback_from:
        ctx.metrics.fallbacks.labels(from_version=result.fallback_from, to_version=result.model_version).inc()
        labels["model_version"] = result.model_version
    payload = {"model_version": result.model_version,
               "feedback_ref": ctx.references.issue(result.model_version, user_key),
               "results": [{"id": h.id, "score": round(h.score, 6), "fields": dict(h.fields)} for h in result.hits]}
    # Server-Timing (W3C): where the time went, readable in browsers' dev tools and benchmarks.
    timing = ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in result.timings.items())
    return payload, 200, {**JSON, VERSION_HEADER: result.model_version, "Server-Timing": timing}


def _written(result) -> tuple[dict, int, dict]:
    metrics = _ctx().metrics
    for version in result.missed:
        metrics.write_misses.labels(model_version=version).inc()
    return {"id": result.id, "version": result.seq, "applied": result.applied, "missed": result.missed}, 200, JSON


@observed("put_document")
def put_document(labels: dict, doc_id: str, body: dict):
    fields = {k: body[k] for k in ("title", "text", "category", "date")}
    return _written(_ctx().service.put_document(doc_id, fields, body.get("version")))


@observed("delete_document")
def delete_document(labels: dict, doc_id: str, version: int | None = None):
    return _written(_ctx().service.delete_document(doc_id, version))


def feedback(body: dict):
    ctx = _ctx()
    try:
        reference = ctx.references.verify(body["ref"])
    except InvalidReference as exc:
        return problem(400, "Bad Request", str(exc))
    if reference.version not in ctx.service.state().versions:
        return problem(409, "Conflict", f"model version {reference.version}, which served that search, "
                                        "is no longer deployed")
    try:
        ctx.ledger.count_once(reference)
    except AlreadyCounted as exc:
        return problem(409, "Conflict", str(exc))
    except Exception as exc:  # the ledger's store: say so, and the client may send it again
        log.warning("feedback not counted, its ledger failed: %s", exc)
        return problem(503, "Ledger Unavailable", f"feedback not counted: {type(exc).__name__}", {"Retry-After": "1"})
    ctx.metrics.feedback.labels(model_version=reference.version, clicked=str(body["clicked"]).lower()).inc()
    return None, 204


def list_decisions(new_version: str | None = None):
    return [asdict(d) for d in _ctx().decisions.read(new_version)], 200, JSON


def post_decision(body: dict):
    by = body.get("by") or (caller().name if caller() else "")  # who sent it, unless they say on whose behalf
    try:
        decision = _ctx().decisions.append(body["new_version"], body["action"], body.get("weight"), by)
    except InvalidDecision as exc:
        return problem(400, "Bad Request", str(exc))
    return asdict(decision), 201, JSON


def deployment():
    return _ctx().service.state().to_json(), 200, JSON


def set_weights(body: dict):
    guard = body.get("rollout") or {}
    try:
        state = _ctx().service.set_weights(body["weights"], guard.get("run_id"), guard.get("step"))
    except InvalidWeights as exc:
        return problem(400, "Bad Request", str(exc))
    except (StateError, RolloutError) as exc:
        return problem(409, "Conflict", str(exc))
    return state.to_json(), 200, JSON


def get_rollout():
    rollout = _ctx().service.state().rollout
    if rollout is None:
        return problem(404, "Not Found", "no rollout has begun on this deployment")
    return rollout.to_json(), 200, JSON


def change_rollout(body: dict):
    arguments = {k: body[k] for k in ("step", "reason", "by", "rollout") if k in body}
    try:
        state = _ctx().service.change_rollout(body["transition"], body["run_id"], **arguments)
    except (StateError, RolloutError) as exc:
        return problem(409, "Conflict", str(exc))
    return state.to_json(), 200, JSON


def backfill_checkpoint(version: str, source: str):
    ctx = _ctx()
    state = ctx.service.state()
    if version not in state.versions:
        return problem(404, "Not Found", f"model version {version} is not deployed")
    slot = checkpoint_slot(ctx.settings, version, source, state=ctx.service.state_file)
    checkpoint = Checkpoint.load(slot, state.versions[version].index)
    return asdict(checkpoint), 200, JSON


def index_size(version: str):
    ctx = _ctx()
    state = ctx.service.state()
    if version not in state.versions:
        return problem(404, "Not Found", f"model version {version} is not deployed")
    index = state.versions[version].index
    try:
        documents = ctx.service.store.count(index)
    except (StoreUnavailable, IndexNotFound) as exc:
        return problem(503, "Store Unavailable", str(exc), {"Retry-After": "1"})
    return {"version": version, "index": index, "documents": documents}, 200, JSON


def list_models():
    return catalogue(_ctx().settings.model_dir), 200, JSON


def get_model(version: str, artifact: str | None = None):
    settings = _ctx().settings
    try:
        folder = None if artifact is None else Path(artifact).resolve()
    except (ValueError, OSError) as exc:  # a NUL byte, a name the filesystem refuses
        return problem(400, "Bad Request", f"artifact {artifact!r} is not a usable path: {exc}")
    # Only what the step pods see too: the shared volumes, not the app's own filesystem.
    if folder and not any(folder.is_relative_to(root.resolve()) for root in (settings.model_base, settings.home)):
        return problem(400, "Bad Request", f"artifact {artifact} is not on a shared volume "
                                           f"({settings.model_base} or {settings.home})")
    try:
        return find(settings.model_dir, version, folder), 200, JSON
    except ModelNotFound as exc:
        return problem(404, "Not Found", str(exc))


def healthz():
    return {"status": "ok"}, 200


def readyz():
    ctx = _ctx()
    state = ctx.service.state()
    report, serving = ctx.service.readiness(state), serving_versions(state)
    ctx.metrics.record_readiness(report)
    ready = bool(serving) and all(report[v]["ready"] for v in serving)
    if not report:
        report = {"deployment": {"error": "no live model version"}}
    return {"ready": ready, "serving": serving, "versions": report}, 200 if ready else 503


def metrics():
    return Response(generate_latest(_ctx().metrics.registry), mimetype=CONTENT_TYPE_LATEST)
