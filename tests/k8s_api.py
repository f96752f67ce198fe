"""An HTTP imitation of the Kubernetes API, kept for the one thing nothing here can run: a pod's
container, and so its log.

Every other cluster test runs against the real kube-apiserver (``tests/kube_cluster.py``). This
one serves ``tests/test_pod_launch.py``: what KubernetesPodOperator does with a step pod whose
container really writes lines and exits with a code -- the lines in the task log, a failed pod
kept, a succeeded one deleted, a restarted worker reattaching.

It speaks the wire protocol for the calls that code makes: get, list (with a ``labelSelector`` --
``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key`` -- and a ``fieldSelector`` on the fields
the API supports), create, patch (RFC 6902 JSON Patch, RFC 7386 merge patch, and strategic merge
patch treated as a merge patch) and delete of ``/api/v1/namespaces/{ns}/{resource}[/{name}]`` and
``/apis/{group}/{version}/namespaces/{ns}/...``, with the API's answers: ``Status`` objects, 404
NotFound, 409 AlreadyExists, 400 BadRequest for a selector it cannot parse, 415 for an unsupported
patch type, 422 Invalid when a ``test`` operation fails or an object is invalid, and a new
resourceVersion on every write.

Pods live: a created pod is validated against the Kubernetes schema (422 if invalid), and what the
scheduler and the kubelet would do to it happens across reads of it (see ``PodRun``): Pending
(unscheduled, then scheduled with its containers ``ContainerCreating``), Running, then Succeeded
or Failed with the container's exit code, with realistic ``status`` and the events a scheduler and
kubelet record (Scheduled, Pulled, Created, Started). ``GET .../pods/{name}/log`` answers the
container's lines as text/plain (``container``, ``timestamps``, ``tailLines``, ``sinceSeconds``,
``sinceTime``, ``previous``; with ``follow=true`` a chunked stream that ends when the container
exits, which the container then does). Only ``restartPolicy: Never`` is imitated (what
KubernetesPodOperator creates): containers are never restarted. Watches and other subresources are
not imitated (405), so a caller relying on them fails loudly.

Every request is recorded as an RBAC-style call (verb, API group, resource, name), so a test can
say which calls the operator made; whether RBAC allows them is proved by the real authorizer
(``tests/test_rbac.py``).
"""
from __future__ import annotations

import copy
import datetime
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jsonpatch

PATH = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
                  r"/namespaces/(?P<namespace>[^/]+)/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")
KINDS = {"virtualservices": "virtualservices.networking.istio.io", "destinationrules": "destinationrules.networking.istio.io",
         "deployments": "deployments.apps", "pods": "pods", "events": "events", "configmaps": "configmaps"}
LIST_KINDS = {"virtualservices": "VirtualServiceList", "destinationrules": "DestinationRuleList",
              "deployments": "DeploymentList", "pods": "PodList", "events": "EventList", "configmaps": "ConfigMapList",
              "services": "ServiceList"}
PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json", "application/strategic-merge-patch+json")
# The fields each resource can be selected by (``fieldSelector``); every resource has the metadata ones.
FIELDS = {"pods": {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                   "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"},
          "events": {"involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
                     "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
                     "reason", "reportingComponent", "source", "type"}}
K8S_VERSION = "1.31"  # the schema created pods are validated against
NODE = "fake-node-1"
STAGES = ("created", "scheduled", "running", "terminated")  # of a pod: unscheduled, ContainerCreating, ...

_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")
_LABEL_NAME = re.compile(rf"^{_NAME}$")
_TERM = re.compile(r"^(?:(?P<absent>!)\s*(?P<akey>[^\s!=,()]+)"
                   r"|(?P<key>[^\s!=,()]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[^\s!=,()]*)"
                   r"|\s+(?P<set>in|notin)\s*\((?P<values>[^()]*)\))?)$")
_TRUE, _FALSE = {"1", "t", "T", "TRUE", "true", "True"}, {"0", "f", "F", "FALSE", "false", "False"}  # Go's ParseBool


@dataclass(frozen=True)
class Call:
    """One API request as RBAC sees it."""
    verb: str
    group: str
    resource: str  # with the subresource: "pods/log"
    name: str | None
    namespace: str


@dataclass
class PodRun:
    """What the scheduler and kubelet do with a created pod, across reads of it (GET or list): the
    first ``pending_reads`` reads see it Pending (the first one unscheduled, the next ones scheduled
    with its containers ``ContainerCreating``); then its containers run, having written ``lines``;
    they exit with ``exit_code`` when a followed log stream has delivered every line (a followed log
    ends when the container exits), or else after ``running_reads`` reads of the running pod."""
    lines: list[str] = field(default_factory=list)
    exit_code: int = 0
    pending_reads: int = 2
    running_reads: int = 3


@dataclass
class _PodLife:
    run: PodRun
    reads: int = 0
    stage: str = "created"  # one of STAGES
    started: datetime.datetime | None = None
    finished: datetime.datetime | None = None
    log: list[tuple[str, datetime.datetime, str]] = field(default_factory=list)  # container, time, line
    container_ids: dict[str, str] = field(default_factory=dict)


class BadRequest(ValueError):
    pass


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _merge(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _split_terms(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    return [t.strip() for t in [*terms, current] if t.strip()]


def label_selector(selector: str) -> Callable[[dict], bool]:
    """A label selector as the API parses it; BadRequest if it cannot."""
    requirements = []
    for term in _split_terms(selector):
        match = _TERM.match(term)
        if match is None:
            raise BadRequest(f"unable to parse requirement: found '{term}', expected: identifier")
        if match["absent"]:
            requirements.append(lambda labels, key=match["akey"]: key not in labels)
        elif match["set"]:
            values = {v.strip() for v in match["values"].split(",")}
            inside = match["set"] == "in"
            requirements.append(lambda labels, key=match["key"], values=values, inside=inside:
                                (key in labels and labels[key] in values) == inside)
        elif match["op"] == "!=":
            requirements.append(lambda labels, key=match["key"], value=match["value"]: labels.get(key) != value)
        elif match["op"]:
            requirements.append(lambda labels, key=match["key"], value=match["value"]: labels.get(key) == value)
        else:
            requirements.append(lambda labels, key=match["key"]: key in labels)
    return lambda labels: all(requirement(labels) for requirement in requirements)


def _matches(labels: dict, selector: str) -> bool:
    return label_selector(selector)(labels)


def _field(obj: dict, path: str) -> str:
    if path == "source":
        return (obj.get("source") or {}).get("component", "")
    value = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def field_selector(resource: str, selector: str) -> Callable[[dict], bool]:
    """A field selector on the fields the API supports for the resource; BadRequest otherwise."""
    requirements = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        match = re.match(r"^([^=!]+?)\s*(==|=|!=)\s*(.*)$", term)
        if match is None:
            raise BadRequest(f"invalid selector: '{selector}'; can't understand '{term}'")
        path, op, value = match.groups()
        if path not in {"metadata.name", "metadata.namespace"} | FIELDS.get(resource, set()):
            raise BadRequest(f'"{path}" is not a known field selector: only "metadata.name", "metadata.namespace"'
                             if resource not in FIELDS else f"field label not supported: {path}")
        requirements.append(lambda obj, path=path, op=op, value=value: (_field(obj, path) == value) == (op != "!="))
    return lambda obj: all(requirement(obj) for requirement in requirements)


def _bool(query: dict, name: str) -> bool:
    value = query.get(name, ["false"])[0]
    if value not in _TRUE | _FALSE:
        raise BadRequest(f'strconv.ParseBool: parsing "{value}": invalid syntax')
    return value in _TRUE


def _timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339_nano(moment: datetime.datetime) -> str:
    """The kubelet's log line timestamps: Go's RFC3339Nano (trailing zeros of the fraction dropped)."""
    fraction = f"{moment.microsecond:06d}000".rstrip("0")
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def _immutable_part(pod_spec: dict) -> dict:
    """What a pod update may not change: all but the images, activeDeadlineSeconds and tolerations."""
    return {**pod_spec, "containers": [{**c, "image": None} for c in pod_spec["containers"]],
            "activeDeadlineSeconds": None, "tolerations": None}


def _invalid_labels(labels: dict) -> list[str]:
    errors = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (not _LABEL_NAME.match(name) or len(name) > 63
                or (prefix and (not _DNS_SUBDOMAIN.match(prefix) or len(prefix) > 253))):
            errors.append(f'metadata.labels: Invalid value: "{key}": name part must consist of alphanumeric '
                          f"characters, '-', '_' or '.', and must start and end with an alphanumeric character")
        if not isinstance(value, str) or not _LABEL_VALUE.match(value) or len(value) > 63:
            errors.append(f'metadata.labels: Invalid value: "{value}": a valid label must be an empty string or '
                          f"consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
                          f"alphanumeric character (at most 63 characters)")
    return errors


class FakeKubernetesAPI:
    def __init__(self):
        self.objects: dict[tuple[str, str, str, str], dict] = {}  # (group, resource, namespace, name)
        self.calls: list[Call] = []
        # What a created pod's containers do (see PodRun); a test can make some pods fail, e.g. by their args.
        self.pod_runs: Callable[[dict], PodRun] = lambda pod: PodRun()
        self._pods: dict[str, _PodLife] = {}  # by uid
        self._version = 100
        self._lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def start(self) -> "FakeKubernetesAPI":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- direct access for tests -------------------------------------------------------------------
    def put(self, obj: dict, resource: str | None = None) -> None:
        resource = resource or obj["kind"].lower() + "s"
        group = obj["apiVersion"].rpartition("/")[0]
        with self._lock:
            self._store(group, resource, copy.deepcopy(obj))

    def get(self, namespace: str, name: str, resource: str = "virtualservices") -> dict:
        with self._lock:
            return copy.deepcopy(self._find(resource, namespace, name))

    def exists(self, namespace: str, name: str, resource: str) -> bool:
        with self._lock:
            return self._find(resource, namespace, name) is not None

    def _find(self, resource: str, namespace: str, name: str) -> dict | None:
        return next((o for (g, r, ns, n), o in self.objects.items() if (r, ns, n) == (resource, namespace, name)), None)

    def _store(self, group: str, resource: str, obj: dict) -> dict:
        self._version += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._version)
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.objects[(group, resource, meta["namespace"], meta["name"])] = obj
        return copy.deepcopy(obj)

    # -- the scheduler and the kubelet -----------------------------------------------------------
    def _admit_pod(self, pod: dict) -> None:
        """What the API server's defaulting adds to a pod, and what its containers will do."""
        spec = pod["spec"]
        for key, default in (("restartPolicy", "Always"), ("dnsPolicy", "ClusterFirst"),
                             ("schedulerName", "default-scheduler"), ("terminationGracePeriodSeconds", 30),
                             ("serviceAccountName", "default"), ("securityContext", {}), ("enableServiceLinks", True),
                             ("priority", 0), ("preemptionPolicy", "PreemptLowerPriority")):
            spec.setdefault(key, default)
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        for container in spec.get("initContainers", []) + spec["containers"]:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            tag = container["image"].rpartition("/")[2].partition(":")[2]
            container.setdefault("imagePullPolicy", "Always" if tag in ("", "latest") else "IfNotPresent")
        resources = [c.get("resources", {}) for c in spec["containers"]]
        qos = ("BestEffort" if not any(r.get("requests") or r.get("limits") for r in resources) else
               "Guaranteed" if all(r.get("limits") and r.get("requests", r["limits"]) == r["limits"] for r in resources)
               else "Burstable")
        pod["status"] = {"phase": "Pending", "qosClass": qos}
        self._pods[pod["metadata"]["uid"]] = _PodLife(self.pod_runs(copy.deepcopy(pod)))

    def _observe(self, pod: dict) -> None:
        """One read of a pod: time passes for it, the scheduler and the kubelet move it on."""
        life = self._pods.get(pod["metadata"].get("uid", ""))
        if life is None or life.stage == "terminated":
            return
        life.reads += 1
        run = life.run
        if life.reads > run.pending_reads + run.running_reads:
            target = "terminated"
        elif life.reads > run.pending_reads:
            target = "running"
        else:
            target = "created" if life.reads == 1 else "scheduled"
        for stage in STAGES[STAGES.index(life.stage) + 1:STAGES.index(target) + 1]:
            self._advance(pod, life, stage)

    def _advance(self, pod: dict, life: _PodLife, stage: str) -> None:
        now = datetime.datetime.now(datetime.UTC)
        meta, spec = pod["metadata"], pod["spec"]
        names = [c["name"] for c in spec["containers"]]
        images = {c["name"]: c["image"] for c in spec["containers"]}
        if stage == "scheduled":
            spec["nodeName"] = NODE
            self._event(pod, "Scheduled", f"Successfully assigned {meta['namespace']}/{meta['name']} to {NODE}",
                        "default-scheduler", None)
        elif stage == "running":
            life.started = now
            for name in names:
                life.container_ids[name] = f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}"
                for number, line in enumerate(life.run.lines):
                    life.log.append((name, now + datetime.timedelta(microseconds=number), line))
                self._event(pod, "Pulled", f'Container image "{images[name]}" already present on machine', "kubelet",
                            name)
                self._event(pod, "Created", f"Created container: {name}", "kubelet", name)
                self._event(pod, "Started", f"Started container {name}", "kubelet", name)
        else:
            life.finished = now
        life.stage = stage
        pod["status"] = self._pod_status(pod, life)
        self._version += 1
        meta["resourceVersion"] = str(self._version)

    def _pod_status(self, pod: dict, life: _PodLife) -> dict:
        qos = pod["status"]["qosClass"]
        started = _timestamp(life.started) if life.started else None
        scheduled_at = pod["status"].get("startTime", _timestamp(datetime.datetime.now(datetime.UTC)))
        failed = life.run.exit_code != 0

        def condition(kind: str, ok: bool, reason: str | None = None) -> dict:
            return {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                    "lastTransitionTime": started or scheduled_at, **({"reason": reason} if reason else {})}

        def container_status(container: dict) -> dict:
            name = container["name"]
            common = {"name": name, "image": container["image"], "restartCount": 0,
                      "volumeMounts": [{"name": m["name"], "mountPath": m["mountPath"]}
                                       for m in container.get("volumeMounts", [])]}
            if life.stage == "scheduled":
                return {**common, "imageID": "", "ready": False, "started": False, "lastState": {},
                        "state": {"waiting": {"reason": "ContainerCreating"}}}
            running = {**common, "imageID": f"{container['image'].partition(':')[0]}@sha256:{'0' * 64}",
                       "containerID": life.container_ids[name], "lastState": {}}
            if life.stage == "running":
                return {**running, "ready": True, "started": True, "state": {"running": {"startedAt": started}}}
            terminated = {"exitCode": life.run.exit_code, "reason": "Error" if failed else "Completed",
                          "startedAt": started, "finishedAt": _timestamp(life.finished),
                          "containerID": life.container_ids[name]}
            return {**running, "ready": False, "started": False, "state": {"terminated": terminated}}

        if life.stage == "created":
            return {"phase": "Pending", "qosClass": qos}
        base = {"hostIP": "10.0.0.11", "hostIPs": [{"ip": "10.0.0.11"}], "startTime": scheduled_at, "qosClass": qos,
                "containerStatuses": [container_status(c) for c in pod["spec"]["containers"]]}
        if life.stage == "scheduled":
            return {**base, "phase": "Pending", "conditions": [
                condition("PodReadyToStartContainers", False), condition("Initialized", True),
                condition("Ready", False, "ContainersNotReady"),
                condition("ContainersReady", False, "ContainersNotReady"),
                condition("PodScheduled", True)]}
        base.update(podIP="10.244.0.17", podIPs=[{"ip": "10.244.0.17"}])
        if life.stage == "running":
            return {**base, "phase": "Running", "conditions": [
                condition("PodReadyToStartContainers", True), condition("Initialized", True), condition("Ready", True),
                condition("ContainersReady", True), condition("PodScheduled", True)]}
        done = "PodFailed" if failed else "PodCompleted"
        return {**base, "phase": "Failed" if failed else "Succeeded", "conditions": [
            condition("PodReadyToStartContainers", False), condition("Initialized", True, "PodCompleted"),
            condition("Ready", False, done), condition("ContainersReady", False, done),
            condition("PodScheduled", True)]}

    def _event(self, pod: dict, reason: str, message: str, component: str, container: str | None) -> None:
        meta, now = pod["metadata"], _timestamp(datetime.datetime.now(datetime.UTC))
        involved = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": meta["namespace"],
                    "uid": meta["uid"], "resourceVersion": meta["resourceVersion"],
                    **({"fieldPath": f"spec.containers{{{container}}}"} if container else {})}
        self._store("", "events", {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"],
                         "uid": str(uuid.uuid4())},
            "involvedObject": involved, "reason": reason, "message": message, "type": "Normal",
            "source": {"component": component, **({"host": NODE} if component == "kubelet" else {})},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1, "reportingComponent": component,
            "reportingInstance": NODE if component == "kubelet" else ""})

    def _log_lines(self, key, query) -> tuple[int, dict | list[str]]:
        """The lines of ``GET .../pods/{name}/log`` (or an error), and with follow the container ends."""
        group, resource, namespace, name = key
        pod = self.objects.get(key)
        if pod is None:
            return self._not_found(resource, name)
        names = [c["name"] for c in pod["spec"]["containers"]]
        container = query.get("container", [None])[0]
        if container is None:
            if len(names) > 1:
                return 400, status(400, "BadRequest", f"a container name must be specified for pod {name}, "
                                                      f"choose one of: [{' '.join(names)}]")
            container = names[0]
        if container not in names:
            return 400, status(400, "BadRequest", f"container {container} is not valid for pod {name}")
        if _bool(query, "previous"):
            return 400, status(400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" '
                                                  f"not found")
        life = self._pods.get(pod["metadata"]["uid"])
        if life is None or life.stage == "created":
            return 400, status(400, "BadRequest", f"pod {name} does not have a host assigned")
        if life.stage == "scheduled":
            return 400, status(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: '
                                                  f"ContainerCreating")
        if _bool(query, "follow") and life.stage == "running":
            self._advance(pod, life, "terminated")  # the stream ends when the container exits
        lines = [(moment, line) for c, moment, line in life.log if c == container]
        since = None
        if "sinceSeconds" in query:
            since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=int(query["sinceSeconds"][0]))
        elif "sinceTime" in query:
            since = datetime.datetime.fromisoformat(query["sinceTime"][0].replace("Z", "+00:00"))
        if since is not None:
            lines = [(moment, line) for moment, line in lines if moment >= since]
        if "tailLines" in query:
            lines = lines[len(lines) - min(len(lines), int(query["tailLines"][0])):]
        stamped = _bool(query, "timestamps")
        return 200, [f"{_rfc3339_nano(moment)} {line}\n" if stamped else f"{line}\n" for moment, line in lines]

    # -- the verbs -------------------------------------------------------------------------------
    def _not_found(self, resource: str, name: str) -> tuple[int, dict]:
        return 404, status(404, "NotFound", f'{KINDS.get(resource, resource)} "{name}" not found')

    def _get(self, key) -> tuple[int, dict]:
        group, resource, namespace, name = key
        obj = self.objects.get(key)
        if obj is None:
            return self._not_found(resource, name)
        if resource == "pods":
            self._observe(obj)
        return 200, copy.deepcopy(obj)

    def _list(self, group, resource, namespace, query, version: str = "v1") -> tuple[int, dict]:
        try:
            labels = label_selector(query.get("labelSelector", [""])[0])
            fields = field_selector(resource, query.get("fieldSelector", [""])[0])
        except BadRequest as exc:
            return 400, status(400, "BadRequest", str(exc))
        since, match = query.get("resourceVersion", [""])[0], query.get("resourceVersionMatch", [""])[0]
        if match and not since:
            return 422, status(422, "Invalid", "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: "
                                               "Forbidden: resourceVersionMatch is forbidden unless resourceVersion "
                                               "is provided")
        if match not in ("", "NotOlderThan", "Exact"):
            return 422, status(422, "Invalid", f'ListOptions.meta.k8s.io "" is invalid: resourceVersionMatch: '
                                               f'Unsupported value: "{match}"')
        if since and int(since) > self._version:
            return 504, status(504, "Timeout", "Too large resource version")
        found = [o for (g, r, ns, _), o in self.objects.items() if (g, r, ns) == (group, resource, namespace)]
        if resource == "pods":
            for pod in found:
                self._observe(pod)
        items = [copy.deepcopy(o) for o in found if labels(o["metadata"].get("labels", {})) and fields(o)]
        return 200, {"kind": LIST_KINDS.get(resource, "List"), "apiVersion": f"{group}/{version}" if group else version,
                     "metadata": {"resourceVersion": str(self._version)}, "items": items}

    def _create(self, group, resource, namespace, body: bytes) -> tuple[int, dict]:
        obj = json.loads(body)
        obj.setdefault("metadata", {})["namespace"] = namespace
        name = obj["metadata"].get("name")
        if not name and obj["metadata"].get("generateName"):
            name = obj["metadata"]["name"] = obj["metadata"]["generateName"] + uuid.uuid4().hex[:5]
        kind = obj.get("kind", resource)
        errors = _invalid_labels(obj["metadata"].get("labels") or {})
        if not name:
            errors.append("metadata.name: Required value: name or generateName is required")
        elif resource == "pods" and (not _DNS_SUBDOMAIN.match(name) or len(name) > 253):
            errors.append(f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of '
                          f"lower case alphanumeric characters, '-' or '.'")
        if resource == "pods" and not errors:
            import kubernetes_validate
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{'.'.join(map(str, exc.path))}: {exc.message}")
            else:  # what the schema leaves to the API server's validation
                errors += [f"spec.containers[{i}].image: Required value" for i, container
                           in enumerate(obj["spec"]["containers"]) if not container.get("image")]
        if errors:
            return 422, status(422, "Invalid", f'{kind} "{name}" is invalid: [{", ".join(errors)}]')
        if (group, resource, namespace, name) in self.objects:
            return 409, status(409, "AlreadyExists", f'{KINDS.get(resource, resource)} "{name}" already exists')
        obj["metadata"]["uid"] = str(uuid.uuid4())
        if resource == "pods":
            self._admit_pod(obj)
        return 201, self._store(group, resource, obj)

    def _patch(self, key, content_type: str, body: bytes) -> tuple[int, dict]:
        group, resource, namespace, name = key
        if content_type not in PATCH_TYPES:
            return 415, status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                             f"accepted media types include: {', '.join(PATCH_TYPES)}")
        if key not in self.objects:
            return self._not_found(resource, name)
        try:
            if content_type == "application/json-patch+json":
                patched = jsonpatch.apply_patch(self.objects[key], json.loads(body))
            else:
                patched = _merge(self.objects[key], json.loads(body))
        except jsonpatch.JsonPatchTestFailed as exc:
            return 422, status(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}")
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            return 422, status(422, "Invalid", str(exc))
        if resource == "pods":
            old = self.objects[key]
            patched["status"] = old.get("status")  # the status changes through pods/status only
            if _immutable_part(patched["spec"]) != _immutable_part(old["spec"]):
                return 422, status(422, "Invalid", f'Pod "{name}" is invalid: spec: Forbidden: pod updates may not '
                                                   f"change fields other than `spec.containers[*].image`, "
                                                   f"`spec.activeDeadlineSeconds` or `spec.tolerations`")
            errors = _invalid_labels(patched["metadata"].get("labels") or {})
            if errors:
                return 422, status(422, "Invalid", f'Pod "{name}" is invalid: [{", ".join(errors)}]')
        if patched.get("spec") != self.objects[key].get("spec"):
            patched["metadata"]["generation"] = self.objects[key]["metadata"].get("generation", 1) + 1
        return 200, self._store(group, resource, patched)

    def _delete(self, key) -> tuple[int, dict]:
        if key not in self.objects:
            return self._not_found(key[1], key[3])
        obj = self.objects.pop(key)
        if key[1] == "pods":  # the kubelet has stopped it (a finished pod has nothing left to stop)
            self._pods.pop(obj["metadata"]["uid"], None)
            obj["metadata"]["deletionTimestamp"] = _timestamp(datetime.datetime.now(datetime.UTC))
            obj["metadata"]["deletionGracePeriodSeconds"] = obj["spec"].get("terminationGracePeriodSeconds", 30)
        return 200, obj

    def _handler(self):
        api = self
        verbs = {"GET": "get", "POST": "create", "PATCH": "patch", "DELETE": "delete"}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked log streams, as kube-apiserver sends them

            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _reply_text(self, lines: list[str], follow: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                if not follow:
                    data = "".join(lines).encode()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for line in lines:
                    data = line.encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")

            def _serve(self):
                content_type = self.headers.get("Content-Type", "").split(";")[0] or None
                url = urlsplit(self.path)
                match = PATH.match(url.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if match is None:
                    return self._reply(404, status(404, "NotFound", "the server could not find the requested resource"))
                group, resource, namespace, name = (match["group"] or "", match["resource"], match["namespace"],
                                                    match["name"])
                query = parse_qs(url.query)
                verb = verbs[self.command]
                try:
                    if self.command == "GET" and name is None:
                        verb = "watch" if _bool(query, "watch") else "list"
                except BadRequest as exc:
                    return self._reply(400, status(400, "BadRequest", str(exc)))
                api.calls.append(Call(verb, group, f"{resource}/{match['sub']}" if match["sub"] else resource,
                                      name, namespace))
                key = (group, resource, namespace, name)
                if (resource, match["sub"], verb, group) == ("pods", "log", "get", ""):
                    try:
                        follow = _bool(query, "follow")
                        with api._lock:
                            code, answer = api._log_lines(key, query)
                    except ValueError as exc:  # BadRequest too
                        return self._reply(400, status(400, "BadRequest", str(exc)))
                    return self._reply_text(answer, follow) if code == 200 else self._reply(code, answer)
                try:
                    with api._lock:
                        if verb == "list":
                            answer = api._list(group, resource, namespace, query, match["version"] or "v1")
                        elif verb == "create" and name is None:
                            answer = api._create(group, resource, namespace, body)
                        elif name is None or match["sub"] or verb == "watch":
                            answer = 405, status(405, "MethodNotAllowed", "not imitated")
                        elif verb == "get":
                            answer = api._get(key)
                        elif verb == "patch":
                            answer = api._patch(key, content_type or "", body)
                        else:
                            answer = api._delete(key)
                except ValueError as exc:  # a body that is not JSON, a query value that does not parse
                    answer = 400, status(400, "BadRequest", str(exc))
                self._reply(*answer)

            do_GET = do_POST = do_PATCH = do_DELETE = _serve

        return Handler
