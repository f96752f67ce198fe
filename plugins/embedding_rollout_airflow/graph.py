"""Pieces of the deployment DAGs' graphs that the ramped and the A/B rollout share."""
from __future__ import annotations

from airflow.sdk import task
from airflow.sdk.exceptions import AirflowFailException

from .conf import InvalidConf, resolve_conf
from .hooks.deployment import deployment_hook
from .runtime import Runtime
from .operators.steps import step
from .sensors.backfill import BackfillCompleteSensor
from .tasks import guarded_rollback, promoted_at, rollback_window

CONF = "ti.xcom_pull(task_ids='validate_conf')"
NEW = "{{ params.new_version }}"
CURRENT = "{{ %s['current_version'] }}" % CONF
THRESHOLDS = "{{ %s['thresholds'] }}" % CONF


@task(doc_md="Refuse an invalid conf before anything changes.")
def validate_conf(params=None) -> dict:
    try:
        return resolve_conf(dict(params), deployment_hook(Runtime()))
    except InvalidConf as exc:
        raise AirflowFailException(f"invalid conf: {exc}") from exc


def prepare_new_version():
    """Steps 1-3: validate, deploy, dual-write, backfill, wait until the new index is complete.

    Returns (conf, tasks in order)."""
    conf = validate_conf()
    tasks = [
        step("deploy_new_version", ["deploy", "--version", NEW, "--run-id", "{{ run_id }}",
                                    "--artifact", "{{ %s['model_artifact'] }}" % CONF],
             doc_md="Step 1: generator serving the new version, its index created (idempotent)."),
        step("start_dual_write", ["dual-write", "--version", NEW],
             doc_md="Step 2: streaming updates now go to both versions."),
        step("backfill", ["index", "load", "--version", NEW, "--source", CURRENT],
             doc_md="Step 3: re-embed every document of the current index into the new one (resumable)."),
        BackfillCompleteSensor(task_id="wait_backfill_complete", version=NEW, source=CURRENT, poke_interval=5,
                               timeout=6 * 3600,
                               doc_md="Every source document is in the new index at its latest version."),
    ]
    conf >> tasks[0] >> tasks[1] >> tasks[2] >> tasks[3]
    return conf, tasks


def promote_and_remove_old(conf):
    """Promote the new version, keep the old one for the rollback window, then remove it (step 5)."""
    promote = step("promote", ["promote", "--version", NEW], doc_md="The new version becomes the stable one.")
    since = promoted_at()
    remove_old = step("remove_old_version", ["remove", "--version", CURRENT],
                      doc_md="Step 5: routes first, then generator, write target and index of the old version.")
    promote >> since >> rollback_window(conf, since) >> remove_old
    return promote


def rollback_on_failure(conf, watched: list):
    """When a rollout task fails: traffic back to the current version, then the new one removed."""
    rollback = guarded_rollback()
    [conf, *watched] >> rollback
    remove_new = step("remove_new_version", ["remove", "--version", NEW], trigger_rule="one_success",
                      doc_md="After a rollback: remove the new version (generator, write target, index).")
    rollback >> remove_new
    return remove_new
