"""Canary analysis and A/B statistics on real Prometheus text from the app's metrics."""
from __future__ import annotations

import math

from prometheus_client import generate_latest

from embedding_rollout.domain.analysis import (FAILED, INCONCLUSIVE, SUCCESSFUL, Thresholds, automatic_decision,
                                               click_through, judge, parse_metrics, two_proportion_p_value, window)
from embedding_rollout.domain.decisions import InvalidDecision
from embedding_rollout.statestore import DecisionLog
from serving_app.metrics import AppMetrics


def traffic(metrics: AppMetrics, version: str, ok: int, failed: int, seconds: float, fallbacks: int = 0) -> None:
    for _ in range(ok):
        metrics.requests.labels(endpoint="search", model_version=version, status="200").inc()
        metrics.latency.labels(endpoint="search", model_version=version).observe(seconds)
    for _ in range(failed):
        metrics.requests.labels(endpoint="search", model_version=version, status="503").inc()
    if fallbacks:
        metrics.fallbacks.labels(from_version=version, to_version="v1").inc(fallbacks)


def snapshot(metrics: AppMetrics):
    return parse_metrics(generate_latest(metrics.registry).decode())


def test_window_and_verdicts():
    metrics = AppMetrics()
    traffic(metrics, "v1", 500, 0, 0.02)
    before = snapshot(metrics)
    traffic(metrics, "v1", 100, 0, 0.02)
    traffic(metrics, "v2", 100, 1, 0.03)
    current = window(before, snapshot(metrics))
    assert current["v1"].requests == 100 and current["v2"].requests == 101
    assert math.isclose(current["v2"].error_rate, 1 / 101)
    assert 0.025 <= current["v2"].quantile(0.99) <= 0.05
    assert judge(current, "v2", "v1", Thresholds()).status == SUCCESSFUL
    assert judge(current, "v2", "v1", Thresholds(min_requests=500)).status == INCONCLUSIVE


def test_errors_and_fallbacks_fail_the_analysis():
    metrics = AppMetrics()
    traffic(metrics, "v1", 100, 0, 0.02)
    traffic(metrics, "v2", 10, 0, 0.02, fallbacks=40)
    verdict = judge(snapshot(metrics), "v2", "v1", Thresholds())
    assert verdict.status == FAILED and "error rate 80.0%" in verdict.reason


def test_slow_p99_fails_the_analysis():
    metrics = AppMetrics()
    traffic(metrics, "v1", 200, 0, 0.02)
    traffic(metrics, "v2", 200, 0, 0.4)
    verdict = judge(snapshot(metrics), "v2", "v1", Thresholds(max_p99_ratio=2.0))
    assert verdict.status == FAILED and "p99" in verdict.reason


def test_the_baseline_needs_a_minimum_sample_too():
    """A p99 over 3 stable requests is noise: nothing is compared (the run that saw 775 ms vs 100 ms)."""
    metrics = AppMetrics()
    traffic(metrics, "v1", 3, 0, 0.1)
    traffic(metrics, "v2", 200, 0, 0.775)
    verdict = judge(snapshot(metrics), "v2", "v1", Thresholds())
    assert verdict.status == INCONCLUSIVE and "v1 (the baseline) served 3 requests" in verdict.reason
    # At 100 % the stable version gets no traffic by design: only the new version's own errors count.
    assert judge(snapshot(metrics), "v2", "v1", Thresholds(), stable_weight=0).status == SUCCESSFUL


def test_p99_is_compared_only_with_enough_requests_on_both_sides():
    metrics = AppMetrics()
    traffic(metrics, "v1", 60, 0, 0.02)
    traffic(metrics, "v2", 60, 0, 0.4)
    few = judge(snapshot(metrics), "v2", "v1", Thresholds(min_requests_p99=100))
    assert few.status == SUCCESSFUL and "p99 not compared" in few.reason
    assert judge(snapshot(metrics), "v2", "v1", Thresholds(min_requests_p99=50)).status == FAILED


def test_a_new_version_with_no_traffic_is_inconclusive_never_successful():
    metrics = AppMetrics()
    traffic(metrics, "v1", 500, 0, 0.02)
    verdict = judge(snapshot(metrics), "v2", "v1", Thresholds())
    assert verdict.status == INCONCLUSIVE and "v2 served 0 requests" in verdict.reason


def test_thresholds_from_a_dag_conf_ignore_unknown_and_empty_keys():
    limits = Thresholds.from_conf({"max_error_rate": 0.1, "min_requests": None, "step_percent": 25})
    assert limits == Thresholds(max_error_rate=0.1)


def test_two_proportion_test():
    assert two_proportion_p_value(30, 1000, 60, 1000) < 0.01      # clearly worse
    assert two_proportion_p_value(60, 1000, 30, 1000) > 0.99      # clearly better
    assert 0.2 < two_proportion_p_value(50, 1000, 52, 1000) < 0.5  # no evidence either way
    assert two_proportion_p_value(0, 0, 5, 10) == 1.0


def test_automatic_decision_from_metrics_and_click_through():
    metrics = AppMetrics()
    traffic(metrics, "v1", 300, 0, 0.02)
    traffic(metrics, "v2", 300, 0, 0.02)
    for version, clicks, shown in (("v1", 60, 300), ("v2", 20, 300)):
        metrics.feedback.labels(model_version=version, clicked="true").inc(clicks)
        metrics.feedback.labels(model_version=version, clicked="false").inc(shown - clicks)
    text = generate_latest(metrics.registry).decode()
    assert click_through(text) == {"v1": (60.0, 300.0), "v2": (20.0, 300.0)}
    decision, reason = automatic_decision(parse_metrics(text), click_through(text), "v2", "v1", Thresholds())
    assert decision == "rollback" and "significantly worse" in reason
    fair = {"v1": (60.0, 300.0), "v2": (64.0, 300.0)}
    assert automatic_decision(parse_metrics(text), fair, "v2", "v1", Thresholds())[0] == "promote"
    assert automatic_decision(parse_metrics(text), {"v1": (5, 10), "v2": (5, 10)}, "v2", "v1", Thresholds())[0] is None


def test_decision_log(tmp_path):
    log = DecisionLog(tmp_path / "decisions.jsonl")
    first = log.append("v2", "set_weights", 30, by="alice")
    second = log.append("v2", "promote")
    log.append("v3", "rollback")
    assert (first.id, second.id) == (1, 2) and [d.action for d in log.read("v2")] == ["set_weights", "promote"]
    assert second.terminal and not first.terminal
    for bad in (("v2", "launch", None), ("v2", "set_weights", None), ("v2", "set_weights", 120)):
        try:
            log.append(*bad)
        except InvalidDecision:
            continue
        raise AssertionError(f"accepted {bad}")
