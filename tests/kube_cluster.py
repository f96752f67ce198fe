"""The real Kubernetes control plane the cluster tests run against (``scripts/kube-test-cluster.sh``):
kube-apiserver with RBAC and an audit log, etcd, kube-controller-manager, Istio's CRDs.

What remains a stand-in, because nothing here runs containers: :class:`StandInKubelet` marks the
pods the ReplicaSet controller creates Running and Ready (or crash-looping) through ``pods/status``,
as a kubelet would report them, and runs a step pod's container command as a local process
(:class:`StepProcesses`) with the pod's env and its ServiceAccount's token. Pod logs are imitated
by ``tests/k8s_api.py`` (``tests/test_pod_launch.py``) only: here a step pod's output goes to a file.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest import IN_CI

WORKDIR = Path(os.environ.get("KUBE_WORKDIR", "/tmp/embedding-rollout-kube"))
URL = os.environ.get("ER_TEST_KUBE_URL", f"https://127.0.0.1:{os.environ.get('KUBE_PORT', '6443')}")
CA = os.environ.get("ER_TEST_KUBE_CA", str(WORKDIR / "pki" / "ca.crt"))
TOKEN_FILE = Path(os.environ.get("ER_TEST_KUBE_TOKEN_FILE", WORKDIR / "admin.token"))
AUDIT_LOG = Path(os.environ.get("ER_TEST_KUBE_AUDIT_LOG", WORKDIR / "logs" / "audit.log"))
KUBECONFIG = Path(os.environ.get("ER_TEST_KUBECONFIG", WORKDIR / "admin.kubeconfig"))


def api_client(token: str) -> client.ApiClient:
    configuration = client.Configuration(host=URL)
    configuration.ssl_ca_cert = CA
    configuration.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(configuration)


@dataclass
class KubeCluster:
    admin_token: str
    admin: client.ApiClient = field(init=False)

    def __post_init__(self):
        self.admin = api_client(self.admin_token)

    def kubectl(self, *args: str, input_text: str | None = None) -> str:
        done = subprocess.run(["kubectl", "--kubeconfig", str(KUBECONFIG), *args], input=input_text,
                              capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def apply(self, objects: list[dict], *, dry_run: bool = False) -> str:
        """Server-side apply, as ``kubectl apply --server-side`` does: the API server validates
        every field (unknown ones included) against the real schemas, CRDs' included."""
        extra = ["--dry-run=server"] if dry_run else []
        return self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=tests",
                            *extra, "-f", "-", input_text=yaml.safe_dump_all(objects))

    def service_account_token(self, namespace: str, name: str, audience: str = "https://kubernetes.default.svc") -> str:
        """A token for the ServiceAccount from the TokenRequest API, as a projected volume gets it."""
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[audience], expiration_seconds=3600))
        reply = client.CoreV1Api(self.admin).create_namespaced_service_account_token(name, namespace, request)
        return reply.status.token

    def client_as(self, namespace: str, service_account: str) -> client.ApiClient:
        return api_client(self.service_account_token(namespace, service_account))

    def audit_mark(self) -> int:
        """The audit log's current end: the calls after it are :meth:`audit_since`'s."""
        return AUDIT_LOG.stat().st_size

    def audit_since(self, mark: int, user: str) -> list[dict]:
        """The audit events of ``user`` (e.g. ``system:serviceaccount:ns:name``) after ``mark``, once
        a marker request made now is in the log (each event is written when its request ends)."""
        marker = f"audit-marker-{uuid.uuid4().hex[:12]}"
        with contextlib.suppress(ApiException):
            client.CoreV1Api(self.admin).read_namespaced_config_map(marker, "default")
        events: list[dict] = []

        def marker_logged() -> bool:
            with AUDIT_LOG.open("rb") as log:
                log.seek(mark)
                events[:] = [json.loads(line) for line in log if line.strip()]
            return any(e.get("objectRef", {}).get("name") == marker for e in events)

        wait_until(marker_logged, 30, "the audit log's marker event")
        # A request is logged when it completes; a watch, which stays open, when its response starts.
        return [e for e in events if e.get("user", {}).get("username") == user and (
            e.get("stage") == "ResponseComplete" and e.get("verb") != "watch"
            or e.get("stage") == "ResponseStarted" and e.get("verb") == "watch")]


def connect() -> KubeCluster:
    message = (f"no Kubernetes API server at {URL} (start it: scripts/kube-test-cluster.sh start; "
               "the tests read its env from scripts/kube-test-cluster.sh env)")
    try:
        token = TOKEN_FILE.read_text().strip()
        client.VersionApi(api_client(token)).get_code(_request_timeout=5)
    except Exception as exc:  # noqa: BLE001 (any failure, a missing token file included, means "not there")
        if IN_CI:
            pytest.fail(f"{message}: {exc}")
        pytest.skip(f"{message}: {exc}")
    return KubeCluster(token)


class StandInKubelet:
    """What the kubelet would report for the pods of ``namespace``: each pod the controllers create
    becomes Running with every container ready, except pods whose ``version`` label is in
    ``crash_looping`` (their container keeps failing: Running, not Ready, CrashLoopBackOff).

    A pod that must not restart (``restartPolicy: Never``, a step pod) stays Pending for
    ``start_seconds`` (as while its image is pulled: the launcher sees it starting), runs for
    ``run_seconds``, then ends with the exit code ``exit_code(pod)`` gives (0 unless set):
    Succeeded or Failed. No container runs and its log is empty (the API server answers 204 for a
    pod on no node)."""

    def __init__(self, cluster: KubeCluster, namespace: str, poll_seconds: float = 0.5):
        self.core = client.CoreV1Api(cluster.admin)
        self.namespace, self.poll_seconds = namespace, poll_seconds
        self.crash_looping: set[str] = set()
        self.exit_code = lambda pod: 0
        self.containers: StepProcesses | None = None  # when set, step pods run their command
        self.start_seconds, self.run_seconds = 2.0, 1.0
        self._seen: dict[tuple[str, str], float] = {}  # (pod uid, phase) -> when first seen so
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stand-in-kubelet", daemon=True)

    def start(self) -> StandInKubelet:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.core.list_namespaced_pod(self.namespace).items
                if self.containers:  # a deleted pod's container is killed, as the kubelet does
                    self.containers.kill_all_but({p.metadata.uid for p in pods if not p.metadata.deletion_timestamp})
                for pod in pods:
                    self._report(pod)
            except ApiException:
                pass  # a pod deleted between list and patch; the next round sees the truth
            self._stop.wait(self.poll_seconds)

    def _report(self, pod) -> None:
        if pod.metadata.deletion_timestamp or (pod.status and pod.status.phase in ("Succeeded", "Failed")):
            return
        if pod.spec.restart_policy == "Never" and self.containers:
            self._run_step(pod)
            return
        if pod.spec.restart_policy == "Never":
            phase = pod.status.phase if pod.status else "Pending"
            since = self._seen.setdefault((pod.metadata.uid, phase), time.monotonic())
            if phase == "Pending" and time.monotonic() - since < self.start_seconds:
                return
            if phase == "Running":
                if time.monotonic() - since >= self.run_seconds:
                    self.core.patch_namespaced_pod_status(pod.metadata.name, self.namespace,
                                                          {"status": ended_status(pod, self.exit_code(pod))})
                return
        failing = (pod.metadata.labels or {}).get("version") in self.crash_looping
        if pod.status and pod.status.phase == "Running" and not failing:
            return
        if failing and pod.status and pod.status.container_statuses:
            return
        self.core.patch_namespaced_pod_status(pod.metadata.name, self.namespace, {"status": pod_status(pod, failing)})


    def _run_step(self, pod) -> None:
        uid = pod.metadata.uid
        if not self.containers.started(uid):
            self.containers.start(pod)
            self.core.patch_namespaced_pod_status(pod.metadata.name, self.namespace, {"status": pod_status(pod, False)})
            return
        exit_code = self.containers.exit_code(uid)
        if exit_code is not None:
            self.core.patch_namespaced_pod_status(pod.metadata.name, self.namespace,
                                                  {"status": ended_status(pod, exit_code)})


class StepProcesses:
    """The stand-in's container runtime for step pods: the container's command (the image's
    ``embedding-rollout`` entry point is this interpreter's ``-m embedding_rollout.cli``) and args
    as a local process, with the container's env and, as the kubelet projects it into a pod, a
    token of the pod's ServiceAccount from the TokenRequest API (here through a kubeconfig, with no
    ``KUBERNETES_SERVICE_HOST``). Its output goes to ``log_dir/<pod>.log`` (no kubelet serves logs
    here). The pod's volumes are not mounted: the step env's paths are this machine's."""

    ENTRY_POINTS = {"embedding-rollout": [sys.executable, "-m", "embedding_rollout.cli"]}
    HOST_ENV = ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH")

    def __init__(self, cluster: KubeCluster, log_dir: Path):
        self.cluster, self.log_dir = cluster, log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def started(self, uid: str) -> bool:
        return uid in self.processes

    def exit_code(self, uid: str) -> int | None:
        return self.processes[uid].poll()

    def start(self, pod) -> None:
        (container,) = pod.spec.containers
        argv = [*self.ENTRY_POINTS[container.command[0]], *container.command[1:], *(container.args or [])]
        kubeconfig = self.log_dir / f"{pod.metadata.name}.kubeconfig"
        token = self.cluster.service_account_token(pod.metadata.namespace, pod.spec.service_account_name)
        kubeconfig.write_text(kubeconfig_text(token))
        env = {**{k: os.environ[k] for k in self.HOST_ENV if k in os.environ},
               **{e.name: e.value for e in container.env or [] if e.value is not None},
               "KUBECONFIG": str(kubeconfig)}
        with (self.log_dir / f"{pod.metadata.name}.log").open("ab") as log, self.lock:
            self.processes[pod.metadata.uid] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def kill_all_but(self, live_uids: set[str]) -> None:
        with self.lock:
            for uid, process in self.processes.items():
                if uid not in live_uids and process.poll() is None:
                    process.kill()

    def log(self, pod_name: str) -> str:
        path = self.log_dir / f"{pod_name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        """Every step pod's output, oldest first: for an assertion message."""
        paths = sorted(self.log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
        return "\n".join(f"--- {p.stem}\n{p.read_text(errors='replace')[-2000:]}" for p in paths)

    def stop(self) -> None:
        self.kill_all_but(set())


def kubeconfig_text(token: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": URL, "certificate-authority": CA}}],
        "users": [{"name": "user", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}]})


def pod_status(pod, failing: bool) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    ready = "False" if failing else "True"
    containers = []
    for container in pod.spec.containers:
        state = ({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}}
                 if failing else {"running": {"startedAt": now}})
        containers.append({"name": container.name, "image": container.image, "imageID": "",
                           "ready": not failing, "started": not failing, "restartCount": 3 if failing else 0,
                           "state": state})
    return {"phase": "Running", "startTime": now, "podIP": "10.1.0.10", "hostIP": "10.0.0.1",
            "conditions": [{"type": t, "status": s, "lastTransitionTime": now}
                           for t, s in (("PodScheduled", "True"), ("Initialized", "True"),
                                        ("ContainersReady", ready), ("Ready", ready))],
            "containerStatuses": containers}


def ended_status(pod, exit_code: int) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    reason = "Completed" if exit_code == 0 else "Error"
    return {"phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [{"type": t, "status": "False", "lastTransitionTime": now, "reason": "PodCompleted"}
                           for t in ("ContainersReady", "Ready")],
            "containerStatuses": [{"name": c.name, "image": c.image, "imageID": "", "ready": False, "started": False,
                                   "restartCount": 0, "state": {"terminated": {
                                       "exitCode": exit_code, "reason": reason, "startedAt": now, "finishedAt": now}}}
                                  for c in pod.spec.containers]}


def wait_until(predicate, timeout: float = 60.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message}: not reached after {timeout:.0f} s")
        time.sleep(0.2)


ISTIO = ("networking.istio.io", "v1")
NAMESPACE = "embeddings"
PLURALS = {"VirtualService": "virtualservices", "DestinationRule": "destinationrules"}


def get_istio(cluster: KubeCluster, kind: str, name: str) -> dict:
    return client.CustomObjectsApi(cluster.admin).get_namespaced_custom_object(*ISTIO, NAMESPACE, PLURALS[kind], name)


def put_istio(cluster: KubeCluster, obj: dict) -> dict:
    """Replace the object's spec (a PUT with the current resourceVersion), or create it."""
    api = client.CustomObjectsApi(cluster.admin)
    kind, name = obj["kind"], obj["metadata"]["name"]
    body = {k: v for k, v in obj.items() if k != "status"}
    try:
        current = api.get_namespaced_custom_object(*ISTIO, NAMESPACE, PLURALS[kind], name)
    except ApiException as exc:
        if exc.status != 404:
            raise
        return api.create_namespaced_custom_object(*ISTIO, NAMESPACE, PLURALS[kind], body)
    body["metadata"] = {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}
    return api.replace_namespaced_custom_object(*ISTIO, NAMESPACE, PLURALS[kind], name, body)


def generator_deployments(cluster: KubeCluster) -> dict[str, dict]:
    reply = client.AppsV1Api(cluster.admin).list_namespaced_deployment(
        NAMESPACE, label_selector="app=embedding-generator", _preload_content=False)
    # A list's items carry no kind of their own.
    return {d["metadata"]["name"]: {"apiVersion": "apps/v1", "kind": "Deployment", **d}
            for d in json.loads(reply.data)["items"]}


def reset_generators(cluster: KubeCluster) -> None:
    """Back to the base: v1's generator Deployment, subset and route only."""
    from test_manifests import raw_base
    base = [o for o in raw_base() if o["metadata"]["name"] == "embedding-generator" and o["kind"] in PLURALS]
    for obj in base:
        put_istio(cluster, obj)
    if "embedding-generator-v1" not in generator_deployments(cluster):  # a rollout test removed it
        cluster.apply([o for o in raw_base() if (o["kind"], o["metadata"]["name"]) ==
                       ("Deployment", "embedding-generator-v1")])
    autoscaling = client.AutoscalingV2Api(cluster.admin)
    autoscalers = {h.metadata.name for h in autoscaling.list_namespaced_horizontal_pod_autoscaler(
        NAMESPACE, label_selector="app=embedding-generator").items}
    if "embedding-generator-v1" not in autoscalers:
        cluster.apply([o for o in raw_base() if (o["kind"], o["metadata"]["name"]) ==
                       ("HorizontalPodAutoscaler", "embedding-generator-v1")])
    for name in autoscalers - {"embedding-generator-v1"}:
        autoscaling.delete_namespaced_horizontal_pod_autoscaler(name, NAMESPACE)
    apps = client.AppsV1Api(cluster.admin)
    for name in generator_deployments(cluster):
        if name != "embedding-generator-v1":
            apps.delete_namespaced_deployment(name, NAMESPACE, propagation_policy="Background")
    wait_until(lambda: set(generator_deployments(cluster)) == {"embedding-generator-v1"}, 60,
               "only v1's generator Deployment left")
