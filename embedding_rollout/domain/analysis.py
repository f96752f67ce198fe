"""Canary analysis: compare the new version's online metrics with the stable version's.

Works on two snapshots of the app's Prometheus metrics (the start and the end of a ramp step):
per version, the requests, the failures (5xx answers, plus requests that fell back to the stable
version because the new version's generator failed) and the latency histogram. Verdicts follow Argo
Rollouts: Successful, Failed, or Inconclusive (too few requests to judge).
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

SUCCESSFUL, FAILED, INCONCLUSIVE = "Successful", "Failed", "Inconclusive"
# Counters of a version's failures the stable version absorbed, and the label naming that version.
MISSES = {"embedding_app_fallbacks_total": "from_version", "embedding_app_write_misses_total": "model_version"}


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
            elif sample.name in MISSES:
                # Served by the stable version because this one's generator failed, or a write this
                # version missed: a failure of this version (and counted as a request of it).
                entry = versions[labels[MISSES[sample.name]]]
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
    min_requests: int = 20        # on each version that should get traffic, before anything is judged
    min_requests_p99: int = 100   # on each version before their p99s are compared: fewer is noise
    min_p99_seconds: float = 0.05  # below this the ratio is noise, not a regression

    @classmethod
    def from_conf(cls, values: dict | None) -> "Thresholds":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(values or {}).items() if k in known and v is not None})


@dataclass(frozen=True)
class Verdict:
    status: str
    reason: str
    new: dict
    stable: dict

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _summary(m: VersionMetrics) -> dict:
    p99 = m.quantile(0.99)
    return {"requests": m.requests, "failures": m.failures, "error_rate": round(m.error_rate, 4),
            "p99_seconds": None if math.isnan(p99) else round(p99, 4)}


def judge(metrics: dict[str, VersionMetrics], new: str, stable: str, limits: Thresholds,
          stable_weight: int | None = None) -> Verdict:
    """Argo's three outcomes for one analysis window.

    Inconclusive while either version that should get traffic (``stable_weight`` > 0, or unknown)
    has fewer than ``min_requests`` requests: nothing is judged on too small a sample. Failed when
    the new version's error rate (every 5xx it answered, every request or write another version had
    to take for it) exceeds the limit, or, once both versions have ``min_requests_p99`` requests,
    when its p99 exceeds ``max_p99_ratio`` times the stable version's. Otherwise Successful.
    """
    candidate, baseline = metrics.get(new, VersionMetrics()), metrics.get(stable, VersionMetrics())

    def report(status: str, reason: str) -> Verdict:
        return Verdict(status, reason, _summary(candidate), _summary(baseline))

    if candidate.requests < limits.min_requests:
        return report(INCONCLUSIVE, f"{new} served {candidate.requests:.0f} requests, fewer than "
                                    f"{limits.min_requests}")
    compared = stable_weight is None or stable_weight > 0  # at 100 % the stable version has no traffic
    if compared and baseline.requests < limits.min_requests:
        return report(INCONCLUSIVE, f"{stable} (the baseline) served {baseline.requests:.0f} requests, fewer "
                                    f"than {limits.min_requests}")
    if candidate.error_rate > limits.max_error_rate:
        return report(FAILED, f"{new} error rate {candidate.error_rate:.1%} > {limits.max_error_rate:.1%} "
                              f"({candidate.failures:.0f} of {candidate.requests:.0f})")
    latency = "p99 not compared: the stable version takes no traffic"
    if compared:
        latency = (f"p99 not compared: fewer than {limits.min_requests_p99} requests on "
                   f"{new} ({candidate.requests:.0f}) or {stable} ({baseline.requests:.0f})")
        if min(candidate.requests, baseline.requests) >= limits.min_requests_p99:
            new_p99, stable_p99 = candidate.quantile(0.99), baseline.quantile(0.99)
            slower = new_p99 > limits.min_p99_seconds and new_p99 > limits.max_p99_ratio * stable_p99
            if slower:
                return report(FAILED, f"{new} p99 {new_p99 * 1000:.0f} ms > {limits.max_p99_ratio} x "
                                      f"{stable} p99 {stable_p99 * 1000:.0f} ms")
            latency = f"p99 {new_p99 * 1000:.0f} ms vs {stable_p99 * 1000:.0f} ms within {limits.max_p99_ratio} x"
    return report(SUCCESSFUL, f"{new} error rate {candidate.error_rate:.1%} within {limits.max_error_rate:.1%}; "
                              f"{latency}")


def click_through(text: str) -> dict[str, tuple[float, float]]:
    """(clicks, impressions) per model version from the feedback counter of /metrics."""
    counts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "embedding_app_feedback_total":
                entry = counts[sample.labels["model_version"]]
                entry[1] += sample.value
                if sample.labels.get("clicked") == "true":
                    entry[0] += sample.value
    return {v: (c[0], c[1]) for v, c in counts.items()}


def two_proportion_p_value(clicks_a: float, n_a: float, clicks_b: float, n_b: float) -> float:
    """One-sided p-value that A's rate is lower than B's (pooled two-proportion z-test)."""
    if n_a == 0 or n_b == 0:
        return 1.0
    pooled = (clicks_a + clicks_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if spread == 0:
        return 1.0 if clicks_a / n_a >= clicks_b / n_b else 0.0
    z = (clicks_a / n_a - clicks_b / n_b) / spread
    return 0.5 * math.erfc(-z / math.sqrt(2))  # P(Z <= z)


def automatic_decision(metrics: dict[str, VersionMetrics], ctr: dict[str, tuple[float, float]], new: str,
                       stable: str, limits: Thresholds, min_feedback: int = 50, alpha: float = 0.05) -> tuple[str | None, str]:
    """``promote``, ``rollback`` or None (keep waiting), with the reason.

    Rollback when the online analysis fails or the new version's click-through is significantly
    lower than the stable one's; promote once both have enough feedback and it is not.
    """
    verdict = judge(metrics, new, stable, limits)
    if verdict.status == FAILED:
        return "rollback", verdict.reason
    (new_clicks, new_n), (old_clicks, old_n) = ctr.get(new, (0.0, 0.0)), ctr.get(stable, (0.0, 0.0))
    if verdict.status == INCONCLUSIVE or min(new_n, old_n) < min_feedback:
        return None, f"waiting for traffic: {verdict.reason}; feedback {new}={new_n:.0f}, {stable}={old_n:.0f}"
    p_worse = two_proportion_p_value(new_clicks, new_n, old_clicks, old_n)
    rates = f"CTR {new} {new_clicks / new_n:.1%} vs {stable} {old_clicks / old_n:.1%}, p={p_worse:.3f}"
    if p_worse < alpha:
        return "rollback", f"{new} is significantly worse: {rates}"
    return "promote", f"{new} is not worse: {rates}; {verdict.reason}"
