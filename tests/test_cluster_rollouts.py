"""Rollouts in the kubernetes runtime, through Airflow's real scheduler, against the real API
server: ``embedding_deploy_ramped`` triggered through the REST API with conf, its steps
KubernetesPodOperator pods launched with the Airflow ServiceAccount's token through
``kubernetes_default``, its traffic moved by ``IstioWeightOperator`` (Istio's gateway VirtualService
under the real CRD schema, then the app), the deployment state in its ConfigMap and the app serving
from its watch of it, while live searches and writes flow.

Each version's generator Deployment is created and removed by the step pods' code, with the
steps' ServiceAccount token, and made into pods by the real controllers. What is a stand-in (see
``kube_cluster``): the kubelet, which reports the pods' status and runs a step pod's command as a
local process instead of its container; and one model server for every version's TF Serving pods.
After each rollout the state, the gateway routes, the generator routes and subsets and the
Deployments agree, and nothing of a removed version remains."""
from __future__ import annotations

import json
import shutil

import pytest
import requests
import yaml
from kubernetes import client

from conftest import TOKENS, airflow_metadata_database
from embedding_rollout import steps
from embedding_rollout.auth import token_for
from embedding_rollout.airflow_stack import AirflowStack, free_port
from embedding_rollout.config import Settings
from embedding_rollout.domain.rollout import ROLLED_BACK, SUCCEEDED
from embedding_rollout.generator.models import ModelManager
from embedding_rollout.generator.server import ModelServer
from embedding_rollout.loadgen import Traffic
from embedding_rollout.model.trainer import TrainConfig
from embedding_rollout.model.training import train_version
from embedding_rollout.statestore.configmap import ConfigMapState
from embedding_rollout_airflow.hooks.deployment import AppDeploymentHook
from embedding_rollout_airflow.hooks.routing import weights_of
from kube_cluster import (KUBECONFIG, NAMESPACE, StepProcesses, generator_deployments, get_istio,
                          kubeconfig_text, put_istio, reset_generators, wait_until)
from rollout_harness import TEST_TRAFFIC_PAUSE, small_corpus
from serving_app import AppServer, create_app
from test_istio_weights import NAME, gateway_virtual_service
from test_manifests import check_generator_routing
from test_rbac import AIRFLOW, APP

pytestmark = pytest.mark.slow
DAG = "embedding_deploy_ramped"
STATE = "embedding-rollout-state"
VERSIONS = ("v1", "v2", "v3", "v4")
IMAGE = "registry.example.com/embedding-rollout:0.1.0"
DEPLOY_TIMEOUT = 30  # seconds a candidate's generator Deployment gets to become available


@pytest.fixture(scope="module")
def four_models(tmp_path_factory, model_repo):
    """Four small real models (the session's v1 and v2, two more trained here) and a model server
    serving them (the stand-in for each version's TF Serving pods, which nothing here can run)."""
    repo = tmp_path_factory.mktemp("four-models") / "embedder"
    for number in (1, 2):
        shutil.copytree(model_repo / str(number), repo / str(number))
    for number, dims in ((3, 24), (4, 16)):
        train_version(repo, number, TrainConfig(dims=dims, epochs=1, vocab_size=4000), None)
    manager = ModelManager("embedder", repo)
    manager.serve([1, 2, 3, 4])
    server = ModelServer(manager, rest_port=0, grpc_port=0).start()
    yield repo, server
    server.stop()


def kubernetes_default(token: str) -> str:
    """Airflow's ``kubernetes_default`` connection (as JSON) for a ServiceAccount token."""
    return json.dumps({"conn_type": "kubernetes",
                       "extra": {"in_cluster": False, "kube_config": yaml.safe_load(kubeconfig_text(token))}})


@pytest.fixture(scope="module")
def cluster_airflow(kube, four_models, tmp_path_factory):
    """v1 bootstrapped in the kubernetes runtime; the app (with its own ServiceAccount's token)
    watching the state ConfigMap; Airflow's components with ``ER_AIRFLOW_RUNTIME=kubernetes`` and
    the Airflow ServiceAccount's token; step pods run by the stand-in kubelet."""
    repo, server = four_models
    home = tmp_path_factory.mktemp("cluster-airflow")
    core = client.CoreV1Api(kube.admin)
    try:
        core.delete_namespaced_config_map(STATE, NAMESPACE)
    except client.exceptions.ApiException as exc:
        assert exc.status == 404
    kube.kubelet.crash_looping.clear()
    reset_generators(kube)
    put_istio(kube, gateway_virtual_service({"v1": 100}))
    app_kubeconfig = home / "app.kubeconfig"
    app_kubeconfig.write_text(kubeconfig_text(kube.service_account_token(*APP)))
    with pytest.MonkeyPatch.context() as env, airflow_metadata_database("cluster") as database:
        for key, value in {"ER_HOME": str(home / "home"), "ER_STORE": "lance", "ER_LANCE_URI": str(home / "lance"),
                           "ER_MODEL_BASE": str(repo.parent), "ER_GENERATOR_BACKEND": "kubernetes",
                           "ER_K8S_NAMESPACE": NAMESPACE, "ER_STATE_BACKEND": "kubernetes",
                           "ER_STATE_CONFIGMAP": STATE, "ER_GENERATOR_GRPC": f"127.0.0.1:{server.grpc_port}",
                           "ER_GENERATOR_REST": f"http://127.0.0.1:{server.rest_port}",
                           "ER_GENERATOR_PROTOCOL": "rest",  # step processes start without TensorFlow
                           "ER_CORPUS": str(small_corpus(home / "corpus.jsonl.gz", 300)),
                           "ER_DRAIN_SECONDS": "1", "ER_GENERATOR_DEPLOY_TIMEOUT": str(DEPLOY_TIMEOUT),
                           "KUBECONFIG": str(KUBECONFIG)}.items():
            env.setenv(key, value)
        env.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        steps.bootstrap(Settings(), "v1")  # v1's Deployment is the base's: only registered, then loaded
        env.setenv("KUBECONFIG", str(app_kubeconfig))
        app = AppServer(create_app(Settings())).start()
        kube.kubelet.containers = StepProcesses(kube, home / "step-pods")
        env.setenv("KUBECONFIG", str(home / "no-kubeconfig"))  # Airflow's code has only its connection
        # The app and its token from the Connection only (ER_APP_URL leads nowhere).
        airflow = AirflowStack(home / "airflow", port=free_port(), parallelism=4, app_url=app.url,
                               app_token=token_for(TOKENS, "operator"), database_url=database, env={
            "ER_AIRFLOW_RUNTIME": "kubernetes", "ER_APP_URL": "http://127.0.0.1:9", "ER_IMAGE": IMAGE,
            "ER_TOKENS": str(home / "no-tokens.json"),
            "ER_GATEWAY_VIRTUAL_SERVICE": NAME, "ER_RETRAIN_SCHEDULE": "none",
            "AIRFLOW_CONN_KUBERNETES_DEFAULT": kubernetes_default(kube.service_account_token(*AIRFLOW))})
        try:
            airflow.start()
            api = airflow.api()
            api.unpause(DAG)
            yield ClusterAirflow(kube, app, api)
        finally:
            airflow.stop()
            kube.kubelet.containers.stop()
            kube.kubelet.containers = None
            app.stop()
            core.delete_namespaced_config_map(STATE, NAMESPACE)


class ClusterAirflow:
    def __init__(self, kube, app, api):
        self.kube, self.app, self.api = kube, app, api
        self.operator_api = AppDeploymentHook(app.url)

    def state(self):
        """The app's view of the deployment state (from its watch of the ConfigMap)."""
        return self.operator_api.state()

    def stored_state(self):
        """The deployment state as the ConfigMap holds it."""
        return ConfigMapState(STATE, NAMESPACE, api_client=self.kube.admin).read()

    def traffic(self, **kwargs) -> Traffic:
        return Traffic(self.app.url, lambda: self.state().weights, **{"pause": TEST_TRAFFIC_PAUSE, **kwargs})

    def run(self, conf: dict) -> tuple[str, dict]:
        run_id = self.api.trigger(DAG, conf)
        return run_id, self.api.wait(DAG, run_id, timeout=900)

    def states(self, run_id: str) -> dict[str, str]:
        return {k: t["state"] for k, t in self.api.task_instances(DAG, run_id).items()}

    def explain(self, run_id: str) -> str:
        states = self.states(run_id)
        failed = [t for t, s in states.items() if s == "failed"]
        logs = "\n".join(f"--- {t}\n{self.api.log(DAG, run_id, t)[-2500:]}" for t in failed)
        return f"{states}\nrollout: {self.state().rollout}\n{logs}\nstep pods:\n{self.kube.kubelet.containers.logs()}"


def served_version(url: str) -> str:
    reply = requests.post(f"{url}/search", json={"query": "python asyncio", "k": 3})
    assert reply.status_code == 200, reply.text
    return reply.json()["model_version"]


def check_agreement(cluster, state, live: str) -> None:
    """The state, the gateway routes, the generator routes and subsets and the Deployments agree:
    ``live`` alone, nothing of any other version."""
    assert set(state.versions) == {live} and state.stable == live and state.weights == {live: 100}
    assert weights_of(get_istio(cluster, "VirtualService", NAME)) == {live: 100}
    objects = [get_istio(cluster, kind, "embedding-generator") for kind in ("VirtualService", "DestinationRule")]
    wait_until(lambda: set(generator_deployments(cluster)) == {f"embedding-generator-{live}"}, 60,
               f"only {live}'s generator Deployment left")
    check_generator_routing(objects + list(generator_deployments(cluster).values()), {live})


def test_a_candidate_whose_generator_never_gets_ready_is_rolled_back_and_leaves_nothing(cluster_airflow):
    """v2's pods crash-loop: the deploy step pod fails at its deadline; meanwhile the app stays
    ready, serves v1 alone, and Istio routes nothing to v2; the teardowns remove every trace of v2."""
    live = cluster_airflow
    assert live.state().stable == "v1"
    live.kube.kubelet.crash_looping.add("v2")
    try:
        with live.traffic() as record:
            run_id = live.api.trigger(DAG, {"new_version": "v2", "weights": [50, 100], "step_interval_seconds": 5,
                                            "min_requests": 3})
            wait_until(lambda: "embedding-generator-v2" in generator_deployments(live.kube), 300,
                       "v2's generator Deployment created by the deploy step pod")
            wait_until(lambda: any(p.status.container_statuses for p in client.CoreV1Api(live.kube.admin)
                                   .list_namespaced_pod(NAMESPACE, label_selector="version=v2").items), 60,
                       "v2's pods crash-looping")
            ready = requests.get(f"{live.app.url}/readyz")
            assert ready.status_code == 200 and ready.json()["serving"] == ["v1"], ready.text
            assert weights_of(get_istio(live.kube, "VirtualService", NAME)) == {"v1": 100}
            assert served_version(live.app.url) == "v1"
            run = live.api.wait(DAG, run_id, timeout=900)
    finally:
        live.kube.kubelet.crash_looping.discard("v2")
    assert run["state"] == "failed"
    states = live.states(run_id)
    assert states["deploy_new_version"] == "failed", live.explain(run_id)
    assert states["conclude_rollout"] == "success" and states["finish_rollout"] == "success", live.explain(run_id)
    assert record.failures == [] and {r["version"] for r in record.responses} == {"v1"}
    rollout = live.state().rollout
    assert rollout.phase == ROLLED_BACK and rollout.message.startswith("rolled back (failed: deploy_new_version)")
    check_agreement(live.kube, live.stored_state(), "v1")
    assert requests.get(f"{live.app.url}/readyz").json()["serving"] == ["v1"]
    assert "not available after" in live.api.log(DAG, run_id, "deploy_new_version") + \
        live.kube.kubelet.containers.logs()


def test_three_consecutive_rollouts_through_the_scheduler_leave_nothing_of_the_old_versions(cluster_airflow):
    live = cluster_airflow
    assert live.state().stable == "v1" and served_version(live.app.url) == "v1"
    for current, new in zip(VERSIONS, VERSIONS[1:]):
        conf = {"new_version": new, "weights": [50, 100], "step_interval_seconds": 5, "min_requests": 3}
        with live.traffic() as record:
            run_id, run = live.run(conf)
        assert run["state"] == "success", live.explain(run_id)
        assert record.failures == [], record.failures[:5]
        assert {r["version"] for r in record.responses} == {current, new}
        # Keyed requests (the gateway's "keyed" route) are assigned by the app: sticky while the weights rise.
        assert record.users_moved_back(current, new) == {}
        seen = [w.get(new) for w in record.weights_seen if new in w]
        assert [w for i, w in enumerate(seen) if i == 0 or w != seen[i - 1]] == [0, 50, 100]
        state = live.state()  # the app's view, from its watch of the ConfigMap
        assert state.rollout.phase == SUCCEEDED and state.rollout.run_id == run_id, state.rollout.describe()
        assert state.versions.keys() == {new}
        check_agreement(live.kube, live.stored_state(), new)
        assert served_version(live.app.url) == new
    assert live.stored_state().stable == "v4"
    # The backfills' checkpoints are keys of the state's ConfigMap; a removed version's went with it.
    data = client.CoreV1Api(live.kube.admin).read_namespaced_config_map(STATE, NAMESPACE).data
    # The backfill's plan and its one slice's checkpoint (backfill_slices defaults to 1 here).
    assert sorted(key for key in data if key.startswith("backfill.")) == [
        "backfill.v4.from.v3.plan.json", "backfill.v4.from.v3.slice-1-of-1.json"]
    assert json.loads(data["backfill.v4.from.v3.plan.json"])["slices"] == 1
    assert json.loads(data["backfill.v4.from.v3.slice-1-of-1.json"])["done"] is True
