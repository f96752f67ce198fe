"""Weekly: retrain the embedding model on recent data, evaluate it, deploy it if it is not worse."""
from __future__ import annotations

import json

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task

from embedding_rollout.domain.versions import parse_version, version_label
from embedding_rollout_airflow.hooks.deployment import deployment_hook
from embedding_rollout_airflow.operators.steps import step
from embedding_rollout_airflow.runtime import Runtime

DOC = """
### Retrain, evaluate, deploy

Every week: pick the next model version, **train** it on the most recent data (`since`, default
all), **evaluate** its offline recall@10 against the live stable version's on the same query set,
and — only when it is at least as good (`min_improvement`) — **trigger** `embedding_deploy_ramped`
with it. A worse model is refused: the trigger is skipped and the log says why.
"""
NEXT = "{{ ti.xcom_pull(task_ids='next_version') }}"


@dag(dag_id="embedding_retrain_deploy", schedule="@weekly", start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
     catchup=False, max_active_runs=1, doc_md=DOC, tags=["embedding-rollout", "training"],
     params={
         "since": Param(None, type=["null", "string"], format="date", title="Train on documents since"),
         "dims": Param(96, type="integer", minimum=8, maximum=1024, title="Embedding size"),
         "epochs": Param(4, type="integer", minimum=1, maximum=100),
         "min_improvement": Param(0.0, type="number", minimum=-1, maximum=1,
                                  title="Required recall@10 gain over the live version"),
         "step_percent": Param(25, type="integer", minimum=1, maximum=100),
         "step_interval_seconds": Param(300, type="integer", minimum=0, maximum=86400),
     })
def embedding_retrain_deploy():
    @task(doc_md="The next version number: one above every trained or deployed version.")
    def next_version() -> str:
        deployment = deployment_hook(Runtime())
        known = [*deployment.state().versions, *(m["version"] for m in deployment.models())]
        return version_label(max([parse_version(v) for v in known] + [0]) + 1)

    train = step("train_new_version", ["train", "--version", NEXT, "--dims", "{{ params.dims }}",
                                       "--epochs", "{{ params.epochs }}", "--since", "{{ params.since or '' }}"],
                 doc_md="Train and export the new version; its recall@10 is saved with it.")

    @task.short_circuit(doc_md="Refuse a model worse than the live one (the trigger is then skipped).")
    def evaluate_against_live(new: str, params=None) -> bool:
        deployment = deployment_hook(Runtime())
        stable = deployment.state().stable
        new_eval = deployment.model(new)["evaluation"]
        live_eval = deployment.model(stable)["evaluation"] if stable else None
        new_recall = new_eval["recall@10"]
        live_recall = live_eval["recall@10"] if live_eval else 0.0
        better = new_recall >= live_recall + params["min_improvement"]
        print(json.dumps({"new": new, "new_recall@10": new_recall, "live": stable, "live_recall@10": live_recall,
                          "min_improvement": params["min_improvement"], "deploy": better}))
        return better

    @task(doc_md="The ramped deployment's conf.")
    def deployment_conf(new: str, params=None) -> dict:
        return {"new_version": new, "step_percent": params["step_percent"],
                "step_interval_seconds": params["step_interval_seconds"]}

    new = next_version()
    conf = deployment_conf(new)
    trigger = TriggerDagRunOperator(
        task_id="trigger_ramped_deployment", trigger_dag_id="embedding_deploy_ramped", conf=conf,
        doc_md="Start the zero-downtime rollout of the new version.")
    new >> train >> evaluate_against_live(new) >> conf >> trigger


embedding_retrain_deploy()
