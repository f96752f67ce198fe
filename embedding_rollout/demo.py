"""The main job: a zero-downtime rollout on one machine, through Airflow, with live traffic.

Brings up the local stack with the current version (training v1 and indexing the corpus on the first
run), trains the next version on all data, starts Airflow's components in the background on
127.0.0.1 (api-server with the UI, scheduler, dag-processor, triggerer), and triggers the
``embedding_deploy_ramped`` DAG through Airflow's REST API with conf, as a user would, while a
background thread searches and writes continuously. It prints the UI's address and login, the split
as it changes, and a summary at the end. ``fast=True`` runs the same DAG in-process with
``dag.test()`` instead (no scheduler: a quick look, not how users run it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import Settings
from .domain.versions import parse_version, version_label
from .generator.models import available_versions
from .loadgen import Traffic, verify_consistency
from .model.repository import catalogue

REPO = Path(__file__).resolve().parent.parent
DAG_ID = "embedding_deploy_ramped"
console = Console()


def configure_airflow(settings: Settings, verbose: bool) -> None:
    """For ``dag.test()`` in this process: Airflow reads its settings at import, so set them first
    (a user's own settings win)."""
    os.environ.setdefault("AIRFLOW_HOME", str(settings.home / "airflow"))
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
    os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(REPO / "plugins"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    if not verbose:
        os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


def _progress(stack, record, stop: threading.Event) -> None:
    seen = 0
    while not stop.wait(3.0):
        recent = record.responses[seen:]
        seen += len(recent)
        split = {v: sum(r["version"] == v for r in recent) for v in sorted({r["version"] for r in recent})}
        state = stack.state.read()
        rollout = state.rollout
        where = f"{rollout.phase}, step {min(rollout.step + 1, len(rollout.plan))}/{len(rollout.plan)}" \
            if rollout and rollout.plan else (rollout.phase if rollout else "-")
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] weights {state.weights}  rollout {where}  "
                      f"answers last 3 s {split}  failures {len(record.failures)}")


def _next_version(settings: Settings, current: str) -> str:
    """A version trained earlier but never rolled out (nor refused), else the next number."""
    refused = {parse_version(m["version"]) for m in catalogue(settings.model_dir) if m.get("refused")}
    trained, number = available_versions(settings.model_dir), parse_version(current)
    newer = [n for n in trained if n > number and n not in refused]
    return version_label(min(newer) if newer else max(trained + [number]) + 1)


def run_demo(settings: Settings, step_percent: int, interval: int, port: int, airflow_port: int, verbose: bool,
             fast: bool = False, keep_running: bool = False) -> bool:
    from .local_stack import LocalStack
    from .model.trainer import TrainConfig
    from .model.training import train_version

    started = time.monotonic()
    stack = LocalStack(settings, app_port=port, rest_port=port + 1, grpc_port=port + 2).start()
    env = {"ER_HOME": str(settings.home), "ER_GENERATOR_GRPC": stack.grpc_address,
           "ER_GENERATOR_REST": stack.rest_url, "ER_APP_URL": stack.app_url, "ER_AIRFLOW_RUNTIME": "local",
           "ER_STORE": settings.store, "ER_ES_URL": settings.es_url}
    os.environ.update(env)  # the DAG's step commands run as processes and inherit these
    current = stack.state.read().stable
    new = _next_version(settings, current)
    if parse_version(new) not in available_versions(settings.model_dir):
        console.print(f"training {new} on all the data (about a minute)...")
        train_version(settings.model_dir, parse_version(new), TrainConfig(dims=96), until=None)
    conf = {"new_version": new, "step_percent": step_percent, "step_interval_seconds": interval, "min_requests": 5}
    airflow = None
    try:
        if fast:
            configure_airflow(settings, verbose)
            trigger = _in_process(conf)
        else:
            airflow, trigger = _through_the_scheduler(settings, airflow_port, env, conf)
        console.print(f"[bold]rolling out {new} over {current}[/] via Airflow ({DAG_ID}), app {stack.app_url}")
        stop = threading.Event()
        with Traffic(stack.app_url, lambda: stack.state.read().weights) as record:
            monitor = threading.Thread(target=_progress, args=(stack, record, stop), daemon=True)
            monitor.start()
            outcome = trigger()
            stop.set()
        checked, mismatches = verify_consistency(record, settings.model_dir)
        ok = _summary(outcome, record, checked, mismatches, new, current, time.monotonic() - started)
        if keep_running:
            console.print(f"the app ({stack.app_url}) and Airflow ({airflow.url if airflow else '-'}) keep "
                          f"running; Ctrl-C stops them")
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
        return ok
    finally:
        if airflow:
            airflow.stop()
        stack.stop()


def _in_process(conf: dict):
    from airflow.dag_processing.dagbag import DagBag
    dag = DagBag(dag_folder=str(REPO / "dags")).get_dag(DAG_ID)
    return lambda: str(dag.test(run_conf=conf).state).split(".")[-1].lower()


def _through_the_scheduler(settings: Settings, port: int, env: dict, conf: dict):
    from .airflow_stack import AirflowStack
    from .auth import token_for
    # The DAGs call the app through their Airflow Connection, with the operator's token.
    airflow = AirflowStack(settings.home / "airflow", port=port, env=env, app_url=env["ER_APP_URL"],
                           app_token=token_for(settings.tokens_path, "operator"))
    console.print(f"starting Airflow (api-server, scheduler, dag-processor, triggerer) on {airflow.url} ...")
    airflow.start()
    api = airflow.api()
    console.print(f"[bold]Airflow UI: {airflow.url}[/]  login [bold]admin[/] / [bold]{airflow.password()}[/]  "
                  f"(graph and grid views of {DAG_ID}; logs of every task in {airflow.home / 'logs'})")
    api.unpause(DAG_ID)

    def trigger() -> str:
        run_id = api.trigger(DAG_ID, conf)
        console.print(f"triggered {run_id} through the REST API with conf {conf}: "
                      f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}")
        return api.wait(DAG_ID, run_id, timeout=3600)["state"]
    return airflow, trigger


def _summary(state: str, record, checked, mismatches, new, current, seconds) -> bool:
    table = Table(title=f"Requests per version, {current} -> {new} (5 s buckets)")
    versions = sorted({r["version"] for r in record.responses})
    table.add_column("t (s)")
    for version in versions:
        table.add_column(version, justify="right")
    for slot, counts in record.per_version_over_time().items():
        table.add_row(str(slot * 5), *[str(counts.get(v, 0)) for v in versions])
    console.print(table)
    ok = state == "success" and not record.failures and not mismatches
    console.print(f"DAG run: {state}; answers: {len(record.responses)}, writes: {len(record.written)}, "
                  f"deletes: {len(record.deleted)}; failed requests: {len(record.failures)} "
                  f"({len(record.retried)} 503s answered on a retry after Retry-After); "
                  f"version consistency: {checked - len(mismatches)}/{checked} sampled answers match the "
                  f"version they report; duration {seconds:.0f} s")
    for failure in record.failures[:5]:
        console.print(f"[red]{failure}[/]")
    console.print("[bold green]zero-downtime rollout complete[/]" if ok else "[bold red]rollout failed[/]")
    return ok
