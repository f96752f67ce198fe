"""The RBAC rules allow exactly the Kubernetes API calls the code makes.

The calls are not listed here: each identity's code runs against the HTTP imitation of the API,
which records every request as RBAC sees it (verb, API group, resource, name). Then every recorded
call must be allowed by the Roles bound to that identity, and every verb, resource and resource
name the Roles grant must have been used by some call.
"""
from __future__ import annotations

import itertools

import pytest
from kubernetes import client

from conftest import REPO
from embedding_rollout.generator.kubernetes import GeneratorRolloutFailed
from embedding_rollout_airflow.hooks.routing import IstioVirtualServiceHook
from k8s_api import Call, FakeKubernetesAPI
from test_generator_fleet import DeploymentController, fleet, generator_objects
from test_istio_weights import NAME, NAMESPACE, gateway_virtual_service
from test_manifests import load_docs
from test_pod_launch import pod_launcher_calls  # noqa: F401 (a fixture: a real KubernetesPodOperator's calls)

RBAC = REPO / "k8s" / "base" / "airflow-rbac" / "rbac.yaml"
AIRFLOW, STEPS = ("airflow", "embedding-rollout-airflow"), ("embeddings", "rollout-steps")


def granted_rules(identity: tuple[str, str]) -> list[dict]:
    """The rules of every Role bound to the service account ``identity`` (namespace, name)."""
    objects = load_docs(RBAC.read_text())
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
    rules = []
    for binding in (o for o in objects if o["kind"] == "RoleBinding"):
        if any((s["namespace"], s["name"]) == identity for s in binding["subjects"]):
            role = roles[binding["roleRef"]["name"]]
            assert role["metadata"]["namespace"] == NAMESPACE
            rules += role["rules"]
    return rules


def allows(rule: dict, call: Call) -> bool:
    names = rule.get("resourceNames")
    return (call.namespace == NAMESPACE and call.group in rule["apiGroups"] and call.resource in rule["resources"]
            and call.verb in rule["verbs"]
            # A rule naming resources never matches create (the name is not known when it is authorized).
            and (not names or (call.verb != "create" and call.name in names)))


def grants(rule: dict):
    """Everything a rule grants, one (group, resource, verb, name-or-None) at a time."""
    for group, resource, verb in itertools.product(rule["apiGroups"], rule["resources"], rule["verbs"]):
        for name in rule.get("resourceNames") or [None]:
            yield group, resource, verb, name


def check_exactly(identity: tuple[str, str], calls: list[Call]) -> None:
    rules = granted_rules(identity)
    assert calls, "the code under test made no API call at all"
    denied = {c for c in calls if not any(allows(r, c) for r in rules)}
    assert not denied, f"{identity} would be forbidden: {sorted(map(str, denied))}"
    unused = [g for r in rules for g in grants(r)
              if not any(c.group == g[0] and c.resource == g[1] and c.verb == g[2] and g[3] in (None, c.name)
                         for c in calls)]
    assert not unused, f"{identity} is granted more than its code uses: {unused}"


# -- the code of each identity, run against the imitation ------------------------------------------
def step_pod_calls() -> list[Call]:
    """The deploy and remove steps (service account rollout-steps): every path they can take."""
    from test_manifests import raw_base
    api = FakeKubernetesAPI().start()
    try:
        api.controllers["deployments"] = controller = DeploymentController()
        for obj in raw_base():
            if obj["metadata"]["name"] == "embedding-generator" and obj["kind"] != "Service":
                api.put(obj)
        fleet(api).deploy("v2")
        fleet(api).deploy("v2")  # retried: the Deployment exists already
        controller.never_ready.add("embedding-generator-v3")
        with pytest.raises(GeneratorRolloutFailed):
            fleet(api).deploy("v3")
        fleet(api).remove("v3")
        fleet(api).remove("v2")
        fleet(api).remove("v2")  # retried: nothing left to remove
        assert generator_objects(api)
        return list(api.calls)
    finally:
        api.stop()


def traffic_calls() -> list[Call]:
    """IstioWeightOperator's hook (Airflow's service account): add, shift, drop, repeat."""
    api = FakeKubernetesAPI().start()
    try:
        api.put(gateway_virtual_service({"v1": 100}))
        hook = IstioVirtualServiceHook(NAME, NAMESPACE, api_client=client.ApiClient(client.Configuration(host=api.url)))
        for weights in ({"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v2": 100}, {"v2": 100}):
            hook.set_weights(weights)
        return list(api.calls)
    finally:
        api.stop()


def test_the_step_pods_role_allows_exactly_what_the_deploy_and_remove_steps_do():
    check_exactly(STEPS, step_pod_calls())


def test_airflows_roles_allow_exactly_what_the_weight_operator_and_the_pod_operator_do(pod_launcher_calls):  # noqa: F811
    check_exactly(AIRFLOW, traffic_calls() + pod_launcher_calls)


def test_the_check_catches_a_missing_and_a_superfluous_grant():
    calls = traffic_calls()
    with pytest.raises(AssertionError, match="forbidden"):
        check_exactly(AIRFLOW, calls + [Call("delete", "networking.istio.io", "virtualservices", NAME, NAMESPACE)])
    with pytest.raises(AssertionError, match="more than its code uses"):
        check_exactly(AIRFLOW, calls)  # without the pod operator's calls, the pod grants are unused
