"""AwaitDecisionSensor: hold an A/B split until a terminal decision arrives.

Decisions come from messages (``POST /rollout/decisions`` on the app; a ``set_weights`` message
changes the split at once and the wait goes on) or, in ``auto`` mode, from the versions' online
metrics and click-through feedback with a significance test. Returns ``promote`` or ``rollback``.
No decision within ``decision_timeout`` seconds of the split's start: the sensor skips, and the
branch after it takes the safe default, rollback.
"""
from __future__ import annotations

from collections.abc import Sequence

import time

import requests
from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowSkipException

from embedding_rollout.domain.analysis import Thresholds, automatic_decision

from ..operators.istio import router_hook
from ..runtime import Runtime

MESSAGES, AUTO = "messages", "auto"


class AwaitDecisionSensor(BaseSensorOperator):
    template_fields: Sequence[str] = ("new_version", "stable_version", "source", "thresholds", "split",
                                      "min_feedback", "decision_timeout")

    def __init__(self, *, new_version: str, stable_version: str, split: dict | str, source: str = MESSAGES,
                 thresholds: dict | None = None, min_feedback: int | str = 50,
                 decision_timeout: int | str = 3600, runtime: Runtime | None = None, **kwargs):
        kwargs.setdefault("mode", "reschedule")
        super().__init__(**kwargs)
        self.new_version, self.stable_version, self.source = new_version, stable_version, source
        self.split = split  # {"at": when the split started, "mark": the metrics source's mark then}
        self.thresholds, self.min_feedback, self.decision_timeout = thresholds or {}, min_feedback, decision_timeout
        self.runtime = runtime

    @property
    def app_url(self) -> str:
        return (self.runtime or Runtime()).app_url

    def poke(self, context):
        waited = time.time() - float(self.split["at"])
        if waited > float(self.decision_timeout):
            raise AirflowSkipException(f"no decision within {self.decision_timeout} s: rolling back")
        return self._auto() if self.source == AUTO else self._messages()

    def _messages(self):
        since = float(self.split["at"])
        reply = requests.get(f"{self.app_url}/rollout/decisions", params={"new_version": self.new_version}, timeout=5)
        reply.raise_for_status()
        decisions = [d for d in reply.json() if d["at"] >= since]
        weights = [d for d in decisions if d["action"] == "set_weights"]
        if weights:  # the latest weight wins; setting it again is a no-op
            latest = weights[-1]["weight"]
            confirmed = router_hook(self.runtime or Runtime()).set_weights(
                {self.new_version: latest, self.stable_version: 100 - latest})
            self.log.info("split now %s (decision %d by %s)", confirmed, weights[-1]["id"], weights[-1]["by"] or "-")
        final = next((d for d in decisions if d["action"] in ("promote", "rollback")), None)
        if final is None:
            return False
        self.log.info("decision %d: %s (by %s)", final["id"], final["action"], final["by"] or "-")
        return PokeReturnValue(is_done=True, xcom_value=final["action"])

    def _auto(self):
        measured = (self.runtime or Runtime()).metrics_source().since(self.split["mark"])
        limits = Thresholds(**{k: v for k, v in dict(self.thresholds).items() if v is not None})
        decision, reason = automatic_decision(measured.versions, measured.clicks, self.new_version,
                                              self.stable_version, limits, int(self.min_feedback))
        self.log.info("automatic decision: %s: %s", decision or "none yet", reason)
        return PokeReturnValue(is_done=True, xcom_value=decision) if decision else False
