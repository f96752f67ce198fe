"""Generators in a cluster: one TF Serving Deployment per model version, routed by Istio.

Adding a version is make-before-break: its Deployment from ``k8s/generator-version-template``
until it is available (its probes pass only once TF Serving reports the version AVAILABLE), then its
DestinationRule subset, then its route in the generator's VirtualService (matching
``x-model-version``), then a status call through the mesh confirms the route. Removing is the
reverse: route, subset, Deployment. Every step first reads the object and changes it only when
needed, so a retried step does nothing twice; list changes are JSON Patches whose first operation
tests the resourceVersion, so a concurrent writer makes the patch fail rather than be overwritten.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from ..domain.versions import parse_version

log = logging.getLogger(__name__)

ISTIO = ("networking.istio.io", "v1")
GENERATOR = "embedding-generator"  # the DestinationRule's and the VirtualService's name
JSON_PATCH = "application/json-patch+json"


class GeneratorRolloutFailed(RuntimeError):
    pass


def render(text: str, version: str) -> str:
    """Fill in the template's two placeholders, exactly as ``envsubst '${VERSION} ${VERSION_NUMBER}'``."""
    number = parse_version(version)
    return text.replace("${VERSION_NUMBER}", str(number)).replace("${VERSION}", version)


def deployment_ready(deployment: dict) -> bool:
    """``kubectl rollout status``'s rule: the controller saw the latest spec, and every replica is
    updated and available."""
    spec, status = deployment.get("spec", {}), deployment.get("status") or {}
    wanted = spec.get("replicas", 1)
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            raise GeneratorRolloutFailed(f"deployment {deployment['metadata']['name']}: {condition.get('message')}")
    return (status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 1)
            and status.get("updatedReplicas", 0) >= wanted
            and status.get("replicas", 0) == status.get("updatedReplicas", 0)
            and status.get("availableReplicas", 0) >= wanted)


def default_api_client():
    """In a pod, its service account; elsewhere, the kubeconfig."""
    import os

    from kubernetes import client, config
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # read now, not at import
    return client.ApiClient()


class KubernetesFleet:
    def __init__(self, namespace: str, template_dir: Path, *, api_client=None,
                 confirm: Callable[[str], None] | None = None, timeout: float = 900.0, poll_seconds: float = 2.0):
        from kubernetes import client
        api_client = api_client or default_api_client()
        self.apps, self.custom = client.AppsV1Api(api_client), client.CustomObjectsApi(api_client)
        self.autoscaling = client.AutoscalingV2Api(api_client)
        self.namespace, self.template_dir = namespace, Path(template_dir)
        self.confirm, self.timeout, self.poll_seconds = confirm, timeout, poll_seconds

    def _template(self, name: str, version: str):
        text = render((self.template_dir / name).read_text(), version)
        return [d for d in yaml.safe_load_all(text) if d] if name.endswith(".yaml") else json.loads(text)

    def _manifest(self, version: str, kind: str) -> dict:
        return next(d for d in self._template("generator.yaml", version) if d["kind"] == kind)

    # -- the steps ---------------------------------------------------------------------------------
    def deploy(self, version: str) -> None:
        name = self._create_deployment(version)
        self._create_autoscaler(version)  # it scales the generator out while the backfill embeds
        self._wait_ready(name)
        self._add_entry("destinationrules", "subsets", self._template("subset-patch.json", version))
        self._add_entry("virtualservices", "http", self._template("route-patch.json", version))
        if self.confirm:
            self.confirm(version)  # through the mesh, with x-model-version: the route really works
        log.info("generator %s deployed and routed", version)

    def remove(self, version: str) -> None:
        self._remove_entry("virtualservices", "http", version)
        self._remove_entry("destinationrules", "subsets", version)
        self._delete_autoscaler(f"{GENERATOR}-{version}")
        self._delete_deployment(f"{GENERATOR}-{version}")
        log.info("generator %s removed", version)

    # -- Deployments -------------------------------------------------------------------------------
    def _create_deployment(self, version: str) -> str:
        from kubernetes.client.exceptions import ApiException
        manifest = self._manifest(version, "Deployment")
        name = manifest["metadata"]["name"]
        try:
            self.apps.create_namespaced_deployment(self.namespace, manifest)
            log.info("created deployment %s", name)
        except ApiException as exc:
            if exc.status != 409:
                raise
            log.info("deployment %s exists already", name)  # a retried step
        return name

    def _create_autoscaler(self, version: str) -> None:
        from kubernetes.client.exceptions import ApiException
        manifest = self._manifest(version, "HorizontalPodAutoscaler")
        try:
            self.autoscaling.create_namespaced_horizontal_pod_autoscaler(self.namespace, manifest)
            log.info("created autoscaler %s", manifest["metadata"]["name"])
        except ApiException as exc:
            if exc.status != 409:  # a retried step
                raise

    def _delete_autoscaler(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException
        try:
            self.autoscaling.delete_namespaced_horizontal_pod_autoscaler(name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _wait_ready(self, name: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not deployment_ready(self._read_deployment(name)):
            if time.monotonic() > deadline:
                raise GeneratorRolloutFailed(f"deployment {name} not available after {self.timeout:.0f} s")
            time.sleep(self.poll_seconds)

    def _read_deployment(self, name: str) -> dict:
        # The raw JSON (camelCase, as the API and kubectl show it), not the client's model objects.
        reply = self.apps.read_namespaced_deployment(name, self.namespace, _preload_content=False)
        return json.loads(reply.data)

    def _delete_deployment(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException
        try:
            self.apps.delete_namespaced_deployment(name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # -- lists in Istio objects: the DestinationRule's subsets, the VirtualService's routes --------
    def _change(self, plural: str, operations: Callable[[dict], list[dict]], attempts: int = 5) -> bool:
        """Apply ``operations(current)`` (nothing when empty) as a JSON Patch guarded by the
        resourceVersion; on a concurrent change (409, or 422 from the failed test) read again."""
        from kubernetes.client.exceptions import ApiException
        for attempt in range(1, attempts + 1):
            current = self.custom.get_namespaced_custom_object(*ISTIO, self.namespace, plural, GENERATOR)
            changes = operations(current)
            if not changes:
                return False
            test = {"op": "test", "path": "/metadata/resourceVersion", "value": current["metadata"]["resourceVersion"]}
            try:
                self.custom.patch_namespaced_custom_object(*ISTIO, self.namespace, plural, GENERATOR,
                                                           [test, *changes], _content_type=JSON_PATCH)
                return True
            except ApiException as exc:
                if exc.status not in (409, 422) or attempt == attempts:
                    raise
                log.warning("%s %s changed concurrently (%s); retrying", plural, GENERATOR, exc.status)
                time.sleep(0.1 * attempt)
        return False

    def _add_entry(self, plural: str, field: str, additions: list[dict]) -> None:
        def operations(current: dict) -> list[dict]:
            present = {entry.get("name") for entry in current["spec"].get(field, [])}
            return [op for op in additions if op["value"]["name"] not in present]
        if self._change(plural, operations):
            log.info("%s %s: added %s", plural, GENERATOR, [op["value"]["name"] for op in additions])

    def _remove_entry(self, plural: str, field: str, version: str) -> None:
        def operations(current: dict) -> list[dict]:
            entries = current["spec"].get(field, [])
            positions = [i for i, entry in enumerate(entries) if entry.get("name") == version]
            # Highest index first, so that the earlier indexes stay valid within the patch.
            return [{"op": "remove", "path": f"/spec/{field}/{i}"} for i in reversed(positions)]
        if self._change(plural, operations):
            log.info("%s %s: removed %s", plural, GENERATOR, version)
