"""BackfillCompleteSensor: wait until the new index's verification against the source has passed."""
from __future__ import annotations

import time
from collections.abc import Sequence

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException

from embedding_rollout.domain.lifecycle import ROUTABLE, VERIFIED

from ..hooks.deployment import deployment_hook
from ..runtime import Runtime
from ..waiting import MIN_DEFER_SECONDS, StopsWithItsRun, wait_until


class BackfillCompleteSensor(StopsWithItsRun, BaseSensorOperator):
    """Done when ``version`` is verified against ``source``: the verification step (``index
    verify``, a pod in clusters) ran once the backfill ended and recorded its report with the
    version in the deployment state. The sensor reads that record, a few hundred bytes, instead
    of scanning the indices on every poke.

    Checks at once, then every ``poke_interval`` seconds (at least ``MIN_DEFER_SECONDS``), deferred
    between checks so it holds no worker slot; fails after ``timeout`` seconds. The state comes
    from the state file, or in a cluster from the app.
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
        spec = deployment_hook(Runtime()).state().spec(self.version)
        report = spec.verification or {}
        if spec.phase not in (VERIFIED, *ROUTABLE) or report.get("source") != self.source:
            self.log.info("%s is %s; verification against %s: %s", self.version, spec.phase, self.source,
                          _figures(report) if report else "none recorded yet")
            return False
        self.log.info("%s verified against %s: %s", self.version, self.source, _figures(report))
        return True


def _figures(report: dict) -> str:
    outcome = "passed" if report.get("complete") else "failed"
    return (f"{outcome}: {report.get('checked', 0)} source documents against {report.get('target_checked', 0)} "
            f"rows; {report.get('missing', 0)} missing, {report.get('behind', 0)} behind, {report.get('extra', 0)} "
            f"extra, {report.get('duplicated', 0)} duplicated {report.get('examples') or ''}")
