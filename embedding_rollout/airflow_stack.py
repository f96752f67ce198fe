"""Airflow's real components on 127.0.0.1, and a client of its REST API.

``AirflowStack`` runs what a user runs: the api-server (UI and REST API), the scheduler (with the
LocalExecutor and a small parallelism), the dag-processor and the triggerer, each its own process,
over one metadata database (SQLite in ``AIRFLOW_HOME`` unless ``database_url`` names another: the
tests' PostgreSQL), with the project's ``dags/`` and ``plugins/``. The demo, the end-to-end tests
and the soak benchmark use it; ``docs/airflow.md`` shows the same settings for a user's own shell.

``AirflowApi`` is the part of Airflow's public REST API (``/api/v2``) they need: a JWT from
``/auth/token``, unpausing a DAG, triggering a run with conf, waiting for it, marking it failed,
answering a human-in-the-loop request.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

REPO = Path(__file__).resolve().parent.parent
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
TERMINAL_RUN_STATES = ("success", "failed")
ADMIN = "admin"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class AirflowError(RuntimeError):
    pass


@dataclass
class AirflowStack:
    """Start with :meth:`start`, stop with :meth:`stop` (or use it as a context manager)."""

    home: Path
    port: int = 8080
    host: str = "127.0.0.1"
    parallelism: int = 4
    env: dict[str, str] = field(default_factory=dict)  # more settings for every component (ER_* ...)
    # The app the DAGs call, and the token (rollout:operate) they call it with: given to every
    # component as the Connection embedding_rollout_app, as a user would define it.
    app_url: str | None = None
    app_token: str | None = None
    # The metadata database's SQLAlchemy URL. SQLite (the default) is for one person's demo: its
    # writers do not lock rows, so a state the API server writes can be lost to a worker's.
    database_url: str | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def password_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json.generated"

    def settings(self) -> dict[str, str]:
        """The environment every component (and every task it runs) gets."""
        self.home.mkdir(parents=True, exist_ok=True)
        return {
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            # Workers reach the execution API on the API server: it must say where that is.
            "AIRFLOW__API__HOST": self.host,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            # On a small busy machine a fresh API server can take longer than the default 5 s to
            # answer a worker; after 5 such timeouts the task is killed before it starts.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            # Every component signs or checks the same tokens.
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt-secret"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.password_file),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            # The DAG files do not change while the stack runs: parsing them every 30 s (the
            # default) only takes CPU from the tasks.
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "300",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            **({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url} if self.database_url else {}),
            **self.app_connection(),
            **self.env,
        }

    def app_connection(self) -> dict[str, str]:
        if not self.app_url:
            return {}
        connection = {"conn_type": "http", "host": self.app_url, **({"password": self.app_token} if self.app_token else {})}
        return {"AIRFLOW_CONN_EMBEDDING_ROLLOUT_APP": json.dumps(connection)}

    def _secret(self, name: str) -> str:
        path = self.home / name
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def password(self) -> str:
        return json.loads(self.password_file.read_text())[ADMIN]

    def _environ(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        return {**inherited, **self.settings()}

    def migrate(self) -> None:
        result = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self._environ(),
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise AirflowError(f"airflow db migrate failed: {result.stderr[-2000:]}")

    def start(self, timeout: float = 180.0) -> "AirflowStack":
        self.migrate()
        if not self.password_file.exists():  # the simple auth manager writes it; ours is fixed per home
            self.password_file.write_text(json.dumps({ADMIN: secrets.token_urlsafe(12)}))
            self.password_file.chmod(0o600)
        logs = self.home / "component-logs"
        logs.mkdir(exist_ok=True)
        for component in COMPONENTS:
            with open(logs / f"{component}.log", "ab") as out:
                self.processes[component] = subprocess.Popen(
                    [sys.executable, "-m", "airflow", component], env=self._environ(), stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float) -> None:
        """Until the API server answers and the scheduler, dag-processor and triggerer heartbeat."""
        deadline = time.monotonic() + timeout
        report: dict = {}
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise AirflowError(f"airflow {name} exited with {proc.returncode}; see "
                                       f"{self.home / 'component-logs' / (name + '.log')}")
            try:
                report = requests.get(f"{self.url}/api/v2/monitor/health", timeout=5).json()
                parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
                if all(report.get(p, {}).get("status") == "healthy" for p in parts):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(1)
        raise AirflowError(f"Airflow not healthy within {timeout:.0f} s: {report}")

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.processes.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes.clear()

    def __enter__(self) -> "AirflowStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def api(self) -> "AirflowApi":
        return AirflowApi(self.url, ADMIN, self.password())


class AirflowApi:
    """Airflow's REST API as a user's script calls it."""

    def __init__(self, url: str, username: str, password: str, timeout: float = 30.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()
        self._credentials = {"username": username, "password": password}
        self._token_at = 0.0

    def _authorize(self) -> None:
        if time.monotonic() - self._token_at < 600:
            return
        reply = requests.post(f"{self.url}/auth/token", json=self._credentials, timeout=self.timeout)
        if reply.status_code not in (200, 201):
            raise AirflowError(f"POST /auth/token: {reply.status_code} {reply.text[:300]}")
        self.session.headers["Authorization"] = f"Bearer {reply.json()['access_token']}"
        self._token_at = time.monotonic()

    def call(self, method: str, path: str, ok=(200,), **kwargs) -> dict:
        self._authorize()
        reply = self.session.request(method, f"{self.url}/api/v2{path}", timeout=self.timeout, **kwargs)
        if reply.status_code not in ok:
            raise AirflowError(f"{method} /api/v2{path}: {reply.status_code} {reply.text[:500]}")
        return reply.json() if reply.content else {}

    @retry(retry=retry_if_exception_type(AirflowError), stop=stop_after_delay(180), wait=wait_fixed(2),
           reraise=True)
    def wait_for_dag(self, dag_id: str) -> dict:
        """The DAG once the dag-processor has parsed it (a fresh Airflow has not yet)."""
        return self.call("GET", f"/dags/{dag_id}")

    def unpause(self, dag_id: str) -> None:
        """New DAGs arrive paused: a run of a paused DAG is created but never scheduled."""
        self.wait_for_dag(dag_id)
        self.call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict, run_id: str | None = None) -> str:
        body = {"logical_date": None, "conf": conf, **({"dag_run_id": run_id} if run_id else {})}
        return self.call("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def runs(self, dag_id: str) -> list[dict]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "start_date"})["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        """Task id (with ``[map_index]`` for mapped ones) -> task instance."""
        items = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                          params={"limit": 1000})["task_instances"]
        return {t["task_id"] + (f"[{t['map_index']}]" if t["map_index"] >= 0 else ""): t for t in items}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value"):
        item = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                         params={"deserialize": "true", "stringify": "false"})
        return item["value"]

    def log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """The task's log as text (what the UI's log view shows)."""
        self._authorize()
        reply = self.session.get(
            f"{self.url}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            headers={"Accept": "application/json"}, timeout=self.timeout)
        if reply.status_code != 200:
            return f"(no log: {reply.status_code})"
        lines = []
        for entry in reply.json().get("content", []):
            if not isinstance(entry, dict):
                lines.append(str(entry))
                continue
            lines.append(entry.get("event", ""))
            lines += [f"{e['exc_type']}: {e['exc_value']}" for e in entry.get("error_detail") or []]
        return "\n".join(lines)

    def wait(self, dag_id: str, run_id: str, timeout: float = 900.0, poll: float = 2.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                run = self.run(dag_id, run_id)
            except requests.exceptions.RequestException:  # a busy API server: ask again, until the deadline
                if time.monotonic() > deadline:
                    raise
                time.sleep(poll)
                continue
            if run["state"] in TERMINAL_RUN_STATES:
                return run
            if time.monotonic() > deadline:
                raise AirflowError(f"{dag_id} {run_id} still {run['state']} after {timeout:.0f} s: "
                                   f"{ {k: t['state'] for k, t in self.task_instances(dag_id, run_id).items()} }")
            time.sleep(poll)

    def mark_failed(self, dag_id: str, run_id: str) -> dict:
        """What a person does with "Mark run as failed" in the UI."""
        return self.call("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}", json={"state": "failed"})

    def pending_hitl(self, dag_id: str) -> list[dict]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/~/hitlDetails",
                         params={"response_received": "false"}).get("hitl_details", [])

    def answer_hitl(self, detail: dict, option: str) -> dict:
        """Answer a human-in-the-loop request as the UI's Required Actions page does."""
        ti = detail["task_instance"]
        return self.call("PATCH", f"/dags/{ti['dag_id']}/dagRuns/{ti['dag_run_id']}/taskInstances/"
                                  f"{ti['task_id']}/{ti['map_index']}/hitlDetails",
                         json={"chosen_options": [option], "params_input": {}})
