"""The analysis's metrics from a real Prometheus scraping two real app servers ("two pods"): the
window counts both, where one scrape of /metrics through a Service would see one pod."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import requests

from conftest import serving, spec_for, verified
from embedding_rollout.domain.analysis import FAILED, Thresholds, judge
from embedding_rollout.domain.state import StateFile, VersionSpec
from embedding_rollout.online_metrics import AppScrape, PrometheusError, PrometheusQuery
from embedding_rollout.service import EmbeddingService
from serving_app import AppServer, create_app
from test_manifests import missing_tool

SCRAPE_SECONDS = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_pods(model_server, tmp_path):
    """Two app instances on one deployment state: v1 healthy, v2's generator down (it falls back)."""
    from embedding_rollout.store.lance import LanceStore
    store = LanceStore(str(tmp_path / "lance"))
    store.create_index("docs-v1", 32, {"model_version": "v1"})
    store.create_index("docs-v2", 48, {"model_version": "v2"})
    state = StateFile(tmp_path / "state.json")
    broken = VersionSpec("v2", 48, "docs-v2", generator_grpc="127.0.0.1:9", generator_rest="http://127.0.0.1:9")
    state.update(lambda s: verified(serving(s, spec_for(model_server, "v1", "docs-v1")), broken)
                 .with_weights({"v1": 50, "v2": 50}))
    # A generous budget: a busy CI machine must not turn v1's answers into 503s. The down generator
    # refuses connections at once, so v2's fallbacks do not wait for it.
    pods = [AppServer(create_app(service=EmbeddingService(state, store, timeout=10.0))).start() for _ in range(2)]
    yield [pod.url for pod in pods]
    for pod in pods:
        pod.stop()


@pytest.fixture
def prometheus(app_pods, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        missing_tool("prometheus is not installed")
    config = tmp_path / "prometheus.yml"
    targets = ", ".join(f'"{url.removeprefix("http://")}"' for url in app_pods)
    config.write_text(f"global: {{scrape_interval: {SCRAPE_SECONDS}s, evaluation_interval: {SCRAPE_SECONDS}s}}\n"
                      f"scrape_configs:\n  - job_name: embedding-app\n    static_configs: [{{targets: [{targets}]}}]\n")
    url = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                f"--web.listen-address={url.removeprefix('http://')}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: query(url, 'sum(up{job="embedding-app"})') == 2.0, "both app pods scraped")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(url: str, promql: str) -> float | None:
    try:
        result = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=2).json()["data"]["result"]
    except (requests.RequestException, KeyError, ValueError):
        return None
    return float(result[0]["value"][1]) if result else None


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def search(url: str, version: str, count: int) -> None:
    for _ in range(count):
        reply = requests.post(f"{url}/search", json={"query": "asyncio", "k": 3}, headers={"x-model-version": version})
        assert reply.status_code == 200


def test_a_window_counts_every_pod_and_fails_the_broken_version(app_pods, prometheus):
    for url in app_pods:
        search(url, "v1", 1)  # the first request creates every live version's series at 0
    time.sleep(3 * SCRAPE_SECONDS)  # ... and Prometheus has seen them at 0
    source, one_pod = PrometheusQuery(prometheus, 'job="embedding-app"', SCRAPE_SECONDS), AppScrape(app_pods[0])
    mark, pod_mark = source.mark(), one_pod.mark()
    for url in app_pods:
        search(url, "v1", 20)
        search(url, "v2", 15)  # v2's generator is down: served by v1, counted as v2's failure
    wait_for(lambda: (query(prometheus, 'sum(embedding_app_fallbacks_total{job="embedding-app"})') or 0) >= 30,
             "Prometheus to scrape the traffic")
    time.sleep(2 * SCRAPE_SECONDS)

    measured = source.since(mark).versions
    alone = one_pod.since(pod_mark).versions
    assert alone["v2"].requests == alone["v2"].failures == 15  # one pod's exact count
    assert 25 <= measured["v2"].requests <= 40 and measured["v2"].failures == pytest.approx(measured["v2"].requests)
    assert 60 <= measured["v1"].requests <= 95 and measured["v1"].failures == 0  # v1 served 40 + the 30 fallbacks
    assert sum(measured["v1"].buckets.values()) > 0 and measured["v1"].quantile(0.99) > 0
    verdict = judge(measured, "v2", "v1", Thresholds(min_requests=10))
    assert verdict.status == FAILED and "error rate" in verdict.reason


def test_a_bad_query_is_a_clear_error(prometheus):
    with pytest.raises(PrometheusError, match="400|parse"):
        PrometheusQuery(prometheus, "job=embedding-app")._query("sum(")
