"""Roll out a new embedding model version with a ramped traffic shift (zero downtime)."""
from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from embedding_rollout_airflow.conf import ramped_params
from embedding_rollout_airflow.graph import (CURRENT, NEW, THRESHOLDS, prepare_new_version, promote_and_remove_old,
                                             rollback_on_failure)
from embedding_rollout_airflow.operators.istio import IstioWeightOperator
from embedding_rollout_airflow.sensors.ramp import RampStepSensor

DOC = """
### Ramped rollout of a new embedding model version

The five steps, each a task: **deploy** the new version next to the current one (generator serving
it, its index created) → **dual-write** streaming updates to both → **backfill** the new index with
every document re-embedded (progress, rate and ETA in the task log) and wait until the index is
verifiably complete → **shift traffic** in steps (`step_percent` every `step_interval_seconds`, or an
explicit `weights` list; one mapped task per step, each judged by an analysis of error rate and p99
against the stable version) → **promote** and, after the rollback window, **remove the old version**.

A failed step or analysis rolls back: all traffic to the current version, the new one removed.
The current version's index is never touched by the rollout. Trigger with
`{"new_version": "v2"}`; the form documents every other setting.
"""


@dag(dag_id="embedding_deploy_ramped", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
     catchup=False, max_active_runs=1, params=ramped_params(), doc_md=DOC,
     tags=["embedding-rollout", "deploy"], render_template_as_native_obj=True)
def embedding_deploy_ramped():
    conf, prepare = prepare_new_version()
    open_new = IstioWeightOperator(task_id="open_new_version", weights='{"%s": 100, "%s": 0}' % (CURRENT, NEW),
                                   doc_md="The new version becomes live at 0 % (reachable by header only).")

    @task(doc_md="The new version's weight at each ramp step.")
    def plan(conf: dict) -> list[int]:
        return conf["plan"]

    ramp = RampStepSensor.partial(
        task_id="ramp_step", new_version=NEW, stable_version=CURRENT,
        interval_seconds="{{ params.step_interval_seconds }}", thresholds=THRESHOLDS,
        timeout=24 * 3600, doc_md="Step 4: set the weight, let traffic flow, judge the new version.",
    ).expand(weight=plan(conf))
    prepare[-1] >> open_new >> ramp >> promote_and_remove_old(conf)
    rollback_on_failure(conf, [*prepare, open_new, ramp])


embedding_deploy_ramped()
