"""Roll out a new embedding model version as an A/B experiment, until promote or rollback."""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.hitl import HITLBranchOperator
from airflow.sdk import dag, task

from embedding_rollout_airflow.conf import ab_params
from embedding_rollout_airflow.graph import (CONF, CURRENT, NEW, THRESHOLDS, conclude, prepare_new_version,
                                             promote_and_remove_old)
from embedding_rollout_airflow.operators.istio import IstioWeightOperator, router_hook
from embedding_rollout_airflow.runtime import Runtime
from embedding_rollout_airflow.sensors.decision import AwaitDecisionSensor
from embedding_rollout_airflow.tasks import ASK_AGAIN_ONCE, rollback_chosen_task

DOC = """
### A/B rollout of a new embedding model version

Steps 1-3 as in the ramped rollout (deploy, dual-write, backfill until complete), then an
**initial split** (`initial_weight` % to the new version) and **decisions** until promote or
rollback:

- `decision_source: messages` — `POST /rollout/decisions` on the app with
  `{"new_version": "v2", "action": "set_weights", "weight": 30}` (the split changes at once and the
  experiment goes on), `"action": "promote"` or `"action": "rollback"`;
- `decision_source: ui` — a person answers *Promote* or *Rollback* in the Airflow UI (Required
  actions), a human-in-the-loop branch;
- `decision_source: auto` — the versions' online metrics (error rate, p99) and click-through
  (`POST /feedback`) decide, with a one-sided two-proportion z-test.

No decision within `decision_timeout_seconds`: rollback. Promote ramps the new version to 100 %,
makes it stable and removes the old one; rollback sends all traffic back and removes the new one.
As in the ramped rollout, `begin_rollout` takes the deployment for the run and the teardowns
(`conclude_rollout`, `finish_rollout`) roll back whatever did not complete, also when a person
marks the run failed.
"""


@dag(dag_id="embedding_deploy_ab", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
     catchup=False, max_active_runs=1, params=ab_params(), doc_md=DOC,
     tags=["embedding-rollout", "deploy", "ab-test"], render_template_as_native_obj=True)
def embedding_deploy_ab():
    conf, prepare = prepare_new_version("ab")

    @task(doc_md="The experiment's first split; returns when it started and the metrics then (the baseline).")
    def initial_split(conf: dict, ti=None) -> dict:
        import time

        runtime = Runtime()
        weight = conf["initial_weight"]
        mark = runtime.metrics_source().mark()
        router_hook(runtime).set_weights({conf["new_version"]: weight, conf["current_version"]: 100 - weight},
                                         run_id=ti.run_id)
        return {"at": time.time(), "mark": mark}

    split = initial_split(conf)

    @task.branch(doc_md="Who decides: messages and automatic decisions wait deferred, a person in the UI.")
    def decision_source(conf: dict) -> str:
        return "ask_a_person" if conf["decision_source"] == "ui" else "await_decision"

    source = decision_source(conf)
    await_decision = AwaitDecisionSensor(
        task_id="await_decision", new_version=NEW, stable_version=CURRENT,
        source="{{ params.decision_source }}", thresholds=THRESHOLDS,
        split="{{ ti.xcom_pull(task_ids='initial_split') }}", min_feedback="{{ params.min_feedback }}",
        decision_timeout="{{ params.decision_timeout_seconds }}", poke_interval=15, timeout=31 * 86400,
        doc_md="Apply weight decisions as they come; done at promote or rollback, or rollback at the timeout.")
    ask_a_person = HITLBranchOperator(
        task_id="ask_a_person", subject="Promote {{ params.new_version }}?",
        body="{{ params.new_version }} serves {{ params.initial_weight }} %% of the traffic next to "
             "{{ %s['current_version'] }}. Compare them on the app's /metrics, then decide." % CONF,
        options=["Promote", "Rollback"], defaults=["Rollback"], response_timeout=timedelta(hours=24),
        options_mapping={"Promote": "promote_to_all", "Rollback": "rollback_decided"},
        doc_md="A person decides in the Airflow UI; no answer in 24 h: Rollback.",
        **ASK_AGAIN_ONCE)

    @task.branch(doc_md="Promote or rollback, as decided (a timeout decides rollback).")
    def decide(ti=None) -> str:
        decision = ti.xcom_pull(task_ids="await_decision")
        return "promote_to_all" if decision["action"] == "promote" else "rollback_decided"

    decided = decide()
    promote_to_all = IstioWeightOperator(task_id="promote_to_all", weights='{"%s": 100, "%s": 0}' % (NEW, CURRENT),
                                         rollout_run_id="{{ run_id }}", trigger_rule="none_failed_min_one_success",
                                         doc_md="All traffic to the new version.")
    rollback_decided = rollback_chosen_task(
        "rollback_decided", fail_run=False,
        doc_md="The decision was rollback: the rollout is aborted, the teardown sends all traffic back and removes "
               "the new version; the experiment's run succeeds.")
    promote, remove_old = promote_and_remove_old()
    prepare[-1] >> split >> source >> [await_decision, ask_a_person]
    await_decision >> decided >> [promote_to_all, rollback_decided]
    ask_a_person >> [promote_to_all, rollback_decided]
    promote_to_all >> promote
    conclude(conf, [remove_old, rollback_decided], decided_rollback="rollback_decided")


embedding_deploy_ab()
