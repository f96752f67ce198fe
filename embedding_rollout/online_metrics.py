"""Where a rollout's online metrics come from: one app's ``/metrics``, or Prometheus.

A ramp step or an A/B experiment takes a ``mark()`` when its window starts (JSON, kept in XCom
between pokes) and later asks for the window ``since(mark)``: per version, the requests, failures and
latency histogram (:class:`~embedding_rollout.domain.analysis.VersionMetrics`) and the click-through.

- :class:`AppScrape` (local runtime, one app): two scrapes of ``/metrics``, the difference.
- :class:`PrometheusQuery` (a cluster with several app pods): ``increase()`` over the window, summed
  over every pod Prometheus scrapes; a pod restarted or added meanwhile is counted right (counter
  resets), which two scrapes through a Service cannot do (each would see one pod).
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import requests

from .domain.analysis import MISSES, VersionMetrics, click_through, parse_metrics, window

ENDPOINT = "search"


@dataclass(frozen=True)
class Window:
    versions: dict[str, VersionMetrics]
    clicks: dict[str, tuple[float, float]]  # version -> (clicks, impressions)


class MetricsUnavailable(RuntimeError):
    """The metrics could not be read (a transient failure of the source, not of a version)."""


class MetricsSource(Protocol):
    def mark(self) -> dict: ...

    def since(self, mark: dict) -> Window: ...


class AppScrape:
    def __init__(self, app_url: str, timeout: float = 5.0):
        self.url, self.timeout = f"{app_url.rstrip('/')}/metrics", timeout

    def _scrape(self) -> str:
        try:
            reply = requests.get(self.url, timeout=self.timeout)
            reply.raise_for_status()
        except requests.RequestException as exc:
            raise MetricsUnavailable(f"GET {self.url}: {exc}") from exc
        return reply.text

    def mark(self) -> dict:
        return {"at": time.time(), "metrics": self._scrape()}

    def since(self, mark: dict) -> Window:
        text = self._scrape()
        before, now = click_through(mark["metrics"]), click_through(text)
        clicks = {v: (c - before.get(v, (0, 0))[0], n - before.get(v, (0, 0))[1]) for v, (c, n) in now.items()}
        return Window(window(parse_metrics(mark["metrics"]), parse_metrics(text)), clicks)


class PrometheusError(MetricsUnavailable):
    pass


class PrometheusQuery:
    """PromQL over Prometheus's HTTP API; ``selector`` narrows the series (e.g. ``namespace="embeddings"``).

    increase() sees only the samples inside its range, so the range reaches one scrape interval
    before the mark: the last sample before the window starts is in it, and the traffic between that
    sample and the first one after the mark is counted (at the price of at most one interval of
    traffic from before the mark).
    """

    def __init__(self, url: str, selector: str = "", scrape_interval: float = 15.0, timeout: float = 10.0):
        self.url, self.selector, self.timeout = url.rstrip("/"), selector.strip(" {},"), timeout
        self.scrape_interval = scrape_interval

    def _query(self, promql: str) -> list[tuple[dict, float]]:
        try:
            reply = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise PrometheusError(f"{promql}: {exc}") from exc
        body = reply.json() if reply.headers.get("content-type", "").startswith("application/json") else {}
        if reply.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"{promql}: {reply.status_code} {body.get('error') or reply.text[:200]}")
        return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]

    def _increase(self, metric: str, by: str, seconds: int, endpoint: bool = True) -> list[tuple[dict, float]]:
        matchers = ",".join(m for m in (f'endpoint="{ENDPOINT}"' if endpoint else "", self.selector) if m)
        return self._query(f"sum by ({by}) (increase({metric}{{{matchers}}}[{seconds}s]))")

    def mark(self) -> dict:
        return {"at": time.time()}

    def since(self, mark: dict) -> Window:
        seconds = math.ceil(time.time() - float(mark["at"]) + self.scrape_interval)
        versions: dict[str, VersionMetrics] = defaultdict(VersionMetrics)
        for labels, value in self._increase("embedding_app_requests_total", "model_version, status", seconds):
            entry = versions[labels["model_version"]]
            entry.requests += value
            if labels.get("status", "").startswith("5"):
                entry.failures += value
        # Failures of a version the stable one absorbed (fallbacks, missed writes): failed requests of it.
        for metric, label in MISSES.items():
            for labels, value in self._increase(metric, label, seconds, endpoint=False):
                entry = versions[labels[label]]
                entry.requests += value
                entry.failures += value
        for labels, value in self._increase("embedding_app_request_seconds_bucket", "model_version, le", seconds):
            buckets = versions[labels["model_version"]].buckets
            buckets[float(labels["le"])] = value
        clicks: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for labels, value in self._increase("embedding_app_feedback_total", "model_version, clicked", seconds,
                                            endpoint=False):
            clicks[labels["model_version"]][1] += value
            if labels.get("clicked") == "true":
                clicks[labels["model_version"]][0] += value
        return Window(dict(versions), {v: (c, n) for v, (c, n) in clicks.items()})


def metrics_source(app_url: str, prometheus_url: str | None = None, selector: str = "",
                   scrape_interval: float = 15.0) -> MetricsSource:
    return PrometheusQuery(prometheus_url, selector, scrape_interval) if prometheus_url else AppScrape(app_url)
