"""BackfillCompleteSensor: wait until the new index really holds every source document."""
from __future__ import annotations

from collections.abc import Sequence

from airflow.sdk import BaseSensorOperator

from embedding_rollout.config import Settings
from embedding_rollout.steps import verify_backfill

from ..hooks.deployment import deployment_hook
from ..runtime import Runtime


class BackfillCompleteSensor(BaseSensorOperator):
    """Done when the backfill checkpoint is final *and* every document of ``source`` is in
    ``version``'s index at its latest version (the invariant, not just "the job ended").

    Runs in ``reschedule`` mode by default so it holds no worker slot between pokes. The state and
    the checkpoint come from the state file, or in a cluster from the app; the documents are read
    from the store itself.
    """

    template_fields: Sequence[str] = ("version", "source")

    def __init__(self, *, version: str, source: str, **kwargs):
        kwargs.setdefault("mode", "reschedule")
        super().__init__(**kwargs)
        self.version, self.source = version, source

    def poke(self, context) -> bool:
        deployment = deployment_hook(Runtime())
        checkpoint = deployment.checkpoint(self.version, self.source)
        if not checkpoint.done:
            self.log.info("backfill of %s from %s not final yet: %d documents so far", self.version,
                          self.source, checkpoint.position)
            return False
        report = verify_backfill(Settings(), self.version, self.source, deployment.state())
        self.log.info("checked %d documents of %s in %s: %d missing, %d behind %s", report.checked, self.source,
                      self.version, report.missing, report.behind, report.examples[:5])
        return report.complete
