"""Pieces of the deployment DAGs' graphs that the ramped and the A/B rollout share.

Every rollout task runs inside one setup/teardown scope: ``begin_rollout`` (setup) takes the
deployment for the run; ``conclude_rollout`` and ``finish_rollout`` (teardowns) run however the run
ends — a failed task, a decided rollback, a person marking the run failed in the UI or through the
REST API (Airflow then fails or skips the other tasks but leaves teardowns to run) — and either
complete the rollout or roll it back; ``rollout_outcome`` (a teardown too) then sets the run's
state from how the rollout ended.
"""
from __future__ import annotations

from datetime import timedelta

from airflow.sdk import task

from .operators.steps import mapped_step, step
from .sensors.backfill import BackfillCompleteSensor
from .tasks import RollbackWindowSensor, begin_rollout_task, conclude_rollout, rollout_outcome

CONF = "ti.xcom_pull(task_ids='begin_rollout')"
NEW = "{{ params.new_version }}"
CURRENT = "{{ %s['current_version'] }}" % CONF
THRESHOLDS = "{{ %s['thresholds'] }}" % CONF


def prepare_new_version(strategy: str):
    """The setup, then steps 1-3: deploy, dual-write, plan, backfill (slices), finish the load,
    verify, wait for the verification.

    Returns (conf, tasks in order)."""
    conf = begin_rollout_task(strategy)
    tasks = [
        step("deploy_new_version", ["deploy", "--version", NEW, "--run-id", "{{ run_id }}",
                                    "--artifact", "{{ %s['model_artifact'] }}" % CONF],
             doc_md="Step 1: generator serving the new version, its index created (idempotent)."),
        step("start_dual_write", ["dual-write", "--version", NEW],
             doc_md="Step 2: streaming updates now go to both versions."),
        step("plan_backfill", ["index", "plan", "--version", NEW, "--source", CURRENT,
                               "--slices", "{{ %s['backfill_slices'] }}" % CONF],
             doc_md="Step 3: split the current index's ids into backfill_slices ranges (kept for retries)."),
        mapped_step("backfill", backfill_slices(conf),
                    doc_md="Step 3: re-embed every document of the current index into the new one, one task per "
                           "slice (an id range), in parallel; each resumes from its own checkpoint."),
        step("finish_backfill", ["index", "finish", "--version", NEW, "--source", CURRENT],
             doc_md="Step 3: once every slice is loaded, end the bulk load (the store's upkeep: Elasticsearch's "
                    "serving settings, LanceDB's compaction and vector index) and record the version as backfilled."),
        step("verify_backfill", ["index", "verify", "--version", NEW, "--source", CURRENT],
             doc_md="Step 3: check the new index against the current one both ways, tombstones too, and "
                    "record the result with the new version."),
        BackfillCompleteSensor(task_id="wait_backfill_complete", version=NEW, source=CURRENT, poke_interval=15,
                               timeout=6 * 3600,
                               doc_md="The new version's recorded verification against the current one passed."),
    ]
    for before, after in zip(tasks, tasks[1:]):
        before >> after
    conf >> tasks[0]
    return conf, tasks


@task(doc_md="The arguments of each backfill slice's task, from the run's backfill_slices.")
def backfill_slices(conf: dict) -> list[list[str]]:
    return [["index", "load", "--version", conf["new_version"], "--source", conf["current_version"],
             "--slice", str(number)] for number in range(1, conf["backfill_slices"] + 1)]


def promote_and_remove_old():
    """Promote the new version, keep the old one for the rollback window, then remove it (step 5).

    Returns (promote, remove_old)."""
    promote = step("promote", ["promote", "--version", NEW, "--run-id", "{{ run_id }}"],
                   trigger_rule="none_failed_min_one_success",
                   doc_md="The new version becomes the stable one, once its index holds every write.")
    window = RollbackWindowSensor(task_id="rollback_window", seconds="{{ params.rollback_window_seconds }}",
                                  doc_md="Keep the old version this long (mark the run failed to roll back).")
    remove_old = step("remove_old_version", ["remove", "--version", CURRENT],
                      doc_md="Step 5: routes first, then generator, write target and index of the old version.")
    promote >> window >> remove_old
    return promote, remove_old


def conclude(conf, leaves: list, decided_rollback: str | None = None) -> None:
    """The teardowns: complete the rollout, or roll it back and remove the new version; then the
    run's verdict. ``decided_rollback``: the task whose success makes a rollback the run's goal
    (an A/B experiment's decision), not a failure.

    Only the verdict decides the run's state (``on_failure_fail_dagrun``): a person marking the run
    failed makes Airflow skip the pending work tasks, and with skipped leaves alone the run would
    end as a success after its rollback."""
    concluded = conclude_rollout(conf)
    finish = step("finish_rollout", ["rollout", "finish", "--run-id", "{{ run_id }}"], retries=2,
                  retry_delay=timedelta(seconds=15),
                  doc_md="Teardown: remove the version the rollout leaves behind (the old one after a promotion, "
                         "the new one after a rollback) and release the deployment.")
    verdict = rollout_outcome(conf, decided_rollback)
    leaves >> concluded >> finish >> verdict
    concluded.as_teardown(setups=conf)
    finish.as_teardown(setups=conf)
    verdict.as_teardown(setups=conf, on_failure_fail_dagrun=True)
