"""embedding_deploy_ab through Airflow with live traffic: scripted promote, scripted rollback."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from embedding_rollout.store import open_store
from rollout_harness import LocalDeployment, assert_changed_only_by_streaming, check_version_consistency, traffic


@pytest.fixture
def deployment(tmp_path, model_repo, monkeypatch):
    deployment = LocalDeployment(tmp_path / "home", model_repo, monkeypatch)
    yield deployment
    deployment.stop()


def decide_when(deployment, script: dict[int, dict], ready=lambda: True):
    """Send a decision (POST /rollout/decisions) each time v2 reaches a weight in ``script``, once
    ``ready()`` (e.g. v2 has answered some traffic)."""
    sent = set()

    def send(decision: dict) -> None:
        deadline = time.monotonic() + 60
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        requests.post(f"{deployment.app.url}/rollout/decisions", json={"new_version": "v2", "by": "test", **decision})

    def on_weights(weights):
        weight = weights.get("v2")
        if weight in script and weight not in sent:
            sent.add(weight)
            threading.Thread(target=send, args=(script[weight],)).start()
    return on_weights


def test_ab_rollout_with_scripted_weight_change_and_promote(dagbag, deployment):
    from airflow.utils.state import DagRunState
    script = {10: {"action": "set_weights", "weight": 40}, 40: {"action": "promote"}}
    conf = {"new_version": "v2", "initial_weight": 10, "decision_source": "messages", "decision_timeout_seconds": 300}
    with traffic(deployment, on_weights=decide_when(deployment, script)) as record:
        run = dagbag.get_dag("embedding_deploy_ab").test(run_conf=conf)
    assert run.state == DagRunState.SUCCESS
    assert record.failures == []
    assert [w.get("v2") for w in record.weights_seen if "v2" in w][:3] == [10, 40, 100]
    state = deployment.state.read()
    assert state.weights == {"v2": 100} and list(state.versions) == ["v2"] and state.stable == "v2"
    assert "docs-v1" not in open_store(deployment.settings).indices()
    assert check_version_consistency(deployment, record) > 5


def test_ab_rollback_leaves_v1_serving_with_its_index_unchanged(dagbag, deployment):
    from airflow.utils.state import DagRunState
    store = open_store(deployment.settings)
    v1_before = {d.id: d.seq for d in store.scan("docs-v1")}
    conf = {"new_version": "v2", "initial_weight": 20, "decision_source": "messages", "decision_timeout_seconds": 300}
    seen = {}  # the traffic's record, once it runs: decide only after v2 has answered
    v2_answered = lambda: any(r["version"] == "v2" for r in seen["record"].responses)  # noqa: E731
    with traffic(deployment, on_weights=decide_when(deployment, {20: {"action": "rollback"}}, v2_answered)) as record:
        seen["record"] = record
        run = dagbag.get_dag("embedding_deploy_ab").test(run_conf=conf)
    assert run.state == DagRunState.SUCCESS  # a decided rollback is a successful run of the experiment
    assert record.failures == []
    assert {r["version"] for r in record.responses} == {"v1", "v2"}
    state = deployment.state.read()
    assert state.weights == {"v1": 100} and list(state.versions) == ["v1"] and state.write_targets == ("v1",)
    assert "docs-v2" not in store.indices() and deployment.model_server.manager.status(2).state == "END"
    assert_changed_only_by_streaming(store, "docs-v1", v1_before, record)


def test_ab_without_a_decision_times_out_into_rollback(dagbag, deployment):
    from airflow.utils.state import DagRunState, TaskInstanceState
    conf = {"new_version": "v2", "initial_weight": 30, "decision_source": "messages", "decision_timeout_seconds": 4}
    with traffic(deployment) as record:
        run = dagbag.get_dag("embedding_deploy_ab").test(run_conf=conf)
    assert run.state == DagRunState.SUCCESS and record.failures == []
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["await_decision"] == TaskInstanceState.SKIPPED
    assert states["rollback_traffic"] == TaskInstanceState.SUCCESS and states["promote"] == TaskInstanceState.SKIPPED
    state = deployment.state.read()
    assert state.weights == {"v1": 100} and list(state.versions) == ["v1"]


@pytest.fixture
def airflow_api(airflow_db, monkeypatch):
    """Airflow's own REST API (the one the UI's Required Actions page uses) on 127.0.0.1, on the same
    metadata database as dag.test(); every request is an admin's (simple auth manager)."""
    from airflow.api_fastapi.app import create_app
    from serving_app import AppServer
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")
    server = AppServer(create_app("core")).start()
    yield server.url
    server.stop()


def answer_when_asked(api: str, answer: str, answered: list):
    """A person in the UI: wait for the run's Human-in-the-loop request, then answer it."""
    def run():
        import time
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            pending = requests.get(f"{api}/api/v2/dags/embedding_deploy_ab/dagRuns/~/hitlDetails",
                                   params={"response_received": "false"}, timeout=10)
            details = pending.json().get("hitl_details", []) if pending.ok else []
            if details:
                ti = details[0]["task_instance"]
                reply = requests.patch(
                    f"{api}/api/v2/dags/embedding_deploy_ab/dagRuns/{ti['dag_run_id']}/taskInstances/"
                    f"{ti['task_id']}/{ti['map_index']}/hitlDetails",
                    json={"chosen_options": [answer], "params_input": {}}, timeout=10)
                answered.append((details[0]["subject"], reply.status_code, reply.text))
                return
            time.sleep(0.5)
    thread = threading.Thread(target=run, name="a-person", daemon=True)
    thread.start()
    return thread


def test_ab_a_person_promotes_in_the_airflow_ui(dagbag, deployment, airflow_api):
    from airflow.utils.state import DagRunState, TaskInstanceState
    answered = []
    answer_when_asked(airflow_api, "Promote", answered)
    conf = {"new_version": "v2", "initial_weight": 25, "decision_source": "ui"}
    with traffic(deployment) as record:
        run = dagbag.get_dag("embedding_deploy_ab").test(run_conf=conf)
    assert answered and answered[0][:2] == ("Promote v2?", 200), answered
    assert run.state == DagRunState.SUCCESS and record.failures == []
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["ask_a_person"] == TaskInstanceState.SUCCESS and states["await_decision"] == TaskInstanceState.SKIPPED
    assert states["promote_to_all"] == TaskInstanceState.SUCCESS
    assert states["rollback_traffic"] == TaskInstanceState.SKIPPED
    assert [w.get("v2") for w in record.weights_seen if "v2" in w][:2] == [25, 100]
    assert deployment.state.read().stable == "v2"
