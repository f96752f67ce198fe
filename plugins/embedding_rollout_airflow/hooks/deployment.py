"""The deployment state as the Airflow tasks see it: the state file (local runtime), or the app's
operator API (kubernetes runtime: the file lives on a volume in the app's namespace, which a worker
in Airflow's namespace cannot mount)."""
from __future__ import annotations

import time

import requests
from airflow.sdk import BaseHook

from embedding_rollout.config import Settings
from embedding_rollout.domain.rollout import RolloutError
from embedding_rollout.domain.state import DeploymentState, StateError
from embedding_rollout.model.repository import ModelNotFound, catalogue, find
from embedding_rollout.pipeline.indexing import Checkpoint
from embedding_rollout.statestore import checkpoint_slot, open_state

from .app import AppEndpoint, AppHook, default_endpoint


class DeploymentStateError(RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the app's HTTP status, when the app answered


class LocalDeploymentHook(BaseHook):
    def __init__(self, settings: Settings | None = None):
        super().__init__()
        self.settings = settings or Settings()
        self.file = open_state(self.settings)

    def state(self) -> DeploymentState:
        return self.file.read()

    def set_weights(self, weights: dict[str, int], run_id: str | None = None,
                    step: int | None = None) -> DeploymentState:
        return self._update(lambda s: s.with_weights(weights, run_id, step))

    def change_rollout(self, transition: str, run_id: str, **arguments) -> DeploymentState:
        """``begin`` or a transition of the rollout (``DeploymentState.change_rollout``)."""
        now = time.time()
        return self._update(lambda s: s.change_rollout(transition, run_id, now, **arguments))

    def _update(self, change) -> DeploymentState:
        try:
            return self.file.update(change)
        except (StateError, RolloutError) as exc:
            raise DeploymentStateError(str(exc), 409) from exc

    def checkpoint(self, version: str, source: str) -> Checkpoint:
        index = self.state().spec(version).index
        return Checkpoint.load(checkpoint_slot(self.settings, version, source, state=self.file), index)

    def documents(self, version: str) -> int:
        """Live documents in ``version``'s index."""
        from embedding_rollout.store import open_store
        return open_store(self.settings).count(self.state().spec(version).index)

    def models(self) -> list[dict]:
        return catalogue(self.settings.model_dir)

    def model(self, version: str, artifact: str | None = None) -> dict:
        """The version's SavedModel (in the repository, or at ``artifact``)."""
        try:
            return find(self.settings.model_dir, version, artifact)
        except ModelNotFound as exc:
            raise DeploymentStateError(str(exc), 404) from exc


class AppDeploymentHook(BaseHook):
    """The app's operator API (``rollout:operate``): where and with which token from the
    ``embedding_rollout_app`` Connection (``AppHook``), unless ``app_url`` is given."""

    def __init__(self, app_url: str | None = None, token: str | None = None, timeout: float = 10.0,
                 app_conn_id: str = AppHook.default_conn_name):
        super().__init__()
        # A URL without a token takes the local default's token (tests, tools next to the stack).
        self._given = AppEndpoint(app_url.rstrip("/"), token or default_endpoint().token) if app_url else None
        self.app_conn_id, self.timeout = app_conn_id, timeout

    def endpoint(self) -> AppEndpoint:
        return self._given or AppHook(self.app_conn_id).endpoint()

    @property
    def app_url(self) -> str:
        return self.endpoint().url

    def _call(self, method: str, path: str, **kwargs) -> dict:
        endpoint = self.endpoint()
        reply = requests.request(method, f"{endpoint.url}{path}", headers=endpoint.headers, timeout=self.timeout,
                                 **kwargs)
        if reply.status_code >= 400:
            detail = reply.json().get("detail") if reply.headers.get("content-type", "").endswith("json") else reply.text
            raise DeploymentStateError(f"{method} {path}: {reply.status_code}: {detail}", reply.status_code)
        return reply.json()

    def state(self) -> DeploymentState:
        return DeploymentState.from_json(self._call("GET", "/deployment"))

    def set_weights(self, weights: dict[str, int], run_id: str | None = None,
                    step: int | None = None) -> DeploymentState:
        body: dict = {"weights": weights}
        if run_id is not None:
            body["rollout"] = {"run_id": run_id, **({"step": step} if step is not None else {})}
        return DeploymentState.from_json(self._call("PUT", "/deployment/weights", json=body))

    def change_rollout(self, transition: str, run_id: str, **arguments) -> DeploymentState:
        body = {"transition": transition, "run_id": run_id, **{k: v for k, v in arguments.items() if v is not None}}
        return DeploymentState.from_json(self._call("POST", "/deployment/rollout", json=body))

    def checkpoint(self, version: str, source: str) -> Checkpoint:
        return Checkpoint(**self._call("GET", f"/deployment/backfills/{version}", params={"source": source}))

    def documents(self, version: str) -> int:
        return int(self._call("GET", f"/deployment/indices/{version}")["documents"])

    def models(self) -> list[dict]:
        return self._call("GET", "/deployment/models")

    def model(self, version: str, artifact: str | None = None) -> dict:
        """The version's SavedModel, as the app (and the step pods) see the shared volumes."""
        return self._call("GET", f"/deployment/models/{version}", params={"artifact": artifact} if artifact else None)

    def decisions(self, new_version: str) -> list[dict]:
        """The A/B decisions sent for ``new_version``, oldest first (in every runtime: they are
        sent to the app)."""
        return self._call("GET", "/rollout/decisions", params={"new_version": new_version})


def deployment_hook(runtime) -> LocalDeploymentHook | AppDeploymentHook:
    from ..runtime import KUBERNETES
    if runtime.kind == KUBERNETES:
        return AppDeploymentHook()
    return LocalDeploymentHook()

