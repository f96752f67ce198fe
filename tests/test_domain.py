"""Versions, traffic split and the deployment state file."""
from __future__ import annotations

import json
import multiprocessing
import random
import time

import pytest

from embedding_rollout.domain.state import (ConcurrentUpdate, DeploymentState, StateError, StateFile,
                                            VersionSpec)
from embedding_rollout.domain.traffic import (InvalidWeights, assign_version, bucket_of, ramp_plan,
                                              validate_plan, validate_weights)
from embedding_rollout.domain.versions import InvalidVersion, parse_version, version_key, version_label
from conftest import serving, verified


@pytest.mark.parametrize("label,number", [("v1", 1), ("v2", 2), ("v10", 10), ("v123456789", 123456789)])
def test_parse_version(label, number):
    assert parse_version(label) == number
    assert version_label(number) == label


@pytest.mark.parametrize("bad", ["", "1", "v0", "v01", "V2", "v2.1", "v-1", "latest", None, 2])
def test_parse_version_rejects_malformed(bad):
    with pytest.raises(InvalidVersion, match="model version"):
        parse_version(bad)


def test_versions_sort_numerically():
    assert sorted(["v10", "v9", "v2"], key=version_key) == ["v2", "v9", "v10"]


@pytest.mark.parametrize("weights,problem", [
    ({}, "at least one"),
    ({"v1": 90, "v2": 20}, "sum to 100"),
    ({"v1": 101}, "between 0 and 100"),
    ({"v1": -10, "v2": 110}, "between 0 and 100"),
    ({"v1": 50.5, "v2": 49.5}, "integer"),
    ({"x1": 100}, "invalid model version"),
])
def test_invalid_weights_are_refused_with_the_reason(weights, problem):
    with pytest.raises(InvalidWeights, match=problem):
        validate_weights(weights)


def test_assignment_follows_the_weights():
    rng = random.Random(1)
    picks = [assign_version({"v1": 80, "v2": 20}, rng=rng) for _ in range(20_000)]
    share = picks.count("v2") / len(picks)
    assert 0.18 < share < 0.22
    assert assign_version({"v1": 0, "v2": 100}, rng=rng) == "v2"


def test_sticky_assignment_is_stable_and_only_moves_users_to_the_new_version():
    users = [f"user-{i}" for i in range(3000)]
    previous = {u: assign_version({"v1": 100, "v2": 0}, u) for u in users}
    assert set(previous.values()) == {"v1"}
    for new_weight in (5, 10, 25, 50, 75, 100):
        current = {u: assign_version({"v1": 100 - new_weight, "v2": new_weight}, u) for u in users}
        moved_back = [u for u in users if previous[u] == "v2" and current[u] == "v1"]
        assert not moved_back
        share = sum(v == "v2" for v in current.values()) / len(users)
        assert abs(share - new_weight / 100) < 0.04
        previous = current
    assert bucket_of("alice") == bucket_of("alice")


def test_ramp_plan_and_explicit_plans():
    assert ramp_plan(25) == [25, 50, 75, 100]
    assert ramp_plan(30) == [30, 60, 90, 100]
    assert ramp_plan(100) == [100]
    with pytest.raises(InvalidWeights, match="step_percent"):
        ramp_plan(0)
    assert validate_plan([5, 20, 100]) == [5, 20, 100]
    for bad, problem in (([], "empty"), ([50, 20, 100], "decrease"), ([10, 50], "end at 100"), ([10, 120], "between")):
        with pytest.raises(InvalidWeights, match=problem):
            validate_plan(bad)


def _spec(name: str, dims: int = 8) -> VersionSpec:
    return VersionSpec(name, dims, f"docs-{name}")


def test_state_transitions_keep_the_state_consistent():
    state = serving(DeploymentState(), _spec("v1"))
    assert state.stable == "v1" and state.live_versions == ["v1"] and state.phase("v1") == "stable"
    state = state.with_version(_spec("v2", 16)).with_write_target("v2")
    assert state.write_targets == ("v1", "v2")
    assert not state.is_live("v2")  # deployed and dual-written, but not routable yet
    with pytest.raises(StateError, match="v2 cannot take traffic: it is dual-writing; it needs a backfill"):
        state.with_weights({"v1": 90, "v2": 10})
    state = state.with_backfill("v2").with_verification("v2", {"source": "v1", "complete": True})
    state = state.with_weights({"v1": 90, "v2": 10})
    with pytest.raises(StateError, match="still has 10 %"):
        state.without_version("v2")
    with pytest.raises(StateError, match="model version v3 is not deployed"):
        state.with_weights({"v1": 50, "v3": 50})
    with pytest.raises(StateError, match="stable"):
        state.with_weights({"v2": 100}).without_version("v1")
    state = state.with_weights({"v2": 100}).with_stable("v2").without_version("v1")
    assert list(state.versions) == ["v2"] and state.write_targets == ("v2",) and state.weights == {"v2": 100}


def test_assign_honours_a_live_header_and_reassigns_anything_else():
    state = verified(DeploymentState(), _spec("v1"), _spec("v2")).with_weights({"v1": 100, "v2": 0})
    assert state.assign("v2") == "v2"        # live at weight 0: explicit header still honoured
    assert state.assign("v7") == "v1"        # unknown version: re-assigned by weight
    assert state.assign("garbage") == "v1"
    assert state.assign(None, "some-user") == "v1"


def test_state_file_round_trip_and_revision(state_file):
    assert state_file.read() == DeploymentState()
    first = state_file.update(lambda s: verified(s, _spec("v1")).with_weights({"v1": 100}))
    assert first.revision == 1
    assert state_file.update(lambda s: s).revision == 1  # no change, no new revision
    with pytest.raises(ConcurrentUpdate):
        state_file.update(lambda s: s.with_write_target("v1"), expected_revision=0)
    assert StateFile(state_file.path).read() == first
    assert json.loads(state_file.path.read_text())["weights"] == {"v1": 100}


def test_state_file_refuses_an_invalid_change_and_keeps_the_old_state(state_file):
    state_file.update(lambda s: verified(s, _spec("v1")).with_weights({"v1": 100}))
    before = state_file.path.read_bytes()
    with pytest.raises(StateError):
        state_file.update(lambda s: DeploymentState(s.versions, {"v1": 70}, (), "v1"))
    assert state_file.path.read_bytes() == before


def _bump(path: str, times: int) -> None:
    states = StateFile(path)
    for _ in range(times):
        states.update(lambda s: s.with_weights({"v1": 100 - (s.revision % 2), "v2": s.revision % 2}))


def test_concurrent_writers_in_several_processes_lose_no_update(state_file):
    state_file.update(lambda s: verified(s, _spec("v1"), _spec("v2")).with_weights({"v1": 100}))
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_bump, args=(str(state_file.path), 25)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert all(w.exitcode == 0 for w in workers)
    assert state_file.read().revision == 1 + 75


def test_a_reader_sees_another_writers_change_at_once(state_file):
    reader = StateFile(state_file.path)
    state_file.update(lambda s: verified(s, _spec("v1"), _spec("v2")).with_weights({"v1": 100}))
    assert reader.read().weights == {"v1": 100}
    StateFile(state_file.path).update(lambda s: s.with_weights({"v1": 40, "v2": 60}))
    started = time.monotonic()
    while reader.read().weights != {"v1": 40, "v2": 60}:
        assert time.monotonic() - started < 1.0
    assert reader.read().revision == 2


# -- the rollout's progress ----------------------------------------------------------------------
from embedding_rollout.domain.rollout import (ABORTED, PAUSED, PROMOTED, ROLLED_BACK, SUCCEEDED,  # noqa: E402
                                              RolloutError, RolloutInProgress)


def two_versions() -> DeploymentState:
    return verified(serving(DeploymentState(), VersionSpec("v1", 8, "docs-v1")), VersionSpec("v2", 8, "docs-v2"))


def begun(plan=(50, 100), run_id="run-1") -> DeploymentState:
    return two_versions().change_rollout("begin", run_id, 1.0, rollout={"new": "v2", "current": "v1",
                                                                       "plan": list(plan), "owner": "ramped"})


def test_a_ramp_walks_its_steps_in_order_and_promotes():
    state = begun()
    with pytest.raises(RolloutError, match="step 2 is not the current step"):
        state.change_rollout("start_step", "run-1", 2.0, step=1)
    with pytest.raises(RolloutError, match="cannot promote before every ramp step passed"):
        state.change_rollout("promote", "run-1", 2.0)
    for step in (0, 1):
        state = state.change_rollout("start_step", "run-1", 2.0 + step, step=step)
        state = state.with_weights({"v1": 100 - state.rollout.plan[step], "v2": state.rollout.plan[step]},
                                   "run-1", step)
        state = state.change_rollout("pass_step", "run-1", 3.0 + step, step=step, reason="ok")
    assert state.rollout.steps_passed and state.weights == {"v1": 0, "v2": 100}
    state = state.change_rollout("promote", "run-1", 5.0)
    assert state.rollout.phase == PROMOTED and state.stable == "v2"
    state = state.without_version("v1").change_rollout("finish", "run-1", 6.0)
    assert state.rollout.phase == SUCCEEDED and not state.rollout.active
    assert DeploymentState.from_json(state.to_json()) == state


def test_one_rollout_at_a_time_and_only_its_run_may_move_it():
    state = begun()
    assert begun().begin_rollout(state.rollout) == state  # the holder's retry is a no-op
    with pytest.raises(RolloutInProgress, match="another rollout holds the deployment: rollout of v2 over v1 by "
                                                "ramped run-1"):
        state.change_rollout("begin", "run-2", 2.0, rollout={"new": "v2", "current": "v1"})
    with pytest.raises(RolloutError, match="run run-2 does not hold the deployment"):
        state.change_rollout("abort", "run-2", 2.0, reason="not mine")
    # Once it ended, the next rollout may begin.
    ended = state.change_rollout("abort", "run-1", 3.0, reason="x").change_rollout("finish", "run-1", 4.0)
    assert ended.rollout.phase == ROLLED_BACK
    assert ended.change_rollout("begin", "run-2", 5.0, rollout={"new": "v2", "current": "v1"}).rollout.run_id == "run-2"


def test_after_an_abort_no_step_may_change_the_weights():
    state = begun().change_rollout("start_step", "run-1", 2.0, step=0)
    aborted = state.change_rollout("abort", "run-1", 3.0, reason="analysis failed")
    assert aborted.rollout.phase == ABORTED
    for run_id, step in (("run-1", 0), ("run-1", None)):
        with pytest.raises(RolloutError, match="Aborted - analysis failed; this needs phase Progressing"):
            aborted.with_weights({"v1": 50, "v2": 50}, run_id, step)
    assert aborted.with_weights({"v1": 100}).weights == {"v1": 100}  # the rollback's own change
    assert aborted.change_rollout("abort", "run-1", 4.0, reason="again").rollout.message == "analysis failed"
    with pytest.raises(RolloutError, match="this needs phase Progressing"):
        aborted.change_rollout("pass_step", "run-1", 4.0, step=0, reason="late")


def test_an_inconclusive_step_extends_then_pauses_for_a_person_who_may_resume_it():
    state = begun().change_rollout("start_step", "run-1", 2.0, step=0)
    state = state.change_rollout("extend", "run-1", 3.0, step=0, reason="v2 served 3 requests")
    assert state.rollout.extensions == 1 and state.rollout.step == 0
    paused = state.change_rollout("pause", "run-1", 4.0, reason="still inconclusive")
    assert paused.rollout.phase == PAUSED
    with pytest.raises(RolloutError):
        paused.with_weights({"v1": 0, "v2": 100}, "run-1", 1)  # a paused ramp does not advance
    resumed = paused.change_rollout("resume", "run-1", 5.0, by="alice")
    assert resumed.rollout.step == 1 and "accepted by alice" in resumed.rollout.message


def test_a_rollback_after_promotion_makes_the_old_version_stable_again_while_it_is_intact():
    promoted = begun(plan=(100,))
    promoted = promoted.change_rollout("start_step", "run-1", 2.0, step=0).with_weights(
        {"v1": 0, "v2": 100}, "run-1", 0).change_rollout("pass_step", "run-1", 3.0, step=0, reason="ok")
    promoted = promoted.change_rollout("promote", "run-1", 4.0)
    assert (promoted.phase("v1"), promoted.phase("v2")) == ("live", "stable")
    back = promoted.change_rollout("abort", "run-1", 5.0, reason="failed: remove_old_version")
    assert back.stable == "v1" and back.rollout.phase == ABORTED
    assert (back.phase("v1"), back.phase("v2")) == ("stable", "rolled-back")
    with pytest.raises(StateError, match="would roll back to it"):
        # never remove what a rollout in progress would roll back to, even made stable by hand
        begun().with_weights({"v1": 0, "v2": 100}).with_stable("v2").without_version("v1")
    gone = promoted.with_weights({"v2": 100}).without_version("v1")
    with pytest.raises(RolloutError, match="cannot roll back to v1: its removal has begun"):
        gone.change_rollout("abort", "run-1", 5.0, reason="too late")


def test_transitions_name_what_they_need():
    with pytest.raises(RolloutError, match="start_step needs step"):
        begun().change_rollout("start_step", "run-1", 2.0)
    with pytest.raises(RolloutError, match="unknown transition 'jump'"):
        begun().change_rollout("jump", "run-1", 2.0)
    with pytest.raises(RolloutError, match="begin needs the rollout"):
        two_versions().change_rollout("begin", "run-1", 1.0)


# -- each version's lifecycle --------------------------------------------------------------------
PASSED, FAILED = {"source": "v1", "complete": True}, {"source": "v1", "complete": False, "behind": 3}


def phases(state: DeploymentState) -> dict[str, str]:
    return {name: spec.phase for name, spec in state.versions.items()}


def test_a_version_walks_its_lifecycle_and_each_step_needs_the_one_before():
    state = two_versions().without_version("v2").with_version(_spec("v2"))
    assert phases(state) == {"v1": "stable", "v2": "deployed"}
    with pytest.raises(StateError, match="v2 cannot be backfilled: it is deployed; start the dual-write first"):
        state.with_backfill("v2")
    with pytest.raises(StateError, match="v2 cannot be verified: it is deployed; its backfill has not ended"):
        state.with_verification("v2", PASSED)
    state = state.with_write_target("v2")
    with pytest.raises(StateError, match="v2 cannot take traffic: it is dual-writing"):
        state.with_weights({"v1": 100, "v2": 0})  # not even at weight 0: the header would reach it
    state = state.with_backfill("v2")
    assert state.phase("v2") == "backfilled"
    failed = state.with_verification("v2", FAILED)
    assert failed.phase("v2") == "backfilled" and failed.spec("v2").verification["behind"] == 3
    state = failed.with_verification("v2", PASSED)
    assert state.phase("v2") == "verified"
    with pytest.raises(StateError, match="v2 cannot become stable: it is verified; it has no weight of the "
                                         "traffic; stable needs 100 %"):
        state.with_stable("v2")
    state = state.with_weights({"v1": 60, "v2": 40})
    assert phases(state) == {"v1": "stable", "v2": "live"}
    with pytest.raises(StateError, match="v2 cannot become stable: it is live; it has 40 % of the traffic"):
        state.with_stable("v2")
    state = state.with_weights({"v1": 0, "v2": 100}).with_stable("v2")
    assert phases(state) == {"v1": "live", "v2": "stable"} and state.stable == "v2"
    with pytest.raises(StateError, match="cannot remove the stable version v2"):
        state.with_weights({"v1": 100, "v2": 0}).without_version("v2")
    state = state.with_weights({"v2": 100})
    assert phases(state)["v1"] == "verified"  # no weight: not routable, may come back while verified
    retiring = state.retiring("v1")
    assert phases(retiring)["v1"] == "retired" and "v1" not in retiring.write_targets
    with pytest.raises(StateError, match="v1 cannot take traffic: it is retired; it is leaving the deployment"):
        retiring.with_weights({"v1": 10, "v2": 90})
    with pytest.raises(StateError, match="v1 cannot become a write target: it is retired"):
        retiring.with_write_target("v1")
    with pytest.raises(StateError, match="v1 cannot be deployed: it is retired and being removed"):
        retiring.with_version(_spec("v1"))
    assert list(retiring.without_version("v1").versions) == ["v2"]


def test_a_new_load_of_a_verified_version_needs_a_new_verification_but_a_serving_one_keeps_serving():
    state = two_versions()
    assert state.phase("v2") == "verified"
    reloaded = state.with_backfill("v2")
    assert reloaded.phase("v2") == "backfilled" and reloaded.spec("v2").verification is None
    serving_v2 = state.with_weights({"v1": 50, "v2": 50})
    assert serving_v2.with_backfill("v2").phase("v2") == "live"
    assert serving_v2.with_verification("v2", FAILED).phase("v2") == "live"  # recorded; the rollout decides


def test_an_aborted_rollout_rolls_its_new_version_back_for_good():
    state = begun().change_rollout("start_step", "run-1", 2.0, step=0).with_weights({"v1": 50, "v2": 50}, "run-1", 0)
    aborted = state.change_rollout("abort", "run-1", 3.0, reason="analysis failed")
    assert phases(aborted) == {"v1": "stable", "v2": "rolled-back"}
    with pytest.raises(StateError, match="v2 cannot take more traffic: it is rolled-back; it is rolled back "
                                         "and can only lose its 50 %"):
        aborted.with_weights({"v1": 40, "v2": 60})
    back = aborted.with_weights({"v1": 100})
    assert back.weights == {"v1": 100} and phases(back)["v2"] == "rolled-back"
    with pytest.raises(StateError, match="v2 cannot be verified: it is rolled-back"):
        back.with_verification("v2", PASSED)
    assert list(back.without_version("v2").versions) == ["v1"]


def test_a_state_from_before_phases_gets_them_from_its_weights_and_write_targets():
    old = {"stable": "v1", "weights": {"v1": 90, "v2": 10}, "write_targets": ["v1", "v2", "v3"],
           "versions": {name: {"name": name, "dims": 8, "index": f"docs-{name}"} for name in ("v1", "v2", "v3", "v4")}}
    assert phases(DeploymentState.from_json(old)) == {"v1": "stable", "v2": "live", "v3": "dual-writing",
                                                      "v4": "deployed"}
    with pytest.raises(StateError, match="v4 has an unknown phase 'launched'"):
        DeploymentState.from_json({**old, "versions": {**old["versions"], "v4": {
            "name": "v4", "dims": 8, "index": "docs-v4", "phase": "launched"}}})
