"""The model server speaks TF Serving's REST and gRPC APIs; the client works over both."""
from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import requests

from conftest import target
from embedding_rollout.generator.admin import ModelServerAdmin
from embedding_rollout.generator.client import (GeneratorError, GeneratorTarget, GeneratorUnavailable,
                                                generator_client)
from embedding_rollout.generator.models import ModelManager
from embedding_rollout.generator.server import ModelServer
from embedding_rollout.model.repository import read_evaluation

TEXTS = ["asyncio event loop", "Fix a reference leak in the C API.", "IDLE now highlights f-strings", ""]


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_client_embeds_with_unit_vectors_of_the_versions_size(model_server, protocol):
    for version, dims in (("v1", 32), ("v2", 48)):
        client = generator_client(target(model_server, version), protocol=protocol, batch_size=3)
        vectors = client.embed(TEXTS * 5)  # 20 texts in batches of 3
        assert vectors.shape == (20, dims)
        assert np.allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, atol=1e-5)
        assert client.status() == "AVAILABLE"


def test_grpc_and_rest_give_the_same_vectors(model_server):
    grpc_vectors = generator_client(target(model_server, "v2"), protocol="grpc").embed(TEXTS)
    rest_vectors = generator_client(target(model_server, "v2"), protocol="rest").embed(TEXTS)
    assert np.allclose(grpc_vectors, rest_vectors, atol=1e-5)


def test_the_two_versions_are_different_models(model_server, model_repo):
    v1 = generator_client(target(model_server, "v1")).embed(TEXTS[:3])
    v2 = generator_client(target(model_server, "v2")).embed(TEXTS[:3])
    assert v1.shape[1] != v2.shape[1]
    for number, until in ((1, "2019-01-01"), (2, None)):
        evaluation = read_evaluation(model_repo / str(number))
        assert evaluation["trained_until"] == until
        assert 0.05 < evaluation["recall@10"] <= 1.0  # far above chance (~0.001)


def test_rest_api_matches_tf_serving(model_server):
    base = f"http://127.0.0.1:{model_server.rest_port}/v1/models/embedder"
    status = requests.get(f"{base}/versions/2").json()
    assert status == {"model_version_status": [{"version": "2", "state": "AVAILABLE",
                                                "status": {"error_code": "OK", "error_message": ""}}]}
    rows = requests.post(f"{base}/versions/1:predict", json={"instances": ["a b", "c"]}).json()
    assert len(rows["predictions"]) == 2 and len(rows["predictions"][0]) == 32
    columnar = requests.post(f"{base}/versions/1:predict", json={"inputs": {"text": ["a b", "c"]}}).json()
    assert np.allclose(columnar["outputs"], rows["predictions"], atol=1e-6)
    latest = requests.post(f"{base}:predict", json={"instances": ["x"]}).json()
    assert len(latest["predictions"][0]) == 48  # no version: the latest served one
    metadata = requests.get(f"{base}/versions/1/metadata").json()
    assert "text" in metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/models/embedder/versions/9:predict", {"instances": ["x"]}, 404, "Servable not found"),
    ("/v1/models/nope:predict", {"instances": ["x"]}, 404, "nope"),
    ("/v1/models/embedder/versions/1:predict", {"rows": ["x"]}, 400, "instances"),
    ("/v1/models/embedder/versions/1:predict", {"instances": [1, 2]}, 400, "strings"),
    ("/v1/models/embedder/versions/1:predict", {"signature_name": "other", "instances": ["x"]}, 400, "other"),
])
def test_rest_errors_look_like_tf_serving(model_server, path, body, status, message):
    reply = requests.post(f"http://127.0.0.1:{model_server.rest_port}{path}", data=json.dumps(body))
    assert reply.status_code == status and message in reply.json()["error"]
    bad_json = requests.post(f"http://127.0.0.1:{model_server.rest_port}{path}", data="{not json")
    assert bad_json.status_code in (400, 404) and "error" in bad_json.json()


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_unknown_version_is_an_error_not_a_retry_loop(model_server, protocol):
    client = generator_client(target(model_server, "v7"), protocol=protocol)
    with pytest.raises(GeneratorError, match="not found|Servable"):
        client.embed(["x"])


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_unreachable_generator_fails_fast_with_unavailable(protocol):
    client = generator_client(GeneratorTarget("v1", "127.0.0.1:9", "http://127.0.0.1:9"), protocol=protocol,
                              timeout=1.0)
    started = time.monotonic()
    with pytest.raises(GeneratorUnavailable, match="v1"):
        client.embed(["x"])
    assert time.monotonic() - started < 3.0


def test_loading_a_version_at_run_time_does_not_fail_requests_to_the_old_one(model_repo, tmp_path):
    """Serve v1 only, keep querying it from a thread, load v2 through HandleReloadConfigRequest."""
    repo = tmp_path / "embedder"
    repo.mkdir()
    shutil.copytree(model_repo / "1", repo / "1")
    manager = ModelManager("embedder", repo)
    manager.serve([1])
    server = ModelServer(manager, rest_port=0, grpc_port=0).start()
    try:
        address = f"127.0.0.1:{server.grpc_port}"
        admin = ModelServerAdmin(address, "embedder", str(repo))
        assert admin.statuses() == {1: "AVAILABLE"}
        clients = [generator_client(GeneratorTarget("v1", address, f"http://127.0.0.1:{server.rest_port}"), protocol=p)
                   for p in ("grpc", "rest")]
        failures, calls, stop = [], [0], threading.Event()

        def traffic():
            while not stop.is_set():
                for client in clients:
                    try:
                        client.embed(["still serving"])
                        calls[0] += 1
                    except Exception as exc:  # any failure is what this test looks for
                        failures.append(exc)

        worker = threading.Thread(target=traffic)
        worker.start()
        time.sleep(0.3)
        shutil.copytree(model_repo / "2", repo / "2")  # a new version lands in the repository
        admin.load(2)
        v2 = generator_client(GeneratorTarget("v2", address), protocol="grpc").embed(["new"])
        admin.unload(2)
        time.sleep(0.3)
        stop.set()
        worker.join()
        assert not failures and calls[0] > 10
        assert v2.shape == (1, 48)
        assert admin.statuses() == {1: "AVAILABLE", 2: "END"}
        with pytest.raises(GeneratorError):
            generator_client(GeneratorTarget("v2", address), protocol="grpc").embed(["gone"])
    finally:
        server.stop()


def test_two_deploys_at_once_keep_each_others_version(model_repo, tmp_path):
    """Two deploy steps (two processes, two admins) change the served set at the same moment: a
    reload lists every version to serve, so each must see the other's, even while it loads."""
    repo = tmp_path / "embedder"
    repo.mkdir()
    for number in (1, 2):
        shutil.copytree(model_repo / str(number), repo / str(number))
    shutil.copytree(model_repo / "1", repo / "3")
    manager = ModelManager("embedder", repo)
    manager.serve([1])
    server = ModelServer(manager, rest_port=0, grpc_port=0).start()
    try:
        address = f"127.0.0.1:{server.grpc_port}"
        lock = tmp_path / "model-server.lock"
        for round_ in range(3):
            admins = [ModelServerAdmin(address, "embedder", str(repo), lock_path=lock) for _ in range(2)]
            start, errors = threading.Barrier(2), []

            def deploy(admin, number):
                start.wait()
                try:
                    admin.load(number)
                except GeneratorError as exc:
                    errors.append((number, exc))

            threads = [threading.Thread(target=deploy, args=(a, n)) for a, n in zip(admins, (2, 3))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == [] and admins[0].served() == [1, 2, 3], (round_, errors, admins[0].statuses())
            for number in (2, 3):
                admins[0].unload(number)
    finally:
        server.stop()


def test_a_broken_version_is_reported_not_served(model_repo, tmp_path):
    repo = tmp_path / "embedder"
    (repo / "3").mkdir(parents=True)
    (repo / "3" / "saved_model.pb").write_bytes(b"not a model")
    manager = ModelManager("embedder", repo)
    manager.serve([3])
    server = ModelServer(manager, rest_port=0, grpc_port=0).start()
    try:
        admin = ModelServerAdmin(f"127.0.0.1:{server.grpc_port}", "embedder", str(repo), timeout=5)
        assert admin.statuses() == {3: "END"}
        status = requests.get(f"http://127.0.0.1:{server.rest_port}/v1/models/embedder/versions/3").json()
        assert "failed to load" in status["model_version_status"][0]["status"]["error_message"]
        with pytest.raises(GeneratorError, match="not AVAILABLE|failed"):
            admin.load(3)
    finally:
        server.stop()


def test_injected_faults_fail_predict_calls(model_server):
    model_server.manager.set_fault_rate(1, 1.0)
    try:
        with pytest.raises(GeneratorError, match="INTERNAL|injected"):
            generator_client(target(model_server, "v1")).embed(["x"])
    finally:
        model_server.manager.set_fault_rate(1, 0.0)
    assert generator_client(target(model_server, "v1")).embed(["x"]).shape == (1, 32)
