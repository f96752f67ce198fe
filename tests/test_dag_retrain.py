"""embedding_retrain_deploy: trains the next version, refuses a worse one, triggers the rollout."""
from __future__ import annotations

import pytest

from rollout_harness import LocalDeployment


@pytest.fixture
def deployment(tmp_path, model_repo, monkeypatch):
    deployment = LocalDeployment(tmp_path / "home", model_repo, monkeypatch)
    yield deployment
    deployment.stop()


def _triggered(dag_id: str):
    from airflow.models.dagrun import DagRun
    return DagRun.find(dag_id=dag_id)


@pytest.mark.parametrize("min_improvement,deploys", [(-1.0, True), (1.0, False)])
def test_retrain_evaluates_and_triggers_only_a_model_that_is_not_worse(dagbag, deployment, min_improvement, deploys):
    from airflow.utils.state import DagRunState, TaskInstanceState
    before = {r.run_id for r in _triggered("embedding_deploy_ramped")}
    run = dagbag.get_dag("embedding_retrain_deploy").test(run_conf={
        "epochs": 1, "dims": 24, "min_improvement": min_improvement, "step_interval_seconds": 5})
    assert run.state == DagRunState.SUCCESS
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    model = deployment.settings.model_dir / "3"
    assert (model / "saved_model.pb").exists() and (model / "assets.extra" / "evaluation.json").exists()
    new_runs = [r for r in _triggered("embedding_deploy_ramped") if r.run_id not in before]
    if deploys:
        assert states["trigger_ramped_deployment"] == TaskInstanceState.SUCCESS
        assert [r.conf["new_version"] for r in new_runs] == ["v3"] and new_runs[0].conf["step_interval_seconds"] == 5
    else:
        assert states["trigger_ramped_deployment"] == TaskInstanceState.SKIPPED and not new_runs
