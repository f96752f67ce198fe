"""The deployment state in a Kubernetes ConfigMap (the kubernetes runtime).

Why a ConfigMap and not a small CRD with a status: the state is one JSON document of a few
kilobytes, written by the app and the step pods only. A ConfigMap needs nothing installed
cluster-wide (a CRD needs cluster-admin once per cluster and a schema kept in step with
``DeploymentState``, which validates every change itself), RBAC can name it
(``resourceNames``), and ``kubectl get configmap embedding-rollout-state -o yaml`` shows it to a
person. What a CRD would add -- schema validation at the API server, a status subresource --
``DeploymentState.validate()`` already does before every write.

- **Compare-and-swap.** ``update`` reads the ConfigMap, applies the change to the state in it,
  and replaces it with the resourceVersion it read: a concurrent writer makes the API server
  answer 409, and the change is applied again to a fresh read. ``change`` must be a pure
  function of the state (every caller's is).
- **Watched.** ``watch()`` keeps a copy current from a list-then-watch of the one ConfigMap (the
  API server pushes each change within milliseconds); ``read`` then answers from it without a
  request. An app pod serves every request from it. Without a watch, ``read`` is one GET.
- No volume: any pod with the Role can read and write it, so no ``ReadWriteMany`` storage is needed
  for the state.
- **Other keys** hold the rollout's records (``records``: backfill checkpoints, A/B decisions),
  each written with the same compare-and-swap (``update_key``), every other key kept.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable

from ..domain.state import ConcurrentUpdate, DeploymentState

log = logging.getLogger(__name__)

KEY = "state.json"
LABELS = {"app.kubernetes.io/part-of": "embedding-rollout", "app.kubernetes.io/component": "deployment-state"}


class ConfigMapState:
    """``read()`` and ``update(change)``, as ``StateFile`` offers them, on a ConfigMap."""

    def __init__(self, name: str, namespace: str, *, api_client=None, attempts: int = 20):
        from kubernetes import client
        if api_client is None:
            from ..generator.kubernetes import default_api_client
            api_client = default_api_client()
        self.core = client.CoreV1Api(api_client)
        self.name, self.namespace, self.attempts = name, namespace, attempts
        self._watched: DeploymentState | None = None
        self._watched_data: dict[str, str] = {}
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"ConfigMapState({self.namespace}/{self.name})"

    # -- reads -----------------------------------------------------------------------------------
    def read(self) -> DeploymentState:
        if self._synced.is_set() and self._watched is not None:
            return self._watched
        return parse_state(self._get()[1].get(KEY))

    def read_key(self, key: str) -> str | None:
        """Another key of the ConfigMap (a backfill checkpoint, the decisions): from the watch's
        copy when watching, else one GET."""
        if self._synced.is_set():
            return self._watched_data.get(key)
        return self._get()[1].get(key)

    def _get(self) -> tuple[str | None, dict[str, str]]:
        """(resourceVersion, data); (None, {}) when the ConfigMap does not exist yet."""
        from kubernetes.client.exceptions import ApiException
        try:
            config_map = self.core.read_namespaced_config_map(self.name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None, {}
            raise
        return config_map.metadata.resource_version, dict(config_map.data or {})

    # -- writes ----------------------------------------------------------------------------------
    def update(self, change: Callable[[DeploymentState], DeploymentState],
               expected_revision: int | None = None) -> DeploymentState:
        """Apply ``change`` to the current state and commit it only if nobody wrote meanwhile (else
        read again and apply it again); the revision grows by one when anything changed."""
        result: list[DeploymentState] = []

        def change_text(text: str | None) -> str | None:
            current = parse_state(text)
            if expected_revision is not None and current.revision != expected_revision:
                raise ConcurrentUpdate(f"state revision is {current.revision}, expected {expected_revision}")
            new = change(current).validate()
            if new.to_json() | {"revision": 0} == current.to_json() | {"revision": 0}:
                result[:] = [current]
                return text
            result[:] = [dataclasses.replace(new, revision=current.revision + 1)]
            return json.dumps(result[0].to_json(), indent=2, sort_keys=True)

        self.update_key(KEY, change_text)
        return result[0]

    def update_key(self, key: str, change: Callable[[str | None], str | None]) -> str | None:
        """Compare-and-swap of one key (``None``: absent), the other keys kept: ``change`` gets
        the key's text and returns the new one; on a 409 it is applied again to a fresh read."""
        def change_data(data: dict[str, str]) -> dict[str, str]:
            text = change(data.get(key))
            return {k: v for k, v in data.items() if k != key} | ({} if text is None else {key: text})
        return self.update_data(change_data).get(key)

    def remove_keys(self, prefix: str) -> None:
        self.update_data(lambda data: {k: v for k, v in data.items() if not k.startswith(prefix)})

    def update_data(self, change: Callable[[dict[str, str]], dict[str, str]]) -> dict[str, str]:
        """Compare-and-swap of the whole ``data``; nothing is written when ``change`` changes nothing."""
        from kubernetes.client.exceptions import ApiException
        for attempt in range(1, self.attempts + 1):
            resource_version, data = self._get()
            new = change(dict(data))
            if new == data:
                return data
            try:
                self._put(resource_version, new)
                return new
            except ApiException as exc:
                if exc.status != 409:  # 409: changed (or created) by another writer since our read
                    raise
                log.info("%s changed concurrently (attempt %d); applying the change again", self, attempt)
                time.sleep(min(0.05 * attempt, 0.5))
        raise ConcurrentUpdate(f"state {self}: another writer won each of {self.attempts} attempts")

    def _put(self, resource_version: str | None, data: dict[str, str]) -> None:
        from kubernetes import client
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace, labels=LABELS,
                                         resource_version=resource_version), data=data)
        if resource_version is None:
            self.core.create_namespaced_config_map(self.namespace, body)
        else:
            self.core.replace_namespaced_config_map(self.name, self.namespace, body)

    # -- the watch -------------------------------------------------------------------------------
    def watch(self, timeout: float = 30.0) -> ConfigMapState:
        """Keep the state current from a watch (in a thread); return once the first list is in."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name=f"watch-{self.name}", daemon=True)
            self._thread.start()
        if not self._synced.wait(timeout):
            raise TimeoutError(f"state {self}: no answer from the Kubernetes API within {timeout:.0f} s")
        return self

    def close(self) -> None:
        self._stop.set()

    def _keep(self, data: dict[str, str] | None) -> None:
        data = dict(data or {})
        if data.get(KEY) != self._watched_data.get(KEY) or self._watched is None:
            self._watched = parse_state(data.get(KEY))  # other keys change often (checkpoints)
        self._watched_data = data

    def _follow(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        selector = f"metadata.name={self.name}"
        while not self._stop.is_set():
            try:
                listed = self.core.list_namespaced_config_map(self.namespace, field_selector=selector)
                self._keep(listed.items[0].data if listed.items else {})
                self._synced.set()
                stream = watch.Watch().stream(self.core.list_namespaced_config_map, self.namespace,
                                              field_selector=selector, timeout_seconds=60,
                                              resource_version=listed.metadata.resource_version)
                for event in stream:
                    if self._stop.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._keep(event["object"].data)
                    elif event["type"] == "DELETED":
                        self._keep({})
            except ApiException as exc:  # 410 Gone: the resourceVersion is too old; list again
                if exc.status != 410:
                    log.warning("watch of state %s failed (%s); listing again in 1 s", self, exc.status)
                    self._stop.wait(1)
            except Exception as exc:  # noqa: BLE001 (the API server away: keep the last state, retry)
                log.warning("watch of state %s interrupted (%s); listing again in 1 s", self, exc)
                self._stop.wait(1)


def parse_state(text: str | None) -> DeploymentState:
    return DeploymentState.from_json(json.loads(text)) if text else DeploymentState()
