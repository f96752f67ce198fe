"""IstioWeightOperator against an HTTP imitation of the Kubernetes API (404, 409, 422 included)."""
from __future__ import annotations

import os
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest import REPO, serving, verified
from embedding_rollout.domain.traffic import InvalidWeights
from embedding_rollout_airflow.hooks.routing import IstioVirtualServiceHook, WeightsNotConfirmed, weights_of
from k8s_api import FakeKubernetesAPI

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


@pytest.fixture
def api():
    fake = FakeKubernetesAPI().start()
    fake.put(gateway_virtual_service({"v1": 100}))
    yield fake
    fake.stop()


@pytest.fixture
def hook(api):
    configuration = client.Configuration(host=api.url)
    return IstioVirtualServiceHook(NAME, NAMESPACE, api_client=client.ApiClient(configuration))


def istio_schema(kind: str) -> dict:
    path = Path(os.environ.get("ER_ISTIO_CRDS", REPO.parent / "shared" / "schemas" / "istio-crds.yaml"))
    for crd in yaml.safe_load_all(path.read_text()):
        if crd and crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            return version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    raise LookupError(kind)


def test_set_weights_adds_a_version_and_leaves_the_rest_intact(api, hook):
    before = api.get(NAMESPACE, NAME)
    assert hook.set_weights({"v1": 90, "v2": 10}) == {"v1": 90, "v2": 10}
    after = api.get(NAMESPACE, NAME)
    assert after["spec"]["http"][0] == before["spec"]["http"][0]  # the other route is untouched
    assert after["spec"]["http"][1]["timeout"] == "5s"
    new_route = after["spec"]["http"][1]["route"][1]
    assert new_route["headers"]["request"]["set"] == {"x-model-version": "v2"}
    assert new_route["destination"] == before["spec"]["http"][1]["route"][0]["destination"]
    patches = [r for r in api.requests if r[0] == "PATCH"]
    assert patches and all(content == "application/json-patch+json" for _, _, content in patches)


def test_set_weights_is_idempotent_and_removes_versions_left_out(api, hook):
    hook.set_weights({"v1": 50, "v2": 50})
    version = api.get(NAMESPACE, NAME)["metadata"]["resourceVersion"]
    hook.set_weights({"v1": 50, "v2": 50})
    assert api.get(NAMESPACE, NAME)["metadata"]["resourceVersion"] == version  # no write at all
    hook.set_weights({"v2": 100})
    assert weights_of(api.get(NAMESPACE, NAME)) == {"v2": 100}


def test_a_conflict_is_retried_on_a_fresh_read(api, hook):
    api.conflicts_to_inject = 2
    assert hook.set_weights({"v1": 75, "v2": 25}) == {"v1": 75, "v2": 25}
    assert [r[0] for r in api.requests].count("PATCH") == 3


def test_a_concurrent_change_fails_the_test_operation_and_is_not_overwritten(api, hook):
    """Between our read and our patch someone adds a route: the resourceVersion test fails (422),
    we read again and patch the new object, so their change survives."""
    real_get = hook.get
    calls = {"n": 0}

    def racing_get():
        current = real_get()
        calls["n"] += 1
        if calls["n"] == 1:
            changed = api.get(NAMESPACE, NAME)
            changed["spec"]["http"][0]["timeout"] = "9s"
            api.put(changed)
        return current

    hook.get = racing_get
    assert hook.set_weights({"v1": 60, "v2": 40}) == {"v1": 60, "v2": 40}
    after = api.get(NAMESPACE, NAME)
    assert after["spec"]["http"][0]["timeout"] == "9s"


def test_gives_up_after_repeated_conflicts(api, hook):
    api.conflicts_to_inject = 10
    with pytest.raises(ApiException) as error:
        hook.set_weights({"v1": 80, "v2": 20})
    assert error.value.status == 409
    assert weights_of(api.get(NAMESPACE, NAME)) == {"v1": 100}


def test_missing_virtual_service_is_a_clear_404(api):
    configuration = client.Configuration(host=api.url)
    missing = IstioVirtualServiceHook("nope", NAMESPACE, api_client=client.ApiClient(configuration))
    with pytest.raises(ApiException) as error:
        missing.set_weights({"v1": 100})
    assert error.value.status == 404 and "not found" in error.value.body


def test_invalid_weights_never_reach_the_api(api, hook):
    with pytest.raises(InvalidWeights, match="sum to 100"):
        hook.set_weights({"v1": 90, "v2": 20})
    assert not [r for r in api.requests if r[0] == "PATCH"]


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
