"""TaskFlow tasks shared by the deployment DAGs."""
from __future__ import annotations

import logging
import time

from airflow.sdk import PokeReturnValue, task
from airflow.sdk.exceptions import AirflowSkipException

from .operators.istio import router_hook
from .runtime import Runtime

log = logging.getLogger(__name__)


@task(trigger_rule="one_failed", doc_md="Rollback: all traffic back to the current version.")
def guarded_rollback(ti=None) -> dict:
    """Runs when a rollout task failed. Skips when the conf was never validated: then nothing
    changed, and a version named by a refused conf must not be touched."""
    conf = ti.xcom_pull(task_ids="validate_conf")
    if not conf:
        raise AirflowSkipException("the conf was refused: nothing was changed, nothing to roll back")
    weights = router_hook(Runtime()).set_weights({conf["current_version"]: 100})
    log.info("rolled back: %s serves all traffic, %s will be removed", conf["current_version"],
                conf["new_version"])
    return weights


@task(doc_md="When the new version became the stable one.")
def promoted_at() -> float:
    return time.time()


@task.sensor(mode="reschedule", poke_interval=30, timeout=8 * 86400,
             doc_md="Keep the old version for the rollback window (holding no worker slot) before removing it.")
def rollback_window(conf: dict, since: float) -> PokeReturnValue:
    return PokeReturnValue(is_done=time.time() >= since + int(conf.get("rollback_window_seconds") or 0))
