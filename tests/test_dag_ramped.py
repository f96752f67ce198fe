"""embedding_deploy_ramped through Airflow (dag.test) while live traffic flows."""
from __future__ import annotations

import pytest

from rollout_harness import LocalDeployment, assert_changed_only_by_streaming, check_version_consistency, traffic


def rises(weights_seen: list[dict]) -> list[int]:
    """The successive distinct weights of v2 that the traffic observed."""
    seen = [w["v2"] for w in weights_seen if "v2" in w]
    return [w for i, w in enumerate(seen) if i == 0 or w != seen[i - 1]]


@pytest.fixture
def deployment(tmp_path, model_repo, monkeypatch):
    deployment = LocalDeployment(tmp_path / "home", model_repo, monkeypatch)
    yield deployment
    deployment.stop()


def test_every_dag_parses_without_import_errors(dagbag):
    assert {"embedding_deploy_ramped"} <= set(dagbag.dag_ids)
    for dag_id in dagbag.dag_ids:
        assert dagbag.get_dag(dag_id).doc_md


def test_ramped_rollout_with_live_traffic(dagbag, deployment):
    from airflow.utils.state import DagRunState
    dag = dagbag.get_dag("embedding_deploy_ramped")
    conf = {"new_version": "v2", "step_percent": 25, "step_interval_seconds": 2, "min_requests": 5}
    with traffic(deployment) as record:
        run = dag.test(run_conf=conf)
    assert run.state == DagRunState.SUCCESS
    assert record.failures == []
    assert len(record.responses) > 50
    # The weights rose in the configured steps.
    assert rises(record.weights_seen) == [0, 25, 50, 75, 100]
    served = {r["version"] for r in record.responses}
    assert served == {"v1", "v2"}
    assert deployment.model_server.manager.status(1).state == "END"  # the old generator is unloaded
    # The new index is complete, the old version is gone.
    state = deployment.state.read()
    assert list(state.versions) == ["v2"] and state.weights == {"v2": 100} and state.stable == "v2"
    from embedding_rollout.store import open_store
    store = open_store(deployment.settings)
    assert store.count("docs-v2") == 10017 + len([d for d in record.written if d.startswith("stream-")]) - len(
        [d for d in record.deleted if not d.startswith("stream-")])
    stored = store.get_many("docs-v2", sorted(record.written))
    assert {d: stored[d].seq for d in record.written} == record.written
    assert "docs-v1" not in store.indices()
    assert check_version_consistency(deployment, record) > 10


def test_a_failing_new_version_fails_the_analysis_and_rolls_back(dagbag, deployment):
    from airflow.utils.state import DagRunState
    from embedding_rollout.store import open_store
    store = open_store(deployment.settings)
    v1_before = {d.id: d.seq for d in store.scan("docs-v1")}

    def break_v2_once_live(weights):  # after the backfill: v2's generator starts failing
        if "v2" in weights:
            deployment.model_server.manager.set_fault_rate(2, 1.0)

    conf = {"new_version": "v2", "step_percent": 50, "step_interval_seconds": 2, "min_requests": 3}
    with traffic(deployment, on_weights=break_v2_once_live) as record:
        run = dagbag.get_dag("embedding_deploy_ramped").test(run_conf=conf)
    assert run.state == DagRunState.FAILED  # the rollout failed ...
    # ... yet every request was answered: searches served by v1 when v2's generator failed, writes
    # taken by v1 (the stable version) with v2's misses counted, not failed.
    assert record.failures == []
    assert len(record.written) + len(record.deleted) > 0
    state = deployment.state.read()         # ... and it rolled back: v1 serves all, v2 is gone
    assert state.weights == {"v1": 100} and list(state.versions) == ["v1"] and state.write_targets == ("v1",)
    assert "docs-v2" not in store.indices()
    assert deployment.model_server.manager.status(2).state == "END"
    assert not any(w.get("v2", 0) > 50 for w in record.weights_seen)  # it never went past the failed step
    # v1's index changed only through the streaming updates of the run.
    assert_changed_only_by_streaming(store, "docs-v1", v1_before, record)


def test_airflow_dags_test_from_the_cli_rolls_out(dagbag, deployment):
    """The same rollout through `airflow dags test` in another process, with live traffic."""
    import json
    import subprocess
    import sys
    # Few requests per 1 s step: a p99 over a handful of them is noise on a loaded machine, and this
    # test is about the CLI path (the analysis has its own tests).
    conf = {"new_version": "v2", "weights": [50, 100], "step_interval_seconds": 1, "min_requests": 1,
            "max_p99_ratio": 20}
    with traffic(deployment) as record:
        result = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", "embedding_deploy_ramped",
                                 "-c", json.dumps(conf)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert record.failures == []
    assert rises(record.weights_seen) == [0, 50, 100]
    state = deployment.state.read()
    assert state.weights == {"v2": 100} and list(state.versions) == ["v2"]
