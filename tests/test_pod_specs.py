"""In the kubernetes runtime the same graphs run their steps as KubernetesPodOperator pods; the
pod specs they render validate against the Kubernetes schemas."""
from __future__ import annotations

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient

from conftest import REPO

K8S_VERSION = "1.31"


@pytest.fixture
def kubernetes_dags(airflow_db, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    monkeypatch.setenv("ER_AIRFLOW_RUNTIME", "kubernetes")
    monkeypatch.setenv("ER_IMAGE", "registry.example.com/embedding-rollout:0.1.0")
    monkeypatch.setenv("ER_STORE", "elasticsearch")
    monkeypatch.setenv("ER_ES_URL", "http://elasticsearch.embeddings.svc:9200")
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag


@pytest.fixture
def local_dags(airflow_db, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    monkeypatch.setenv("ER_AIRFLOW_RUNTIME", "local")
    return DagBag(dag_folder=str(REPO / "dags"))


def test_kubernetes_runtime_renders_valid_pod_specs(kubernetes_dags):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.definitions.mappedoperator import MappedOperator
    pods = mapped = 0
    for dag_id in kubernetes_dags.dag_ids:
        for task in kubernetes_dags.get_dag(dag_id).tasks:
            if isinstance(task, MappedOperator) and issubclass(task.operator_class, KubernetesPodOperator):
                task = task.unmap({"arguments": ["index", "load", "--version", "v2", "--source", "v1", "--slice", "2"]})
                mapped += 1
            if not isinstance(task, KubernetesPodOperator):
                continue
            pod = ApiClient().sanitize_for_serialization(task.build_pod_request_obj(dry_run=True))
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
            container = pod["spec"]["containers"][0]
            assert container["image"] == "registry.example.com/embedding-rollout:0.1.0"
            assert container["command"] == ["embedding-rollout"] and container["args"]
            assert {"name": "ER_STORE", "value": "elasticsearch"} in container["env"]
            assert pod["spec"]["serviceAccountName"] == "rollout-steps"
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts == {"embedding-models": "/models"}  # no volume for state, checkpoints, decisions
            assert task.durable and task.on_finish_action.value == "delete_succeeded_pod"
            pods += 1
    assert pods >= 10 and mapped >= 2  # the backfill's slices: a pod each


class XComOfBeginRollout:
    """What a task instance's ``xcom_pull(task_ids='begin_rollout')`` gives the templates."""

    def xcom_pull(self, task_ids=None, **_):
        assert task_ids == "begin_rollout"
        return {"current_version": "v1", "model_artifact": "/models/embedder/2", "backfill_slices": 2,
                "thresholds": {"max_error_rate": 0.05, "max_p99_ratio": 1.5, "min_requests": 20}}


def test_pods_rendered_as_the_scheduler_renders_them_are_valid(kubernetes_dags, monkeypatch):
    """The DAGs render templates as native objects: a step setting that reads as a number
    (``ER_DRAIN_SECONDS=1``) must still reach the pod as a string, or the API server refuses the
    pod (400: cannot unmarshal number into EnvVar.value), as it did every step pod's."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.dag_processing.dagbag import DagBag
    monkeypatch.setenv("ER_DRAIN_SECONDS", "1")
    monkeypatch.setenv("ER_GENERATOR_TIMEOUT", "2.0")
    bag = DagBag(dag_folder=str(REPO / "dags"))
    rendered = 0
    for dag_id in bag.dag_ids:
        dag = bag.get_dag(dag_id)
        if not dag.render_template_as_native_obj:
            continue
        context = {"params": {"new_version": "v2", "rollback_window_seconds": 0}, "run_id": "manual__1",
                   "ti": XComOfBeginRollout(), "dag_run": None}
        for task in dag.tasks:
            if isinstance(task, KubernetesPodOperator):
                task.render_template_fields(context)
                pod = ApiClient().sanitize_for_serialization(task.build_pod_request_obj(dry_run=True))
                kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
                container = pod["spec"]["containers"][0]
                assert {"name": "ER_DRAIN_SECONDS", "value": "1"} in container["env"]
                assert all(isinstance(arg, str) for arg in container["args"]), container["args"]
                rendered += 1
    assert rendered >= 10


def test_a_broken_pod_spec_would_be_caught():
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                                      "spec": {"containers": [{"name": "c", "image": 3}]}}, K8S_VERSION, strict=True)


def test_the_graph_is_the_same_in_both_runtimes(kubernetes_dags, local_dags):
    for dag_id in local_dags.dag_ids:
        local, kube = local_dags.get_dag(dag_id), kubernetes_dags.get_dag(dag_id)
        edges = lambda dag: {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}  # noqa: E731
        assert edges(local) == edges(kube) and set(local.task_ids) == set(kube.task_ids)
