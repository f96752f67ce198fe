"""Roll out a new embedding model version with a ramped traffic shift (zero downtime)."""
from __future__ import annotations

import pendulum
from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowFailException

from embedding_rollout_airflow.conf import InvalidConf, ramped_params, resolve_conf
from embedding_rollout_airflow.operators.istio import IstioWeightOperator
from embedding_rollout_airflow.operators.steps import step
from embedding_rollout_airflow.sensors.backfill import BackfillCompleteSensor
from embedding_rollout_airflow.sensors.ramp import RampStepSensor
from embedding_rollout_airflow.tasks import guarded_rollback, rollback_window

CONF = "ti.xcom_pull(task_ids='validate_conf')"
NEW, CURRENT = "{{ params.new_version }}", "{{ %s['current_version'] }}" % CONF

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
    @task(doc_md="Refuse an invalid conf before anything changes.")
    def validate_conf(params=None) -> dict:
        try:
            return resolve_conf(dict(params))
        except InvalidConf as exc:
            raise AirflowFailException(f"invalid conf: {exc}") from exc

    conf = validate_conf()
    deploy = step("deploy_new_version", ["deploy", "--version", NEW, "--run-id", "{{ run_id }}",
                                         "--artifact", "{{ %s['model_artifact'] }}" % CONF],
                  doc_md="Step 1: generator serving the new version, its index created (idempotent).")
    dual_write = step("start_dual_write", ["dual-write", "--version", NEW],
                      doc_md="Step 2: streaming updates now go to both versions.")
    backfill = step("backfill", ["index", "load", "--version", NEW, "--source", CURRENT],
                    doc_md="Step 3: re-embed every document of the current index into the new one (resumable).")
    complete = BackfillCompleteSensor(task_id="wait_backfill_complete", version=NEW, source=CURRENT,
                                      poke_interval=5, timeout=6 * 3600,
                                      doc_md="Every source document is in the new index at its latest version.")
    open_new = IstioWeightOperator(task_id="open_new_version", weights='{"%s": 100, "%s": 0}' % (CURRENT, NEW),
                                   doc_md="The new version becomes live at 0 % (reachable by header only).")

    @task(doc_md="The new version's weight at each ramp step.")
    def plan(conf: dict) -> list[int]:
        return conf["plan"]

    ramp = RampStepSensor.partial(
        task_id="ramp_step", new_version=NEW, stable_version=CURRENT,
        interval_seconds="{{ params.step_interval_seconds }}", thresholds="{{ %s['thresholds'] }}" % CONF,
        timeout=24 * 3600, doc_md="Step 4: set the weight, let traffic flow, judge the new version.",
    ).expand(weight=plan(conf))
    promote = step("promote", ["promote", "--version", NEW], doc_md="The new version becomes the stable one.")
    window = rollback_window(conf)
    remove_old = step("remove_old_version", ["remove", "--version", CURRENT],
                      doc_md="Step 5: routes first, then generator, write target and index of the old version.")

    conf >> deploy >> dual_write >> backfill >> complete >> open_new >> ramp >> promote >> window >> remove_old
    rollback = guarded_rollback()
    [conf, deploy, dual_write, backfill, complete, open_new, ramp] >> rollback
    rollback >> step("remove_new_version", ["remove", "--version", NEW],
                     doc_md="After a rollback: remove the new version (generator, write target, index).")


embedding_deploy_ramped()
