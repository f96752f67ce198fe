"""Each deployment step SIGKILLed at a seeded point, then run again as a task's retry runs it: the
rollout converges (every step's effect once, each version in the right phase, the new index
equal to the old one) and the index settings are restored. On LanceDB and on the real
Elasticsearch server, one seed each here (more: ``bench/data_soak.py``); the backfill's own
kills, ten seeds per backend, are in ``test_write_races.py``."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest

from conftest import ES_URL, elasticsearch_store
from embedding_rollout import steps
from embedding_rollout.pipeline.indexing import Checkpoint
from embedding_rollout.store import open_store
from rollout_harness import LocalDeployment, small_corpus

DRAIN_SECONDS = 2.0
SEEDS = ([(store, seed) for store in ("lance", "elasticsearch") for seed in range(int(os.environ["ER_KILL_SEEDS"]))]
         if os.environ.get("ER_KILL_SEEDS") else [("lance", 0), ("elasticsearch", 1)])


@pytest.fixture
def deployment(request, tmp_path, model_repo, monkeypatch):
    if request.param == "elasticsearch":
        elasticsearch_store()  # fails in CI, skips elsewhere, when the server is not running
    monkeypatch.setenv("ER_CORPUS", str(small_corpus(tmp_path / "corpus.jsonl.gz", 400)))
    monkeypatch.setenv("ER_DRAIN_SECONDS", str(DRAIN_SECONDS))
    deployment = LocalDeployment(tmp_path / "home", model_repo, monkeypatch, store=request.param, es_url=ES_URL,
                                 index_prefix=f"kill-{uuid.uuid4().hex[:8]}")
    yield deployment
    deployment.stop(drop_indices=True)


def killed_then_run_again(deployment, arguments: list[str], reached: Callable[[], str | None],
                          rng: random.Random) -> str:
    """Run ``embedding-rollout <arguments>``; SIGKILL it once ``reached()`` names the point it got
    to (plus a seeded moment more); run it again to the end. Returns where the kill landed."""
    command = [sys.executable, "-m", "embedding_rollout.cli", *arguments]
    env = {**os.environ, **deployment.env, "ER_GENERATOR_PROTOCOL": "rest"}  # no TensorFlow to import: starts fast
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    point = "after it ended"
    while first.poll() is None:
        where = reached()
        if where:
            time.sleep(rng.uniform(0, 0.3))
            first.send_signal(signal.SIGKILL)
            point = where
            break
        time.sleep(0.01)
    first.wait()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (point, again.stderr[-3000:])
    return point


def phases(deployment) -> dict[str, str]:
    return {name: spec.phase for name, spec in deployment.state.read().versions.items()}


def assert_serving_settings(deployment, index: str) -> None:
    """After a bulk load, killed or not, the index takes writes at serving settings again."""
    settings = deployment.settings
    if settings.store != "elasticsearch":
        return
    held = open_store(settings).client.indices.get_settings(index=index)
    (concrete,) = held.values()
    assert concrete["settings"]["index"].get("refresh_interval", "1s") != "-1", concrete
    assert concrete["settings"]["index"]["number_of_replicas"] == str(settings.es_replicas)


@pytest.mark.parametrize("deployment,seed", SEEDS, indirect=["deployment"])
def test_every_step_killed_at_a_seeded_point_converges_when_run_again(deployment, seed):
    rng = random.Random(seed)
    settings, manager = deployment.settings, deployment.model_server.manager
    store = open_store(settings)
    landed = {}

    def deploying():  # the model server was told to load v2: the index and the state come after
        return f"v2's generator {manager.status(2).state}" if manager.status(2).state != "UNKNOWN" else None

    landed["deploy"] = killed_then_run_again(deployment, ["deploy", "--version", "v2", "--run-id", f"kill-{seed}"],
                                             deploying, rng)
    assert phases(deployment) == {"v1": "stable", "v2": "deployed"}
    assert manager.status(2).state == manager.status(1).state == "AVAILABLE"
    assert settings.index_name("v2") in store.indices()

    steps.start_dual_write(settings, "v2")
    checkpoint = steps.checkpoint_path(settings, "v2", "v1")
    threshold = rng.randrange(1, 400 // 32) * 32

    def loading():
        progress = Checkpoint.load(checkpoint, settings.index_name("v2"))
        return f"the load after {progress.loaded} documents" if progress.loaded >= threshold else None

    landed["index load"] = killed_then_run_again(
        deployment, ["index", "load", "--version", "v2", "--source", "v1", "--batch-size", "32"], loading, rng)
    assert_serving_settings(deployment, settings.index_name("v2"))
    assert phases(deployment)["v2"] == "backfilled"

    started = time.monotonic()
    wait = rng.uniform(0.5, 4.0)  # verify's passes have no outside sign: a seeded moment of its run
    landed["index verify"] = killed_then_run_again(
        deployment, ["index", "verify", "--version", "v2", "--source", "v1"],
        lambda: f"{wait:.1f} s in" if time.monotonic() - started > wait else None, rng)
    assert phases(deployment)["v2"] == "verified"

    steps.set_weights(settings, {"v1": 0, "v2": 100})
    started, wait = time.monotonic(), rng.uniform(0.5, 4.0)
    landed["promote"] = killed_then_run_again(
        deployment, ["promote", "--version", "v2"],
        lambda: f"{wait:.1f} s in" if time.monotonic() - started > wait else None, rng)
    assert phases(deployment) == {"v1": "live", "v2": "stable"}
    assert deployment.state.read().spec("v2").verification["complete"]

    def removing():  # v1 left routing and the write targets and is draining
        return "v1 draining" if phases(deployment).get("v1") == "retired" else None

    landed["remove"] = killed_then_run_again(deployment, ["remove", "--version", "v1"], removing, rng)
    state = deployment.state.read()
    assert phases(deployment) == {"v2": "stable"} and state.write_targets == ("v2",) and state.weights == {"v2": 100}
    assert settings.index_name("v1") not in store.indices()
    assert manager.status(1).state in ("END", "UNKNOWN") and manager.status(2).state == "AVAILABLE"
    assert_serving_settings(deployment, settings.index_name("v2"))
    print(f"\nseed {seed} ({settings.store}): killed {landed}")
