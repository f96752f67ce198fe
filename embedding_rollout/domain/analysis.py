"""Canary analysis: compare the new version's online metrics with the stable version's.

Works on two snapshots of the app's Prometheus metrics (the start and the end of a ramp step):
per version, the requests, the failures (5xx answers, plus requests that fell back to the stable
version because the new version's generator failed) and the latency histogram. Verdicts follow Argo
Rollouts: Successful, Failed, or Inconclusive (too few requests to judge).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

SUCCESSFUL, FAILED, INCONCLUSIVE = "Successful", "Failed", "Inconclusive"


@dataclass
class VersionMetrics:
    requests: float = 0.0
    failures: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count

    def minus(self, earlier: "VersionMetrics") -> "VersionMetrics":
        return VersionMetrics(self.requests - earlier.requests, self.failures - earlier.failures,
                              {le: c - earlier.buckets.get(le, 0.0) for le, c in self.buckets.items()})

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float:
        """Histogram quantile, as PromQL's histogram_quantile (linear within the bucket)."""
        bounds = sorted(self.buckets)
        if not bounds or self.buckets[bounds[-1]] <= 0:
            return math.nan
        rank, lower, below = q * self.buckets[bounds[-1]], 0.0, 0.0
        for upper in bounds:
            count = self.buckets[upper]
            if count >= rank:
                if math.isinf(upper):
                    return lower
                return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
            lower, below = upper, count
        return bounds[-1]


def parse_metrics(text: str, endpoint: str = "search") -> dict[str, VersionMetrics]:
    """Per model version metrics of one endpoint from the app's /metrics text."""
    versions: dict[str, VersionMetrics] = defaultdict(VersionMetrics)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "embedding_app_requests_total" and labels.get("endpoint") == endpoint:
                entry = versions[labels["model_version"]]
                entry.requests += sample.value
                if labels.get("status", "").startswith("5"):
                    entry.failures += sample.value
            elif sample.name == "embedding_app_fallbacks_total":
                # Served by the stable version because this one's generator failed: a failure of
                # this version (and counted as a request of it, not only of the stable one).
                entry = versions[labels["from_version"]]
                entry.requests += sample.value
                entry.failures += sample.value
            elif (sample.name == "embedding_app_request_seconds_bucket" and labels.get("endpoint") == endpoint):
                buckets = versions[labels["model_version"]].buckets
                bound = float(labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return dict(versions)


def window(before: dict[str, VersionMetrics], after: dict[str, VersionMetrics]) -> dict[str, VersionMetrics]:
    return {v: m.minus(before.get(v, VersionMetrics())) for v, m in after.items()}


@dataclass(frozen=True)
class Thresholds:
    max_error_rate: float = 0.05
    max_p99_ratio: float = 2.0
    min_requests: int = 20
    min_p99_seconds: float = 0.05  # below this the ratio is noise, not a regression


@dataclass(frozen=True)
class Verdict:
    status: str
    reason: str
    new: dict
    stable: dict


def judge(metrics: dict[str, VersionMetrics], new: str, stable: str, limits: Thresholds) -> Verdict:
    """Failed on too many errors or a p99 too slow relative to stable; Inconclusive on too little traffic."""
    candidate, baseline = metrics.get(new, VersionMetrics()), metrics.get(stable, VersionMetrics())
    summary = lambda m: {"requests": m.requests, "error_rate": round(m.error_rate, 4),  # noqa: E731
                         "p99_seconds": None if math.isnan(m.quantile(0.99)) else round(m.quantile(0.99), 4)}
    report = lambda status, reason: Verdict(status, reason, summary(candidate), summary(baseline))  # noqa: E731
    if candidate.requests < limits.min_requests:
        return report(INCONCLUSIVE, f"{new} served {candidate.requests:.0f} requests, fewer than {limits.min_requests}")
    if candidate.error_rate > limits.max_error_rate:
        return report(FAILED, f"{new} error rate {candidate.error_rate:.1%} > {limits.max_error_rate:.1%}")
    new_p99, stable_p99 = candidate.quantile(0.99), baseline.quantile(0.99)
    if not math.isnan(new_p99) and not math.isnan(stable_p99) and new_p99 > limits.min_p99_seconds:
        if new_p99 > limits.max_p99_ratio * stable_p99:
            return report(FAILED, f"{new} p99 {new_p99 * 1000:.0f} ms > {limits.max_p99_ratio} x "
                                  f"{stable} p99 {stable_p99 * 1000:.0f} ms")
    return report(SUCCESSFUL, f"{new}: error rate {candidate.error_rate:.1%}, p99 within limits")
