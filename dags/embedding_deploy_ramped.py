"""Roll out a new embedding model version with a ramped traffic shift (zero downtime)."""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.hitl import HITLBranchOperator
from airflow.sdk import dag, task

from embedding_rollout_airflow.conf import ramped_params
from embedding_rollout_airflow.graph import (CURRENT, NEW, THRESHOLDS, conclude, prepare_new_version,
                                             promote_and_remove_old)
from embedding_rollout_airflow.operators.istio import IstioWeightOperator
from embedding_rollout_airflow.operators.ramp import PASSED, ROLLBACK, RampOperator
from embedding_rollout_airflow.tasks import ASK_AGAIN_ONCE, rollback_chosen_task

DOC = """
### Ramped rollout of a new embedding model version

The five steps, each a task: **deploy** the new version next to the current one (generator serving
it, its index created) → **dual-write** streaming updates to both → **backfill** the new index with
every document re-embedded (progress, rate and ETA in the task log) and wait until the index is
verifiably complete → **shift traffic** in steps (`ramp`: `step_percent` every
`step_interval_seconds`, or an explicit `weights` list; after each step an analysis of error rate
and p99 against the stable version: Successful passes the step, Failed rolls back, Inconclusive
waits longer, then rolls back or asks a person) → **promote** and, after the rollback window,
**remove the old version**.

`begin_rollout` takes the deployment for this run (one rollout at a time); `conclude_rollout` and
`finish_rollout` run however the run ends: unless the rollout completed, all traffic goes back to
the current version and the new one is removed. Marking the run failed rolls it back the same way.
The current version's index is never touched by the rollout. Trigger with `{"new_version": "v2"}`;
the form documents every other setting. Each ramp step's weight, verdict and figures: the `ramp`
task's XCom (`step_1`, `step_2`, …) and log.
"""


@dag(dag_id="embedding_deploy_ramped", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
     catchup=False, max_active_runs=1, params=ramped_params(), doc_md=DOC,
     tags=["embedding-rollout", "deploy"], render_template_as_native_obj=True)
def embedding_deploy_ramped():
    conf, prepare = prepare_new_version("ramped")
    open_new = IstioWeightOperator(task_id="open_new_version", weights='{"%s": 100, "%s": 0}' % (CURRENT, NEW),
                                   rollout_run_id="{{ run_id }}",
                                   doc_md="The new version becomes live at 0 % (reachable by header only).")
    ramp = RampOperator(task_id="ramp", interval_seconds="{{ params.step_interval_seconds }}", thresholds=THRESHOLDS,
                        inconclusive_limit="{{ params.inconclusive_limit }}",
                        on_inconclusive="{{ params.on_inconclusive }}",
                        doc_md="Step 4: each step sets the weight, waits its interval (deferred) and judges the new "
                               "version; XCom step_<n> holds each step's weight, verdict and figures.")

    @task.branch(doc_md="Every step passed: promote. An inconclusive step paused the ramp: ask a person.")
    def after_ramp(ti=None) -> str:
        return "steps_passed" if ti.xcom_pull(task_ids="ramp")["outcome"] == PASSED else "ask_about_step"

    # A join: the branch skips what it does not choose, and promote must stay reachable from resume_ramp.
    passed = EmptyOperator(task_id="steps_passed", doc_md="Every ramp step passed its analysis.")

    ask = HITLBranchOperator(
        task_id="ask_about_step", subject="Continue the ramp of {{ params.new_version }}?",
        body="The analysis of the current ramp step stayed inconclusive (too little traffic to judge). "
             "Continue accepts this step and goes on with the ramp; Rollback sends all traffic back.",
        options=["Continue", "Rollback"], defaults=["Rollback"], response_timeout=timedelta(hours=24),
        options_mapping={"Continue": "resume_ramp", "Rollback": "rollback_chosen"},
        doc_md="Only with on_inconclusive=ask: a person decides in the Airflow UI; no answer in 24 h: Rollback.",
        **ASK_AGAIN_ONCE)
    resume = RampOperator(task_id="resume_ramp", resume=True, interval_seconds="{{ params.step_interval_seconds }}",
                          thresholds=THRESHOLDS, inconclusive_limit="{{ params.inconclusive_limit }}",
                          on_inconclusive=ROLLBACK, doc_md="The rest of the ramp after a person's Continue (a "
                                                           "second inconclusive step rolls back).")
    chosen = rollback_chosen_task("rollback_chosen", fail_run=True,
                                  doc_md="A person chose Rollback: the rollout is aborted and the run fails.")
    promote, remove_old = promote_and_remove_old()
    branch = after_ramp()
    prepare[-1] >> open_new >> ramp >> branch >> [passed, ask]
    ask >> [resume, chosen]
    [passed, resume] >> promote
    conclude(conf, [remove_old, chosen])


embedding_deploy_ramped()
