"""Generators in a cluster: the deploy and remove steps manage one TF Serving Deployment per version,
its DestinationRule subset and its route, make-before-break, against the real API server holding
the project's own manifests. They run with the step pods' own ServiceAccount token (rollout-steps),
so RBAC is the real authorizer's. kube-controller-manager makes the ReplicaSets and pods; the
stand-in kubelet of ``tests/kube_cluster.py`` reports the pods Ready (or crash-looping)."""
from __future__ import annotations

import pytest
import yaml
from kubernetes import client

from conftest import REPO
from embedding_rollout.generator.admin import ModelServerAdmin
from embedding_rollout.generator.kubernetes import GeneratorRolloutFailed, KubernetesFleet, render
from kube_cluster import KUBECONFIG, NAMESPACE, generator_deployments, get_istio, put_istio, wait_until
from test_manifests import check_generator_routing

TEMPLATES = REPO / "k8s" / "generator-version-template"
STEPS_USER = "system:serviceaccount:embeddings:rollout-steps"


@pytest.fixture
def cluster(kube_generators):
    """The base's generator objects (v1 live) and a client as the step pods' ServiceAccount."""
    kube_generators.steps_client = kube_generators.client_as(NAMESPACE, "rollout-steps")
    return kube_generators


@pytest.fixture
def mesh_admin(model_server, model_repo):
    """Status calls "through the mesh": the real model server, serving v1 and v2."""
    return ModelServerAdmin(f"127.0.0.1:{model_server.grpc_port}", "embedder", str(model_repo), timeout=3)


def fleet(cluster, **kwargs) -> KubernetesFleet:
    kwargs.setdefault("poll_seconds", 0.2)
    kwargs.setdefault("timeout", 120)
    return KubernetesFleet(NAMESPACE, TEMPLATES, api_client=cluster.steps_client, **kwargs)


def generator_objects(cluster) -> list[dict]:
    istio = [get_istio(cluster, kind, "embedding-generator") for kind in ("VirtualService", "DestinationRule")]
    return istio + list(generator_deployments(cluster).values())


def writes(cluster, mark: int) -> list[tuple[str, str, str | None, int]]:
    """The step identity's writes since ``mark``, from the API server's audit log."""
    return [(e["verb"], e["objectRef"]["resource"], e["objectRef"].get("name"), e["responseStatus"]["code"])
            for e in cluster.audit_since(mark, STEPS_USER) if e["verb"] in ("create", "patch", "delete")]


def test_deploy_is_make_before_break_and_leaves_a_valid_routed_version(cluster, mesh_admin):
    confirmed, mark = [], cluster.audit_mark()

    def confirm(version):
        # Called after the route is in place: by then the Deployment was available.
        status = generator_deployments(cluster)[f"embedding-generator-{version}"]["status"]
        assert status["availableReplicas"] == 2
        mesh_admin.wait_available(int(version[1:]))
        confirmed.append(version)

    fleet(cluster, confirm=confirm).deploy("v2")

    assert writes(cluster, mark) == [("create", "deployments", "embedding-generator-v2", 201),
                                     ("create", "horizontalpodautoscalers", "embedding-generator-v2", 201),
                                     ("patch", "destinationrules", "embedding-generator", 200),
                                     ("patch", "virtualservices", "embedding-generator", 200)]
    assert confirmed == ["v2"]
    objects = generator_objects(cluster)
    check_generator_routing(objects, {"v1", "v2"})
    created = generator_deployments(cluster)["embedding-generator-v2"]
    expected, autoscaler = yaml.safe_load_all(render((TEMPLATES / "generator.yaml").read_text(), "v2"))
    assert created["spec"]["template"]["spec"]["containers"][0]["env"] == \
        expected["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "versions: 2 }" in created["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"]
    # The real controllers made its ReplicaSet and pods; the pods carry the subset's labels.
    pods = client.CoreV1Api(cluster.admin).list_namespaced_pod(NAMESPACE, label_selector="version=v2").items
    assert len(pods) == 2 and all(p.metadata.owner_references[0].kind == "ReplicaSet" for p in pods)
    # Its autoscaler targets it, from the replicas it started with (the backfill's load scales it out).
    scaler = client.AutoscalingV2Api(cluster.admin).read_namespaced_horizontal_pod_autoscaler(
        "embedding-generator-v2", NAMESPACE)
    assert scaler.spec.scale_target_ref.name == "embedding-generator-v2" == autoscaler["spec"]["scaleTargetRef"]["name"]
    assert scaler.spec.min_replicas == created["spec"]["replicas"] == 2 < scaler.spec.max_replicas


def test_deploy_twice_changes_nothing_the_second_time(cluster):
    fleet(cluster).deploy("v2")
    before = generator_objects(cluster)
    mark = cluster.audit_mark()
    fleet(cluster).deploy("v2")
    assert generator_objects(cluster) == before
    assert writes(cluster, mark) == [("create", "deployments", "embedding-generator-v2", 409),  # AlreadyExists
                                     ("create", "horizontalpodautoscalers", "embedding-generator-v2", 409)]


def test_a_version_whose_pods_never_get_ready_is_never_routed(cluster):
    """Its pods crash-loop: the Deployment never becomes available, the step fails at its deadline,
    and no subset or route of it exists."""
    cluster.kubelet.crash_looping.add("v3")
    with pytest.raises(GeneratorRolloutFailed, match="not available after"):
        fleet(cluster, timeout=8).deploy("v3")
    status = generator_deployments(cluster)["embedding-generator-v3"]["status"]
    assert status.get("unavailableReplicas", 0) >= 1 and not status.get("availableReplicas")
    check_generator_routing([o for o in generator_objects(cluster) if o["metadata"]["name"] != "embedding-generator-v3"],
                            {"v1"})
    fleet(cluster).remove("v3")  # the rollback: nothing of v3 is left
    wait_until(lambda: "embedding-generator-v3" not in generator_deployments(cluster), 30, "v3 deleted")
    check_generator_routing(generator_objects(cluster), {"v1"})


def test_a_failed_mesh_confirmation_fails_the_step(cluster, mesh_admin):
    """v5 has no model in the repository: its status through the mesh never becomes AVAILABLE."""
    from embedding_rollout.generator.client import GeneratorError
    with pytest.raises(GeneratorError, match="not AVAILABLE"):
        fleet(cluster, confirm=lambda v: mesh_admin.wait_available(int(v[1:]))).deploy("v5")


def test_remove_is_routes_first_and_leaves_the_other_version_untouched(cluster):
    fleet(cluster).deploy("v2")
    v1_before = generator_deployments(cluster)["embedding-generator-v1"]
    mark = cluster.audit_mark()
    fleet(cluster).remove("v2")
    assert writes(cluster, mark) == [("patch", "virtualservices", "embedding-generator", 200),
                                     ("patch", "destinationrules", "embedding-generator", 200),
                                     ("delete", "horizontalpodautoscalers", "embedding-generator-v2", 200),
                                     ("delete", "deployments", "embedding-generator-v2", 200)]
    wait_until(lambda: "embedding-generator-v2" not in generator_deployments(cluster), 30, "v2 deleted")
    check_generator_routing(generator_objects(cluster), {"v1"})
    v1_after = generator_deployments(cluster)["embedding-generator-v1"]
    assert (v1_after["spec"], v1_after["metadata"]["generation"]) == (v1_before["spec"], v1_before["metadata"]["generation"])
    mark = cluster.audit_mark()
    fleet(cluster).remove("v2")  # again: nothing to do, the 404 of the delete is fine
    assert writes(cluster, mark) == [("delete", "horizontalpodautoscalers", "embedding-generator-v2", 404),
                                     ("delete", "deployments", "embedding-generator-v2", 404)]


def test_a_concurrent_change_to_the_routes_is_retried_not_overwritten(cluster):
    """Someone changes the generator VirtualService between the step's read and its patch: the
    API server refuses the patch (422, the resourceVersion test), the step reads again, and both
    changes are kept."""
    steps_fleet, mark = fleet(cluster), cluster.audit_mark()
    real_get, raced = steps_fleet.custom.get_namespaced_custom_object, []

    def racing_get(group, version, namespace, plural, name, **kwargs):
        current = real_get(group, version, namespace, plural, name, **kwargs)
        if plural == "virtualservices" and not raced:
            raced.append(True)
            changed = get_istio(cluster, "VirtualService", name)
            changed["spec"]["http"][0]["timeout"] = "7s"
            put_istio(cluster, changed)
        return current

    steps_fleet.custom.get_namespaced_custom_object = racing_get
    steps_fleet.deploy("v2")
    assert [w[3] for w in writes(cluster, mark) if w[1] == "virtualservices"] == [422, 200]
    service = get_istio(cluster, "VirtualService", "embedding-generator")
    assert service["spec"]["http"][0]["timeout"] == "7s"
    check_generator_routing(generator_objects(cluster), {"v1", "v2"})


def test_the_deploy_and_remove_steps_use_the_cluster_fleet(cluster, tmp_path, monkeypatch, model_repo,
                                                           model_server):
    """The steps as the step pods run them: settings from ER_*, the API from a kubeconfig holding
    the step ServiceAccount's token."""
    from embedding_rollout import steps
    from embedding_rollout.config import Settings
    kubeconfig = tmp_path / "kubeconfig"
    admin = yaml.safe_load(KUBECONFIG.read_text())
    token = cluster.service_account_token(NAMESPACE, "rollout-steps")
    kubeconfig.write_text(yaml.safe_dump({**admin, "users": [{"name": "admin", "user": {"token": token}}]}))
    for name, value in {"KUBECONFIG": str(kubeconfig), "ER_HOME": str(tmp_path), "ER_GENERATOR_BACKEND": "kubernetes",
                        "ER_MODEL_BASE": str(model_repo.parent), "ER_STORE": "lance",
                        "ER_GENERATOR_GRPC": f"127.0.0.1:{model_server.grpc_port}", "ER_DRAIN_SECONDS": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = Settings()
    mark = cluster.audit_mark()
    steps.deploy_version(settings, "v1")  # v1 runs already: only registered
    assert writes(cluster, mark) == [("create", "deployments", "embedding-generator-v1", 409),
                                     ("create", "horizontalpodautoscalers", "embedding-generator-v1", 409)]
    state = steps.deploy_version(settings, "v2", run_id="run-1")
    assert state.versions["v2"].dims == 48
    check_generator_routing(generator_objects(cluster), {"v1", "v2"})
    steps.remove_version(settings, "v2")
    wait_until(lambda: "embedding-generator-v2" not in generator_deployments(cluster), 30, "v2 deleted")
    check_generator_routing(generator_objects(cluster), {"v1"})
    assert "v2" not in steps.state_file(settings).read().versions
