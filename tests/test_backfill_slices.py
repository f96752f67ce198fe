"""A backfill in three slices, each the real step command in its own process, all at once, while
writers change documents through the app; one slice SIGKILLed part way and run again, as Airflow
retries a mapped task. Every slice completes and the new index equals the old one, document by
document (missing, behind, extra, duplicated: none), on LanceDB and on the real Elasticsearch."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from conftest import ES_URL, WRITE, elasticsearch_store
from embedding_rollout import steps
from embedding_rollout.pipeline.indexing import Checkpoint
from embedding_rollout.store import open_store
from rollout_harness import LocalDeployment, small_corpus

DOCUMENTS = 3000
SLICES = 3
BATCH = 32


@pytest.fixture(params=["lance", "elasticsearch"])
def deployment(request, tmp_path, model_repo, monkeypatch):
    if request.param == "elasticsearch":
        elasticsearch_store()  # fails in CI, skips elsewhere, when the server is not running
    monkeypatch.setenv("ER_CORPUS", str(small_corpus(tmp_path / "corpus.jsonl.gz", DOCUMENTS)))
    deployment = LocalDeployment(tmp_path / "home", model_repo, monkeypatch, store=request.param, es_url=ES_URL,
                                 index_prefix=f"slices-{uuid.uuid4().hex[:8]}")
    yield deployment
    deployment.stop(drop_indices=True)


class LiveWrites(threading.Thread):
    """Updates and deletes through the app's HTTP API for as long as the backfill runs."""

    def __init__(self, url: str, ids: list[str], seed: int):
        super().__init__(daemon=True)
        self.url, self.ids, self.rng = url, ids, random.Random(seed)
        self.stopped, self.acknowledged, self.errors = threading.Event(), 0, []

    def run(self) -> None:
        version = 1_000
        while not self.stopped.is_set():
            version += 1
            doc_id = self.rng.choice(self.ids)
            if self.rng.random() < 0.2:
                reply = requests.delete(f"{self.url}/documents/{doc_id}", params={"version": version},
                                        headers=WRITE, timeout=30)
            else:
                reply = requests.put(f"{self.url}/documents/{doc_id}", headers=WRITE, timeout=30,
                                     json={"version": version, "title": f"edited {version}", "text": "changed",
                                           "category": "live", "date": "2024-02-02"})
            if reply.status_code == 200:
                self.acknowledged += 1
            elif reply.status_code != 503:  # a busy store: the next write goes on
                self.errors.append(f"{reply.status_code} {reply.text[:200]}")


def test_three_slices_one_killed_and_run_again_complete_with_the_index_exact(deployment):
    settings = deployment.settings
    store = open_store(settings)
    steps.deploy_version(settings, "v2")
    steps.start_dual_write(settings, "v2")
    plan = steps.plan_backfill(settings, "v2", "v1", SLICES)
    assert plan.slices == SLICES and len(plan.points) == SLICES - 1
    assert steps.plan_backfill(settings, "v2", "v1", SLICES) == plan  # a retried plan keeps its ranges

    ids = [d.id for d in store.scan(settings.index_name("v1"))]
    writes = LiveWrites(deployment.app.url, ids, seed=3)
    writes.start()
    env = {**os.environ, **deployment.env, "ER_GENERATOR_PROTOCOL": "rest"}

    def command(number: int) -> list[str]:
        return [sys.executable, "-m", "embedding_rollout.cli", "index", "load", "--version", "v2", "--source", "v1",
                "--slice", str(number), "--batch-size", str(BATCH)]

    running = {k: subprocess.Popen(command(k), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for k in range(1, SLICES + 1)}
    victim = 2
    slot = steps.checkpoint_slot(settings, "v2", "v1", part=steps.slice_part(victim, plan))
    while running[victim].poll() is None:  # the kill lands once the slice has written some batches
        progress = Checkpoint.load(slot, settings.index_name("v2"), plan.range(victim))
        if progress.loaded >= 3 * BATCH:
            running[victim].send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    killed = running[victim].wait()
    interrupted = Checkpoint.load(slot, settings.index_name("v2"), plan.range(victim))
    assert killed == -signal.SIGKILL and not interrupted.done, "the slice ended before the kill"
    assert steps.state_file(settings).read().phase("v2") == "dual-writing"  # not backfilled with a slice missing
    finish = [sys.executable, "-m", "embedding_rollout.cli", "index", "finish", "--version", "v2", "--source", "v1"]
    early = subprocess.run(finish, env=env, capture_output=True, text=True, timeout=600)
    named = re.search(rf"slice\(s\) ([\d, ]+) of {SLICES} not done", early.stderr)  # the others may still run
    assert early.returncode != 0 and named and str(victim) in named.group(1).split(", "), early.stderr[-3000:]
    assert steps.state_file(settings).read().phase("v2") == "dual-writing"

    again = subprocess.run(command(victim), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for number, process in running.items():
        if number != victim:
            assert process.wait(timeout=600) == 0, process.stderr.read().decode()[-3000:]
    writes.stopped.set()
    writes.join()
    assert writes.acknowledged > 0 and not writes.errors, writes.errors[:5]

    resumed = Checkpoint.load(slot, settings.index_name("v2"), plan.range(victim))
    assert resumed.done and resumed.last_id is not None and resumed.loaded >= interrupted.loaded
    assert steps.state_file(settings).read().phase("v2") == "dual-writing"  # the load ends in a step of its own
    for _ in range(2):  # a retried finish changes nothing
        finished = subprocess.run(finish, env=env, capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, finished.stderr[-3000:]
        assert json.loads(finished.stdout)["slices"] == SLICES
        assert steps.state_file(settings).read().phase("v2") == "backfilled"
    report = steps.verify(settings, "v2", "v1")  # repairs what a write that missed v2 left, as the step does
    assert report.complete, report
    assert report.duplicated == 0 and report.checked == report.target_checked
    assert store.count(settings.index_name("v2")) == store.count(settings.index_name("v1"))
    assert steps.state_file(settings).read().phase("v2") == "verified"
    if settings.store == "elasticsearch":  # the finish put the serving settings back
        held = store.client.indices.get_settings(index=settings.index_name("v2"))
        (concrete,) = held.values()
        assert concrete["settings"]["index"].get("refresh_interval", "1s") != "-1", concrete
