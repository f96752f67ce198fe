"""A step pod launched by Airflow: the KubernetesPodOperator that ``pod_operator`` builds (kubernetes
runtime), run by ``dag.test()`` through Airflow's task runner (real context, templates, task state
store), against the HTTP imitation of the Kubernetes API reached through the ``kubernetes_default``
connection. What it creates, whether the pod's log reaches the task's log, what happens to a
succeeded and to a failed pod, and which API calls it makes -- ``launcher_calls`` /
``pod_launcher_calls`` give them to the RBAC check of the ``rollout-pod-launcher`` Role."""
from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from k8s_api import Call, FakeKubernetesAPI, PodRun

NAMESPACE = "embeddings"
DAG_ID, TASK_ID = "pod_launch_probe", "deploy_step"
IMAGE = "registry.example.com/embedding-rollout:0.1.0"
FAILING_VERSION, FAILING_EXIT_CODE = "v9", 3  # the step pod of this version exits non-zero
# A one-task DAG in its own bundle, so dag.test() runs it the way Airflow runs the project's DAGs.
DAG_FILE = f'''
import pendulum
from airflow.sdk import DAG

from embedding_rollout_airflow.operators.steps import pod_operator
from embedding_rollout_airflow.runtime import Runtime

with DAG(dag_id="{DAG_ID}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         params={{"version": "v2"}}):
    # Only the startup poll is shortened (default 5 s); everything else is the project's operator.
    pod_operator("{TASK_ID}", ["deploy", "--version", "{{{{ params.version }}}}"], Runtime(kind="kubernetes"),
                 startup_check_interval_seconds=0.1)
'''


def launcher_calls(made: FakeKubernetesAPI | Iterable[Call]) -> set[tuple[str, str, str]]:
    """The API calls made (all of a fake API's, or some), as RBAC sees them: (verb, API group,
    resource with its subresource)."""
    return {(c.verb, c.group, c.resource) for c in (made.calls if isinstance(made, FakeKubernetesAPI) else made)}


@dataclass
class Launch:
    """One dag.test() run of the step task against the fake cluster."""
    state: str  # the task instance's
    calls: list[Call]
    pods: list[dict]  # the pods created, as the API admitted them
    log: list[str]  # what was logged meanwhile (the task's log events, as Airflow's log handlers get them)
    lines: list[str]  # what the pod's container wrote

    @property
    def pod_name(self) -> str:
        (pod,) = self.pods
        return pod["metadata"]["name"]

    def pod_calls(self) -> list[Call]:
        return [c for c in self.calls if c.resource.startswith("pods")]

    def logged(self, message: str) -> bool:
        return any(event.rstrip("\n") == message for event in self.log)


def probe_bundle(tmp_path_factory) -> Path:
    """The DAG bundle holding the probe DAG (one place per test session)."""
    path = tmp_path_factory.getbasetemp() / "pod-launch-bundle"
    path.mkdir(exist_ok=True)
    (path / "pod_launch_probe.py").write_text(DAG_FILE)
    return path


def use_cluster(monkeypatch, bundle: Path, server: str, token: str, ca_file: str | None = None) -> None:
    """Airflow's kubernetes_default connection pointing at ``server`` through a kubeconfig, and the
    probe DAG's bundle configured (besides the project's dags folder)."""
    cluster = {"server": server, **({"certificate-authority": ca_file} if ca_file else {})}
    kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
                  "clusters": [{"name": "test", "cluster": cluster}],
                  "users": [{"name": "airflow", "user": {"token": token}}],
                  "contexts": [{"name": "test", "context": {"cluster": "test", "user": "airflow"}}]}
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps(
        {"conn_type": "kubernetes", "extra": {"in_cluster": False, "kube_config": kubeconfig}}))
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps([
        {"name": "pod-launch-probe", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
         "kwargs": {"path": str(bundle)}},
        {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {}}]))
    monkeypatch.setenv("ER_IMAGE", IMAGE)
    monkeypatch.delenv("KUBECONFIG", raising=False)


def run_probe(bundle: Path, version: str, **dates):
    """One dag.test() run of the probe DAG (a fresh DAG object per run: dag.test() keeps the conf);
    its task instance."""
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=str(bundle))
    assert bag.import_errors == {}
    dag_run = bag.get_dag(DAG_ID).test(run_conf={"version": version}, **dates)
    (ti,) = dag_run.get_task_instances()
    return ti


@contextmanager
def fake_cluster(bundle: Path, monkeypatch) -> Iterator[FakeKubernetesAPI]:
    """The imitation of the API (it runs the pod's "container" and serves its log), with Airflow's
    connection pointing at it."""
    api = FakeKubernetesAPI().start()
    use_cluster(monkeypatch, bundle, api.url, "not-a-secret")
    try:
        yield api
    finally:
        api.stop()


def launcher(api: FakeKubernetesAPI, bundle: Path) -> Callable[..., Launch]:
    """Runs the probe DAG for a version; its step pod writes a few unique lines and exits 0, or
    FAILING_EXIT_CODE for FAILING_VERSION."""
    import structlog.testing

    def run(version: str, *, run_after: datetime.datetime | None = None,
            before: Callable[[], None] | None = None) -> Launch:
        created: list[dict] = []
        lines = [f"deploying {version} ({uuid.uuid4().hex})", f"{version}: index ready ({uuid.uuid4().hex})"]

        def container(pod: dict) -> PodRun:  # decided by the args the pod was created with
            created.append(pod)
            if FAILING_VERSION in pod["spec"]["containers"][0].get("args", []):
                lines.append(f"error: {FAILING_VERSION} is broken ({uuid.uuid4().hex})")
                return PodRun(lines=lines, exit_code=FAILING_EXIT_CODE)
            return PodRun(lines=lines)

        api.pod_runs = container
        if before:
            before()
        first = len(api.calls)
        dates = {"run_after": run_after, "logical_date": run_after} if run_after else {}
        with structlog.testing.capture_logs() as events:
            ti = run_probe(bundle, version, **dates)
        return Launch(ti.state, api.calls[first:], created, [str(e.get("event")) for e in events], lines)

    return run


@pytest.fixture
def bundle(tmp_path_factory) -> Path:
    return probe_bundle(tmp_path_factory)


@pytest.fixture
def cluster(airflow_db, bundle, monkeypatch):
    with fake_cluster(bundle, monkeypatch) as api:
        yield api


@pytest.fixture
def launch(cluster, bundle):
    return launcher(cluster, bundle)


@pytest.fixture
def pod_launcher_calls(airflow_db, tmp_path_factory, monkeypatch) -> list[Call]:
    """Every API call KubernetesPodOperator made over a success and a failure run of a step pod
    (``launcher_calls`` of them: the (verb, group, resource) set). Depends on conftest's and
    pytest's fixtures only, so another module can use it: ``from test_pod_launch import
    pod_launcher_calls``."""
    bundle = probe_bundle(tmp_path_factory)
    with fake_cluster(bundle, monkeypatch) as api:
        run = launcher(api, bundle)
        succeeded, failed = run("v2"), run(FAILING_VERSION)
    assert (succeeded.state, failed.state) == ("success", "failed")
    return succeeded.calls + failed.calls


def test_the_operator_creates_the_step_pod_in_the_embeddings_namespace(launch, bundle):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    assert issubclass(type(DagBag(dag_folder=str(bundle)).get_dag(DAG_ID).get_task(TASK_ID)), KubernetesPodOperator)
    run = launch("v2")
    assert run.state == "success", run.log
    assert [c.namespace for c in run.calls if c.verb == "create"] == [NAMESPACE]
    (pod,) = run.pods
    assert pod["metadata"]["namespace"] == NAMESPACE and pod["metadata"]["name"].startswith("rollout-deploy-step-")
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["name"] == "base" and container["image"] == IMAGE
    assert container["command"] == ["embedding-rollout"]
    assert container["args"] == ["deploy", "--version", "v2"]  # rendered by Airflow from the params
    assert spec["serviceAccountName"] == "rollout-steps"
    assert spec["restartPolicy"] == "Never"  # else a failed step would be restarted, not reported
    # the models are the only shared volume: state, checkpoints and decisions live in a ConfigMap
    assert {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]} == {
        "embedding-models": "embedding-models"}
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]} == {"embedding-models": "/models"}
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "rollout-step"
    assert (labels["dag_id"], labels["task_id"], labels["try_number"]) == (DAG_ID, TASK_ID, "1")


def test_the_step_pod_gets_elasticsearch_from_its_airflow_connection(launch, monkeypatch):
    monkeypatch.setenv("ER_ES_URL", "http://parse-time.invalid:9200")
    monkeypatch.setenv("AIRFLOW_CONN_ELASTICSEARCH_DEFAULT", json.dumps(
        {"conn_type": "elasticsearch", "host": "es.search.svc.cluster.local", "port": 9200, "schema": "https"}))
    run = launch("v2")
    assert run.state == "success", run.log
    (pod,) = run.pods
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["ER_ES_URL"] == "https://es.search.svc.cluster.local:9200"
    assert "ER_APP_TOKEN" not in env  # the steps never call the app


def test_the_pods_log_lines_reach_the_task_log(launch):
    run = launch("v2")
    assert run.lines
    for line in run.lines:
        assert run.logged(f"[base] {line}"), run.log
    assert ("get", "", "pods/log") in launcher_calls(run.calls)


def test_a_succeeded_pod_is_deleted(launch, cluster):
    run = launch("v2")
    assert run.state == "success", run.log
    assert not cluster.exists(NAMESPACE, run.pod_name, "pods")
    assert [(c.verb, c.name) for c in run.pod_calls() if c.verb in ("patch", "delete")] == [("delete", run.pod_name)]
    assert run.pod_calls()[-1] == Call("delete", "", "pods", run.pod_name, NAMESPACE)  # once it was done with it


def test_a_failed_pod_fails_the_task_and_is_kept_for_inspection(launch, cluster):
    run = launch(FAILING_VERSION)
    assert run.state == "failed"
    assert len(run.lines) == 3
    for line in run.lines:  # the step's own error output is in the task log
        assert run.logged(f"[base] {line}"), run.log
    assert [c for c in run.calls if c.verb == "delete"] == []
    assert run.pod_calls()[-1] == Call("patch", "", "pods", run.pod_name, NAMESPACE)
    kept = cluster.get(NAMESPACE, run.pod_name, "pods")
    assert kept["status"]["phase"] == "Failed"
    assert kept["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == FAILING_EXIT_CODE
    # marked as handled, so that a retry of the task starts a new pod instead of reattaching to this one
    assert kept["metadata"]["labels"]["already_checked"] == "True"


def test_a_restarted_worker_picks_up_the_running_pod_instead_of_starting_another(launch, cluster):
    """durable: the task's pod, started by a worker that died, is found by its labels."""
    from airflow.providers.cncf.kubernetes.pod_generator import make_safe_label_value
    from kubernetes import client
    run_after = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    labels = {"app.kubernetes.io/name": "embedding-rollout", "app.kubernetes.io/component": "rollout-step",
              "dag_id": DAG_ID, "task_id": TASK_ID, "run_id": make_safe_label_value(f"manual__{run_after.isoformat()}"),
              "kubernetes_pod_operator": "True", "try_number": "1"}
    previous = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "rollout-deploy-step-previous", "labels": labels},
                "spec": {"restartPolicy": "Never", "serviceAccountName": "rollout-steps", "containers": [
                    {"name": "base", "image": IMAGE, "command": ["embedding-rollout"],
                     "args": ["deploy", "--version", "v2"]}]}}

    def previous_worker_started_it():
        core = client.CoreV1Api(client.ApiClient(client.Configuration(host=cluster.url)))
        core.create_namespaced_pod(NAMESPACE, previous)
        core.read_namespaced_pod(previous["metadata"]["name"], NAMESPACE)  # it is scheduled meanwhile

    run = launch("v2", run_after=run_after, before=previous_worker_started_it)
    assert run.state == "success", run.log
    assert [c for c in run.calls if c.verb == "create"] == []  # no second pod
    assert run.pod_name == "rollout-deploy-step-previous"
    for line in run.lines:
        assert run.logged(f"[base] {line}"), run.log
    assert run.pod_calls()[-1] == Call("delete", "", "pods", run.pod_name, NAMESPACE)


def test_the_api_calls_of_a_success_and_a_failure_run(pod_launcher_calls):
    assert {c.namespace for c in pod_launcher_calls} == {NAMESPACE}
    assert launcher_calls(pod_launcher_calls) == {
        ("list", "", "pods"),  # find the task's pod (durable), before and after creating it
        ("create", "", "pods"),
        ("get", "", "pods"),  # follow its phase
        ("list", "", "events"),  # log its events while it starts
        ("get", "", "pods/log"),  # stream its log
        ("patch", "", "pods"),  # label a kept (failed) pod already_checked
        ("delete", "", "pods"),  # delete the succeeded pod
    }


def test_the_imitated_api_answers_pod_reads_as_kubernetes_does():
    """The fake's pod lifecycle, log, events and error answers, through the kubernetes client."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    api = FakeKubernetesAPI().start()
    api.pod_runs = lambda pod: PodRun(lines=["one", "two"], exit_code=7, pending_reads=2, running_reads=1)
    core = client.CoreV1Api(client.ApiClient(client.Configuration(host=api.url)))

    def refused(call, *args, **kwargs) -> tuple[int, str]:
        with pytest.raises(ApiException) as caught:
            call(*args, **kwargs)
        return caught.value.status, json.loads(caught.value.body)["message"]

    def log(**query) -> str:
        return core.read_namespaced_pod_log("p", NAMESPACE, _preload_content=False, **query).data.decode()

    def names(selector: str) -> list[str]:
        return [p.metadata.name for p in core.list_namespaced_pod(NAMESPACE, label_selector=selector).items]

    try:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "1"}},
               "spec": {"restartPolicy": "Never", "containers": [{"name": "base", "image": "i:1"}]}}
        no_image = {**pod, "spec": {"containers": [{"name": "c"}]}}
        assert refused(core.create_namespaced_pod, NAMESPACE, no_image) == (
            422, 'Pod "p" is invalid: [spec.containers[0].image: Required value]')
        assert refused(core.create_namespaced_pod, NAMESPACE, {**pod, "metadata": {"name": "P_"}})[0] == 422
        core.create_namespaced_pod(NAMESPACE, pod)
        assert refused(core.create_namespaced_pod, NAMESPACE, pod) == (409, 'pods "p" already exists')
        assert refused(core.read_namespaced_pod_log, "p", NAMESPACE) == (400, "pod p does not have a host assigned")
        phases = [core.read_namespaced_pod("p", NAMESPACE).status.phase for _ in range(4)]
        assert phases == ["Pending", "Pending", "Running", "Failed"]
        terminated = core.read_namespaced_pod("p", NAMESPACE).status.container_statuses[0].state.terminated
        assert (terminated.exit_code, terminated.reason) == (7, "Error")
        assert log(container="base") == log(follow=True) == "one\ntwo\n"
        assert log(tail_lines=1) == "two\n"
        stamped = log(timestamps=True).splitlines()
        assert [line.partition(" ")[2] for line in stamped] == ["one", "two"] and stamped[0].endswith("Z one")
        assert refused(core.read_namespaced_pod_log, "p", NAMESPACE, container="x") == (
            400, "container x is not valid for pod p")
        assert refused(core.read_namespaced_pod_log, "gone", NAMESPACE) == (404, 'pods "gone" not found')
        events = core.list_namespaced_event(NAMESPACE, field_selector="involvedObject.name=p").items
        assert [e.reason for e in events] == ["Scheduled", "Pulled", "Created", "Started"]
        assert core.list_namespaced_event(NAMESPACE, field_selector="involvedObject.name=q").items == []
        assert refused(core.list_namespaced_event, NAMESPACE, field_selector="involvedObject.name=p",
                       resource_version_match="NotOlderThan")[0] == 422
        assert refused(core.list_namespaced_event, NAMESPACE, field_selector="spec.x=1")[0] == 400
        assert names("a=1,b!=2,!c") == ["p"] and names("a in (1,3)") == ["p"]
        assert names("a notin (1)") == [] and names("c") == [] and names("a==2") == []
        assert refused(core.list_namespaced_pod, NAMESPACE, label_selector="a=(1")[0] == 400
        core.patch_namespaced_pod("p", NAMESPACE, {"metadata": {"labels": {"already_checked": "True"}},
                                                   "status": {"phase": "Running"}})
        kept = core.read_namespaced_pod("p", NAMESPACE)
        assert kept.metadata.labels["already_checked"] == "True" and kept.status.phase == "Failed"
        core.delete_namespaced_pod("p", NAMESPACE)
        assert refused(core.read_namespaced_pod, "p", NAMESPACE) == (404, 'pods "p" not found')
        assert refused(core.delete_namespaced_pod, "p", NAMESPACE)[0] == 404
    finally:
        api.stop()
