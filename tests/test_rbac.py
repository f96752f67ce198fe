"""The RBAC Roles allow exactly the Kubernetes API calls the code makes, proved by the real
authorizer (kube-apiserver with ``--authorization-mode=Node,RBAC``).

Each identity's code runs with that ServiceAccount's own token, from the TokenRequest API, against
the API server holding the project's Roles and RoleBindings (``k8s/base/airflow-rbac/rbac.yaml``):

- it succeeds, and none of its requests was refused;
- every verb, resource and resource name the Roles grant was used by some request, as the API
  server's audit log records it (not a recorder of the project's own);
- without any single verb of any rule, the same code is refused with a 403.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import pytest
import yaml
from kubernetes import client

from conftest import REPO
from embedding_rollout.generator.kubernetes import GeneratorRolloutFailed
from embedding_rollout_airflow.hooks.routing import IstioVirtualServiceHook
from kube_cluster import NAMESPACE, put_istio, wait_until
from test_generator_fleet import TEMPLATES
from test_istio_weights import NAME, gateway_virtual_service
from test_manifests import load_docs

RBAC = REPO / "k8s" / "base" / "airflow-rbac" / "rbac.yaml"
AIRFLOW, STEPS = ("airflow", "embedding-rollout-airflow"), ("embeddings", "rollout-steps")
APP = ("embeddings", "embedding-app")
IDENTITIES = {"rollout-steps": STEPS, "airflow": AIRFLOW, "app": APP}


def roles_of(identity: tuple[str, str]) -> list[dict]:
    """The Roles bound to the ServiceAccount ``identity`` (namespace, name), as the manifest has them."""
    objects = load_docs(RBAC.read_text())
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
    bound = [roles[b["roleRef"]["name"]] for b in objects if b["kind"] == "RoleBinding"
             and any((s["namespace"], s["name"]) == identity for s in b["subjects"])]
    assert bound, f"no Role is bound to {identity}"
    return bound


def grants(role: dict):
    """Everything a Role grants, one (group, resource, verb, name-or-None) at a time."""
    for rule in role["rules"]:
        for group, resource, verb in itertools.product(rule["apiGroups"], rule["resources"], rule["verbs"]):
            for name in rule.get("resourceNames") or [None]:
                yield group, resource, verb, name


def used(event: dict, grant: tuple[str, str, str, str | None]) -> bool:
    ref = event["objectRef"]
    resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    group, name = ref.get("apiGroup", ""), ref.get("name")
    return ((group, resource, event["verb"]) == grant[:3] and ref.get("namespace") == NAMESPACE
            and grant[3] in (None, name))


# -- the code of each Role, run with the token of the identity it is bound to ----------------------
def generator_deployer_code(run) -> None:
    """The deploy and remove steps (the step pods): every path they take."""
    from embedding_rollout.generator.kubernetes import KubernetesFleet
    fleet = KubernetesFleet(NAMESPACE, TEMPLATES, api_client=run.api_client, poll_seconds=0.2, timeout=60)
    fleet.deploy("v2")
    fleet.deploy("v2")  # retried: the Deployment exists already
    run.cluster.kubelet.crash_looping.add("v3")
    with pytest.raises(GeneratorRolloutFailed):
        KubernetesFleet(NAMESPACE, TEMPLATES, api_client=run.api_client, poll_seconds=0.2, timeout=3).deploy("v3")
    fleet.remove("v3")
    fleet.remove("v2")
    fleet.remove("v2")  # retried: nothing left to remove


def traffic_code(run) -> None:
    """IstioWeightOperator's hook: add, shift, drop, repeat."""
    hook = IstioVirtualServiceHook(NAME, NAMESPACE, api_client=run.api_client)
    for weights in ({"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v2": 100}, {"v2": 100}):
        hook.set_weights(weights)


def pod_launcher_code(run) -> list[str]:
    """A real KubernetesPodOperator (dag.test() of a one-task DAG) launching a step pod that
    succeeds and one that fails, through Airflow's kubernetes_default connection."""
    from test_pod_launch import FAILING_EXIT_CODE, FAILING_VERSION, run_probe, use_cluster
    from kube_cluster import CA, URL
    use_cluster(run.monkeypatch, run.bundle, URL, run.token, CA)
    run.cluster.kubelet.exit_code = lambda pod: (
        FAILING_EXIT_CODE if FAILING_VERSION in (pod.spec.containers[0].args or []) else 0)
    return [run_probe(run.bundle, "v2").state, run_probe(run.bundle, FAILING_VERSION).state]


STATE = "embedding-rollout-state"


def state_writer_code(run) -> None:
    """The steps' state: the first write creates the ConfigMap, the next ones replace it."""
    from embedding_rollout.domain.state import VersionSpec
    from embedding_rollout.statestore.configmap import ConfigMapState
    state = ConfigMapState(STATE, NAMESPACE, api_client=run.api_client)
    state.update(lambda s: s.with_version(VersionSpec("v1", 8, "docs-v1")))
    state.update(lambda s: s.with_write_target("v1"))
    assert state.read().write_targets == ("v1",)


def app_state_code(run) -> None:
    """The app's state (made by a step first): watched, and updated as the operator API does."""
    from embedding_rollout.domain.state import VersionSpec
    from embedding_rollout.statestore.configmap import ConfigMapState
    made_by_a_step = ConfigMapState(STATE, NAMESPACE, api_client=run.cluster.admin)
    made_by_a_step.update(lambda s: s.with_version(VersionSpec("v1", 8, "docs-v1")).with_write_target("v1")
                          if not s.versions else s)
    state = ConfigMapState(STATE, NAMESPACE, api_client=run.api_client).watch(timeout=10)
    try:
        state.update(lambda s: s.with_backfill("v1"))
        wait_until(lambda: state.read().phase("v1") == "backfilled", 30, "the watch delivering the change")
    finally:
        state.close()


CODE = {"rollout-generator-deployer": generator_deployer_code, "rollout-traffic": traffic_code,
        "rollout-pod-launcher": pod_launcher_code, "deployment-state-writer": state_writer_code,
        "deployment-state": app_state_code}


@dataclass
class Run:
    cluster: object
    token: str
    monkeypatch: object
    bundle: object

    @property
    def api_client(self):
        from kube_cluster import api_client
        return api_client(self.token)


@pytest.fixture
def cluster(kube_generators, airflow_db):
    put_istio(kube_generators, gateway_virtual_service({"v1": 100}))
    delete_state(kube_generators)
    yield kube_generators
    delete_state(kube_generators)
    kube_generators.kubelet.exit_code = lambda pod: 0
    reset_roles(kube_generators)


def delete_state(cluster) -> None:
    try:
        client.CoreV1Api(cluster.admin).delete_namespaced_config_map(STATE, NAMESPACE)
    except client.exceptions.ApiException as exc:
        if exc.status != 404:
            raise


def reset_roles(cluster) -> None:
    cluster.apply([o for o in load_docs(RBAC.read_text()) if o["kind"] == "Role"])


def user(identity: tuple[str, str]) -> str:
    return f"system:serviceaccount:{identity[0]}:{identity[1]}"


def run_as(cluster, identity: tuple[str, str], roles: list[dict], monkeypatch, bundle) -> tuple[list[dict], dict]:
    """Run the code of ``roles`` with the identity's own token. Returns its requests from the audit
    log, and what each Role's code returned or raised."""
    mark, outcomes = cluster.audit_mark(), {}
    run = Run(cluster, cluster.service_account_token(*identity), monkeypatch, bundle)
    for role in roles:
        name = role["metadata"]["name"]
        try:
            outcomes[name] = CODE[name](run)
        except Exception as exc:  # noqa: BLE001 (the caller judges it)
            outcomes[name] = exc
    return cluster.audit_since(mark, user(identity)), outcomes


@pytest.fixture
def bundle(tmp_path_factory):
    from test_pod_launch import probe_bundle
    return probe_bundle(tmp_path_factory)


@pytest.mark.parametrize("identity", IDENTITIES.values(), ids=IDENTITIES.keys())
def test_each_identitys_code_is_allowed_and_uses_every_grant(cluster, identity, monkeypatch, bundle):
    roles = roles_of(identity)
    events, outcomes = run_as(cluster, identity, roles, monkeypatch, bundle)
    failed = {name: outcome for name, outcome in outcomes.items() if isinstance(outcome, Exception)}
    assert not failed, failed
    if "rollout-pod-launcher" in outcomes:
        assert outcomes["rollout-pod-launcher"] == ["success", "failed"]  # the step pods' own exit codes
    refused = [(e["verb"], e["objectRef"]) for e in events if e["responseStatus"]["code"] == 403]
    assert not refused, f"{identity} was forbidden: {refused}"
    unused = [g for role in roles for g in grants(role) if not any(used(e, g) for e in events)]
    assert not unused, f"{identity} is granted more than its code uses (per the audit log): {unused}"


def without_one_verb(identity: tuple[str, str]):
    """Each Role of ``identity`` with one verb of one rule taken out (the rule too, once empty)."""
    for role in roles_of(identity):
        for index, rule in enumerate(role["rules"]):
            for verb in rule["verbs"]:
                smaller = copy.deepcopy(role)
                rest = [v for v in rule["verbs"] if v != verb]
                if rest:
                    smaller["rules"][index]["verbs"] = rest
                else:
                    del smaller["rules"][index]
                yield pytest.param(identity, smaller, id=f"{role['metadata']['name']}-{index}-{verb}")


@pytest.mark.parametrize("identity,smaller_role", [p for i in IDENTITIES.values() for p in without_one_verb(i)])
def test_without_any_single_grant_the_code_is_refused_with_403(cluster, identity, smaller_role, monkeypatch, bundle):
    cluster.kubectl("replace", "-f", "-", input_text=yaml.safe_dump(smaller_role))
    wait_until(lambda: not can_do_all(cluster, identity, smaller_role), 30, "the smaller Role in force")
    events, outcomes = run_as(cluster, identity, [smaller_role], monkeypatch, bundle)
    refused = [e for e in events if e["responseStatus"]["code"] == 403]
    assert refused, f"{smaller_role['metadata']['name']} without one verb still let its code through: {outcomes}"


def can_do_all(cluster, identity, role) -> bool:
    """Whether the API server still allows every grant of the manifest's version of ``role``."""
    original = next(r for r in roles_of(identity) if r["metadata"]["name"] == role["metadata"]["name"])
    api = client.AuthorizationV1Api(cluster.admin)
    for group, resource, verb, name in grants(original):
        resource, _, subresource = resource.partition("/")
        review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
            user=user(identity), groups=["system:serviceaccounts", f"system:serviceaccounts:{identity[0]}"],
            resource_attributes=client.V1ResourceAttributes(namespace=NAMESPACE, group=group, resource=resource,
                                                            subresource=subresource or None, verb=verb, name=name)))
        if not api.create_subject_access_review(review).status.allowed:
            return False
    return True

