"""IstioWeightOperator's hook against the real API server (``scripts/kube-test-cluster.sh``): JSON
Patches under Istio's real CRD schema, a real 422 when a concurrent writer changed the object
between read and patch, a real 404."""
from __future__ import annotations

import os
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from conftest import REPO, serving, verified
from embedding_rollout.domain.traffic import InvalidWeights
from embedding_rollout_airflow.hooks.routing import IstioVirtualServiceHook, WeightsNotConfirmed, weights_of
from kube_cluster import get_istio, put_istio

NAMESPACE, NAME = "embeddings", "embedding-app"


def gateway_virtual_service(versions: dict[str, int]) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {"app": "embedding-app"}},
        "spec": {
            "hosts": ["search.example.com"], "gateways": ["embedding-gateway"],
            "http": [
                {"name": "docs", "match": [{"uri": {"prefix": "/ui"}}],
                 "route": [{"destination": {"host": "embedding-app", "port": {"number": 8080}}}]},
                {"name": "versions", "timeout": "5s", "route": [
                    {"destination": {"host": "embedding-app", "port": {"number": 8080}}, "weight": weight,
                     "headers": {"request": {"set": {"x-model-version": version}}}}
                    for version, weight in versions.items()]},
            ],
        },
    }


class GatewayVirtualService:
    """The gateway VirtualService in the real API server, read and replaced as an admin."""

    def __init__(self, cluster):
        self.cluster = cluster

    def get(self, namespace: str = NAMESPACE, name: str = NAME) -> dict:
        return get_istio(self.cluster, "VirtualService", name)

    def put(self, obj: dict) -> dict:
        return put_istio(self.cluster, obj)

    def patches_since(self, mark: int) -> list[dict]:
        return [e for e in self.cluster.audit_since(mark, "test-admin")
                if e["verb"] == "patch" and e["objectRef"].get("name") == NAME]


@pytest.fixture
def api(kube):
    gateway = GatewayVirtualService(kube)
    gateway.put(gateway_virtual_service({"v1": 100}))
    return gateway


@pytest.fixture
def hook(api):
    return IstioVirtualServiceHook(NAME, NAMESPACE, api_client=api.cluster.admin)


def istio_schema(kind: str) -> dict:
    path = Path(os.environ.get("ER_ISTIO_CRDS", REPO / "k8s" / "crds" / "istio-crds.yaml"))
    for crd in yaml.safe_load_all(path.read_text()):
        if crd and crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            return version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    raise LookupError(kind)


def test_set_weights_adds_a_version_and_leaves_the_rest_intact(api, hook):
    before, mark = api.get(NAMESPACE, NAME), api.cluster.audit_mark()
    assert hook.set_weights({"v1": 90, "v2": 10}) == {"v1": 90, "v2": 10}
    after = api.get(NAMESPACE, NAME)
    assert after["spec"]["http"][0] == before["spec"]["http"][0]  # the other route is untouched
    assert after["spec"]["http"][1]["timeout"] == "5s"
    new_route = after["spec"]["http"][1]["route"][1]
    assert new_route["headers"]["request"]["set"] == {"x-model-version": "v2"}
    assert new_route["destination"] == before["spec"]["http"][1]["route"][0]["destination"]
    assert [e["responseStatus"]["code"] for e in api.patches_since(mark)] == [200]


def test_set_weights_is_idempotent_and_removes_versions_left_out(api, hook):
    hook.set_weights({"v1": 50, "v2": 50})
    version = api.get(NAMESPACE, NAME)["metadata"]["resourceVersion"]
    hook.set_weights({"v1": 50, "v2": 50})
    assert api.get(NAMESPACE, NAME)["metadata"]["resourceVersion"] == version  # no write at all
    hook.set_weights({"v2": 100})
    assert weights_of(api.get(NAMESPACE, NAME)) == {"v2": 100}


def racing(api, hook, changes: int) -> None:
    """Another writer changes the VirtualService right after each of the hook's first ``changes``
    reads, so the hook's patch carries a stale resourceVersion."""
    real_get, reads = hook.get, {"n": 0}

    def racing_get():
        current = real_get()
        reads["n"] += 1
        if reads["n"] <= changes:
            changed = api.get(NAMESPACE, NAME)
            changed["spec"]["http"][0]["timeout"] = f"{reads['n']}s"
            api.put(changed)
        return current

    hook.get = racing_get


def test_a_concurrent_change_fails_the_patch_and_is_retried_on_a_fresh_read(api, hook):
    """The API server refuses the stale patch (its resourceVersion test fails: 422); the hook reads
    again and patches the new object, so the other writer's change survives."""
    mark = api.cluster.audit_mark()
    racing(api, hook, changes=2)
    assert hook.set_weights({"v1": 75, "v2": 25}) == {"v1": 75, "v2": 25}
    assert [e["responseStatus"]["code"] for e in api.patches_since(mark)] == [422, 422, 200]
    after = api.get(NAMESPACE, NAME)
    assert after["spec"]["http"][0]["timeout"] == "2s" and weights_of(after) == {"v1": 75, "v2": 25}


def test_gives_up_after_repeated_conflicts(api, hook):
    racing(api, hook, changes=10)
    with pytest.raises(WeightsNotConfirmed, match=r"changed by another writer during each of 5 attempts "
                                                  r"\(last answer 422\); its weights stay \{'v1': 100\}"):
        hook.set_weights({"v1": 80, "v2": 20})
    assert weights_of(api.get(NAMESPACE, NAME)) == {"v1": 100}


def test_the_shipped_gateway_keeps_its_keyed_route_while_the_weights_change(api, hook):
    """The gateway VirtualService of k8s/base, under the real CRD schema: the weight changes touch
    the "versions" route alone; the "keyed" route (sticky assignment by the app) stays as shipped."""
    (shipped,) = [o for o in yaml.safe_load_all((REPO / "k8s/base/gateway/gateway.yaml").read_text())
                  if o["kind"] == "VirtualService"]
    api.put(shipped)
    for weights in ({"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v2": 100}):
        hook.set_weights(weights)
        after = api.get(NAMESPACE, NAME)
        assert [http["name"] for http in after["spec"]["http"]] == ["keyed", "versions"]
        assert after["spec"]["http"][0] == shipped["spec"]["http"][0]
        assert weights_of(after) == weights
        jsonschema.validate(after["spec"], istio_schema("VirtualService"))


def test_missing_virtual_service_is_a_clear_404(api):
    missing = IstioVirtualServiceHook("nope", NAMESPACE, api_client=api.cluster.admin)
    with pytest.raises(ApiException) as error:
        missing.set_weights({"v1": 100})
    assert error.value.status == 404 and "not found" in error.value.body


def test_invalid_weights_never_reach_the_api(api, hook):
    mark = api.cluster.audit_mark()
    with pytest.raises(InvalidWeights, match="sum to 100"):
        hook.set_weights({"v1": 90, "v2": 20})
    assert not api.patches_since(mark)


def test_a_virtual_service_without_version_routes_is_refused(api, hook):
    vs = gateway_virtual_service({"v1": 100})
    del vs["spec"]["http"][1]["route"][0]["headers"]
    api.put(vs)
    with pytest.raises(ValueError, match="x-model-version"):
        hook.set_weights({"v1": 100})


def test_read_back_mismatch_is_reported(api, hook, monkeypatch):
    monkeypatch.setattr("embedding_rollout_airflow.hooks.routing.weights_patch",
                        lambda current, weights: [{"op": "test", "path": "/metadata/resourceVersion",
                                                   "value": current["metadata"]["resourceVersion"]}])
    with pytest.raises(WeightsNotConfirmed):
        hook.set_weights({"v1": 70, "v2": 30})


@pytest.mark.parametrize("weights", [{"v1": 100}, {"v1": 99, "v2": 1}, {"v1": 0, "v2": 100},
                                     {"v1": 33, "v2": 33, "v3": 34}, {"v2": 100}])
def test_the_produced_virtual_service_validates_against_istios_schema(api, hook, weights):
    """The API server applied it under the CRD's structural schema; the schema, made strict, agrees."""
    hook.set_weights(weights)
    produced = api.get(NAMESPACE, NAME)
    jsonschema.validate(produced["spec"], istio_schema("VirtualService"))
    assert sum(weights_of(produced).values()) == 100


def test_istio_weight_operator_sets_the_local_router_in_the_local_runtime(tmp_path, monkeypatch):
    from embedding_rollout.domain.state import StateFile, VersionSpec
    from embedding_rollout_airflow.operators.istio import IstioWeightOperator
    monkeypatch.setenv("ER_HOME", str(tmp_path))
    monkeypatch.setenv("ER_AIRFLOW_RUNTIME", "local")
    state = StateFile(tmp_path / "state.json")
    state.update(lambda s: verified(serving(s, VersionSpec("v1", 8, "docs-v1")), VersionSpec("v2", 8, "docs-v2")))
    operator = IstioWeightOperator(task_id="shift", weights='{"v1": 70, "v2": 30}')
    assert operator.execute(context={}) == {"v1": 70, "v2": 30}
    assert state.read().weights == {"v1": 70, "v2": 30}
