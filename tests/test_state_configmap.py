"""The deployment state in a ConfigMap (kubernetes runtime) against the real API server:
compare-and-swap on the resourceVersion (a real 409 from a concurrent writer, applied again on a
fresh read, no update lost), a watch that keeps each reader current, and the app serving from it."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
import requests
from kubernetes import client

from conftest import OPERATE, serving, spec_for, verified
from embedding_rollout.domain.state import ConcurrentUpdate, VersionSpec
from embedding_rollout.statestore.configmap import ConfigMapState
from kube_cluster import NAMESPACE, wait_until


@pytest.fixture
def name(kube):
    """A ConfigMap name of the test's own, deleted afterwards."""
    name = f"state-test-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        client.CoreV1Api(kube.admin).delete_namespaced_config_map(name, NAMESPACE)
    except client.exceptions.ApiException as exc:
        assert exc.status == 404


def spec(number: int) -> VersionSpec:
    return VersionSpec(f"v{number}", 8, f"docs-v{number}")


def config_map(kube, name: str):
    return client.CoreV1Api(kube.admin).read_namespaced_config_map(name, NAMESPACE)


def test_the_first_update_creates_it_and_an_unchanged_state_is_not_written(kube, name):
    state = ConfigMapState(name, NAMESPACE, api_client=kube.admin)
    assert state.read().versions == {}  # no ConfigMap yet: the empty state
    written = state.update(lambda s: s.with_version(spec(1)))
    assert written.revision == 1 and set(state.read().versions) == {"v1"}
    before = config_map(kube, name).metadata.resource_version
    assert state.update(lambda s: s if "v1" in s.versions else s.with_version(spec(1))).revision == 1
    assert config_map(kube, name).metadata.resource_version == before  # nothing written
    with pytest.raises(ConcurrentUpdate, match="revision is 1, expected 0"):
        state.update(lambda s: s.with_version(spec(2)), expected_revision=0)


def test_a_concurrent_writer_between_read_and_write_loses_nothing(kube, name):
    """Another writer changes the state right after our read: the API server answers our replace
    with 409 Conflict (stale resourceVersion), and our change is applied again to the fresh state."""
    ours, theirs = (ConfigMapState(name, NAMESPACE, api_client=kube.admin) for _ in range(2))
    theirs.update(lambda s: s.with_version(spec(1)))
    real_get, raced = ours._get, []

    def racing_get():
        read = real_get()
        if not raced:
            raced.append(True)
            theirs.update(lambda s: s.with_version(spec(2)))
        return read

    ours._get = racing_get
    mark = kube.audit_mark()
    result = ours.update(lambda s: s.with_version(spec(3)))
    assert set(result.versions) == {"v1", "v2", "v3"} and result.revision == 3
    codes = [e["responseStatus"]["code"] for e in kube.audit_since(mark, "test-admin")
             if e["verb"] == "update" and e["objectRef"].get("name") == name]
    assert codes == [200, 409, 200]  # theirs, our stale one, our retry


def test_writers_in_parallel_each_keep_their_change(kube, name):
    writers = [ConfigMapState(name, NAMESPACE, api_client=kube.admin) for _ in range(6)]
    writers[0].update(lambda s: s)  # nothing to write: the ConfigMap is not created for no change
    errors: list[BaseException] = []

    def write(number: int):
        try:
            writers[number - 1].update(lambda s: s.with_version(spec(number)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(1, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    final = writers[0].read()
    assert set(final.versions) == {f"v{n}" for n in range(1, 7)} and final.revision == 6


def test_a_watching_reader_sees_each_change_without_asking(kube, name):
    writer = ConfigMapState(name, NAMESPACE, api_client=kube.admin)
    reader = ConfigMapState(name, NAMESPACE, api_client=kube.admin).watch()
    try:
        assert reader.read().versions == {}
        lags = []
        for number in (1, 2, 3):
            written_at = time.monotonic()
            writer.update(lambda s, n=number: s.with_version(spec(n)))
            wait_until(lambda n=number: f"v{n}" in reader.read().versions, 30, f"the watch delivering v{number}")
            lags.append(time.monotonic() - written_at)
        print(f"watch lag per change: {[f'{lag * 1000:.0f} ms' for lag in lags]}")
        mark = kube.audit_mark()
        for _ in range(20):
            assert reader.read().revision == 3
        gets = [e for e in kube.audit_since(mark, "test-admin") if e["verb"] == "get" and e["objectRef"].get("name") == name]
        assert gets == []  # answered from the watch
        client.CoreV1Api(kube.admin).delete_namespaced_config_map(name, NAMESPACE)
        wait_until(lambda: reader.read().versions == {}, 30, "the watch delivering the deletion")
    finally:
        reader.close()


def test_the_app_serves_from_the_configmap_and_writes_to_it(kube, name, model_server, tmp_path, monkeypatch):
    """The app in the kubernetes runtime: no state file anywhere; a change a step makes to the
    ConfigMap is what the next request sees, and the operator API writes to it."""
    from embedding_rollout.config import Settings
    from embedding_rollout.store.lance import LanceStore
    from serving_app import AppServer, create_app
    from kube_cluster import KUBECONFIG
    for key, value in {"ER_STATE_BACKEND": "kubernetes", "ER_STATE_CONFIGMAP": name, "ER_K8S_NAMESPACE": NAMESPACE,
                       "KUBECONFIG": str(KUBECONFIG), "ER_HOME": str(tmp_path / "home"), "ER_STORE": "lance",
                       "ER_LANCE_URI": str(tmp_path / "lance")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    step = ConfigMapState(name, NAMESPACE, api_client=kube.admin)
    v1, v2 = spec_for(model_server, "v1", "docs-v1"), spec_for(model_server, "v2", "docs-v2")
    store = LanceStore(str(tmp_path / "lance"))
    for version in (v1, v2):
        store.create_index(version.index, version.dims, {"model_version": version.name})
    step.update(lambda s: verified(serving(s, v1), v2))
    server = AppServer(create_app(Settings())).start()  # the app as `embedding-rollout app` builds it
    try:
        assert requests.get(f"{server.url}/deployment", headers=OPERATE).json()["weights"] == {"v1": 100}
        step.update(lambda s: s.with_weights({"v1": 50, "v2": 50}))
        wait_until(lambda: requests.get(f"{server.url}/deployment", headers=OPERATE).json()["weights"] == {"v1": 50, "v2": 50}, 30,
                   "the app seeing the step's change")
        reply = requests.put(f"{server.url}/deployment/weights", headers=OPERATE, json={"weights": {"v1": 90, "v2": 10}})
        assert reply.status_code == 200, reply.text
        assert step.read().weights == {"v1": 90, "v2": 10}
        assert not (tmp_path / "home" / "state.json").exists()
    finally:
        server.stop()


def test_records_beside_the_state_keep_it_and_a_checkpoint_is_written_at_a_pace(kube, name):
    """A backfill's checkpoint is a key of the state's ConfigMap: writing it keeps the state (and
    the state's updates keep it); between two writes at least ``min_interval`` passes, except the
    final one (done), so a load of many batches is not one etcd write per batch."""
    from embedding_rollout.pipeline.indexing import Checkpoint
    from embedding_rollout.statestore.records import ConfigMapSlot
    state = ConfigMapState(name, NAMESPACE, api_client=kube.admin)
    state.update(lambda s: s.with_version(spec(1)))
    slot = ConfigMapSlot(state, "backfill.v2.from.v1.json", min_interval=3600)
    mark = kube.audit_mark()
    for n in range(1, 6):  # five batches: only the first is written, then the final one
        Checkpoint("docs-v2", last_id=f"doc-{n}", loaded=n).save(slot)
    Checkpoint("docs-v2", last_id="doc-5", loaded=5, done=True).save(slot)
    updates = [e for e in kube.audit_since(mark, "test-admin") if e["verb"] == "update" and e["objectRef"].get("name") == name]
    assert len(updates) == 2
    assert Checkpoint.load(slot, "docs-v2") == Checkpoint("docs-v2", last_id="doc-5", loaded=5, done=True)
    assert Checkpoint.load(slot, "docs-v3") == Checkpoint("docs-v3")  # another index's: starts over
    state.update(lambda s: s.with_version(spec(2)))
    assert Checkpoint.load(slot, "docs-v2").done and set(state.read().versions) == {"v1", "v2"}


def test_decisions_appended_by_app_pods_at_once_get_unique_ids(kube, name):
    """Several app pods take decisions at the same moment: each append is a compare-and-swap (a
    real 409 is applied again), so no decision is lost and no id is given twice; a watching pod
    reads them all."""
    from embedding_rollout.domain.decisions import InvalidDecision
    from embedding_rollout.statestore.records import ConfigMapDecisionLog
    pods = [ConfigMapDecisionLog(ConfigMapState(name, NAMESPACE, api_client=kube.admin)) for _ in range(4)]
    with pytest.raises(InvalidDecision):
        pods[0].append("v2", "set_weights", 101)
    barrier, errors = threading.Barrier(len(pods)), []

    def decide(log, number):
        barrier.wait()
        try:
            for _ in range(3):
                log.append("v2", "set_weights", 10 * number, by=f"pod-{number}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=decide, args=(log, n)) for n, log in enumerate(pods)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    watching = ConfigMapDecisionLog(ConfigMapState(name, NAMESPACE, api_client=kube.admin).watch())
    try:
        wait_until(lambda: len(watching.read()) == 12, 30, "the watch delivering every decision")
        decisions = watching.read("v2")
        assert [d.id for d in decisions] == list(range(1, 13))
        assert sorted(d.by for d in decisions) == sorted(f"pod-{n}" for n in range(4) for _ in range(3))
        assert watching.read("v3") == [] and watching.read(since=decisions[-1].at) == [decisions[-1]]
    finally:
        watching.state.close()
