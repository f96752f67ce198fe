"""A local stack for deployment tests: models, model server, v1 deployed, the app, live traffic."""
from __future__ import annotations

import gzip
import random
import shutil
from pathlib import Path

from embedding_rollout import steps
from embedding_rollout.config import Settings
from embedding_rollout.corpus import corpus_path
from embedding_rollout.domain.state import StateFile
from embedding_rollout.generator.models import ModelManager
from embedding_rollout.generator.server import ModelServer
from embedding_rollout.loadgen import Traffic, TrafficRecord, verify_consistency
from embedding_rollout.store import open_store
from serving_app import AppServer, create_app


def small_corpus(path: Path, documents: int, seed: int = 7) -> Path:
    """A seeded sample of the corpus (ids with '~' among them), for a deployment that loads fast."""
    with gzip.open(corpus_path(), "rt") as source, gzip.open(path, "wt") as subset:
        lines = [line for _, line in zip(range(documents * 20), source)]
        for line in random.Random(seed).sample(lines, documents):
            subset.write(line)
    return path


class LocalDeployment:
    """ER_* settings in os.environ (step commands inherit them; ``env`` holds them for processes
    started elsewhere, e.g. Airflow's), servers on ephemeral ports. ``monkeypatch`` (or anything with
    its ``setenv``) undoes the environment afterwards."""

    def __init__(self, home, model_repo, monkeypatch, store: str = "lance", es_url: str = "",
                 index_prefix: str = "docs"):
        models = home / "models" / "embedder"
        for number in (1, 2):
            shutil.copytree(model_repo / str(number), models / str(number))
        manager = ModelManager("embedder", models)
        manager.serve([1])
        self.model_server = ModelServer(manager, rest_port=0, grpc_port=0).start()
        self.env = {"ER_HOME": str(home), "ER_STORE": store,
                    "ER_GENERATOR_GRPC": f"127.0.0.1:{self.model_server.grpc_port}",
                    "ER_GENERATOR_REST": f"http://127.0.0.1:{self.model_server.rest_port}",
                    "ER_AIRFLOW_RUNTIME": "local", "ER_INDEX_PREFIX": index_prefix,
                    **({"ER_ES_URL": es_url} if es_url else {})}
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        self.settings = Settings()
        steps.bootstrap(self.settings, "v1")
        self.app = AppServer(create_app(self.settings)).start()
        self.env["ER_APP_URL"] = self.app.url
        monkeypatch.setenv("ER_APP_URL", self.app.url)
        self.state = StateFile(self.settings.state_path)

    def stop(self, drop_indices: bool = False) -> None:
        """Stop the servers; with ``drop_indices``, drop this deployment's indices too (on a shared
        Elasticsearch server, where a test's indices would otherwise outlive it)."""
        self.app.stop()
        self.model_server.stop()
        if drop_indices:
            store = open_store(self.settings)
            for index in store.indices():
                if index.startswith(self.settings.index_prefix):
                    store.drop_index(index)


# About 15 requests a second: plenty for every analysis window, while a test's traffic does not
# take a whole core from the scheduler and the other tests running beside it.
TEST_TRAFFIC_PAUSE = 0.05


def traffic(deployment: "LocalDeployment", **kwargs) -> Traffic:
    return Traffic(deployment.app.url, lambda: deployment.state.read().weights,
                   **{"pause": TEST_TRAFFIC_PAUSE, **kwargs})


def check_version_consistency(deployment: LocalDeployment, record: TrafficRecord) -> int:
    checked, mismatches = verify_consistency(record, deployment.settings.model_dir)
    assert mismatches == []
    return checked


def assert_changed_only_by_streaming(store, index: str, before: dict[str, int], record: TrafficRecord) -> None:
    """The index holds what it held before, except the documents the live traffic wrote or deleted."""
    after = {d.id: d.seq for d in store.scan(index)}
    touched = set(record.written) | set(record.deleted)
    assert {k: v for k, v in after.items() if k not in touched} == {k: v for k, v in before.items() if k not in touched}
    assert all(after[d] == seq for d, seq in record.written.items())
