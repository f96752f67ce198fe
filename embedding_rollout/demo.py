"""The main job: a zero-downtime rollout on one machine, through Airflow, with live traffic.

Brings up the local stack with the current version (training v1 and indexing the corpus on the first
run), trains the next version on all data, runs the ``embedding_deploy_ramped`` DAG with
``dag.test()`` while a background thread searches and writes continuously, and ends with a summary.
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

REPO = Path(__file__).resolve().parent.parent
console = Console()


def configure_airflow(settings: Settings, verbose: bool) -> None:
    """Airflow reads its settings at import: set them first (a user's own settings win)."""
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
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] weights {stack.state.read().weights}  "
                      f"answers last 3 s {split}  failures {len(record.failures)}")


def run_demo(settings: Settings, step_percent: int, interval: int, port: int, verbose: bool) -> bool:
    from .local_stack import LocalStack
    from .model.trainer import TrainConfig
    from .model.training import train_version

    started = time.monotonic()
    configure_airflow(settings, verbose)
    stack = LocalStack(settings, app_port=port, rest_port=port + 1, grpc_port=port + 2).start()
    for key, value in {"ER_HOME": str(settings.home), "ER_GENERATOR_GRPC": stack.grpc_address,
                       "ER_GENERATOR_REST": stack.rest_url, "ER_APP_URL": stack.app_url,
                       "ER_AIRFLOW_RUNTIME": "local", "ER_STORE": settings.store}.items():
        os.environ[key] = value  # the DAG's step commands run as processes and inherit these
    current = stack.state.read().stable
    trained, number = available_versions(settings.model_dir), parse_version(current)
    newer = [n for n in trained if n > number]  # trained earlier but never rolled out
    new = version_label(min(newer) if newer else max(trained + [number]) + 1)
    if parse_version(new) not in available_versions(settings.model_dir):
        console.print(f"training {new} on all the data (about a minute)...")
        train_version(settings.model_dir, parse_version(new), TrainConfig(dims=96), until=None)
    console.print(f"[bold]rolling out {new} over {current}[/] via Airflow (embedding_deploy_ramped), "
                  f"app {stack.app_url}")
    from airflow.dag_processing.dagbag import DagBag
    dag = DagBag(dag_folder=str(REPO / "dags")).get_dag("embedding_deploy_ramped")
    stop = threading.Event()
    conf = {"new_version": new, "step_percent": step_percent, "step_interval_seconds": interval, "min_requests": 5}
    try:
        with Traffic(stack.app_url, lambda: stack.state.read().weights) as record:
            monitor = threading.Thread(target=_progress, args=(stack, record, stop), daemon=True)
            monitor.start()
            run = dag.test(run_conf=conf)
            stop.set()
        checked, mismatches = verify_consistency(record, settings.model_dir)
    finally:
        stack.stop()
    return _summary(run, record, checked, mismatches, new, current, time.monotonic() - started)


def _summary(run, record, checked, mismatches, new, current, seconds) -> bool:
    table = Table(title=f"Requests per version, {current} -> {new} (5 s buckets)")
    versions = sorted({r["version"] for r in record.responses})
    table.add_column("t (s)")
    for version in versions:
        table.add_column(version, justify="right")
    for slot, counts in record.per_version_over_time().items():
        table.add_row(str(slot * 5), *[str(counts.get(v, 0)) for v in versions])
    console.print(table)
    ok = str(run.state) in ("success", "DagRunState.SUCCESS") and not record.failures and not mismatches
    console.print(f"DAG run: {run.state}; answers: {len(record.responses)}, writes: {len(record.written)}, "
                  f"deletes: {len(record.deleted)}; failed requests: {len(record.failures)}; "
                  f"version consistency: {checked - len(mismatches)}/{checked} sampled answers match the "
                  f"version they report; duration {seconds:.0f} s")
    for failure in record.failures[:5]:
        console.print(f"[red]{failure}[/]")
    console.print("[bold green]zero-downtime rollout complete[/]" if ok else "[bold red]rollout failed[/]")
    return ok
