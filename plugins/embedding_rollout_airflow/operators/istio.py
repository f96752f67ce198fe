"""IstioWeightOperator: set the traffic split between model versions, then confirm it."""
from __future__ import annotations

import json
from collections.abc import Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from ..hooks.deployment import AppDeploymentHook
from ..hooks.routing import IstioVirtualServiceHook, LocalRouterHook, MeshRouterHook, WeightsRefused
from ..runtime import KUBERNETES, Runtime


def router_hook(runtime: Runtime, kubernetes_conn_id: str | None = None):
    if runtime.kind == KUBERNETES:
        istio = IstioVirtualServiceHook(runtime.gateway_virtual_service, runtime.namespace, kubernetes_conn_id)
        return MeshRouterHook(istio, AppDeploymentHook())
    return LocalRouterHook()


class IstioWeightOperator(BaseOperator):
    """Set the gateway VirtualService's per-version weights and the app's live versions (or the
    local router's weights, locally).

    ``weights`` maps version labels to integer percentages summing to 100 (a dict, or a JSON string
    rendered from a template). Idempotent; optimistic concurrency on the resourceVersion; the
    weights are read back and returned (XCom) once confirmed. With ``rollout_run_id`` the change is
    a rollout task's: refused (the task fails) once that run's rollout stopped progressing.
    """

    template_fields: Sequence[str] = ("weights", "rollout_run_id")
    ui_color = "#466bb0"
    ui_fgcolor = "#ffffff"

    def __init__(self, *, weights: dict[str, int] | str, rollout_run_id: str | None = None,
                 kubernetes_conn_id: str | None = None, runtime: Runtime | None = None, **kwargs):
        super().__init__(**kwargs)
        self.weights, self.rollout_run_id = weights, rollout_run_id
        self.kubernetes_conn_id = kubernetes_conn_id
        self.runtime = runtime

    def execute(self, context) -> dict[str, int]:
        weights = json.loads(self.weights) if isinstance(self.weights, str) else dict(self.weights)
        hook = router_hook(self.runtime or Runtime(), self.kubernetes_conn_id)
        before = hook.weights()
        try:
            confirmed = hook.set_weights({k: int(v) for k, v in weights.items()}, run_id=self.rollout_run_id)
        except WeightsRefused as exc:
            raise AirflowFailException(f"refused: {exc}") from exc
        self.log.info("traffic split %s -> %s (confirmed)", before, confirmed)
        return confirmed
