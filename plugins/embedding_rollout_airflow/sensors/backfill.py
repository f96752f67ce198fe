"""BackfillCompleteSensor: wait until the new index really holds every source document."""
from __future__ import annotations

from collections.abc import Sequence

from airflow.sdk import BaseSensorOperator

from embedding_rollout.config import Settings
from embedding_rollout.pipeline.indexing import Checkpoint
from embedding_rollout.steps import checkpoint_path, verify_backfill


class BackfillCompleteSensor(BaseSensorOperator):
    """Done when the backfill checkpoint is final *and* every document of ``source`` is in
    ``version``'s index at its latest version (the invariant, not just "the job ended").

    Runs in ``reschedule`` mode by default so it holds no worker slot between pokes.
    """

    template_fields: Sequence[str] = ("version", "source")

    def __init__(self, *, version: str, source: str, **kwargs):
        kwargs.setdefault("mode", "reschedule")
        super().__init__(**kwargs)
        self.version, self.source = version, source

    def poke(self, context) -> bool:
        settings = Settings()
        checkpoint = Checkpoint.load(checkpoint_path(settings, self.version, self.source),
                                     settings.index_name(self.version))
        if not checkpoint.done:
            self.log.info("backfill of %s from %s not final yet: %d documents so far", self.version,
                          self.source, checkpoint.position)
            return False
        report = verify_backfill(settings, self.version, self.source)
        self.log.info("checked %d documents of %s in %s: %d missing, %d behind %s", report.checked, self.source,
                      self.version, report.missing, report.behind, report.examples[:5])
        return report.complete
