"""Where the traffic split lives: the local router's deployment state, or (in a cluster) an Istio
VirtualService together with the app's live versions.

Both hooks offer ``weights()`` and ``set_weights(weights)``; ``set_weights`` is idempotent and returns
the weights read back after the change, so the caller can confirm them.
"""
from __future__ import annotations

import copy
import logging
import time

from airflow.sdk import BaseHook

from embedding_rollout.config import Settings
from embedding_rollout.domain.rollout import RolloutError
from embedding_rollout.domain.state import StateError, StateFile
from embedding_rollout.domain.traffic import validate_weights

log = logging.getLogger(__name__)

VERSION_HEADER = "x-model-version"
ISTIO_GROUP, ISTIO_VERSION, VIRTUAL_SERVICES = "networking.istio.io", "v1", "virtualservices"


class WeightsNotConfirmed(RuntimeError):
    pass


class WeightsRefused(RuntimeError):
    """A rollout task's weight change after its rollout stopped progressing (a rollback began)."""


class LocalRouterHook(BaseHook):
    """The app's own router: the weights in the deployment state file."""

    def __init__(self, state_path: str | None = None):
        super().__init__()
        self.state = StateFile(state_path or Settings().state_path)

    def weights(self) -> dict[str, int]:
        return dict(self.state.read().weights)

    def set_weights(self, weights: dict[str, int], run_id: str | None = None,
                    step: int | None = None) -> dict[str, int]:
        """``run_id`` (and ``step``): a rollout task's change, made only while the rollout allows it,
        checked in the same locked update as the change."""
        weights = validate_weights(weights)
        try:
            self.state.update(lambda s: s.with_weights(weights, run_id, step))
        except (StateError, RolloutError) as exc:
            raise WeightsRefused(str(exc)) from exc
        confirmed = StateFile(self.state.path).read().weights
        if confirmed != weights:
            raise WeightsNotConfirmed(f"state holds {confirmed} after setting {weights}")
        return confirmed


def version_routes(virtual_service: dict) -> tuple[int, list[dict]]:
    """The HTTP route whose destinations each set ``x-model-version``: (index, destinations)."""
    for index, http in enumerate(virtual_service.get("spec", {}).get("http", [])):
        routes = http.get("route", [])
        if routes and all(_version_of(r) for r in routes):
            return index, routes
    raise ValueError(f"VirtualService {virtual_service['metadata']['name']} has no route whose destinations "
                     f"set the {VERSION_HEADER} header")


def _version_of(destination: dict) -> str | None:
    return destination.get("headers", {}).get("request", {}).get("set", {}).get(VERSION_HEADER)


def weights_patch(virtual_service: dict, weights: dict[str, int]) -> list[dict]:
    """A JSON Patch setting ``weights``: replace existing weights, add missing versions, remove the rest.

    A merge patch would replace the whole route list; a JSON Patch touches only the weights, and its
    first operation tests the resourceVersion, so a concurrent change makes it fail (optimistic
    concurrency) instead of being overwritten.
    """
    index, routes = version_routes(virtual_service)
    base = f"/spec/http/{index}/route"
    ops: list[dict] = [{"op": "test", "path": "/metadata/resourceVersion",
                        "value": virtual_service["metadata"]["resourceVersion"]}]
    present = {_version_of(r): i for i, r in enumerate(routes)}
    for version, position in present.items():
        if version in weights and routes[position].get("weight") != weights[version]:
            ops.append({"op": "replace", "path": f"{base}/{position}/weight", "value": weights[version]})
    for version in sorted(set(weights) - set(present)):
        entry = copy.deepcopy(routes[0])
        entry["weight"] = weights[version]
        entry["headers"]["request"]["set"][VERSION_HEADER] = version
        ops.append({"op": "add", "path": f"{base}/-", "value": entry})
    for position in sorted((p for v, p in present.items() if v not in weights), reverse=True):
        ops.append({"op": "remove", "path": f"{base}/{position}"})
    return ops


def weights_of(virtual_service: dict) -> dict[str, int]:
    _, routes = version_routes(virtual_service)
    return {_version_of(r): int(r.get("weight", 0)) for r in routes}


class IstioVirtualServiceHook(BaseHook):
    """The gateway VirtualService's per-version weights, through the Kubernetes API."""

    def __init__(self, name: str, namespace: str, kubernetes_conn_id: str | None = None, api_client=None,
                 attempts: int = 5):
        super().__init__()
        self.name, self.namespace, self.attempts = name, namespace, attempts
        self.kubernetes_conn_id = kubernetes_conn_id
        self._api_client = api_client

    @property
    def api(self):
        from kubernetes import client
        if self._api_client is None:
            from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
            self._api_client = KubernetesHook(conn_id=self.kubernetes_conn_id).api_client
        return client.CustomObjectsApi(self._api_client)

    def get(self) -> dict:
        return self.api.get_namespaced_custom_object(ISTIO_GROUP, ISTIO_VERSION, self.namespace,
                                                     VIRTUAL_SERVICES, self.name)

    def weights(self) -> dict[str, int]:
        return weights_of(self.get())

    def set_weights(self, weights: dict[str, int], precondition=None) -> dict[str, int]:
        """``precondition()`` is called after each read, before the patch; it raises to stop the
        change (the patch's resourceVersion test then makes a change made meanwhile win).

        A version at 0 % gets no destination at all: a 0 % route sends nothing, and kept it would
        outlive the version's removal and name a version the app no longer knows."""
        from kubernetes.client.exceptions import ApiException
        weights = {version: weight for version, weight in validate_weights(weights).items() if weight > 0}
        for attempt in range(1, self.attempts + 1):
            current = self.get()
            if weights_of(current) == weights:
                return weights  # idempotent: nothing to change
            if precondition:
                precondition()
            try:
                # The client sends custom-object patches as merge patches unless told otherwise.
                self.api.patch_namespaced_custom_object(ISTIO_GROUP, ISTIO_VERSION, self.namespace,
                                                        VIRTUAL_SERVICES, self.name, weights_patch(current, weights),
                                                        _content_type="application/json-patch+json")
            except ApiException as exc:
                # 409 Conflict / 422 failed test op: someone changed it since we read it; read again.
                # (The API server's 422 for a failed test says no more than "an error in our request".)
                if exc.status not in (409, 422):
                    raise
                if attempt == self.attempts:
                    raise WeightsNotConfirmed(
                        f"VirtualService {self.name} was changed by another writer during each of {self.attempts} "
                        f"attempts (last answer {exc.status}); its weights stay {weights_of(self.get())}") from exc
                log.warning("VirtualService %s changed concurrently (%s); retrying", self.name, exc.status)
                time.sleep(0.1 * attempt)
                continue
            confirmed = weights_of(self.get())
            if confirmed != weights:
                raise WeightsNotConfirmed(f"VirtualService {self.name} has {confirmed} after setting {weights}")
            return confirmed
        raise AssertionError("unreachable: the last attempt returns or raises")


class MeshRouterHook(BaseHook):
    """In a cluster Istio assigns the version at the gateway and the app serves the version it is
    given only while it is live in the app's deployment state. So the two change make-before-break:
    first the app accepts every version Istio routes now or will route, then Istio's weights
    change, then the versions Istio no longer routes stop being live in the app."""

    def __init__(self, istio: IstioVirtualServiceHook, app):
        super().__init__()
        self.istio, self.app = istio, app

    def weights(self) -> dict[str, int]:
        return self.istio.weights()

    def set_weights(self, weights: dict[str, int], run_id: str | None = None,
                    step: int | None = None) -> dict[str, int]:
        """With ``run_id`` the app refuses the change once the rollout stopped progressing, and the
        guard is checked again after Istio's VirtualService is read, right before it is patched."""
        from .deployment import DeploymentStateError
        weights = validate_weights(weights)
        live = set(self.app.state().live_versions)
        # Versions Istio routes now stay live in the app until Istio stops routing them; a version
        # the app no longer serves (removed) has nothing to keep: Istio just drops its destination.
        leaving = {version: 0 for version in self.istio.weights() if version not in weights and version in live}

        def still_allowed() -> None:
            rollout = self.app.state().rollout
            if run_id is not None:
                try:
                    if rollout is None:
                        raise RolloutError(f"run {run_id} holds no rollout")
                    rollout.guard_weights(run_id, step)
                except RolloutError as exc:
                    raise WeightsRefused(str(exc)) from exc

        try:
            self.app.set_weights({**leaving, **weights}, run_id, step)
            self.istio.set_weights(weights, precondition=still_allowed)
            confirmed = dict(self.app.set_weights(weights, run_id, step).weights)
        except DeploymentStateError as exc:
            if exc.status == 409:
                raise WeightsRefused(str(exc)) from exc
            raise
        return confirmed
