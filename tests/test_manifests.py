"""The cluster deliverables, checked offline.

- Every manifest under ``k8s/`` and every rendered kustomization (base, overlays, bootstrap)
  validates: Kubernetes objects against the Kubernetes schemas (``kubernetes-validate``, strict, a
  fixed Kubernetes version), Istio objects against the ``openAPIV3Schema`` of their CRD in
  ``k8s/crds/istio-crds.yaml`` (pinned from Istio; ``ER_ISTIO_CRDS`` overrides), made strict: an unknown field
  is an error, as with ``kubectl apply``'s server-side field validation.
- The routing holds together: gateway weights sum to 100, one header value per version, and every
  live version has its generator route, DestinationRule subset and Deployment; the generator
  template filled in for a new version, with its subset and route patches applied, still validates.
- ``docker-compose.yaml`` validates against the Compose Specification schema (vendored in
  ``tests/schemas/``) and runs the same commands on the same ports as the Kubernetes manifests; the
  Dockerfile's default command is the app's.
- The Compose gateway (nginx + njs, ``deploy/gateway/``) runs for real and assigns versions as the
  app's router does.

Tools: ``kustomize`` (``scripts/install-tools.sh`` builds it into ``~/.cache/embedding-rollout/bin``;
``$KUSTOMIZE``, then that cache, then PATH, then ``kubectl kustomize``) and ``nginx`` with its njs
module. A missing tool skips its tests on a developer's machine and fails them in CI (``CI=true``).

Not here (TODO, issue 4): the VirtualService the IstioWeightOperator produces, and the check that the
RBAC Roles cover exactly the API calls of the operator and step code: both belong with that code.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import http.client
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml

from conftest import WRITE
from embedding_rollout.store import open_store
from rollout_harness import LocalDeployment, small_corpus

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
TEMPLATE_DIR = K8S / "generator-version-template"
K8S_VERSION = "1.31"  # the oldest Kubernetes the manifests support (native sidecars, autoscaling/v2)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TOOLS_DIR = Path(os.environ.get("ER_TOOLS_DIR") or
                 Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedding-rollout" / "bin")
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/prod", "bootstrap"]
NAMESPACES = {"embeddings", "airflow"}
VERSION_HEADER = "x-model-version"
ISTIO_GROUPS = ("networking.istio.io", "security.istio.io")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass"}


def missing_tool(message: str):
    """Skip on a developer's machine, fail in CI: a green CI must have run the check."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true: run scripts/install-tools.sh)")
    pytest.skip(f"{message}: run scripts/install-tools.sh")


# -- reading manifests ---------------------------------------------------------------------------
def load_docs(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def fill_template(text: str, version: str) -> str:
    """The generator template filled in for ``version`` (``vN``): exactly its two placeholders."""
    number = re.fullmatch(r"v([1-9][0-9]*)", version).group(1)
    filled = text.replace("${VERSION_NUMBER}", number).replace("${VERSION}", version)
    assert "${" not in filled, "the template has a placeholder besides ${VERSION} and ${VERSION_NUMBER}"
    return filled


def template_objects(version: str) -> list[dict]:
    return load_docs(fill_template((TEMPLATE_DIR / "generator.yaml").read_text(), version))


def template_patch(name: str, version: str) -> list[dict]:
    return json.loads(fill_template((TEMPLATE_DIR / name).read_text(), version))


def patch_files() -> set[Path]:
    """Files that kustomizations use as patches: partial objects, checked through the rendered output."""
    files = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kustomization.read_text()).get("patches", []):
            if "path" in patch:
                files.add((kustomization.parent / patch["path"]).resolve())
    return files


def manifest_files() -> list[Path]:
    patches = patch_files()
    return sorted(p for p in K8S.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and p.parent != TEMPLATE_DIR and p.resolve() not in patches)


def by_kind(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = by_kind(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def raw_objects(directory: Path) -> list[dict]:
    """A kustomization's resources straight from their files (no kustomize: no transformers either)."""
    objects = []
    for resource in yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]:
        path = directory / resource
        objects += raw_objects(path) if path.is_dir() else load_docs(path.read_text())
    return objects


def raw_base() -> list[dict]:
    return raw_objects(K8S / "base")


# -- kustomize -----------------------------------------------------------------------------------
def kustomize_command() -> list[str] | None:
    if os.environ.get("KUSTOMIZE"):
        return [os.environ["KUSTOMIZE"]]
    if (TOOLS_DIR / "kustomize").is_file():
        return [str(TOOLS_DIR / "kustomize")]
    if shutil.which("kustomize"):
        return [shutil.which("kustomize")]
    if shutil.which("kubectl"):
        return [shutil.which("kubectl"), "kustomize"]
    return None


@functools.lru_cache(maxsize=None)
def _render(path: str) -> tuple[str, str]:
    command = kustomize_command()
    if command is None:
        return "", "kustomize not found"
    proc = subprocess.run([*command, "build", str(K8S / path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return "", f"`{' '.join(command)} build k8s/{path}` failed:\n{proc.stderr}"
    return proc.stdout, ""


def render(path: str) -> list[dict]:
    out, error = _render(path)
    if error == "kustomize not found":
        missing_tool(error)
    assert not error, error
    return load_docs(out)


# -- schemas ---------------------------------------------------------------------------------------
def strict(schema):
    """A CRD schema where unknown fields are errors (unless the schema preserves them)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=None)
def istio_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict spec schema, for every served version of every Istio CRD."""
    path = Path(os.environ.get("ER_ISTIO_CRDS") or K8S / "crds" / "istio-crds.yaml")
    if not path.is_file():
        pytest.fail(f"Istio CRD schemas not found at {path} (set ER_ISTIO_CRDS)")
    schemas = {}
    for crd in load_docs(path.read_text()):
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                root = version["schema"]["openAPIV3Schema"]
                schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = strict(root["properties"]["spec"])
    return schemas


METADATA_FIELDS = {"name": str, "namespace": str, "labels": dict, "annotations": dict}


def validate_istio(obj: dict) -> None:
    schema = istio_schemas().get((obj["apiVersion"], obj["kind"]))
    assert schema is not None, f"no served Istio CRD for {obj['apiVersion']} {obj['kind']}"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, f"unexpected top-level fields {set(obj)}"
    for key, value in obj["metadata"].items():
        assert key in METADATA_FIELDS and isinstance(value, METADATA_FIELDS[key]), f"metadata.{key}"
    for key in ("labels", "annotations"):
        assert all(isinstance(v, str) for v in obj["metadata"].get(key, {}).values()), f"metadata.{key} values"
    jsonschema.Draft7Validator(schema).validate(obj.get("spec", {}))


def validate(obj: dict) -> None:
    what = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
    try:
        if obj["apiVersion"].split("/")[0] in ISTIO_GROUPS:
            validate_istio(obj)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        raise AssertionError(f"{what} is invalid at {path or '(root)'}: {exc.message}") from None


# -- 1. every manifest file ------------------------------------------------------------------------
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_validates(path):
    objects = load_docs(path.read_text())
    assert objects
    for obj in objects:
        validate(obj)


@pytest.mark.parametrize("version", ["v1", "v2", "v13"])
def test_the_generator_template_validates_for_any_version(version):
    objects = template_objects(version)
    assert [o["kind"] for o in objects] == ["Deployment", "HorizontalPodAutoscaler"]  # what the step creates
    assert objects[1]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                    "name": f"embedding-generator-{version}"}
    assert objects[1]["spec"]["minReplicas"] <= objects[0]["spec"]["replicas"] <= objects[1]["spec"]["maxReplicas"]
    for obj in objects:
        validate(obj)
    deployment = objects[0]
    labels = {"app": "embedding-generator", "version": version}
    assert deployment["metadata"]["name"] == f"embedding-generator-{version}"
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    number = version[1:]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    config = env_of(container)["TFS_MODEL_CONFIG"]
    assert re.search(r"specific\s*{\s*versions:\s*%s\s*}" % number, config), config
    for probe in ("startupProbe", "readinessProbe"):
        script = container[probe]["exec"]["command"][-1]
        assert f"/v1/models/embedder/versions/{number} " in script and "AVAILABLE" in script


def model_server_config(text: str):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2
    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_generator_command_writes_a_valid_model_config_and_execs_the_server(version, tmp_path):
    container = template_objects(version)[0]["spec"]["template"]["spec"]["containers"][0]
    config_file = tmp_path / "models.config"
    # Run the container's own shell command with echo standing in for tensorflow_model_server.
    command = [part.replace("/etc/tfserving/models.config", str(config_file))
               .replace("exec tensorflow_model_server", "exec echo") for part in container["command"]]
    run = subprocess.run(command + container["args"], env={"TFS_MODEL_CONFIG": env_of(container)["TFS_MODEL_CONFIG"]},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == container["args"]
    (model,) = model_server_config(config_file.read_text()).model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("embedder", "/models/embedder", "tensorflow")
    assert list(model.model_version_policy.specific.versions) == [int(version[1:])]
    assert "--model_config_file=/etc/tfserving/models.config" in container["args"]
    assert {"name": "config", "mountPath": "/etc/tfserving"} in container["volumeMounts"]


def test_generator_v1_in_the_base_is_the_template_filled_in():
    assert load_docs((K8S / "base" / "generator" / "generator-v1.yaml").read_text()) == template_objects("v1")


# -- 2. rendered kustomizations --------------------------------------------------------------------
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_rendered_kustomization_validates(path):
    objects = render(path)
    assert objects
    seen = set()
    for obj in objects:
        validate(obj)
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") in NAMESPACES, f"{key}: namespace must be explicit"
        for container in pod_spec(obj).get("containers", []) if pod_spec(obj) else []:
            image = container["image"]
            assert re.search(r":[\w.-]+$", image.split("/")[-1]) and not image.endswith(":latest"), image


INSTALL_ORDER = ["foundation", "elasticsearch", "generator", "app", "gateway", "airflow-rbac"]


@pytest.mark.parametrize("path", ["base", "overlays/dev", "overlays/prod"])
def test_every_object_belongs_to_an_install_step_and_the_docs_apply_them_in_order(path):
    """docs/deploy-kubernetes.md applies the rendered overlay part by part (kubectl apply -l ...)."""
    objects = render(path)
    parts = [o["metadata"].get("labels", {}).get("app.kubernetes.io/component") for o in objects]
    assert set(parts) == set(INSTALL_ORDER), sorted(map(str, set(parts)))
    docs = (REPO / "docs" / "deploy-kubernetes.md").read_text()
    assert re.findall(r"^\s*apply ([a-z-]+)\s*$", docs, re.M) == INSTALL_ORDER
    assert sorted(INSTALL_ORDER) == sorted(p.name for p in (K8S / "base").iterdir() if p.is_dir())


def rendered_systems():
    return [p for p in KUSTOMIZATIONS if p != "bootstrap"]


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def gateway_virtual_services(objects):
    return [o for o in by_kind(objects, "VirtualService") if o["spec"].get("gateways")]


def weighted_routes(virtual_service):
    return [http for http in virtual_service["spec"]["http"] if any("weight" in r for r in http["route"])]


@pytest.mark.parametrize("path", rendered_systems())
def test_gateway_weights_sum_to_100_and_each_destination_sets_its_version(path):
    objects = render(path)
    services = gateway_virtual_services(objects)
    assert len(services) == 1
    routes = weighted_routes(services[0])
    assert routes, "the gateway VirtualService has no weighted route"
    for http in routes:
        weights = [r.get("weight", 0) for r in http["route"]]
        assert sum(weights) == 100 and all(isinstance(w, int) and 0 <= w <= 100 for w in weights), weights
        versions = [r["headers"]["request"]["set"][VERSION_HEADER] for r in http["route"]]
        assert len(set(versions)) == len(versions) and all(re.fullmatch(r"v[1-9]\d*", v) for v in versions)
        app = one(objects, "Service", "embedding-app")
        for r in http["route"]:
            assert r["destination"]["host"] == "embedding-app.embeddings.svc.cluster.local"
            assert r["destination"]["port"]["number"] in [p["port"] for p in app["spec"]["ports"]]


def live_versions(objects) -> set[str]:
    routes = weighted_routes(gateway_virtual_services(objects)[0])
    return {r["headers"]["request"]["set"][VERSION_HEADER] for http in routes for r in http["route"]}


def check_generator_routing(objects, versions):
    """Every version: a header route -> a subset -> a Deployment whose pods carry the subset's labels."""
    service = one(objects, "VirtualService", "embedding-generator")
    rule = one(objects, "DestinationRule", "embedding-generator")
    host = "embedding-generator.embeddings.svc.cluster.local"
    assert service["spec"]["hosts"] == [host] and rule["spec"]["host"] == host
    subsets = {s["name"]: s["labels"] for s in rule["spec"]["subsets"]}
    routed = {}
    for http in service["spec"]["http"]:
        assert len(http["match"]) == 1, "each generator route matches the version header only"
        version = http["match"][0]["headers"][VERSION_HEADER]["exact"]
        assert [r["destination"] for r in http["route"]] == [{"host": host, "subset": version}]
        routed[version] = http
    assert set(routed) == set(subsets) == set(versions), (routed.keys(), subsets.keys(), versions)
    for version, labels in subsets.items():
        assert labels == {"app": "embedding-generator", "version": version}
        pods = [d for d in by_kind(objects, "Deployment")
                if labels.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, f"subset {version} selects {len(pods)} Deployments"


@pytest.mark.parametrize("path", rendered_systems())
def test_every_live_version_has_generator_route_subset_and_deployment(path):
    objects = render(path)
    check_generator_routing(objects, live_versions(objects))


@pytest.mark.parametrize("version", ["v2", "v7"])
def test_a_new_version_make_before_break_still_validates(version):
    """Deployment from the template, then the subset patch, then the route patch: each stage valid."""
    objects = raw_base() + template_objects(version)
    rule = one(objects, "DestinationRule", "embedding-generator")
    service = one(objects, "VirtualService", "embedding-generator")
    new_rule = jsonpatch.apply_patch(rule, template_patch("subset-patch.json", version))
    validate(new_rule)
    new_service = jsonpatch.apply_patch(service, template_patch("route-patch.json", version))
    validate(new_service)
    assert new_service["spec"]["http"][:-1] == service["spec"]["http"]  # existing routes untouched
    staged = [o for o in objects if o not in (rule, service)] + [new_rule, new_service]
    check_generator_routing(staged, {"v1", version})
    # The new route is a copy of the existing ones but for the version.
    assert json.dumps(new_service["spec"]["http"][-1]).replace(version, "v1") == json.dumps(service["spec"]["http"][0])


@pytest.mark.parametrize("path", rendered_systems())
def test_service_ports_are_named_for_istio_and_point_at_container_ports(path):
    objects = render(path)
    for service in by_kind(objects, "Service"):
        pods = [pod_spec(o) for o in objects if pod_spec(o)
                and service["spec"]["selector"].items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {service['metadata']['name']} selects no workload"
        for port in service["spec"]["ports"]:
            assert re.fullmatch(r"(http|grpc|tcp)(-[a-z0-9-]+)?", port["name"]), port
            names = {p["name"] for pod in pods for c in pod["containers"] for p in c.get("ports", [])}
            assert port["targetPort"] in names, f"{service['metadata']['name']}: {port['targetPort']} not in {names}"
    # The request path is HTTP and gRPC only: never tcp (weight changes then drain, not drop).
    assert {(p["name"], p["port"]) for p in one(objects, "Service", "embedding-generator")["spec"]["ports"]} == \
        {("grpc", 8500), ("http", 8501)}
    assert [(p["name"], p["port"]) for p in one(objects, "Service", "embedding-app")["spec"]["ports"]] == [("http", 8080)]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_workloads_reference_what_exists(path):
    objects = render(path) + (render("base") if path == "bootstrap" else [])
    names = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects}
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        ns = obj["metadata"]["namespace"]
        if obj["kind"] != "Job":
            assert obj["spec"]["selector"]["matchLabels"].items() <= obj["spec"]["template"]["metadata"]["labels"].items()
        assert ("ServiceAccount", ns, spec.get("serviceAccountName")) in names, obj["metadata"]["name"]
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", ns, volume["persistentVolumeClaim"]["claimName"]) in names
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert ("ConfigMap", ns, source["configMapRef"]["name"]) in names
            security = container.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False and security["capabilities"]["drop"] == ["ALL"]
        assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("path", rendered_systems())
def test_app_probes_autoscaling_and_disruption_budget(path):
    objects = render(path)
    app = one(objects, "Deployment", "embedding-app")
    container = app["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["embedding-rollout"]
    assert container["args"] == ["app", "--host", "0.0.0.0", "--port", "8080"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert "replicas" not in app["spec"], "the HPA owns the replica count"
    hpa = one(objects, "HorizontalPodAutoscaler", "embedding-app")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "embedding-app"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = one(objects, "PodDisruptionBudget", "embedding-app")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= app["spec"]["template"]["metadata"]["labels"].items()
    if "minAvailable" in pdb["spec"]:
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB would block every eviction"


def principal(namespace: str, account: str) -> str:
    return f"cluster.local/ns/{namespace}/sa/{account}"


@pytest.mark.parametrize("path", rendered_systems())
def test_mesh_security_strict_mtls_and_who_may_call_whom(path):
    objects = render(path)
    assert [p["spec"] for p in by_kind(objects, "PeerAuthentication")] == [{"mtls": {"mode": "STRICT"}}]
    assert one(objects, "AuthorizationPolicy", "allow-nothing")["spec"] == {}

    def allowed(name):
        policy = one(objects, "AuthorizationPolicy", name)
        assert policy["spec"]["action"] == "ALLOW"
        return {p for rule in policy["spec"]["rules"] for s in rule["from"] for p in s["source"]["principals"]}

    app, steps = principal("embeddings", "embedding-app"), principal("embeddings", "rollout-steps")
    airflow = principal("airflow", "embedding-rollout-airflow")
    gateway = principal("istio-system", "istio-ingressgateway-service-account")
    assert allowed("embedding-generator") == {app, steps}
    assert allowed("embedding-app") == {gateway, airflow, steps}
    assert allowed("elasticsearch") == {app, steps, airflow, principal("embeddings", "elasticsearch")}
    # The public may reach the API, not the metrics, the state or the rollout decisions.
    policy = one(objects, "AuthorizationPolicy", "embedding-app")
    public = [rule for rule in policy["spec"]["rules"] if gateway in rule["from"][0]["source"]["principals"]]
    public_paths = {p for rule in public for op in rule["to"] for p in op["operation"]["paths"]}
    assert "/search" in public_paths and not {"/metrics", "/deployment", "/rollout/decisions"} & public_paths
    # Every principal named (but the ingress gateway's) is a service account of ours.
    accounts = {principal(o["metadata"]["namespace"], o["metadata"]["name"]) for o in by_kind(objects, "ServiceAccount")}
    for name in ("embedding-app", "embedding-generator", "elasticsearch"):
        assert allowed(name) - {gateway} <= accounts
    # Policies select existing workloads.
    for policy in by_kind(objects, "AuthorizationPolicy"):
        selector = policy["spec"].get("selector", {}).get("matchLabels")
        if selector:
            assert any(selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
                       for o in objects if pod_spec(o)), policy["metadata"]["name"]


def _istio_match(pattern: str, value: str | None) -> bool:
    """An Istio string match: exact, prefix (``x*``), suffix (``*x``) or presence (``*``)."""
    if value is None:
        return False
    return pattern in ("*", value) or (pattern.endswith("*") and value.startswith(pattern[:-1])) or \
        (pattern.startswith("*") and value.endswith(pattern[1:]))


def mesh_allows(policy: dict, principal_: str, request_principal: str | None, scopes: set[str], method: str,
                path: str) -> bool:
    """Whether an ALLOW AuthorizationPolicy lets the request through, as Istio's documented rules
    read (no Envoy runs here): any rule whose every present field matches."""
    def fields_match(spec: dict, values: dict) -> bool:
        return all(any(_istio_match(p, values[field]) for p in patterns) for field, patterns in spec.items()
                   if field in values)
    for rule in policy["spec"]["rules"]:
        sources = [s["source"] for s in rule.get("from", [])] or [{}]
        operations = [t["operation"] for t in rule.get("to", [])] or [{}]
        who = {"principals": principal_, "requestPrincipals": request_principal}
        what = {"methods": method, "paths": path, "ports": "8080"}
        conditions = all(scopes & set(c["values"]) for c in rule.get("when", []) if c["key"] == "request.auth.claims[scope]")
        if any(fields_match(s, who) for s in sources) and any(fields_match(o, what) for o in operations) and conditions:
            return True
    return False


@pytest.mark.parametrize("path", rendered_systems())
def test_the_mesh_requires_a_jwt_with_the_scope_for_every_write_and_control_call(path):
    objects = render(path)
    authn = one(objects, "RequestAuthentication", "embedding-app")
    policy = one(objects, "AuthorizationPolicy", "embedding-app")
    assert authn["spec"]["selector"] == policy["spec"]["selector"]
    issuers = {rule["issuer"] for rule in authn["spec"]["jwtRules"]}
    assert all(rule["audiences"] == ["embedding-rollout"] and rule["forwardOriginalToken"]  # the app checks it too
               for rule in authn["spec"]["jwtRules"])
    kube, users = "https://kubernetes.default.svc.cluster.local", "https://auth.example.com"
    assert issuers == {kube, users}
    gateway = principal("istio-system", "istio-ingressgateway-service-account")
    airflow, steps = principal("airflow", "embedding-rollout-airflow"), principal("embeddings", "rollout-steps")
    airflow_jwt = f"{kube}/system:serviceaccount:airflow:embedding-rollout-airflow"
    writer_jwt = f"{users}/content-pipeline"

    def allows(source, jwt_principal, scopes, method, request_path):
        return mesh_allows(policy, source, jwt_principal, set(scopes), method, request_path)
    writes = [("PUT", "/documents/d1"), ("DELETE", "/documents/d1"), ("POST", "/feedback")]
    control = [("PUT", "/deployment/weights"), ("POST", "/rollout/decisions"), ("POST", "/deployment/rollout"),
               ("GET", "/deployment"), ("GET", "/rollout/decisions"), ("GET", "/deployment/backfills/v2"),
               ("GET", "/deployment/indices/v1")]
    for method, request_path in writes + control:  # no JWT: no write, no control, from anywhere
        for source in (gateway, airflow, steps):
            assert not allows(source, None, [], method, request_path), (source, method, request_path)
    assert allows(gateway, writer_jwt, ["documents:write"], "PUT", "/documents/d1")
    assert allows(gateway, writer_jwt, ["documents:write"], "DELETE", "/documents/d1")
    assert not allows(gateway, writer_jwt, ["feedback:write"], "PUT", "/documents/d1")  # the scope per operation
    assert allows(gateway, writer_jwt, ["feedback:write"], "POST", "/feedback")
    assert not allows(gateway, writer_jwt, ["documents:write"], "POST", "/feedback")
    for method, request_path in control:
        assert allows(airflow, airflow_jwt, [], method, request_path), (method, request_path)
        assert not allows(gateway, airflow_jwt, [], method, request_path)  # not from outside
        assert not allows(steps, airflow_jwt, [], method, request_path)  # a stolen token from another workload
        assert not allows(airflow, writer_jwt, ["documents:write", "feedback:write"], method, request_path)
    assert not allows(airflow, airflow_jwt, [], "PUT", "/documents/d1")  # Airflow holds rollout:operate only
    assert allows(gateway, None, [], "POST", "/search") and allows(airflow, None, [], "GET", "/metrics")


FORBIDDEN_VERBS = {"*", "escalate", "bind", "impersonate"}


@pytest.mark.parametrize("path", rendered_systems())
def test_rbac_is_namespaced_and_least_privilege(path):
    objects = render(path)
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(objects, "Role")}
    assert roles
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["apiGroups"] and "*" not in rule["resources"], role["metadata"]["name"]
            assert not FORBIDDEN_VERBS & set(rule["verbs"]), rule
            assert not {"secrets", "roles", "rolebindings", "serviceaccounts/token"} & set(rule["resources"]), rule
    accounts = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in by_kind(objects, "ServiceAccount")}
    bound = set()
    for binding in by_kind(objects, "RoleBinding"):
        ns = binding["metadata"]["namespace"]
        assert binding["roleRef"]["kind"] == "Role" and (ns, binding["roleRef"]["name"]) in roles
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and (subject["namespace"], subject["name"]) in accounts
        bound.add((ns, binding["roleRef"]["name"]))
    assert bound == set(roles), "every Role is bound, once"
    # The API tokens go only where the API is used: the bootstrap and the app (the state ConfigMap).
    for obj in objects:
        spec = pod_spec(obj)
        if spec and obj["metadata"]["name"] not in ("bootstrap-v1", "embedding-app"):
            assert spec.get("automountServiceAccountToken") is False, obj["metadata"]["name"]


@pytest.mark.parametrize("path", rendered_systems())
def test_airflow_settings_match_the_app_and_the_cluster(path):
    """The step pods get the Airflow worker's ER_* settings: they must be the app's."""
    objects = render(path)
    app_config = one(objects, "ConfigMap", "embedding-rollout-config")["data"]
    airflow = one(objects, "ConfigMap", "embedding-rollout-airflow-env")["data"]
    assert {k: airflow.get(k) for k in app_config} == app_config
    app = one(objects, "Deployment", "embedding-app")
    assert airflow["ER_IMAGE"] == app["spec"]["template"]["spec"]["containers"][0]["image"]
    assert airflow["ER_AIRFLOW_RUNTIME"] == "kubernetes"
    ns = airflow["ER_K8S_NAMESPACE"]
    one(objects, "ServiceAccount", airflow["ER_STEP_SERVICE_ACCOUNT"])
    gateway = gateway_virtual_services(objects)[0]["metadata"]
    assert (gateway["name"], gateway["namespace"]) == (airflow["ER_GATEWAY_VIRTUAL_SERVICE"], ns)
    assert airflow["ER_APP_URL"] == f"http://embedding-app.{ns}.svc.cluster.local:8080"
    traffic = one(objects, "Role", "rollout-traffic")
    assert airflow["ER_GATEWAY_VIRTUAL_SERVICE"] in traffic["rules"][0]["resourceNames"]


def test_the_bootstrap_job_runs_the_image_script_with_the_app_settings():
    job = one(render("bootstrap"), "Job", "bootstrap-v1")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["embedding-rollout-bootstrap"] and container["args"] == ["all"]
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "rollout-steps"
    assert (REPO / "deploy" / "bootstrap.sh").is_file()


def test_a_broken_object_is_caught():
    """The validation is strict: unknown fields and wrong types are errors for both kinds of schema."""
    base = raw_base()
    gateway = copy.deepcopy(gateway_virtual_services(base)[0])
    gateway["spec"]["http"][0]["route"][0]["headers"]["request"]["sett"] = {VERSION_HEADER: "v1"}
    with pytest.raises(AssertionError, match="sett"):
        validate(gateway)
    rule = copy.deepcopy(one(base, "DestinationRule", "embedding-generator"))
    rule["spec"]["subsets"][0]["labels"] = ["v1"]
    with pytest.raises(AssertionError):
        validate(rule)
    app = copy.deepcopy(one(base, "Deployment", "embedding-app"))
    app["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(AssertionError, match="paht"):
        validate(app)


# -- 3. docker-compose.yaml and the Dockerfile ---------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def interpolated(value):
    """Compose's interpolation of a string without variables: ``$$`` is a literal ``$``."""
    if isinstance(value, list):
        return [interpolated(v) for v in value]
    assert not re.search(r"(?<!\$)\$(?!\$)", value.replace("$$", "")), f"unexpected variable in {value!r}"
    return value.replace("$$", "$")


def as_list(value) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


def compose_argv(service: dict) -> list[str]:
    return interpolated(as_list(service["entrypoint"]) + as_list(service.get("command", [])))


def compose_ports(service: dict) -> set[int]:
    ports = {int(p) for p in service.get("expose", [])}
    ports |= {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}
    return ports


def container_ports(container: dict) -> set[int]:
    return {p["containerPort"] for p in container.get("ports", [])}


def test_compose_file_validates_against_the_compose_specification():
    schema = json.loads((REPO / "tests" / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    broken = compose()
    broken["services"]["app"]["healthcheck"]["intervall"] = "5s"
    assert not validator.is_valid(broken)


def test_compose_runs_the_same_commands_and_ports_as_kubernetes():
    services = compose()["services"]
    base = raw_base()

    app = one(base, "Deployment", "embedding-app")["spec"]["template"]["spec"]["containers"][0]
    assert compose_argv(services["app"]) == app["command"] + app["args"]
    assert compose_ports(services["app"]) == container_ports(app) == {8080}

    generator = template_objects("v1")[0]["spec"]["template"]["spec"]["containers"][0]
    assert compose_argv(services["generator"]) == generator["command"] + generator["args"]
    assert compose_ports(services["generator"]) == container_ports(generator) == {8500, 8501}
    assert services["generator"]["image"] == generator["image"]
    # One TF Serving for every version in Compose, one per version in the cluster: the same model
    # config but for the list of versions, the same readiness check.
    k8s_config, compose_config = env_of(generator)["TFS_MODEL_CONFIG"], services["generator"]["environment"]["TFS_MODEL_CONFIG"]
    without_versions = functools.partial(re.sub, r"specific\s*{[^}]*}", "specific {}")
    assert without_versions(compose_config).split() == without_versions(k8s_config).split()
    (model,) = model_server_config(compose_config).model_config_list.config
    assert list(model.model_version_policy.specific.versions) == [1, 2]
    assert services["generator"]["healthcheck"]["test"][1:] == generator["readinessProbe"]["exec"]["command"]
    assert "/models:ro" in " ".join(services["generator"]["volumes"])

    es = one(base, "StatefulSet", "elasticsearch")["spec"]["template"]["spec"]["containers"][0]
    assert services["elasticsearch"]["image"] == es["image"]
    assert compose_ports(services["elasticsearch"]) == {9200}
    assert {p["containerPort"] for p in es["ports"] if p["name"] == "http"} == {9200}
    for setting in ("cluster.name", "discovery.type", "xpack.security.enabled", "node.store.allow_mmap"):
        assert str(services["elasticsearch"]["environment"][setting]) == env_of(es)[setting], setting

    job = one(load_docs((K8S / "bootstrap" / "job.yaml").read_text()), "Job", "bootstrap-v1")
    bootstrap = job["spec"]["template"]["spec"]["containers"][0]
    assert compose_argv(services["model-init"])[0] == compose_argv(services["bootstrap"])[0] == bootstrap["command"][0]

    # The same settings (by name; the addresses differ), and the same paths inside the containers.
    config = one(base, "ConfigMap", "embedding-rollout-config")["data"]
    for name in ("app", "bootstrap", "model-init", "airflow"):
        env = services[name]["environment"]
        assert {k for k in env if k.startswith("ER_")} >= set(config), name
        for key in ("ER_MODEL_NAME", "ER_MODEL_BASE", "ER_SERVING_MODEL_PATH", "ER_STORE"):
            assert env[key] == config[key], (name, key)
        # Compose keeps the state in a file on a volume the services share; the cluster in a ConfigMap.
        assert Path(env["ER_STATE"]).parent == Path(services["app"]["environment"]["ER_HOME"]), name
        assert env["ER_ES_URL"] == "http://elasticsearch:9200"
        assert env["ER_GENERATOR_GRPC"] == "generator:8500"
        assert env["ER_GENERATOR_REST"] == "http://generator:8501"
    mounts = {m for s in ("app", "airflow", "bootstrap") for m in services[s]["volumes"]}
    home = services["app"]["environment"]["ER_HOME"]
    assert "rollout-home:" + home in mounts and "models:" + config["ER_MODEL_BASE"] in mounts
    assert services["airflow"]["environment"]["ER_APP_URL"] == "http://app:8080"
    assert services["airflow"]["image"].startswith("embedding-rollout-airflow")


def test_compose_gateway_serves_the_state_the_app_writes():
    services = compose()["services"]
    gateway = services["gateway"]
    volumes = gateway["volumes"]
    state = services["app"]["environment"]["ER_STATE"]
    conf = (REPO / "deploy" / "gateway" / "nginx.conf").read_text()
    assert f"set $rollout_state {state};" in conf
    assert f"rollout-home:{Path(state).parent}:ro" in volumes
    assert "./deploy/gateway/nginx.conf:/etc/nginx/nginx.conf:ro" in volumes
    assert "./deploy/gateway/version.js:/etc/nginx/njs/version.js:ro" in volumes
    assert "server app:8080;" in conf
    # The state file is written by uid 10001 with mode 0600 (mkstemp + rename): the gateway runs as it.
    assert gateway["user"].split(":")[0] == "10001"


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    lines = (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_default_is_the_app_as_a_non_root_user():
    text = (REPO / "Dockerfile").read_text()
    final = dockerfile_stages()[-1]
    base = final[0][1].split()[0]
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", text) and base == "${PYTHON_IMAGE}"
    users = [rest for instruction, rest in final if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entrypoint = json.loads(next(rest for instruction, rest in final if instruction == "ENTRYPOINT"))
    cmd = json.loads(next(rest for instruction, rest in final if instruction == "CMD"))
    app = one(raw_base(), "Deployment", "embedding-app")["spec"]["template"]["spec"]["containers"][0]
    assert entrypoint == app["command"] and cmd == app["args"]
    assert "pip install" in text and "embedding-rollout-bootstrap" in text


def test_dockerfile_copies_only_what_the_build_context_has():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for stage in dockerfile_stages():
        for instruction, rest in stage:
            if instruction not in ("COPY", "ADD") or "--from=" in rest:
                continue
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is in .dockerignore"


# -- 4. the Compose gateway, run for real --------------------------------------------------------------
NJS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EchoVersion(http.server.BaseHTTPRequestHandler):
    """The app's stand-in: answers with the x-model-version it received."""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        body = json.dumps({"version": self.headers.get(VERSION_HEADER)}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def substitute(text: str, old: str, new: str, count: int = 1) -> str:
    assert text.count(old) == count, f"deploy/gateway/nginx.conf: expected {count}x {old!r}"
    return text.replace(old, new)


@contextmanager
def running_gateway(work: Path, upstream_port: int, state: Path):
    """deploy/gateway/nginx.conf run by nginx on 127.0.0.1, in front of ``upstream_port``; yields its port."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None or not os.path.exists(NJS_MODULE):
        missing_tool("nginx with the njs module not found")
    port = free_port()
    conf = (REPO / "deploy" / "gateway" / "nginx.conf").read_text()
    conf = substitute(conf, "server app:8080;", f"server 127.0.0.1:{upstream_port};")
    conf = substitute(conf, "listen 8080;", f"listen 127.0.0.1:{port};")
    conf = substitute(conf, "js_path /etc/nginx/njs/;", f"js_path {REPO / 'deploy' / 'gateway'}/;")
    conf = substitute(conf, "/var/lib/embedding-rollout/state.json;", f"{state};")
    conf = substitute(conf, "pid /tmp/nginx.pid;", f"pid {work / 'nginx.pid'};")
    conf = substitute(conf, "/tmp/nginx-", f"{work}/nginx-", count=5)
    (work / "nginx.conf").write_text(conf)
    # As root, nginx's workers would drop to "nobody"; the Compose gateway runs as the state's owner.
    # (nginx takes one -g: the global directives go together.)
    argv = [nginx, "-p", str(work), "-c", str(work / "nginx.conf"), "-e", "stderr",
            "-g", "daemon off;" + (" user root;" if os.geteuid() == 0 else "")]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    log = (work / "error.log").open("w")
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    f"nginx did not start: {(work / 'error.log').read_text()}"
                time.sleep(0.05)
        yield port
    finally:
        server.send_signal(signal.SIGQUIT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    work = tmp_path_factory.mktemp("gateway")
    state = work / "state.json"
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoVersion)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    with running_gateway(work, upstream.server_address[1], state) as port:
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

        def request(path="/search", headers=None):
            client.request("GET", path, headers=headers or {})
            response = client.getresponse()
            body = response.read()
            if response.getheader("content-type") != "application/json":
                return response.status, None
            return response.status, json.loads(body)["version"]

        def set_weights(weights):
            state.write_text(json.dumps({"revision": 1, "weights": weights, "versions": {}}))

        yield request, set_weights, state
        client.close()
    upstream.shutdown()


def test_the_compose_gateway_passes_tokens_through_and_the_app_refuses_anonymous_writes(model_repo, tmp_path,
                                                                                          monkeypatch):
    """The real app behind the real gateway configuration: the app checks the tokens."""
    monkeypatch.setenv("ER_CORPUS", str(small_corpus(tmp_path / "corpus.jsonl.gz", 50)))
    deployment = LocalDeployment(tmp_path / "home", model_repo, monkeypatch)
    work = tmp_path / "gateway"
    work.mkdir()
    try:
        with running_gateway(work, int(deployment.app.url.rsplit(":", 1)[1]), deployment.settings.state_path) as port:
            url, index = f"http://127.0.0.1:{port}", deployment.state.read().spec("v1").index
            before = open_store(deployment.settings).count(index)
            document = {"title": "t", "text": "through the gateway", "category": "c", "date": "2024-01-01"}
            refused = requests.put(f"{url}/documents/gw-1", json=document, timeout=30)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
            assert open_store(deployment.settings).count(index) == before
            assert requests.put(f"{url}/documents/gw-1", json=document, headers=WRITE, timeout=30).status_code == 200
            assert requests.post(f"{url}/search", json={"query": "gateway"}, timeout=30).status_code == 200
    finally:
        deployment.stop()


def test_gateway_sets_the_header_by_the_live_weights(gateway):
    request, set_weights, state = gateway
    if state.exists():
        state.unlink()
    assert request() == (200, None)  # no state yet: no header, the app answers for itself
    set_weights({"v1": 100})
    assert {request()[1] for _ in range(20)} == {"v1"}
    # The client cannot pick a version at the boundary (Istio's headers.request.set replaces it too).
    assert request(headers={VERSION_HEADER: "v9"}) == (200, "v1")
    set_weights({"v1": 70, "v2": 30})  # a weight change takes effect without a reload
    counts = {"v1": 0, "v2": 0}
    for _ in range(600):
        counts[request()[1]] += 1
    assert 130 <= counts["v2"] <= 230, counts  # 180 expected; 4.5 standard deviations either side
    set_weights({"v1": 0, "v2": 100})
    assert {request()[1] for _ in range(20)} == {"v2"}


def test_gateway_assigns_user_keys_as_the_app_router_does(gateway):
    from embedding_rollout.domain.traffic import assign_version

    request, set_weights, _ = gateway
    users = [f"user-{i}" for i in range(150)]
    on_new = {}
    for weights in ({"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v2": 20, "v3": 80}):
        set_weights(weights)
        for user in users[:100]:
            assert request(headers={"x-user-id": user}) == (200, assign_version(weights, user)), (weights, user)
        for user in users[100:]:
            assert request(headers={"cookie": f"uid={user}"}) == (200, assign_version(weights, user)), (weights, user)
        newest = max(weights, key=lambda v: int(v[1:]))
        on_new[tuple(sorted(weights.items()))] = {u for u in users if assign_version(weights, u) == newest}
    # Raising v2's weight only moves users to it (sticky, monotonic).
    assert on_new[(("v1", 90), ("v2", 10))] <= on_new[(("v1", 50), ("v2", 50))]


def test_gateway_keeps_operator_endpoints_private(gateway):
    request, set_weights, _ = gateway
    set_weights({"v1": 100})
    for path in ("/metrics", "/deployment", "/rollout/decisions"):
        assert request(path)[0] == 404, path
    assert request("/gateway/healthz")[0] == 200


@pytest.mark.parametrize("cookie", ["uid=user-7", "theme=dark; uid=user-7", "a=1;uid=u; b=2", "uid=u;",
                                    "xuid=user-7", "uid=", "theme=dark", "theme=uid=7", ""])
def test_the_keyed_gateway_route_matches_what_the_app_reads_as_a_user_key(cookie):
    """Requests with a user key bypass Istio's per-request weights, so that the app assigns them,
    sticky. The route's match (RE2 syntax; Python's ``re`` agrees on it) must select exactly the
    requests in which the app finds a key: a missed key would be split per request again."""
    from werkzeug.http import parse_cookie

    from serving_app.views import USER_COOKIE, USER_HEADER

    gateway = gateway_virtual_services(raw_base())[0]
    keyed = next(http for http in gateway["spec"]["http"] if http["name"] == "keyed")
    assert not weighted_routes({"spec": {"http": [keyed]}})  # the weight operator leaves it alone
    (route,) = keyed["route"]
    assert route["headers"]["request"]["remove"] == [VERSION_HEADER]  # the app assigns, not the client
    by_header, by_cookie = (m["headers"] for m in keyed["match"])
    assert re.fullmatch(by_header[USER_HEADER]["regex"], "user-7") and not re.fullmatch(by_header[USER_HEADER]["regex"], "")
    app_reads_a_key = bool(parse_cookie(cookie).get(USER_COOKIE))
    assert bool(re.fullmatch(by_cookie["cookie"]["regex"], cookie)) == app_reads_a_key, cookie
