"""RampOperator: step 4 of the ramped rollout, one task that walks the step list.

Argo Rollouts' step list and Flagger's controller loop: the plan and the index of the current step
live in the deployment state (``embedding_rollout.domain.rollout``), and this task only executes
the transitions, one step after the other, so the order of the steps is the order of the loop:

1. ``start_step``: record that the step begins, take a metrics mark, set the step's weight (a change
   the state refuses once the rollout stopped progressing, e.g. a rollback began);
2. defer until the step's window has passed (no worker slot is held meanwhile);
3. judge the window (``domain.analysis.judge``): **Successful** passes the step and the loop goes on
   with the next one; **Failed** aborts the rollout and fails the task (the run's teardown rolls
   back); **Inconclusive** never advances traffic: the window grows by one interval, up to
   ``inconclusive_limit`` times, then ``on_inconclusive`` decides: ``rollback``, or ``ask`` (the
   rollout pauses and the DAG asks a person). A metrics source that cannot be read is an
   **Error**: retried after ``retry_delay_seconds``, up to ``error_limit`` times in a row.

Each step's weight, verdict and figures are pushed as XCom ``step_<n>`` (the task's XCom tab) and
logged; the return value lists them all.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from embedding_rollout.domain.analysis import FAILED, INCONCLUSIVE, SUCCESSFUL, Thresholds, judge
from embedding_rollout.domain.rollout import PAUSED, PROGRESSING
from embedding_rollout.online_metrics import MetricsUnavailable

from ..hooks.deployment import deployment_hook
from ..hooks.routing import WeightsRefused
from ..runtime import Runtime
from ..waiting import StopsWithItsRun, wait_until
from .istio import router_hook

ROLLBACK, ASK = "rollback", "ask"
PASSED = "passed"


class RampOperator(StopsWithItsRun, BaseOperator):
    template_fields: Sequence[str] = ("interval_seconds", "thresholds", "inconclusive_limit", "on_inconclusive")
    ui_color = "#b0e0c8"

    def __init__(self, *, interval_seconds: int | str, thresholds: dict | str | None = None,
                 inconclusive_limit: int | str = 2, on_inconclusive: str = ROLLBACK, error_limit: int = 4,
                 retry_delay_seconds: float = 15.0, resume: bool = False, runtime: Runtime | None = None,
                 **kwargs):
        kwargs.setdefault("retries", 0)  # a failed step must roll back, not run again
        super().__init__(**kwargs)
        self.interval_seconds, self.thresholds = interval_seconds, thresholds or {}
        self.inconclusive_limit, self.on_inconclusive = inconclusive_limit, on_inconclusive
        self.error_limit, self.retry_delay_seconds = error_limit, retry_delay_seconds
        self.resume, self.runtime = resume, runtime

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def _runtime(self) -> Runtime:
        return self.runtime or Runtime()

    def _deployment(self):
        return deployment_hook(self._runtime)

    def _rollout(self, context, phase: str = PROGRESSING):
        run_id = context["run_id"]
        rollout = self._deployment().state().rollout
        if rollout is None or rollout.run_id != run_id:
            raise AirflowFailException(f"run {run_id} holds no rollout: {rollout.describe() if rollout else 'none'}")
        if rollout.phase != phase:
            raise AirflowFailException(f"the ramp stops: {rollout.describe()}")
        return rollout

    def _abort(self, context, reason: str) -> None:
        self._deployment().change_rollout("abort", context["run_id"], reason=reason)
        raise AirflowFailException(reason)

    # -- the loop --------------------------------------------------------------------------------
    def execute(self, context):
        if self.resume:
            rollout = self._rollout(context, PAUSED)
            self._deployment().change_rollout("resume", context["run_id"], by="a person (Airflow UI)")
            self.log.info("resumed after a person accepted step %d", rollout.step + 1)
        return self.next_step(context)

    def next_step(self, context, event=None, errors: int = 0):
        """Begin the current step: set its weight and wait for its window."""
        rollout = self._rollout(context)
        if rollout.steps_passed:
            return self._summary(context, rollout, PASSED)
        step, run_id = rollout.step, context["run_id"]
        weight = rollout.weight_at(step)
        try:
            mark = self._runtime.metrics_source().mark()
        except MetricsUnavailable as exc:
            return self._metrics_error(context, errors, exc, "next_step", {})
        rollout = self._deployment().change_rollout("start_step", run_id, step=step).rollout
        try:
            confirmed = router_hook(self._runtime).set_weights(
                {rollout.new: weight, rollout.current: 100 - weight}, run_id=run_id, step=step)
        except WeightsRefused as exc:
            raise AirflowFailException(f"step {step + 1} may not change the weights: {exc}") from exc
        self.log.info("step %d of %d: %s at %d %% (split %s); analysis in %s s", step + 1, len(rollout.plan),
                      rollout.new, weight, confirmed, self.interval_seconds)
        self._record(context, step, {"weight": weight, "status": "Running", "started_at": rollout.step_started_at})
        return wait_until(self, context, rollout.step_started_at + float(self.interval_seconds), "analyse",
                          {"step": step, "mark": mark})

    def analyse(self, context, event=None, step: int = 0, mark: dict | None = None, errors: int = 0):
        """Judge the step's window; pass, extend, pause or abort."""
        rollout = self._rollout(context)
        if rollout.step != step:
            raise AirflowFailException(f"step {step + 1} is no longer current: {rollout.describe()}")
        try:
            measured = self._runtime.metrics_source().since(mark)
        except MetricsUnavailable as exc:
            return self._metrics_error(context, errors, exc, "analyse", {"step": step, "mark": mark})
        weight = rollout.weight_at(step)
        verdict = judge(measured.versions, rollout.new, rollout.current, Thresholds.from_conf(self.thresholds),
                        stable_weight=100 - weight)
        window = float(self.interval_seconds) * (1 + rollout.extensions)
        result = {"weight": weight, "status": verdict.status, "reason": verdict.reason, "window_seconds": window,
                  "new": verdict.new, "stable": verdict.stable}
        self._record(context, step, result)
        self.log.info("step %d at %d %%: %s: %s (%s %s, %s %s)", step + 1, weight, verdict.status, verdict.reason,
                      rollout.new, verdict.new, rollout.current, verdict.stable)
        run_id = context["run_id"]
        if verdict.status == SUCCESSFUL:
            self._deployment().change_rollout("pass_step", run_id, step=step, reason=verdict.reason)
            return self.next_step(context)
        if verdict.status == FAILED:
            self._abort(context, f"analysis failed at step {step + 1} ({weight} %): {verdict.reason}")
        assert verdict.status == INCONCLUSIVE
        if rollout.extensions < int(self.inconclusive_limit):
            rollout = self._deployment().change_rollout("extend", run_id, step=step, reason=verdict.reason).rollout
            self.log.info("inconclusive: gathering one more interval of data (%d of %s)", rollout.extensions,
                          self.inconclusive_limit)
            due = rollout.step_started_at + float(self.interval_seconds) * (1 + rollout.extensions)
            return wait_until(self, context, due, "analyse", {"step": step, "mark": mark})
        reason = (f"analysis inconclusive at step {step + 1} ({weight} %) after {rollout.extensions + 1} "
                  f"windows: {verdict.reason}")
        if self.on_inconclusive == ASK:
            self._deployment().change_rollout("pause", run_id, reason=reason + "; waiting for a person")
            self.log.warning("%s: pausing for a person to decide", reason)
            return self._summary(context, rollout, PAUSED)
        self._abort(context, reason)

    def _metrics_error(self, context, errors: int, exc: Exception, method: str, kwargs: dict):
        errors += 1
        if errors > self.error_limit:
            self._abort(context, f"metrics unavailable {errors} times in a row: {exc}")
        self.log.warning("metrics unavailable (%d of %d): %s; retrying in %.0f s", errors, self.error_limit, exc,
                         self.retry_delay_seconds)
        return wait_until(self, context, time.time() + self.retry_delay_seconds, method, {**kwargs, "errors": errors})

    def _record(self, context, step: int, result: dict) -> None:
        context["ti"].xcom_push(key=f"step_{step + 1}", value=result)

    def _summary(self, context, rollout, outcome: str) -> dict:
        ti = context["ti"]
        steps = [ti.xcom_pull(task_ids=ti.task_id, key=f"step_{i + 1}") for i in range(len(rollout.plan))]
        return {"outcome": outcome, "steps": [s for s in steps if s]}
