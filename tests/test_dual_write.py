"""A candidate version's failure never fails the live system's writes: the stable version takes
them, the candidate's misses are counted, and its index is repaired before it can become stable."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from conftest import WRITE
from embedding_rollout import steps
from embedding_rollout.store import open_store
from rollout_harness import LocalDeployment


@pytest.fixture
def deployment(tmp_path, model_repo, monkeypatch):
    deployment = LocalDeployment(tmp_path / "home", model_repo, monkeypatch)
    steps.deploy_version(deployment.settings, "v2", run_id="run-1")
    steps.start_dual_write(deployment.settings, "v2")
    steps.backfill(deployment.settings, "v2", "v1")
    assert steps.verify(deployment.settings, "v2", "v1").complete
    yield deployment
    deployment.stop()


DOC = {"title": "asyncio", "text": "a new event loop policy", "category": "Library", "date": "2023-01-01"}


def test_writes_succeed_while_the_candidate_fails_and_promote_repairs_it(deployment):
    url, store = deployment.app.url, open_store(deployment.settings)
    victim = next(iter(store.scan("docs-v1"))).id
    deployment.model_server.manager.set_fault_rate(2, 1.0)  # v2's generator fails every call
    put = requests.put(f"{url}/documents/new-doc", headers=WRITE, json={**DOC, "version": 10**15})
    delete = requests.delete(f"{url}/documents/{victim}", headers=WRITE, params={"version": 10**15})
    assert put.status_code == delete.status_code == 200, (put.text, delete.text)
    assert list(put.json()["missed"]) == ["v2"] and put.json()["applied"] == {"v1": True}
    assert "injected failure" in put.json()["missed"]["v2"]
    # A delete needs no generator: both versions take it.
    assert delete.json()["applied"] == {"v1": True, "v2": True} and delete.json()["missed"] == {}
    store = open_store(deployment.settings)  # a fresh reader sees the app's writes at once
    assert store.get_many("docs-v1", ["new-doc"])["new-doc"].seq == 10**15
    assert store.get_many("docs-v2", ["new-doc"]) == {}
    metrics = requests.get(f"{url}/metrics").text
    assert 'embedding_app_write_misses_total{model_version="v2"} 1.0' in metrics

    with pytest.raises(Exception, match="v2 cannot become stable: it is verified; it has no weight"):
        steps.promote(deployment.settings, "v2")  # refused before the repair: no traffic yet
    steps.set_weights(deployment.settings, {"v1": 0, "v2": 100})
    with pytest.raises(Exception, match="injected failure"):  # still broken: it cannot be promoted
        steps.promote(deployment.settings, "v2")
    assert deployment.state.read().stable == "v1"

    deployment.model_server.manager.set_fault_rate(2, 0.0)
    assert steps.promote(deployment.settings, "v2").stable == "v2"
    repaired = open_store(deployment.settings).get_many("docs-v2", ["new-doc", victim])
    assert repaired["new-doc"].seq == 10**15 and not repaired["new-doc"].deleted
    assert repaired[victim].deleted and repaired[victim].seq == 10**15
    assert steps.verify_backfill(deployment.settings, "v2", "v1").complete


def test_the_stable_versions_failure_fails_the_write_and_writes_nothing(deployment):
    url = deployment.app.url
    deployment.model_server.manager.set_fault_rate(1, 1.0)
    put = requests.put(f"{url}/documents/lost-doc", headers=WRITE, json={**DOC, "version": 10**15})
    assert put.status_code == 503 and "injected failure" in put.json()["detail"]
    store = open_store(deployment.settings)
    assert store.get_many("docs-v1", ["lost-doc"]) == {} == store.get_many("docs-v2", ["lost-doc"])


def test_remove_lets_a_request_in_flight_finish_before_the_index_and_generator_go(deployment, monkeypatch):
    """Drain on remove: v2 leaves routing and the write targets first, then the requests that
    read the state before finish within the drain period, and only then the index goes."""
    monkeypatch.setenv("ER_DRAIN_SECONDS", "3")
    settings, url = deployment.settings, deployment.app.url
    steps.set_weights(settings, {"v1": 100, "v2": 0})  # v2 live at 0: reachable by its header
    deployment.model_server.manager.set_delay(2, 1.0)  # a slow v2 request, in flight when remove begins
    answers = []
    slow = threading.Thread(target=lambda: answers.append(requests.post(
        f"{url}/search", json={"query": "asyncio", "k": 3}, headers={"x-model-version": "v2"}, timeout=30)))
    slow.start()
    time.sleep(0.3)  # the request has read the state and waits on v2's generator
    started = time.monotonic()
    steps.remove_version(settings, "v2")
    slow.join(30)
    assert answers[0].status_code == 200 and answers[0].json()["model_version"] == "v2", answers[0].text
    assert time.monotonic() - started >= 3.0
    state = deployment.state.read()
    assert "v2" not in state.versions and state.write_targets == ("v1",)
    assert "docs-v2" not in open_store(settings).indices()
    after = requests.post(f"{url}/search", json={"query": "asyncio", "k": 3}, headers={"x-model-version": "v2"})
    assert after.json()["model_version"] == "v1"  # no longer routable: assigned by the weights


def test_a_removal_that_stopped_after_retiring_the_version_is_finished_by_the_next_run(deployment, monkeypatch):
    """The state a remove leaves when it dies during its drain (a real SIGKILL there: test_step_kills.py)."""
    monkeypatch.setenv("ER_DRAIN_SECONDS", "0")
    settings = deployment.settings
    deployment.state.update(lambda s: s.retiring("v2"))
    assert deployment.state.read().phase("v2") == "retired"
    with pytest.raises(Exception, match="v2 cannot take traffic: it is retired"):
        steps.set_weights(settings, {"v1": 90, "v2": 10})
    steps.remove_version(settings, "v2")
    assert "v2" not in deployment.state.read().versions
    assert "docs-v2" not in open_store(settings).indices()


def test_a_verification_repairs_by_id_what_its_pass_found(deployment, monkeypatch):
    """Writes the candidate missed are found by one merge of the two scans and repaired by id: the
    source is read once per pass (no third, full repair scan), and the record says how many."""
    url, settings = deployment.app.url, deployment.settings
    deployment.model_server.manager.set_fault_rate(2, 1.0)
    for n in range(3):
        put = requests.put(f"{url}/documents/missed-{n}", headers=WRITE, json={**DOC, "version": 10**15})
        assert put.status_code == 200 and list(put.json()["missed"]) == ["v2"], put.text
    deployment.model_server.manager.set_fault_rate(2, 0.0)
    store_class, scans = type(open_store(settings)), []
    original_scan = store_class.scan

    def counted_scan(self, index, *args, **kwargs):
        scans.append(index)
        return original_scan(self, index, *args, **kwargs)

    monkeypatch.setattr(store_class, "scan", counted_scan)
    report = steps.verify(settings, "v2", "v1")
    assert report.complete
    record = deployment.state.read().spec("v2").verification
    assert record["complete"] and record["passes"] == 2 and record["repaired"] == 3, record
    assert scans.count("docs-v1") == 2, scans  # the two passes; the repair read the three by id
    assert set(open_store(settings).get_many("docs-v2", [f"missed-{n}" for n in range(3)])) == \
        {f"missed-{n}" for n in range(3)}
