"""Shared fixtures: real trained models, a real model server, both real vector stores.

Elasticsearch is the real server started by ``scripts/test.sh`` (``scripts/elasticsearch.sh
start``) at ``ER_TEST_ES_URL`` (default http://127.0.0.1:9200); the Airflow stacks' metadata
databases live on the PostgreSQL server at ``ER_TEST_AIRFLOW_DB`` (``scripts/postgres.sh``).
Outside CI a missing server skips its tests; in CI (``CI=true``) it fails them.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Airflow reads its configuration at import: a throwaway home with the project's DAGs and plugins,
# one per pytest-xdist worker (a worker inherits the controller's environment, which has one too).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix=f"er-airflow-{os.environ['PYTEST_XDIST_WORKER']}-")
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="er-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(REPO / "plugins"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")

from embedding_rollout import auth  # noqa: E402
from embedding_rollout.domain.state import StateFile, VersionSpec  # noqa: E402
from embedding_rollout.generator.client import GeneratorTarget, generator_client  # noqa: E402
from embedding_rollout.generator.models import ModelManager  # noqa: E402
from embedding_rollout.generator.server import ModelServer  # noqa: E402
from embedding_rollout.model.trainer import TrainConfig  # noqa: E402
from embedding_rollout.model.training import train_version  # noqa: E402

# The token file of every app the tests start (scripts/test.sh gives each run one; a worker keeps
# its controller's): the default callers and one holding every scope. Headers for requests:
if not os.environ.get("ER_TOKENS"):
    os.environ["ER_TOKENS"] = str(Path(tempfile.mkdtemp(prefix="er-tokens-")) / "tokens.json")
if auth.ensure_tokens_file(Path(os.environ["ER_TOKENS"])):
    auth.add_token(Path(os.environ["ER_TOKENS"]), "all-scopes", auth.SCOPES)
TOKENS = Path(os.environ["ER_TOKENS"])
os.environ.setdefault("ER_FEEDBACK_LEDGER", str(TOKENS.parent / "feedback.sqlite"))  # not under the cwd


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {auth.token_for(TOKENS, name)}"}


OPERATE, WRITE, FEEDBACK, ALL_SCOPES = bearer("operator"), bearer("writer"), bearer("feedback"), bearer("all-scopes")

ES_URL = os.environ.get("ER_TEST_ES_URL", "http://127.0.0.1:9200")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Small but real models: two time windows, two sizes, so v1 and v2 genuinely differ.
TEST_MODELS = {1: ("2019-01-01", 32), 2: (None, 48)}


# scripts/test.sh runs the suite on two pytest-xdist workers. The tests of one shared live system
# run on one worker, in order: each group of Airflow end-to-end tests (one live Airflow per worker,
# mostly waiting on its scheduler, so the rest of the suite runs meanwhile), and the tests of the
# one Kubernetes cluster's `embeddings` namespace. The groups, having the most tests, are handed
# out first. (A scheduler of its own: xdist's loadgroup cannot tag node ids under
# pytest 9.2.)
SERIAL_GROUPS = {"airflow-ramped": ("test_airflow_ramped",),
                 "airflow-ab": ("test_airflow_ab", "test_airflow_retrain"),
                 "kube": ("test_istio_weights", "test_generator_fleet", "test_rbac", "test_cluster_",
                          "test_state_configmap")}


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SharedSystemScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = Path(nodeid.split("::", 1)[0]).stem
            group = next((g for g, prefixes in SERIAL_GROUPS.items() if module.startswith(prefixes)), None)
            return group or nodeid  # any other test is a unit of its own

    return SharedSystemScheduling(config, log)


def verified(state, *specs):
    """``specs`` deployed, written to, backfilled and verified through their lifecycle transitions:
    the shortcut of a test whose documents are indexed by other means than the backfill step."""
    for spec in specs:
        state = (state.with_version(spec).with_write_target(spec.name).with_backfill(spec.name)
                 .with_verification(spec.name, {"source": "corpus", "complete": True}))
    return state


def serving(state, spec: VersionSpec):
    """``spec`` verified, with all the traffic, stable."""
    return verified(state, spec).with_weights({spec.name: 100}).with_stable(spec.name)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("models") / "embedder"
    for number, (until, dims) in TEST_MODELS.items():
        train_version(model_dir, number, TrainConfig(dims=dims, epochs=1, vocab_size=8000), until)
    return model_dir


@pytest.fixture(scope="session")
def model_server(model_repo):
    manager = ModelManager("embedder", model_repo)
    manager.serve([1, 2])
    server = ModelServer(manager, rest_port=0, grpc_port=0).start()
    yield server
    server.stop()


def target(server: ModelServer, version: str) -> GeneratorTarget:
    return GeneratorTarget(version, f"127.0.0.1:{server.grpc_port}", f"http://127.0.0.1:{server.rest_port}")


def spec_for(server: ModelServer, version: str, index: str) -> VersionSpec:
    t = target(server, version)
    return VersionSpec(version, {"v1": 32, "v2": 48}[version], index,
                       generator_grpc=t.grpc_address, generator_rest=t.rest_url)


@pytest.fixture(scope="session")
def embedders(model_server):
    return {v: generator_client(target(model_server, v)) for v in ("v1", "v2")}


def missing_server(message: str):
    """A server the tests need does not answer: their failure in CI, a skip on a developer's machine."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def elasticsearch_store():
    from embedding_rollout.store.elastic import ElasticsearchStore
    from embedding_rollout.store.base import StoreUnavailable
    store = ElasticsearchStore(ES_URL, timeout=10.0)
    try:
        store.ready()
    except StoreUnavailable as exc:
        missing_server(f"no Elasticsearch server at {ES_URL} (start it: scripts/elasticsearch.sh start): {exc}")
    return store


@contextmanager
def airflow_metadata_database(purpose: str):
    """A fresh PostgreSQL database for one Airflow stack, dropped afterwards; yields its URL.

    PostgreSQL, as Airflow's users run it: SQLite's writers take no row locks, so a state the API
    server writes (a run marked failed) can be lost to a worker's, and a writer waiting on the
    file's lock for 5 s fails the request with a 500."""
    import sqlalchemy
    server = os.environ.get("ER_TEST_AIRFLOW_DB")
    if not server:
        missing_server("ER_TEST_AIRFLOW_DB names no PostgreSQL server (scripts/test.sh starts one: "
                       "scripts/postgres.sh start; export ER_TEST_AIRFLOW_DB=$(scripts/postgres.sh url))")
    url = sqlalchemy.make_url(server)
    name = f"airflow_{purpose}_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as db:
            db.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sqlalchemy.exc.OperationalError as exc:
        admin.dispose()
        missing_server(f"no PostgreSQL server at {url.render_as_string()} (scripts/postgres.sh start): {exc}")
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as db:
            db.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["lance", "elasticsearch"])
def store(request, tmp_path):
    """Each test gets a fresh store of each backend; index names are unique per test."""
    if request.param == "lance":
        from embedding_rollout.store.lance import LanceStore
        backend = LanceStore(str(tmp_path / "lance"))
    else:
        backend = elasticsearch_store()
    created: list[str] = []
    backend.test_index = lambda name="docs": _unique(created, name)  # type: ignore[attr-defined]
    yield backend
    for index in created:
        backend.drop_index(index)


def _unique(created: list[str], name: str) -> str:
    index = f"test-{name}-{uuid.uuid4().hex[:10]}"
    created.append(index)
    return index


@pytest.fixture
def state_file(tmp_path) -> StateFile:
    return StateFile(tmp_path / "state.json")


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's metadata database (SQLite in the throwaway AIRFLOW_HOME), migrated once."""
    import subprocess
    import sys
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


@pytest.fixture
def dagbag(airflow_db):
    """Freshly parsed DAGs for each test: ``dag.test(run_conf=...)`` leaves the conf in the DAG
    object's params, so a DAG object must not be shared between runs."""
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag


@pytest.fixture(scope="session")
def live_airflow(tmp_path_factory, model_repo):
    """Airflow's real components over one local deployment, for every test that runs a DAG the way
    users do (through the REST API). The deployment carries over from test to test: each rolls out
    from whatever version the last one left serving."""
    from embedding_rollout.airflow_stack import free_port
    from airflow_harness import start_live_airflow
    with pytest.MonkeyPatch.context() as env, airflow_metadata_database("live") as database:
        live = start_live_airflow(tmp_path_factory.mktemp("live"), model_repo, env, free_port(), database)
        try:
            yield live
        finally:
            live.airflow.stop()
            live.deployment.stop()


@pytest.fixture
def live(live_airflow):
    """The live Airflow, checked idle first: no rollout holds the deployment, one version serves."""
    state = live_airflow.state()
    assert state.rollout is None or not state.rollout.active, state.rollout.describe()
    assert len(state.versions) == 1 and list(state.weights.values()) == [100], state.to_json()
    yield live_airflow
    for number in (1, 2, 3, 4, 5):
        live_airflow.deployment.model_server.manager.set_fault_rate(number, 0.0)


# -- the real Kubernetes control plane (scripts/kube-test-cluster.sh) ------------------------------
@pytest.fixture(scope="session")
def kube():
    """The real API server holding what the cluster tests act on -- the base's namespaces, service
    accounts, RBAC, gateway and generator objects, applied server-side (so they passed the real
    schemas) -- and a stand-in kubelet for the pods of ``embeddings``. The app and Elasticsearch
    are left out: nothing here runs them (``test_cluster_apply`` dry-runs every object)."""
    from kube_cluster import StandInKubelet, connect
    from test_manifests import render
    cluster = connect()
    left_out = {("Deployment", "embedding-app"), ("StatefulSet", "elasticsearch")}
    objects = [o for o in render("base") if (o["kind"], o["metadata"]["name"]) not in left_out
               and o["kind"] not in ("PersistentVolumeClaim", "Job")]
    cluster.apply([o for o in objects if o["kind"] == "Namespace"])
    cluster.apply([o for o in objects if o["kind"] != "Namespace"])
    cluster.kubelet = StandInKubelet(cluster, "embeddings").start()
    yield cluster
    cluster.kubelet.stop()


@pytest.fixture
def kube_generators(kube):
    """The generator objects of ``embeddings`` as the base has them (v1 live), whatever an earlier
    test left; no version's pods crash-loop."""
    from kube_cluster import reset_generators
    kube.kubelet.crash_looping.clear()
    reset_generators(kube)
    yield kube
    kube.kubelet.crash_looping.clear()
