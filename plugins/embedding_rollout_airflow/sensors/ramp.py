"""RampStepSensor: one step of a ramped traffic shift, as a mapped task, with analysis.

Mapped task instances may run in any order; each step waits (rescheduled, holding no slot) until
the step before it succeeded, then sets the new weight, lets traffic flow for the interval, and
judges the new version's metrics against the stable one's. A failed analysis fails the task for
good (no retries), which sends the DAG to its rollback branch.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from embedding_rollout.domain.analysis import FAILED, INCONCLUSIVE, Thresholds, judge

from ..operators.istio import router_hook
from ..runtime import Runtime


class RampStepSensor(BaseSensorOperator):
    template_fields: Sequence[str] = ("new_version", "stable_version", "interval_seconds", "thresholds")

    def __init__(self, *, weight: int, new_version: str, stable_version: str, interval_seconds: int | str,
                 thresholds: dict | str | None = None, runtime: Runtime | None = None, **kwargs):
        kwargs.setdefault("mode", "reschedule")
        kwargs.setdefault("poke_interval", 1)
        kwargs.setdefault("max_active_tis_per_dagrun", 1)
        kwargs.setdefault("retries", 0)
        super().__init__(**kwargs)
        self.weight, self.new_version, self.stable_version = weight, new_version, stable_version
        self.interval_seconds, self.thresholds = interval_seconds, thresholds or {}
        self.runtime = runtime

    def _previous_step_done(self, ti) -> bool:
        """True once the step before succeeded; skips this step when that one failed or was skipped."""
        if ti.map_index <= 0:
            return True
        if ti.xcom_pull(task_ids=self.task_id, map_indexes=ti.map_index - 1) is not None:
            return True
        ended_badly = ti.get_ti_count(dag_id=ti.dag_id, map_index=ti.map_index - 1, task_ids=[self.task_id],
                                      run_ids=[ti.run_id], states=["failed", "upstream_failed", "skipped"])
        if ended_badly:
            raise AirflowSkipException(f"ramp step {ti.map_index - 1} did not succeed: the ramp stops here")
        return False

    def poke(self, context):
        ti = context["ti"]
        if not self._previous_step_done(ti):
            self.log.info("waiting for ramp step %d to succeed first", ti.map_index - 1)
            return False
        runtime = self.runtime or Runtime()
        weights = {self.new_version: int(self.weight), self.stable_version: 100 - int(self.weight)}
        metrics = runtime.metrics_source()
        mark = metrics.mark()
        confirmed = router_hook(runtime).set_weights(weights)
        self.log.info("ramp step %d: %s now gets %d %% %s", ti.map_index, self.new_version, self.weight, confirmed)
        time.sleep(float(self.interval_seconds))
        verdict = judge(metrics.since(mark).versions, self.new_version, self.stable_version,
                        Thresholds(**{k: v for k, v in dict(self.thresholds).items() if v is not None}))
        self.log.info("analysis: %s: %s (new %s, stable %s)", verdict.status, verdict.reason, verdict.new,
                      verdict.stable)
        if verdict.status == FAILED:
            raise AirflowFailException(f"analysis failed at {self.weight} %: {verdict.reason}")
        if verdict.status == INCONCLUSIVE:
            self.log.warning("analysis inconclusive at %d %%: %s; continuing", self.weight, verdict.reason)
        return PokeReturnValue(is_done=True, xcom_value={"weight": int(self.weight), "verdict": verdict.status,
                                                         "new": verdict.new, "stable": verdict.stable})
