"""The rollout DAGs as users run them: Airflow's real components on 127.0.0.1 (api-server, scheduler
with the LocalExecutor, dag-processor, triggerer) over a local deployment with its app and model
server, runs triggered through the REST API with conf while live traffic flows."""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass

from conftest import TOKENS
from embedding_rollout.airflow_stack import AirflowApi, AirflowStack
from embedding_rollout.auth import token_for
from embedding_rollout.domain.versions import parse_version
from embedding_rollout.store import open_store
from rollout_harness import LocalDeployment, check_version_consistency, traffic

DAGS = ("embedding_deploy_ramped", "embedding_deploy_ab", "embedding_retrain_deploy")


@dataclass
class LiveAirflow:
    deployment: LocalDeployment
    airflow: AirflowStack
    api: AirflowApi

    # -- the deployment --------------------------------------------------------------------------
    def state(self):
        return self.deployment.state.read()

    def versions(self) -> tuple[str, str]:
        """(current, new): the stable version, and the test model that is not deployed."""
        current = self.state().stable
        return current, {"v1": "v2", "v2": "v1"}.get(current, "v1")

    def fault(self, version: str, rate: float) -> None:
        self.deployment.model_server.manager.set_fault_rate(parse_version(version), rate)

    def indices(self) -> list[str]:
        return open_store(self.deployment.settings).indices()

    def assert_serving_only(self, version: str) -> None:
        state = self.state()
        assert state.weights == {version: 100} and list(state.versions) == [version], state.to_json()
        assert state.stable == version and state.write_targets == (version,)
        assert [i for i in self.indices() if i.startswith("docs-")] == [f"docs-{version}"]

    def check_consistency(self, record) -> int:
        return check_version_consistency(self.deployment, record)

    # -- runs ------------------------------------------------------------------------------------
    def traffic(self, **kwargs):
        return traffic(self.deployment, **kwargs)

    def trigger(self, dag_id: str, conf: dict) -> str:
        return self.api.trigger(dag_id, conf)

    def wait(self, dag_id: str, run_id: str, timeout: float = 900) -> dict:
        return self.api.wait(dag_id, run_id, timeout=timeout)

    def answer_as_a_person(self, detail: dict, option: str, thinking_seconds: float = 3) -> dict:
        """Answer once the task waits in ``awaiting_input`` and a moment has passed, as a person
        does. An answer that beats the scheduler's handling of the parked worker's exit hits an
        Airflow race (see ``tasks.ASK_AGAIN_ONCE``)."""
        ti = detail["task_instance"]
        self.wait_for(lambda: self.states(ti["dag_id"], ti["dag_run_id"]).get(ti["task_id"]) == "awaiting_input",
                      timeout=120, what=f"{ti['task_id']} awaiting input")
        time.sleep(thinking_seconds)
        return self.api.answer_hitl(detail, option)

    def states(self, dag_id: str, run_id: str) -> dict[str, str]:
        return {k: t["state"] for k, t in self.api.task_instances(dag_id, run_id).items()}

    def log(self, dag_id: str, run_id: str, task_id: str) -> str:
        return self.api.log(dag_id, run_id, task_id)

    def wait_for(self, condition, timeout: float = 600, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_exits_drained(self, dag_id: str, run_id: str, task_id: str, timeout: float = 120) -> None:
        """Wait until the scheduler has handled the exit of every worker in which the task deferred.

        A deferring worker exits "success" seconds after the task is shown ``deferred``; the
        scheduler takes that event for a task killed externally if the task is queued again by
        then (apache/airflow#71172). The scheduler logs each exit event it takes from the executor
        as "Received executor event", and the task's log each deferral. (Not "TaskInstance
        Finished": an event whose task row another transaction holds is skipped under
        ``skip_locked`` and dropped unlogged, as the first deferral's was in a CI run, so that
        count stayed one short for good. A dropped event can no more fail a queued task.)"""
        scheduler_log = self.airflow.home / "component-logs" / "scheduler.log"
        handled = (f"Received executor event with state success for task instance TaskInstanceKey("
                   f"dag_id='{dag_id}', task_id='{task_id}', run_id='{run_id}',")

        def drained():
            deferrals = self.log(dag_id, run_id, task_id).count("Pausing task as DEFERRED")
            return deferrals and scheduler_log.read_text(errors="replace").count(handled) >= deferrals

        self.wait_for(drained, timeout=timeout, what=f"the scheduler to handle {task_id}'s deferred workers")

    # -- faults of Airflow's own --------------------------------------------------------------
    @contextmanager
    def scheduler_stopped(self):
        """The scheduler frozen (SIGSTOP) between two of its transactions, so that what is done
        inside lands between two of its loops, and no row lock of its holds anything up."""
        pid = self.airflow.processes["scheduler"].pid
        for _ in range(100):
            os.kill(pid, signal.SIGSTOP)
            if not self._database_busy():
                break
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.1)
        else:
            raise AssertionError("the scheduler never paused outside a transaction")
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def _database_busy(self) -> bool:
        """Whether another connection to the metadata database is inside a statement or transaction."""
        with self._metadata() as db:
            return db.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> "
                "pg_backend_pid() AND state IN ('active', 'idle in transaction')").scalar() > 0

    def overwrite_task_state(self, dag_id: str, run_id: str, task_id: str, state: str) -> None:
        """A write to the metadata database's row of a task instance, as a lost update leaves it."""
        with self._metadata() as db, db.begin():
            changed = db.exec_driver_sql(
                "UPDATE task_instance SET state = %s WHERE dag_id = %s AND run_id = %s AND task_id = %s",
                (state, dag_id, run_id, task_id)).rowcount
        assert changed == 1, f"{task_id} of {run_id} not in the metadata database"

    @contextmanager
    def _metadata(self):
        import sqlalchemy
        engine = sqlalchemy.create_engine(self.airflow.database_url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as db:
                yield db
        finally:
            engine.dispose()

    def explain(self, dag_id: str, run_id: str) -> str:
        """What went wrong, for an assertion message: every task's state and the failed tasks' logs."""
        states = self.states(dag_id, run_id)
        failed = [t for t, s in states.items() if s == "failed"]
        logs = "\n".join(f"--- {t}\n{self.log(dag_id, run_id, t)[-3000:]}" for t in failed)
        return f"{states}\nrollout: {self.state().rollout}\n{logs}"


def start_live_airflow(home, model_repo, monkeypatch, port: int, database_url: str) -> LiveAirflow:
    # The traffic's requests take milliseconds here: a 1 s drain outlasts them (the default, the
    # generator's and the store's timeouts, is for slow requests; tests/test_dual_write.py drains those).
    monkeypatch.setenv("ER_DRAIN_SECONDS", "1")
    # A version's first predictions after it is loaded, on two busy cores, can take longer than the
    # default 2 s: the analysis would judge the machine, not the version (tests/test_dual_write.py
    # and tests/test_app.py test the timeouts themselves).
    monkeypatch.setenv("ER_GENERATOR_TIMEOUT", "10")
    deployment = LocalDeployment(home / "home", model_repo, monkeypatch)
    # No weekly retrain: unpausing a scheduled DAG would start its latest missed interval at once.
    # The DAGs find the app and its token in their Airflow Connection only: no ER_APP_URL, and a
    # token file that does not exist, so a hook that ignored the Connection would be refused.
    env = {k: v for k, v in deployment.env.items() if k != "ER_APP_URL"}
    airflow = AirflowStack(home / "airflow", port=port, parallelism=4, app_url=deployment.app.url,
                           app_token=token_for(TOKENS, "operator"), database_url=database_url,
                           env={**env, "ER_RETRAIN_SCHEDULE": "none", "ER_DRAIN_SECONDS": "1",
                                "ER_APP_URL": "http://127.0.0.1:9", "ER_TOKENS": str(home / "no-tokens.json")})
    try:
        airflow.start()
        api = airflow.api()
        for dag_id in DAGS:
            api.unpause(dag_id)
    except BaseException:
        airflow.stop()
        deployment.stop()
        raise
    return LiveAirflow(deployment, airflow, api)
