"""embedding_deploy_ramped as users run it: triggered through Airflow's REST API with conf, run by the
real scheduler, executor and triggerer, while live searches and writes flow."""
from __future__ import annotations

import time

import pytest

from embedding_rollout.domain.rollout import ROLLED_BACK, SUCCEEDED

pytestmark = pytest.mark.slow
DAG = "embedding_deploy_ramped"


def rises(weights_seen: list[dict], version: str) -> list[int]:
    """The successive distinct weights of ``version`` the traffic observed."""
    seen = [w[version] for w in weights_seen if version in w]
    return [w for i, w in enumerate(seen) if i == 0 or w != seen[i - 1]]


def assert_rolled_back(live, current: str, new: str) -> None:
    live.assert_serving_only(current)
    rollout = live.state().rollout
    assert rollout.run_id and rollout.phase == ROLLED_BACK, rollout
    assert live.deployment.model_server.manager.status(int(new[1:])).state == "END"


def test_a_four_step_ramp_through_the_scheduler(live):
    current, new = live.versions()
    conf = {"new_version": new, "step_percent": 25, "step_interval_seconds": 12, "min_requests": 5,
            "backfill_slices": 2}
    with live.traffic() as record:
        run_id = live.trigger(DAG, conf)
        run = live.wait(DAG, run_id)
    assert run["state"] == "success", live.explain(DAG, run_id)
    states = live.states(DAG, run_id)
    # The backfill ran as two mapped tasks, one per slice; one task ended the load, then one
    # verification covered both slices.
    assert states["backfill[0]"] == states["backfill[1]"] == "success" and "backfill[2]" not in states
    assert states["plan_backfill"] == states["finish_backfill"] == states["verify_backfill"] == "success"
    assert live.api.xcom(DAG, run_id, "backfill_slices")[1][-2:] == ["--slice", "2"]
    assert record.failures == []
    assert rises(record.weights_seen, new) == [0, 25, 50, 75, 100]
    assert {r["version"] for r in record.responses} == {current, new}
    assert record.users_moved_back(current, new) == {}  # each user moved at most once, old to new
    live.assert_serving_only(new)
    assert live.state().rollout.phase == SUCCEEDED
    assert live.deployment.model_server.manager.status(int(current[1:])).state == "END"
    # Each step's weight, verdict and figures are in the ramp task's XCom, as the UI shows them.
    steps = [live.api.xcom(DAG, run_id, "ramp", f"step_{i}") for i in (1, 2, 3, 4)]
    assert [s["weight"] for s in steps] == [25, 50, 75, 100]
    assert [s["status"] for s in steps] == ["Successful"] * 4
    assert all(s["new"]["requests"] >= 5 for s in steps)
    assert live.check_consistency(record) > 10
    assert states["conclude_rollout"] == "success" and states["finish_rollout"] == "success"
    assert states["ask_about_step"] == "skipped"


def test_a_failing_new_version_rolls_back_and_v1_keeps_serving(live):
    current, new = live.versions()

    def break_new_once_live(weights):  # after the backfill: the new version's generator fails
        if new in weights:
            live.fault(new, 1.0)

    conf = {"new_version": new, "step_percent": 50, "step_interval_seconds": 12, "min_requests": 3}
    with live.traffic(on_weights=break_new_once_live) as record:
        run_id = live.trigger(DAG, conf)
        run = live.wait(DAG, run_id)
    assert run["state"] == "failed"
    # Every request was answered: searches fell back to the stable version, writes went to it.
    assert record.failures == []
    assert_rolled_back(live, current, new)
    assert not any(w.get(new, 0) > 50 for w in record.weights_seen)  # never past the failed step
    states = live.states(DAG, run_id)
    assert states["ramp"] == "failed" and states["promote"] == "upstream_failed"
    assert states["conclude_rollout"] == "success" and states["finish_rollout"] == "success"
    assert live.api.xcom(DAG, run_id, "ramp", "step_1")["status"] == "Failed"
    assert "analysis failed at step 1" in live.state().rollout.message


def test_no_traffic_for_the_new_version_is_inconclusive_and_never_advances(live):
    current, new = live.versions()
    conf = {"new_version": new, "step_percent": 25, "step_interval_seconds": 12, "min_requests": 5,
            "inconclusive_limit": 1}
    with live.traffic(version=current) as record:  # every search asks for the current version
        run_id = live.trigger(DAG, conf)
        run = live.wait(DAG, run_id)
    assert run["state"] == "failed", live.explain(DAG, run_id)
    assert record.failures == [] and {r["version"] for r in record.responses} == {current}
    assert max(w.get(new, 0) for w in record.weights_seen) == 25  # the first step's weight, never more
    step = live.api.xcom(DAG, run_id, "ramp", "step_1")
    assert step["status"] == "Inconclusive" and step["window_seconds"] == 24  # one more interval gathered
    assert "inconclusive" in live.state().rollout.message
    assert_rolled_back(live, current, new)


def test_a_failing_promote_rolls_back(live):
    current, new = live.versions()

    def break_new_at_full_traffic(weights):  # the last step passes (errors tolerated), promote cannot
        if weights.get(new) == 100:
            live.fault(new, 1.0)

    conf = {"new_version": new, "weights": [50, 100], "step_interval_seconds": 12, "min_requests": 3,
            "max_error_rate": 1.0}
    with live.traffic(on_weights=break_new_at_full_traffic) as record:
        run_id = live.trigger(DAG, conf)
        run = live.wait(DAG, run_id)
    states = live.states(DAG, run_id)
    assert run["state"] == "failed"
    assert record.missed, "no write missed the failing version: nothing for promote to fail on"
    assert states["ramp"] == "success" and states["promote"] == "failed", live.explain(DAG, run_id)
    assert record.failures == []
    assert "failed: promote" in live.state().rollout.message
    assert_rolled_back(live, current, new)


def test_marking_the_run_failed_mid_ramp_rolls_back_and_stops_the_ramp(live):
    current, new = live.versions()
    # Ten steps of 25 s: the mark (a PATCH to a busy API server) lands with minutes of ramp to spare.
    conf = {"new_version": new, "step_percent": 10, "step_interval_seconds": 25, "min_requests": 3}
    with live.traffic() as record:
        run_id = live.trigger(DAG, conf)
        live.wait_for(lambda: live.state().weights.get(new) == 20, what=f"{new} at 20 %")
        live.api.mark_failed(DAG, run_id)  # what "Mark run as failed" in the UI does
        run = live.wait(DAG, run_id)
    assert run["state"] == "failed"
    assert record.failures == []
    states = live.states(DAG, run_id)
    assert states["ramp"] == "failed" and states["conclude_rollout"] == "success", live.explain(DAG, run_id)
    assert_rolled_back(live, current, new)
    # No weight changed after the rollback sent the traffic back: the ramp never raised it again.
    back = next(i for i, w in enumerate(record.weights_seen) if w == {current: 100} and i > 0)
    assert all(new not in w for w in record.weights_seen[back:]), record.weights_seen
    assert 20 <= max(w.get(new, 0) for w in record.weights_seen) < 100


def test_a_ramp_that_outlives_the_mark_stops_at_its_next_step(live):
    """A mark can lose to the ramp's own deferral: on Airflow's SQLite database the ramp's
    read-then-write of its state runs in no transaction at the read, and overwrites the FAILED the
    mark wrote. Seen in CI: the ramp then ran all ten steps after the run was marked failed, with
    the run's pending tasks skipped and its teardowns waiting. Here that outcome is made
    deterministic: with the scheduler stopped, the run is marked failed and the ramp's row is put
    back to what its trigger's firing leaves. The ramp must see that its run has ended and stop."""
    current, new = live.versions()
    conf = {"new_version": new, "step_percent": 10, "step_interval_seconds": 20, "min_requests": 3}
    with live.traffic() as record:
        run_id = live.trigger(DAG, conf)
        live.wait_for(lambda: live.state().weights.get(new) == 20 and live.states(DAG, run_id)["ramp"] == "deferred",
                      what=f"the ramp deferred with {new} at 20 %")
        live.wait_exits_drained(DAG, run_id, "ramp")  # else the queued ramp is failed as killed
        with live.scheduler_stopped():
            live.api.mark_failed(DAG, run_id)
            assert live.states(DAG, run_id)["ramp"] == "failed"
            live.overwrite_task_state(DAG, run_id, "ramp", "scheduled")  # the lost update
        run = live.wait(DAG, run_id)
    assert run["state"] == "failed"
    assert record.failures == []
    states = live.states(DAG, run_id)
    assert states["ramp"] == "failed" and states["conclude_rollout"] == "success", live.explain(DAG, run_id)
    assert "ended while the ramp ran" in live.log(DAG, run_id, "ramp")
    assert_rolled_back(live, current, new)
    assert max(w.get(new, 0) for w in record.weights_seen) == 20, rises(record.weights_seen, new)


def test_one_rollout_at_a_time(live):
    """Three triggers at once: of the ramped and the A/B run one takes the deployment, the other is
    refused saying why; the ramped DAG's second run waits for the first (max_active_runs), and is
    refused too if the deployment is still taken when its turn comes."""
    current, new = live.versions()
    conf = {"new_version": new, "step_percent": 50, "step_interval_seconds": 30, "min_requests": 1}
    holders = set()
    ramped = live.trigger(DAG, conf)
    ab = live.trigger("embedding_deploy_ab", {"new_version": new, "decision_timeout_seconds": 60})
    waiting = live.trigger(DAG, conf)
    runs = {ramped: DAG, ab: "embedding_deploy_ab"}

    def settled():
        rollout = live.state().rollout
        if rollout and rollout.active:
            holders.add(rollout.run_id)
        begun = {run: live.states(dag, run).get("begin_rollout") for run, dag in runs.items()}
        return begun if sorted(map(str, begun.values())) == ["failed", "success"] else None

    begun = live.wait_for(settled, what="both begin_rollout tasks to end")
    winner = next(run for run, state in begun.items() if state == "success")
    loser = ab if winner == ramped else ramped
    assert "another rollout holds the deployment" in live.log(runs[loser], loser, "begin_rollout")
    assert live.wait(runs[loser], loser)["state"] == "failed"
    # It took nothing, so its teardowns (which roll back) never ran.
    assert live.states(runs[loser], loser)["conclude_rollout"] in ("skipped", "upstream_failed")
    if winner == ramped:
        assert live.api.run(DAG, waiting)["state"] == "queued"  # waits for the ramped run before it
    else:  # the ramped run lost, so the waiting one started at once, and was refused as well
        assert live.wait(DAG, waiting)["state"] == "failed"
        assert "another rollout holds the deployment" in live.log(DAG, waiting, "begin_rollout")
    live.api.mark_failed(runs[winner], winner)
    live.wait(runs[winner], winner)
    if winner == ramped:  # the waiting run's turn: it takes the free deployment; stop it too
        # Once its setup task has ended: a run marked failed while begin_rollout still runs (the state
        # written, the task not yet ended) fails its setup, so no teardown runs and the deployment
        # stays held until `embedding-rollout rollout abort` and `rollout finish` (a known gap).
        live.wait_for(lambda: live.states(DAG, waiting).get("begin_rollout") == "success",
                      what="the waiting run to take the deployment")
        assert live.state().rollout.run_id == waiting
        live.api.mark_failed(DAG, waiting)
        assert live.wait(DAG, waiting)["state"] == "failed"
    assert holders == {winner}  # while the two competed, the refused one never held the deployment
    assert not live.state().rollout.active
    live.assert_serving_only(current)


def test_an_inconclusive_step_asks_a_person_who_continues_the_ramp(live):
    current, new = live.versions()
    conf = {"new_version": new, "weights": [50, 100], "step_interval_seconds": 12, "min_requests": 5,
            "inconclusive_limit": 0, "on_inconclusive": "ask"}
    generator = live.traffic(version=current)  # at first every search asks for the current version
    with generator as record:
        run_id = live.trigger(DAG, conf)
        detail = live.wait_for(lambda: live.api.pending_hitl(DAG), what="the question to a person")[0]
        assert detail["subject"] == f"Continue the ramp of {new}?"
        assert live.state().rollout.phase == "Paused" and live.state().weights[new] == 50
        generator.version = None  # the new version gets its share from now on
        live.answer_as_a_person(detail, "Continue")
        # Should the scheduler fail the first wait (tasks.ASK_AGAIN_ONCE), it asks once more.
        while live.api.run(DAG, run_id)["state"] == "running":
            for again in live.api.pending_hitl(DAG):
                live.answer_as_a_person(again, "Continue")
            time.sleep(0.5)
        run = live.wait(DAG, run_id)
    assert run["state"] == "success", live.explain(DAG, run_id)
    states = live.states(DAG, run_id)
    assert states["ask_about_step"] == "success" and states["resume_ramp"] == "success"
    assert states["steps_passed"] == "skipped" and states["rollback_chosen"] == "skipped"
    assert live.api.xcom(DAG, run_id, "ramp", "step_1")["status"] == "Inconclusive"
    assert live.api.xcom(DAG, run_id, "resume_ramp", "step_2")["status"] == "Successful"
    assert record.failures == []
    live.assert_serving_only(new)
