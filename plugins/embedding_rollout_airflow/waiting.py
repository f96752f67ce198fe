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
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

MIN_DEFER_SECONDS = 10.0


def wait_until(operator, context, moment: float, method_name: str, kwargs: dict):
    """Resume ``operator.<method_name>(context, event, **kwargs)`` at ``moment`` (epoch seconds)."""
    from airflow.providers.standard.triggers.temporal import DateTimeTrigger

    left = moment - time.time()
    if left < MIN_DEFER_SECONDS:
        time.sleep(max(0.0, left))
        return getattr(operator, method_name)(context, None, **kwargs)
    operator.defer(trigger=DateTimeTrigger(moment=datetime.fromtimestamp(moment, tz=timezone.utc)),
                   method_name=method_name, kwargs=kwargs)
