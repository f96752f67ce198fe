"""Invalid DAG conf is refused before anything changes, with a clear message."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from embedding_rollout.domain.state import StateFile, VersionSpec
from embedding_rollout.store.base import StoredDocument
from embedding_rollout.store.lance import LanceStore
from embedding_rollout_airflow.conf import InvalidConf, resolve_conf
from embedding_rollout_airflow.hooks.deployment import LocalDeploymentHook
from conftest import serving


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ER_HOME", str(tmp_path))
    (tmp_path / "models" / "embedder" / "2").mkdir(parents=True)
    (tmp_path / "models" / "embedder" / "2" / "saved_model.pb").write_bytes(b"model")
    StateFile(tmp_path / "state.json").update(
        lambda s: serving(s, VersionSpec("v1", 8, "docs-v1")))
    return tmp_path


BASE = {"new_version": "v2", "current_version": None, "model_artifact": None, "step_percent": 25,
        "weights": None, "max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 20, "backfill_slices": 3}


def test_a_valid_conf_is_resolved(home):
    conf = resolve_conf(BASE, LocalDeploymentHook())
    assert conf["current_version"] == "v1" and conf["plan"] == [25, 50, 75, 100]
    assert conf["model_artifact"].endswith("embedder/2") and conf["backfill_slices"] == 3
    assert resolve_conf({**BASE, "weights": [5, 50, 100]}, LocalDeploymentHook())["plan"] == [5, 50, 100]


def test_the_default_backfill_slices_come_from_the_current_index_and_its_absence_is_named(home, monkeypatch):
    from embedding_rollout.domain import slices
    with pytest.raises(InvalidConf, match="cannot count the documents of v1's index"):
        resolve_conf({**BASE, "backfill_slices": None}, LocalDeploymentHook())
    store = LanceStore(str(home / "lancedb"))
    store.create_index("docs-v1", 8, {"model_version": "v1"})
    store.bulk_write("docs-v1", [StoredDocument(f"d{i}", 1, {"title": "t"}, np.ones(8, np.float32)) for i in range(5)])
    assert resolve_conf({**BASE, "backfill_slices": None}, LocalDeploymentHook())["backfill_slices"] == 1
    monkeypatch.setattr(slices, "DOCS_PER_SLICE", 2)
    assert resolve_conf({**BASE, "backfill_slices": None}, LocalDeploymentHook())["backfill_slices"] == 3


@pytest.mark.parametrize("change,message", [
    ({"current_version": "v7"}, "current version v7 is not live"),
    ({"new_version": "v1"}, "is the current version"),
    ({"new_version": "v3"}, "model artifact for v3 not found"),
    ({"model_artifact": "/nowhere/model"}, "/nowhere/model has no saved_model.pb"),
    ({"weights": [50, 20, 100]}, "must not decrease"),
    ({"weights": [10, 50]}, "must end at 100"),
])
def test_semantic_problems_are_named(home, change, message):
    with pytest.raises(InvalidConf, match=message):
        resolve_conf({**BASE, **change}, LocalDeploymentHook())


def test_no_current_version_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("ER_HOME", str(tmp_path))
    with pytest.raises(InvalidConf, match="no current version"):
        resolve_conf(BASE, LocalDeploymentHook())


@pytest.fixture
def ramped(dagbag):
    return dagbag.get_dag("embedding_deploy_ramped")


@pytest.mark.parametrize("conf,message", [
    ({"new_version": "2"}, "does not match"),
    ({"new_version": "v2", "step_percent": 0}, "less than the minimum"),
    ({"new_version": "v2", "weights": [10, 120]}, "greater than the maximum"),
    ({"new_version": "v2", "max_error_rate": 2}, "greater than the maximum"),
    ({"new_version": "v2", "backfill_slices": 0}, "less than the minimum"),
    ({"new_version": "v2", "backfill_slices": 17}, "greater than the maximum"),
    ({}, "new_version"),
])
def test_the_trigger_form_refuses_malformed_conf(ramped, home, conf, message):
    from airflow.sdk.exceptions import ParamValidationError
    before = (home / "state.json").read_bytes()
    with pytest.raises(ParamValidationError, match=message):
        ramped.test(run_conf=conf)
    assert (home / "state.json").read_bytes() == before


def test_a_refused_conf_changes_nothing_and_rolls_nothing_back(ramped, home):
    from airflow.utils.state import DagRunState, TaskInstanceState
    before = (home / "state.json").read_bytes()
    run = ramped.test(run_conf={"new_version": "v2", "current_version": "v9"})
    assert run.state == DagRunState.FAILED
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["begin_rollout"] == TaskInstanceState.FAILED
    assert states["deploy_new_version"] == TaskInstanceState.UPSTREAM_FAILED
    # The setup failed, so the teardowns that would roll back do not run: nothing was taken.
    assert states["conclude_rollout"] != TaskInstanceState.SUCCESS
    assert (home / "state.json").read_bytes() == before


def test_a_refused_model_cannot_be_rolled_out(home):
    from embedding_rollout.model.repository import mark_refused
    (home / "models" / "embedder" / "2" / "assets.extra").mkdir()
    mark_refused(home / "models" / "embedder", "v2", "recall@10 0.41 <= v1 0.41 + min_improvement 0.01", 1.0)
    with pytest.raises(InvalidConf, match="model v2 was refused: recall@10 0.41"):
        resolve_conf(BASE, LocalDeploymentHook())


def test_every_dag_parses_and_documents_itself(dagbag):
    assert {"embedding_deploy_ramped", "embedding_deploy_ab", "embedding_retrain_deploy"} <= set(dagbag.dag_ids)
    for dag_id in dagbag.dag_ids:
        assert dagbag.get_dag(dag_id).doc_md


def test_the_rollout_tasks_run_inside_one_setup_teardown_scope(dagbag):
    """Whatever ends a run, the teardowns run (Airflow leaves them to run even when a person marks
    the run failed), and only the verdict decides the run's state."""
    for dag_id in ("embedding_deploy_ramped", "embedding_deploy_ab"):
        dag = dagbag.get_dag(dag_id)
        setup = dag.get_task("begin_rollout")
        teardowns = {t.task_id for t in dag.tasks if t.is_teardown}
        assert setup.is_setup and teardowns == {"conclude_rollout", "finish_rollout", "rollout_outcome"}
        work = {t.task_id for t in dag.tasks} - teardowns - {"begin_rollout"}
        assert work <= {t.task_id for t in setup.get_flat_relatives(upstream=False)}
        assert work <= {t.task_id for t in dag.get_task("conclude_rollout").get_flat_relatives(upstream=True)}
        assert [t.task_id for t in dag.tasks if t.is_teardown and t.on_failure_fail_dagrun] == ["rollout_outcome"]


def test_airflow_cli_parses_and_refuses_bad_conf(airflow_db, home):
    listed = subprocess.run([sys.executable, "-m", "airflow", "dags", "list", "--local", "-o", "plain"],
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "embedding_deploy_ramped" in listed.stdout
    errors = subprocess.run([sys.executable, "-m", "airflow", "dags", "list-import-errors", "--local", "-o", "plain"],
                            capture_output=True, text=True, timeout=300)
    assert errors.returncode == 0 and "No data found" in errors.stdout, errors.stdout
    refused = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", "embedding_deploy_ramped",
                              "-c", json.dumps({"new_version": "version-two"})],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "new_version" in refused.stdout + refused.stderr
