"""Prometheus metrics of the app, labelled by model version (one registry per app instance)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class AppMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("embedding_app_requests", "Requests served, by endpoint, model version and status",
                                ["endpoint", "model_version", "status"], registry=self.registry)
        self.errors = Counter("embedding_app_errors", "Failed requests, by endpoint, model version and cause",
                              ["endpoint", "model_version", "cause"], registry=self.registry)
        self.latency = Histogram("embedding_app_request_seconds", "Request latency, by endpoint and model version",
                                 ["endpoint", "model_version"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.fallbacks = Counter("embedding_app_fallbacks", "Requests served by the stable version after the "
                                 "assigned version's generator failed", ["from_version", "to_version"],
                                 registry=self.registry)
        self.feedback = Counter("embedding_app_feedback", "Result feedback (clicked or not), by model version",
                                ["model_version", "clicked"], registry=self.registry)
        self.write_misses = Counter("embedding_app_write_misses", "Writes a candidate version missed (its "
                                    "generator or index failed; the stable version took them)", ["model_version"],
                                    registry=self.registry)
        self.version_ready = Gauge("embedding_app_version_ready", "1 when the live version's generator and index "
                                   "are ready (as of the last /readyz), by role: stable or candidate",
                                   ["model_version", "role"], registry=self.registry)
        self._prepared: set[tuple[str, str | None]] = set()

    def record_readiness(self, report: dict[str, dict]) -> None:
        self.version_ready.clear()  # versions no longer live leave no series behind
        for version, entry in report.items():
            self.version_ready.labels(model_version=version, role=entry["role"]).set(1 if entry["ready"] else 0)

    def prepare(self, state) -> None:
        """Create a live version's series at 0 before its first request. Prometheus's increase()
        cannot count the first value of a series born inside its window, so a version whose
        traffic (or first errors) began within one scrape interval would be under-counted."""
        stable = state.stable
        for version in dict.fromkeys([*state.live_versions, *state.write_targets]):
            if (version, stable) in self._prepared:
                continue
            for status in ("200", "503"):
                self.requests.labels(endpoint="search", model_version=version, status=status)
            self.latency.labels(endpoint="search", model_version=version)
            for clicked in ("true", "false"):
                self.feedback.labels(model_version=version, clicked=clicked)
            if stable and stable != version:
                self.fallbacks.labels(from_version=version, to_version=stable)
                self.write_misses.labels(model_version=version)
            self._prepared.add((version, stable))
