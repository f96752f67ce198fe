"""RampOperator's decisions, one step at a time, against a real state file and router, with the
metrics source scripted and the waits run at once (the scheduler path is tests/test_airflow_ramped.py)."""
from __future__ import annotations

import pytest

from embedding_rollout.domain.analysis import VersionMetrics
from embedding_rollout.domain.rollout import ABORTED, PAUSED
from embedding_rollout.domain.state import StateFile, VersionSpec
from embedding_rollout.online_metrics import MetricsUnavailable, Window
from conftest import serving, verified

RUN = "manual__test"


class ScriptedMetrics:
    """Each ``since`` returns the next window of the script, or raises the next exception in it."""

    def __init__(self, *windows):
        self.windows = list(windows)

    def mark(self) -> dict:
        return {"at": 0}

    def since(self, mark) -> Window:
        item = self.windows.pop(0)
        if isinstance(item, Exception):
            raise item
        return Window({v: VersionMetrics(requests=n, failures=f) for v, (n, f) in item.items()}, {})


class FakeTI:
    task_id = "ramp"

    def __init__(self):
        self.xcom = {}

    def xcom_push(self, key, value):
        self.xcom[key] = value

    def xcom_pull(self, task_ids, key):
        return self.xcom.get(key)


@pytest.fixture
def ramp(tmp_path, monkeypatch):
    from embedding_rollout_airflow.operators import ramp as module
    from embedding_rollout_airflow.runtime import Runtime
    monkeypatch.setenv("ER_HOME", str(tmp_path))
    state = StateFile(tmp_path / "state.json")
    state.update(lambda s: verified(serving(s, VersionSpec("v1", 8, "docs-v1")), VersionSpec("v2", 8, "docs-v2"))
                 .change_rollout("begin", RUN, 1.0, rollout={"new": "v2", "current": "v1", "plan": [50, 100]}))
    waits = []
    monkeypatch.setattr(module, "wait_until", lambda op, ctx, moment, method, kwargs: (
        waits.append(method), getattr(op, method)(ctx, None, **kwargs))[1])

    def run(*windows, **kwargs):
        metrics = ScriptedMetrics(*windows)
        runtime = Runtime(kind="local")
        object.__setattr__(runtime, "metrics_source", lambda: metrics)
        operator = module.RampOperator(task_id="ramp", interval_seconds=1, thresholds={"min_requests": 10},
                                       retry_delay_seconds=0, runtime=runtime, **kwargs)
        context = {"run_id": RUN, "ti": FakeTI()}
        return operator, context, operator.execute(context)
    run.state, run.waits = state, waits
    return run


def test_successful_windows_walk_every_step_in_order(ramp):
    _, context, result = ramp({"v2": (50, 0), "v1": (50, 0)}, {"v2": (100, 0), "v1": (0, 0)})
    assert result["outcome"] == "passed" and [s["weight"] for s in result["steps"]] == [50, 100]
    assert ramp.state.read().rollout.steps_passed and ramp.state.read().weights == {"v2": 100, "v1": 0}


def test_a_failed_window_aborts_and_the_weights_stay_where_they_were(ramp):
    from airflow.sdk.exceptions import AirflowFailException
    with pytest.raises(AirflowFailException, match="analysis failed at step 1"):
        ramp({"v2": (50, 40), "v1": (50, 0)})
    state = ramp.state.read()
    assert state.rollout.phase == ABORTED and state.weights == {"v2": 50, "v1": 50}


def test_inconclusive_gathers_more_data_and_never_advances_then_rolls_back(ramp):
    from airflow.sdk.exceptions import AirflowFailException
    few = {"v2": (3, 0), "v1": (40, 0)}
    with pytest.raises(AirflowFailException, match="inconclusive at step 1 .* after 3 windows"):
        ramp(few, few, few, inconclusive_limit=2)
    state = ramp.state.read()
    assert state.rollout.phase == ABORTED and state.rollout.step == 0 and state.weights["v2"] == 50


def test_inconclusive_can_ask_a_person_instead(ramp):
    few = {"v2": (3, 0), "v1": (40, 0)}
    _, _, result = ramp(few, inconclusive_limit=0, on_inconclusive="ask")
    assert result["outcome"] == PAUSED and ramp.state.read().rollout.phase == PAUSED


def test_an_unreadable_metrics_source_is_retried_not_judged(ramp):
    down = MetricsUnavailable("connection refused")
    _, _, result = ramp(down, down, {"v2": (50, 0), "v1": (50, 0)}, {"v2": (60, 0)}, error_limit=4)
    assert result["outcome"] == "passed" and ramp.waits.count("analyse") == 4  # 2 windows + 2 retries


def test_too_many_metrics_errors_in_a_row_abort(ramp):
    from airflow.sdk.exceptions import AirflowFailException
    down = MetricsUnavailable("connection refused")
    with pytest.raises(AirflowFailException, match="metrics unavailable 3 times in a row"):
        ramp(down, down, down, error_limit=2)
    assert ramp.state.read().rollout.phase == ABORTED


class MarkedTI(FakeTI):
    """A task instance whose run's other tasks have the given states (the execution API's answer)."""
    dag_id, run_id = "embedding_deploy_ramped", RUN

    def __init__(self, states):
        super().__init__()
        self.states = states

    def get_task_states(self, dag_id, task_ids, run_ids):
        assert (dag_id, run_ids) == (self.dag_id, [self.run_id])
        return {self.run_id: {t: s for t, s in self.states.items() if t in task_ids}}


@pytest.mark.parametrize("after_ramp, stops", [(None, False), ("skipped", True), ("success", True)])
def test_a_ramp_resumed_in_a_run_a_person_ended_stops_before_its_step(tmp_path, after_ramp, stops):
    """A resume after the run was marked failed or success (its pending tasks skipped, see
    ``waiting.StopsWithItsRun``) fails before the ramp reads or changes anything."""
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG
    from airflow.sdk.exceptions import AirflowFailException
    from embedding_rollout_airflow.operators.ramp import RampOperator
    with DAG("embedding_deploy_ramped", schedule=None):
        ramp = RampOperator(task_id="ramp", interval_seconds=1)
        ramp >> EmptyOperator(task_id="after_ramp")
    ramp.analyse = lambda context, event=None, **kwargs: "analysed"
    context = {"run_id": RUN, "ti": MarkedTI({"after_ramp": after_ramp, "promote": "skipped"})}
    if stops:
        with pytest.raises(AirflowFailException, match=f"ended while the ramp ran .*after_ramp {after_ramp}"):
            ramp.resume_execution("analyse", {"step": 0}, context)
    else:
        assert ramp.resume_execution("analyse", {"step": 0}, context) == "analysed"
