"""embedding_retrain_deploy as users run it: a better model triggers a ramped rollout that the
scheduler runs to the end; an equal one is refused, with the reason."""
from __future__ import annotations

import json

import pytest

from embedding_rollout.domain.rollout import SUCCEEDED
from embedding_rollout.domain.versions import parse_version, version_label

pytestmark = pytest.mark.slow
DAG, RAMPED = "embedding_retrain_deploy", "embedding_deploy_ramped"
# Better than the tests' one-epoch models; trained the same way twice, it scores the same.
RETRAIN = {"epochs": 2, "dims": 32, "step_percent": 50, "step_interval_seconds": 12}


def next_label(live) -> str:
    trained = [int(p.name) for p in live.deployment.settings.model_dir.iterdir() if p.name.isdigit()]
    return version_label(max(trained) + 1)


def test_a_better_model_is_rolled_out(live):
    current, _ = live.versions()
    new = next_label(live)
    with live.traffic() as record:
        run_id = live.trigger(DAG, RETRAIN)
        run = live.wait(DAG, run_id)
        assert run["state"] == "success", live.explain(DAG, run_id)
        assert live.states(DAG, run_id)["trigger_ramped_deployment"] == "success"
        # The run it triggered, by the id the operator recorded (the newest by start_date may not
        # have started yet when the retrain run ends).
        triggered = live.api.xcom(DAG, run_id, "trigger_ramped_deployment", key="trigger_run_id")
        ramped = live.api.run(RAMPED, triggered)
        assert ramped["conf"]["new_version"] == new and ramped["conf"]["step_interval_seconds"] == 12
        finished = live.wait(RAMPED, ramped["dag_run_id"])
    assert finished["state"] == "success", live.explain(RAMPED, ramped["dag_run_id"])
    assert record.failures == []
    live.assert_serving_only(new)
    assert live.state().rollout.phase == SUCCEEDED
    assert {r["version"] for r in record.responses} >= {current, new}


def test_an_equal_model_is_refused_with_the_reason(live):
    current, _ = live.versions()
    new = next_label(live)
    before = [r["dag_run_id"] for r in live.api.runs(RAMPED)]
    run_id = live.trigger(DAG, RETRAIN)  # the same data and settings as the live model: no better
    run = live.wait(DAG, run_id)
    assert run["state"] == "success", live.explain(DAG, run_id)
    states = live.states(DAG, run_id)
    assert states["refuse_candidate"] == "success" and states["trigger_ramped_deployment"] == "skipped"
    assert [r["dag_run_id"] for r in live.api.runs(RAMPED)] == before  # nothing triggered
    log = live.log(DAG, run_id, "evaluate_against_live")
    assert f"refused: {new} recall@10" in log and "<=" in log, log[-2000:]
    refused = live.deployment.settings.model_dir / str(parse_version(new)) / "assets.extra" / "refused.json"
    assert "min_improvement" in json.loads(refused.read_text())["reason"]
    live.assert_serving_only(current)
