"""BackfillCompleteSensor: wait until the new index really holds every source document."""
from __future__ import annotations

import time
from collections.abc import Sequence

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException

from embedding_rollout.config import Settings
from embedding_rollout.steps import verify_backfill

from ..hooks.deployment import deployment_hook
from ..runtime import Runtime
from ..waiting import MIN_DEFER_SECONDS, wait_until


class BackfillCompleteSensor(BaseSensorOperator):
    """Done when the backfill checkpoint is final *and* every document of ``source`` is in
    ``version``'s index at its latest version (the invariant, not just "the job ended").

    Checks at once, then every ``poke_interval`` seconds (at least ``MIN_DEFER_SECONDS``), deferred
    between checks so it holds no worker slot; fails after ``timeout`` seconds. The state and the
    checkpoint come from the state file, or in a cluster from the app; the documents are read from
    the store itself.
    """

    template_fields: Sequence[str] = ("version", "source")

    def __init__(self, *, version: str, source: str, **kwargs):
        super().__init__(**kwargs)
        self.version, self.source = version, source

    def execute(self, context):
        return self.check(context, None, started=time.time())

    def check(self, context, event=None, started: float = 0.0):
        if self.poke(context):
            return True
        if time.time() - started > self.timeout:
            raise AirflowFailException(f"the backfill of {self.version} was not complete within {self.timeout:.0f} s")
        return wait_until(self, context, time.time() + max(self.poke_interval, MIN_DEFER_SECONDS), "check",
                          {"started": started})

    def poke(self, context) -> bool:
        deployment = deployment_hook(Runtime())
        checkpoint = deployment.checkpoint(self.version, self.source)
        if not checkpoint.done:
            self.log.info("backfill of %s from %s not final yet: %d documents so far, up to id %r",
                          self.version, self.source, checkpoint.loaded, checkpoint.last_id)
            return False
        report = verify_backfill(Settings(), self.version, self.source, deployment.state())
        self.log.info("checked %d documents of %s against %d rows of %s: %d missing, %d behind, %d extra, "
                      "%d duplicated %s", report.checked, self.source, report.target_checked, self.version,
                      report.missing, report.behind, report.extra, report.duplicated, report.examples[:5])
        return report.complete
