"""How the rollout's tasks wait: deferred to the triggerer, holding no worker slot.

Every wait of the rollout (a ramp step's window, the backfill check, the A/B decision, the rollback
window) defers with a ``DateTimeTrigger`` or a trigger of ``triggers/``; none sleeps in a worker and
none re-queues itself rapidly in reschedule mode.

One guard: a deferral shorter than ``MIN_DEFER_SECONDS`` is waited in the worker instead. The
scheduler ignores the stale "success" of a worker that deferred only while the resumed task is
still *scheduled* (``next_method`` set); if the trigger fires so soon that the scheduler has already
queued the resumed task before it drained that event, it takes the event for a task killed
externally and fails it (the race of apache/airflow#71172, on the defer path). Ten seconds leave
the scheduler several loops to drain the event first, even on a busy machine.

And one for a run that ends while a task waits: ``StopsWithItsRun``.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

MIN_DEFER_SECONDS = 10.0
FINISHED = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})


def wait_until(operator, context, moment: float, method_name: str, kwargs: dict):
    """Resume ``operator.<method_name>(context, event, **kwargs)`` at ``moment`` (epoch seconds)."""
    from airflow.providers.standard.triggers.temporal import DateTimeTrigger

    left = moment - time.time()
    if left < MIN_DEFER_SECONDS:
        time.sleep(max(0.0, left))
        return getattr(operator, method_name)(context, None, **kwargs)
    operator.defer(trigger=DateTimeTrigger(moment=datetime.fromtimestamp(moment, tz=timezone.utc)),
                   method_name=method_name, kwargs=kwargs)


class StopsWithItsRun:
    """A deferring operator that fails when it resumes in a run that has ended.

    Marking a run failed (or success) fails its running and deferred tasks and skips its pending
    ones. A task that defers at that moment can still come back: on Airflow's SQLite database the
    execution API reads a task's state and writes the new one outside one transaction, so the
    task's deferral overwrites the FAILED the mark wrote (seen in CI: a ramp went on for all its
    steps after its run was marked failed). The mark leaves a trace the task can read: its
    downstream tasks are finished while it still runs, which no trigger rule of these DAGs allows.
    """

    def resume_execution(self, next_method, next_kwargs, context):
        stop_if_run_ended(self, context)
        return super().resume_execution(next_method, next_kwargs, context)


def stop_if_run_ended(operator, context) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    downstream = sorted(operator.downstream_task_ids)
    if not downstream:
        return
    ti = context["ti"]
    states = ti.get_task_states(dag_id=ti.dag_id, task_ids=downstream, run_ids=[ti.run_id]).get(ti.run_id, {})
    finished = {task: state for task, state in states.items() if state in FINISHED}
    if finished:
        raise AirflowFailException(
            f"the run ended while the {operator.task_id} ran (a person marked it failed or success: "
            f"{', '.join(f'{t} {s}' for t, s in sorted(finished.items()))}); it stops here, and the "
            "teardowns conclude the rollout")
