"""TaskFlow tasks shared by the deployment DAGs: the rollout's setup and teardown, and the waits
around promotion."""
from __future__ import annotations

import logging
import time
from datetime import timedelta

from airflow.sdk import BaseOperator, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from embedding_rollout.domain.rollout import ABORTED, PROMOTED, ROLLED_BACK, SUCCEEDED

from .conf import InvalidConf, resolve_conf
from .hooks.deployment import DeploymentStateError, deployment_hook
from .operators.istio import router_hook
from .runtime import Runtime
from .waiting import StopsWithItsRun, wait_until

log = logging.getLogger(__name__)

# For the human-in-the-loop tasks. An answer that arrives within about a second of the task starting
# to wait can reach the scheduler before it has drained the waiting worker's exit, and the scheduler
# then fails the task as "killed externally" (the race of apache/airflow#71172, on the resume path:
# its guard covers only a resumed task still *scheduled*). One retry asks again instead of rolling
# back; a person's (or a script's) next answer decides.
ASK_AGAIN_ONCE = {"retries": 1, "retry_delay": timedelta(seconds=5)}


def begin_rollout_task(strategy: str):
    @task(task_id="begin_rollout", retries=0,
          doc_md="Setup: refuse an invalid conf before anything changes, then take the deployment for this "
                 "run (one rollout at a time: refused while another run's rollout is active).")
    def begin_rollout(params=None, dag_run=None) -> dict:
        deployment = deployment_hook(Runtime())
        try:
            conf = resolve_conf(dict(params), deployment)
        except InvalidConf as exc:
            raise AirflowFailException(f"invalid conf: {exc}") from exc
        rollout = {"new": conf["new_version"], "current": conf["current_version"], "strategy": strategy,
                   "plan": conf.get("plan", []), "owner": dag_run.dag_id}
        try:
            state = deployment.change_rollout("begin", dag_run.run_id, rollout=rollout)
        except DeploymentStateError as exc:
            raise AirflowFailException(f"refused: {exc}") from exc
        log.info("began: %s", state.rollout.describe())
        return conf
    return begin_rollout()


def _failed_tasks(ti) -> list[str]:
    """The tasks that failed; only when none did, those that could not run because of one."""
    states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})
    failed = sorted(task_id for task_id, state in states.items() if state == "failed")
    return failed or sorted(task_id for task_id, state in states.items() if state == "upstream_failed")


@task(retries=2, retry_delay=timedelta(seconds=15), doc_md="Teardown: runs however the run ended (a failed task, a person marking the run failed). "
                        "Unless the rollout completed, it is aborted and all traffic goes back to the current "
                        "version; `finish_rollout` then removes what is left over.")
def conclude_rollout(conf: dict, ti=None) -> dict:
    deployment, run_id = deployment_hook(Runtime()), ti.run_id
    state = deployment.state()
    rollout = state.rollout
    if rollout is None or rollout.run_id != run_id or not rollout.active:
        raise AirflowSkipException(f"run {run_id} holds no active rollout: {rollout.describe() if rollout else '-'}")
    if rollout.phase == PROMOTED and rollout.current not in state.versions:
        log.info("%s; its old version's removal has begun: finish_rollout completes it", rollout.describe())
        return {"outcome": "promoted", "rollout": rollout.to_json()}
    if rollout.phase != ABORTED:
        failed = _failed_tasks(ti)
        reason = f"failed: {', '.join(failed)}" if failed else "the run ended before the rollout completed"
        rollout = deployment.change_rollout("abort", run_id, reason=reason).rollout
    weights = router_hook(Runtime()).set_weights({rollout.current: 100})
    log.info("rolled back (%s): %s serves all traffic %s; finish_rollout removes %s", rollout.message,
             rollout.current, weights, rollout.new)
    return {"outcome": "rolled back", "reason": rollout.message, "rollout": rollout.to_json()}


def rollback_chosen_task(task_id: str, fail_run: bool, doc_md: str):
    """A decided rollback: abort the rollout (the teardown sends the traffic back). ``fail_run``:
    the run fails too (a ramped rollout that did not reach its goal); else it succeeds (an A/B
    experiment that ended in a rollback)."""
    @task(task_id=task_id, trigger_rule="none_failed_min_one_success", doc_md=doc_md)
    def rollback_chosen(ti=None) -> str:
        decision = ti.xcom_pull(task_ids="await_decision") or {}
        reason = decision.get("reason") or "a person chose Rollback"
        deployment_hook(Runtime()).change_rollout("abort", ti.run_id, reason=f"rollback decided: {reason}")
        if fail_run:
            raise AirflowFailException(f"rollback decided: {reason}")
        return reason
    return rollback_chosen()


@task(doc_md="Teardown, the run's verdict: succeeds when the rollout completed (or, in an A/B run, when the "
             "rollback was the decision), fails otherwise, so the run's state says how the rollout ended.")
def rollout_outcome(conf: dict, decided_rollback: str | None = None, ti=None) -> str:
    rollout = deployment_hook(Runtime()).state().rollout
    if rollout is None or rollout.run_id != ti.run_id:
        raise AirflowFailException(f"run {ti.run_id} holds no rollout: {rollout.describe() if rollout else '-'}")
    if rollout.phase == SUCCEEDED:
        return rollout.describe()
    if rollout.phase == ROLLED_BACK and decided_rollback:
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})
        if states.get(decided_rollback) == "success":
            return rollout.describe()
    if rollout.active:
        raise AirflowFailException(f"the rollback did not complete: {rollout.describe()}")
    raise AirflowFailException(rollout.describe())


class RollbackWindowSensor(StopsWithItsRun, BaseOperator):
    """Keep the old version for ``seconds`` after promotion (Argo's rollbackWindow), deferred: a
    person can still roll back by marking the run failed, and no worker slot is held."""

    template_fields = ("seconds",)

    def __init__(self, *, seconds: int | str, **kwargs):
        super().__init__(**kwargs)
        self.seconds = seconds

    def execute(self, context):
        return wait_until(self, context, time.time() + float(self.seconds), "window_ended", {})

    def window_ended(self, context, event=None) -> None:
        self.log.info("rollback window of %s s over: the old version goes", self.seconds)
