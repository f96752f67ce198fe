"""embedding_deploy_ab as users run it: triggered through Airflow's REST API, decided by messages to
the app, by a person through Airflow's human-in-the-loop API, or by the timeout."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from conftest import OPERATE
from embedding_rollout.domain.rollout import ROLLED_BACK, SUCCEEDED

pytestmark = pytest.mark.slow
DAG = "embedding_deploy_ab"


def decide_when(live, new: str, script: dict[int, dict], ready=lambda: True):
    """Send a decision (POST /rollout/decisions) each time ``new`` reaches a weight in ``script``,
    once ``ready()``."""
    sent = set()

    def send(decision: dict) -> None:
        live.wait_for(ready, timeout=120, what="traffic on the new version")
        requests.post(f"{live.deployment.app.url}/rollout/decisions", headers=OPERATE,
                      json={"new_version": new, "by": "test", **decision}, timeout=10).raise_for_status()

    def on_weights(weights):
        weight = weights.get(new)
        if weight in script and weight not in sent:
            sent.add(weight)
            threading.Thread(target=send, args=(script[weight],), daemon=True).start()
    return on_weights


def test_ab_with_messages_changes_the_split_then_promotes(live):
    current, new = live.versions()
    script = {10: {"action": "set_weights", "weight": 40}, 40: {"action": "promote"}}
    conf = {"new_version": new, "initial_weight": 10, "decision_source": "messages", "decision_timeout_seconds": 600}
    with live.traffic(on_weights=decide_when(live, new, script)) as record:
        run_id = live.trigger(DAG, conf)
        run = live.wait(DAG, run_id)
    assert run["state"] == "success", live.explain(DAG, run_id)
    assert record.failures == []
    assert [w.get(new) for w in record.weights_seen if w.get(new)][:3] == [10, 40, 100]
    live.assert_serving_only(new)
    assert live.state().rollout.phase == SUCCEEDED
    assert live.check_consistency(record) > 5


def test_ab_answered_by_a_person_through_the_hitl_api(live):
    current, new = live.versions()
    answered, done = [], threading.Event()

    def a_person():  # answers whatever it is asked
        while not done.is_set():
            for detail in live.api.pending_hitl(DAG):
                reply = live.answer_as_a_person(detail, "Promote")
                answered.append((detail["subject"], tuple(reply["chosen_options"])))
            time.sleep(0.2)

    person = threading.Thread(target=a_person, daemon=True)
    person.start()
    conf = {"new_version": new, "initial_weight": 25, "decision_source": "ui"}
    try:
        with live.traffic() as record:
            run_id = live.trigger(DAG, conf)
            run = live.wait(DAG, run_id)
    finally:
        done.set()
        person.join(10)
    # Asked once, or twice when the scheduler failed the first wait (see tasks.ASK_AGAIN_ONCE).
    assert answered and set(answered) == {(f"Promote {new}?", ("Promote",))} and len(answered) <= 2, answered
    assert run["state"] == "success", live.explain(DAG, run_id)
    states = live.states(DAG, run_id)
    assert states["ask_a_person"] == "success" and states["await_decision"] == "skipped"
    assert states["promote_to_all"] == "success" and states["rollback_decided"] == "skipped"
    assert record.failures == []
    assert [w.get(new) for w in record.weights_seen if w.get(new)][:2] == [25, 100]
    live.assert_serving_only(new)


def test_ab_without_a_decision_times_out_into_rollback(live):
    current, new = live.versions()
    conf = {"new_version": new, "initial_weight": 30, "decision_source": "messages", "decision_timeout_seconds": 20}
    with live.traffic() as record:
        run_id = live.trigger(DAG, conf)
        run = live.wait(DAG, run_id)
    assert run["state"] == "success", live.explain(DAG, run_id)  # a decided rollback ends the experiment
    assert record.failures == [] and {r["version"] for r in record.responses} == {current, new}
    states = live.states(DAG, run_id)
    assert states["await_decision"] == "success" and states["rollback_decided"] == "success"
    assert states["promote"] == "skipped"
    assert live.api.xcom(DAG, run_id, "await_decision")["action"] == "rollback"
    live.assert_serving_only(current)
    rollout = live.state().rollout
    assert rollout.phase == ROLLED_BACK and "no decision within 20 s" in rollout.message
