"""Generators in a cluster: the deploy and remove steps manage one TF Serving Deployment per version,
its DestinationRule subset and its route, make-before-break, against an HTTP imitation of the
Kubernetes API holding the project's own manifests."""
from __future__ import annotations

import pytest
import yaml
from kubernetes import client

from conftest import REPO
from embedding_rollout.generator.admin import ModelServerAdmin
from embedding_rollout.generator.kubernetes import GeneratorRolloutFailed, KubernetesFleet, render
from k8s_api import FakeKubernetesAPI
from test_manifests import by_kind, check_generator_routing, raw_base, validate

NAMESPACE = "embeddings"
TEMPLATES = REPO / "k8s" / "generator-version-template"
ISTIO_KINDS = {"DestinationRule": "destinationrules", "VirtualService": "virtualservices"}


class DeploymentController:
    """What the Deployment controller and kubelet do: after a few reads the replicas are up, unless
    the version's pods never get ready (then the progress deadline passes)."""

    def __init__(self, reads_until_ready: int = 2):
        self.reads_until_ready, self.reads, self.never_ready = reads_until_ready, {}, set()

    def __call__(self, deployment: dict) -> None:
        name = deployment["metadata"]["name"]
        self.reads[name] = self.reads.get(name, 0) + 1
        replicas = deployment["spec"].get("replicas", 1)
        if name in self.never_ready:
            deployment["status"] = {"observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
                                    "updatedReplicas": replicas, "unavailableReplicas": replicas, "conditions": [
                                        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                         "message": f'ReplicaSet "{name}-5d4f" has timed out progressing.'}]}
        elif self.reads[name] >= self.reads_until_ready:
            deployment["status"] = {"observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
                                    "updatedReplicas": replicas, "readyReplicas": replicas,
                                    "availableReplicas": replicas,
                                    "conditions": [{"type": "Available", "status": "True"}]}
        else:
            deployment["status"] = {"observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
                                    "updatedReplicas": replicas, "unavailableReplicas": replicas}


@pytest.fixture
def cluster():
    """The fake API holding the base's generator objects (v1 live)."""
    api = FakeKubernetesAPI().start()
    api.controllers["deployments"] = DeploymentController()
    for obj in raw_base():
        if obj["kind"] in ISTIO_KINDS and obj["metadata"]["name"] == "embedding-generator":
            api.put(obj, ISTIO_KINDS[obj["kind"]])
        elif obj["kind"] == "Deployment" and obj["metadata"]["name"].startswith("embedding-generator-"):
            api.put(obj, "deployments")
    yield api
    api.stop()


@pytest.fixture
def mesh_admin(model_server, model_repo):
    """Status calls "through the mesh": the real model server, serving v1 and v2."""
    return ModelServerAdmin(f"127.0.0.1:{model_server.grpc_port}", "embedder", str(model_repo), timeout=3)


def fleet(api: FakeKubernetesAPI, **kwargs) -> KubernetesFleet:
    kwargs.setdefault("poll_seconds", 0.01)
    return KubernetesFleet(NAMESPACE, TEMPLATES, api_client=client.ApiClient(client.Configuration(host=api.url)),
                           **kwargs)


def generator_objects(api: FakeKubernetesAPI) -> list[dict]:
    objects = [api.get(NAMESPACE, "embedding-generator", plural) for plural in ISTIO_KINDS.values()]
    return objects + [o for (g, r, ns, n), o in api.objects.items() if r == "deployments"]


def writes(api: FakeKubernetesAPI) -> list[tuple[str, str, str]]:
    return [(c.verb, c.resource, c.name) for c in api.calls if c.verb in ("create", "patch", "delete")]


def test_deploy_is_make_before_break_and_leaves_a_valid_routed_version(cluster, mesh_admin):
    confirmed = []
    fleet(cluster, confirm=lambda v: (mesh_admin.wait_available(int(v[1:])), confirmed.append(v))).deploy("v2")

    assert writes(cluster) == [("create", "deployments", None), ("patch", "destinationrules", "embedding-generator"),
                               ("patch", "virtualservices", "embedding-generator")]
    # The subset was added only after the Deployment was read as available.
    controller = cluster.controllers["deployments"]
    assert controller.reads["embedding-generator-v2"] >= controller.reads_until_ready
    assert confirmed == ["v2"]
    objects = generator_objects(cluster)
    for obj in objects:
        validate({k: v for k, v in obj.items() if k != "status"} | {"metadata": {
            k: v for k, v in obj["metadata"].items() if k in ("name", "namespace", "labels", "annotations")}})
    check_generator_routing(objects, {"v1", "v2"})
    created = cluster.get(NAMESPACE, "embedding-generator-v2", "deployments")
    expected = yaml.safe_load(render((TEMPLATES / "generator.yaml").read_text(), "v2"))
    assert created["spec"] == expected["spec"]
    assert "versions: 2 }" in created["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"]


def test_deploy_twice_changes_nothing_the_second_time(cluster):
    fleet(cluster).deploy("v2")
    before = generator_objects(cluster)
    cluster.calls.clear()
    fleet(cluster).deploy("v2")
    assert generator_objects(cluster) == before
    assert [c.verb for c in cluster.calls if c.verb != "get"] == ["create"]  # answered 409 AlreadyExists


def test_a_version_that_never_gets_ready_is_never_routed(cluster):
    cluster.controllers["deployments"].never_ready.add("embedding-generator-v3")
    with pytest.raises(GeneratorRolloutFailed, match="timed out progressing"):
        fleet(cluster).deploy("v3")
    check_generator_routing(generator_objects(cluster), {"v1"})


def test_a_deployment_that_stays_unavailable_times_out(cluster):
    cluster.controllers["deployments"].reads_until_ready = 10**6
    with pytest.raises(GeneratorRolloutFailed, match="not available after"):
        fleet(cluster, timeout=0.2).deploy("v2")
    assert [c.verb for c in cluster.calls if c.verb == "patch"] == []


def test_a_failed_mesh_confirmation_fails_the_step(cluster, mesh_admin):
    """v5 has no model in the repository: its status through the mesh never becomes AVAILABLE."""
    from embedding_rollout.generator.client import GeneratorError
    with pytest.raises(GeneratorError, match="not AVAILABLE"):
        fleet(cluster, confirm=lambda v: mesh_admin.wait_available(int(v[1:]))).deploy("v5")


def test_remove_is_routes_first_and_leaves_the_other_version_untouched(cluster):
    fleet(cluster).deploy("v2")
    v1_before = cluster.get(NAMESPACE, "embedding-generator-v1", "deployments")
    cluster.calls.clear()
    fleet(cluster).remove("v2")
    assert writes(cluster) == [("patch", "virtualservices", "embedding-generator"),
                               ("patch", "destinationrules", "embedding-generator"),
                               ("delete", "deployments", "embedding-generator-v2")]
    objects = generator_objects(cluster)
    check_generator_routing(objects, {"v1"})
    assert by_kind(objects, "Deployment") == [v1_before]
    cluster.calls.clear()
    fleet(cluster).remove("v2")  # again: nothing to do, the 404 of the delete is fine
    assert writes(cluster) == [("delete", "deployments", "embedding-generator-v2")]


def test_concurrent_changes_to_the_routes_are_retried_not_overwritten(cluster):
    cluster.conflicts_to_inject = 2
    fleet(cluster).deploy("v2")
    check_generator_routing(generator_objects(cluster), {"v1", "v2"})


def test_the_deploy_and_remove_steps_use_the_cluster_fleet(cluster, tmp_path, monkeypatch, model_repo,
                                                           model_server):
    """The steps as the step pods run them: settings from ER_*, the API from the kubeconfig."""
    from embedding_rollout import steps
    from embedding_rollout.config import Settings
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": cluster.url}}],
        "users": [{"name": "rollout-steps", "user": {"token": "t"}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "rollout-steps"}}]}))
    for name, value in {"KUBECONFIG": str(kubeconfig), "ER_HOME": str(tmp_path), "ER_GENERATOR_BACKEND": "kubernetes",
                        "ER_MODEL_BASE": str(model_repo.parent), "ER_STORE": "lance",
                        "ER_GENERATOR_GRPC": f"127.0.0.1:{model_server.grpc_port}"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = Settings()
    steps.deploy_version(settings, "v1")  # v1 runs already: only registered
    assert [c.verb for c in cluster.calls if c.verb != "get"] == ["create"]
    state = steps.deploy_version(settings, "v2", run_id="run-1")
    assert state.versions["v2"].dims == 48
    check_generator_routing(generator_objects(cluster), {"v1", "v2"})
    steps.remove_version(settings, "v2")
    check_generator_routing(generator_objects(cluster), {"v1"})
    assert "v2" not in steps.state_file(settings).read().versions
