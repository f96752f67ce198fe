"""AwaitDecisionSensor: hold an A/B split until a terminal decision arrives.

Decisions come from messages (``POST /rollout/decisions`` on the app; a ``set_weights`` message
changes the split at once and the wait goes on) or, in ``auto`` mode, from the versions' online
metrics and click-through feedback with a significance test. Returns ``{"action": "promote" |
"rollback", "reason": ...}``; no decision within ``decision_timeout`` seconds of the split's start
is a rollback. Between checks the task is deferred: to ``DecisionTrigger`` (messages, answered as
soon as one arrives) or to a timer (``auto``, every ``poke_interval`` seconds).
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException

from embedding_rollout.domain.analysis import Thresholds, automatic_decision
from embedding_rollout.online_metrics import MetricsUnavailable

from ..hooks.deployment import AppDeploymentHook
from ..hooks.routing import WeightsRefused
from ..operators.istio import router_hook
from ..runtime import Runtime
from ..triggers.decisions import DecisionTrigger
from ..waiting import MIN_DEFER_SECONDS, StopsWithItsRun, wait_until

MESSAGES, AUTO = "messages", "auto"


class AwaitDecisionSensor(StopsWithItsRun, BaseSensorOperator):
    template_fields: Sequence[str] = ("new_version", "stable_version", "source", "thresholds", "split",
                                      "min_feedback", "decision_timeout")

    def __init__(self, *, new_version: str, stable_version: str, split: dict | str, source: str = MESSAGES,
                 thresholds: dict | None = None, min_feedback: int | str = 50,
                 decision_timeout: int | str = 3600, runtime: Runtime | None = None, **kwargs):
        kwargs.setdefault("poke_interval", 15)
        super().__init__(**kwargs)
        self.new_version, self.stable_version, self.source = new_version, stable_version, source
        self.split = split  # {"at": when the split started, "mark": the metrics source's mark then}
        self.thresholds, self.min_feedback, self.decision_timeout = thresholds or {}, min_feedback, decision_timeout
        self.runtime = runtime

    @property
    def _runtime(self) -> Runtime:
        return self.runtime or Runtime()

    @property
    def deadline(self) -> float:
        return float(self.split["at"]) + float(self.decision_timeout)

    def execute(self, context):
        return self.check(context)

    def check(self, context, event=None, applied: int = 0):
        if time.time() >= self.deadline:
            return self._decided("rollback", f"no decision within {self.decision_timeout} s: rolling back")
        if self.source == AUTO:
            return self._auto(context)
        return self._messages(context, applied)

    def _decided(self, action: str, reason: str) -> dict:
        self.log.info("decision: %s: %s", action, reason)
        return {"action": action, "reason": reason}

    def _messages(self, context, applied: int):
        decisions = self._decisions()
        weights = [d for d in decisions if d["action"] == "set_weights" and d["id"] > applied]
        if weights:  # the latest weight wins; setting it again is a no-op
            latest = weights[-1]
            try:
                confirmed = router_hook(self._runtime).set_weights(
                    {self.new_version: latest["weight"], self.stable_version: 100 - latest["weight"]},
                    run_id=context["run_id"])
            except WeightsRefused as exc:
                raise AirflowFailException(f"decision {latest['id']} may not change the weights: {exc}") from exc
            applied = latest["id"]
            self.log.info("split now %s (decision %d by %s)", confirmed, latest["id"], latest["by"] or "-")
        final = next((d for d in decisions if d["action"] in ("promote", "rollback")), None)
        if final is not None:
            return self._decided(final["action"], f"decision {final['id']} by {final['by'] or '-'}")
        last_seen = max([applied, *(d["id"] for d in decisions)])
        self.defer(trigger=DecisionTrigger(self.new_version, last_seen, self.deadline),
                   method_name="check", kwargs={"applied": applied})

    def _decisions(self) -> list[dict]:
        """Decisions for this version sent since the split began, oldest first."""
        return [d for d in AppDeploymentHook().decisions(self.new_version) if d["at"] >= float(self.split["at"])]

    def _auto(self, context):
        try:
            measured = self._runtime.metrics_source().since(self.split["mark"])
        except MetricsUnavailable as exc:  # not a verdict: look again at the next check
            self.log.warning("metrics unavailable, deciding later: %s", exc)
        else:
            decision, reason = automatic_decision(measured.versions, measured.clicks, self.new_version,
                                                  self.stable_version, Thresholds.from_conf(self.thresholds),
                                                  int(self.min_feedback))
            if decision:
                return self._decided(decision, reason)
            self.log.info("no automatic decision yet: %s", reason)
        return wait_until(self, context, time.time() + max(self.poke_interval, MIN_DEFER_SECONDS), "check", {})
