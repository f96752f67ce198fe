"""Weekly: retrain the embedding model on recent data, evaluate it, deploy it only if it is better."""
from __future__ import annotations

import json
import os

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException

from embedding_rollout.domain.versions import parse_version, version_label
from embedding_rollout_airflow.hooks.deployment import deployment_hook
from embedding_rollout_airflow.operators.steps import step
from embedding_rollout_airflow.runtime import Runtime

DOC = """
### Retrain, evaluate, deploy

Every week: pick the next model version, **train** it on the most recent data (`since`, default
all), **evaluate** its offline recall@10 against the live stable version's on the same query set,
and only when it is **strictly better** by `min_improvement` (default 0.01) **trigger**
`embedding_deploy_ramped` with it. A candidate that is not better is **refused**: marked refused in
the model repository (kept for inspection, never deployed, its number never reused), with the
reason in the log of `evaluate_against_live`. While another rollout holds the deployment, the week
is skipped (nothing is trained).

Unpausing this DAG starts its latest missed interval at once (`catchup=False` skips the older
ones); trigger it by hand with conf to retrain now. `ER_RETRAIN_SCHEDULE` (read when the DAG is
parsed) sets the cadence: a cron expression or preset, or `none` for manual runs only.
"""
NEXT = "{{ ti.xcom_pull(task_ids='next_version') }}"


# The retrain cadence: a cron expression or preset; "none" for manual runs only.
SCHEDULE = os.environ.get("ER_RETRAIN_SCHEDULE", "@weekly")


@dag(dag_id="embedding_retrain_deploy", schedule=None if SCHEDULE.lower() == "none" else SCHEDULE, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
     catchup=False, max_active_runs=1, doc_md=DOC, tags=["embedding-rollout", "training"],
     params={
         "since": Param(None, type=["null", "string"], format="date", title="Train on documents since"),
         "dims": Param(96, type="integer", minimum=8, maximum=1024, title="Embedding size"),
         "epochs": Param(4, type="integer", minimum=1, maximum=100),
         "min_improvement": Param(0.01, type="number", minimum=0, maximum=1,
                                  title="Required recall@10 gain over the live version",
                                  description="The candidate is deployed only when its recall@10 exceeds the "
                                              "live version's by more than this."),
         "step_percent": Param(25, type="integer", minimum=1, maximum=100),
         "step_interval_seconds": Param(300, type="integer", minimum=0, maximum=86400),
     })
def embedding_retrain_deploy():
    @task(doc_md="The next version number: one above every trained (refused ones too) or deployed version. "
                 "Skips the week while a rollout holds the deployment.")
    def next_version() -> str:
        deployment = deployment_hook(Runtime())
        state = deployment.state()
        if state.rollout and state.rollout.active:
            raise AirflowSkipException(f"not retraining: {state.rollout.describe()}")
        known = [*state.versions, *(m["version"] for m in deployment.models())]
        return version_label(max([parse_version(v) for v in known] + [0]) + 1)

    train = step("train_new_version", ["train", "--version", NEXT, "--dims", "{{ params.dims }}",
                                       "--epochs", "{{ params.epochs }}", "--since", "{{ params.since or '' }}"],
                 doc_md="Train and export the new version; its recall@10 is saved with it.")

    @task.branch(doc_md="Deploy only a candidate strictly better than the live version; refuse any other.")
    def evaluate_against_live(new: str, params=None, ti=None) -> str:
        deployment = deployment_hook(Runtime())
        stable = deployment.state().stable
        new_recall = deployment.model(new)["evaluation"]["recall@10"]
        live_eval = deployment.model(stable)["evaluation"] if stable else None
        live_recall = live_eval["recall@10"] if live_eval else 0.0
        margin = params["min_improvement"]
        better = new_recall > live_recall + margin
        verdict = (f"{new} recall@10 {new_recall:.4f} {'>' if better else '<='} {stable} {live_recall:.4f} + "
                   f"min_improvement {margin}")
        print(json.dumps({"new": new, "new_recall@10": new_recall, "live": stable, "live_recall@10": live_recall,
                          "min_improvement": margin, "deploy": better}))
        ti.xcom_push(key="verdict", value=verdict)
        if better:
            return "deployment_conf"
        print(f"refused: {verdict}")
        return "refuse_candidate"

    refuse = step("refuse_candidate", ["refuse", "--version", NEXT, "--reason",
                                       "{{ ti.xcom_pull(task_ids='evaluate_against_live', key='verdict') }}"],
                  doc_md="Mark the candidate refused in the model repository (with the reason).")

    @task(doc_md="The ramped deployment's conf.")
    def deployment_conf(new: str, params=None) -> dict:
        return {"new_version": new, "step_percent": params["step_percent"],
                "step_interval_seconds": params["step_interval_seconds"]}

    new = next_version()
    conf = deployment_conf(new)
    trigger = TriggerDagRunOperator(
        task_id="trigger_ramped_deployment", trigger_dag_id="embedding_deploy_ramped", conf=conf,
        doc_md="Start the zero-downtime rollout of the new version.")
    evaluation = evaluate_against_live(new)
    new >> train >> evaluation >> [conf, refuse]
    conf >> trigger


embedding_retrain_deploy()
