"""Soak: N consecutive ramped rollouts through Airflow's real scheduler, with live traffic.

    python -m bench.soak [--rollouts 10] [--step-percent 25] [--interval 15] [--home DIR] [--output FILE]

Brings up the local stack (LanceDB; v1 trained and indexed on first use, v2 trained too) and
Airflow's components (api-server, scheduler with the LocalExecutor at parallelism 4, dag-processor,
triggerer), then triggers ``embedding_deploy_ramped`` through the REST API N times in a row, each
rolling out the version the last one did not leave serving (v1 -> v2 -> v1 ...), while one client
searches and writes continuously. Per rollout it records the run's state, the wall time, the
configured intervals (steps x interval), the time tasks spent running (their start to end; the
ramp's includes its deferred windows), and Airflow's own overhead: the wall time no task was
running (scheduling, queueing, starting a worker), with the mean start latency per task. It counts
task instances the scheduler failed (the "state attribute is queued" race of apache/airflow#71172,
from the scheduler's log) and requests that failed. Writes a markdown section between the
``soak:begin``/``soak:end`` markers of docs/benchmarks.md (or ``--output``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RACE = re.compile(r"finished with state \w+, but the task instance's state attribute is")
DAG = "embedding_deploy_ramped"


def _seconds(start: str | None, end: str | None) -> float:
    if not start or not end:
        return 0.0
    parse = dt.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def _busy_seconds(task_instances: list[dict]) -> float:
    """Seconds of the run's span during which at least one task was running (union of intervals)."""
    spans = sorted((t["start_date"], t["end_date"]) for t in task_instances if t["start_date"] and t["end_date"])
    busy, current = 0.0, None
    for start, end in spans:
        if current and start <= current[1]:
            current = (current[0], max(current[1], end))
            continue
        if current:
            busy += _seconds(*current)
        current = (start, end)
    return busy + (_seconds(*current) if current else 0.0)


def measure(run: dict, tis: list[dict], steps: int, interval: int, record, failures_before: int) -> dict:
    ran = [t for t in tis if t["start_date"] and t["state"] not in ("skipped", "upstream_failed")]
    wall = _seconds(run["start_date"], run["end_date"])
    busy = _busy_seconds(ran)
    # A task that deferred keeps its first start but is queued again to resume: count first starts only.
    latencies = [_seconds(t["queued_when"], t["start_date"]) for t in ran
                 if t.get("queued_when") and t["queued_when"] <= t["start_date"]]
    return {"state": run["state"], "wall_s": round(wall, 1), "intervals_s": steps * interval,
            "tasks_running_s": round(busy, 1), "airflow_overhead_s": round(wall - busy, 1),
            "tasks": len(ran), "mean_queued_to_start_s": round(statistics.mean(latencies), 2) if latencies else None,
            "failed_tasks": sorted(t["task_id"] for t in tis if t["state"] == "failed"),
            "failed_requests": len(record.failures) - failures_before}


def soak(rollouts: int, step_percent: int, interval: int, home: Path) -> dict:
    from embedding_rollout.airflow_stack import AirflowStack, free_port
    from embedding_rollout.auth import token_for
    from embedding_rollout.config import Settings
    from embedding_rollout.loadgen import Traffic
    from embedding_rollout.local_stack import LocalStack
    from embedding_rollout.model.trainer import TrainConfig
    from embedding_rollout.model.training import train_version
    from embedding_rollout.generator.models import available_versions

    os.environ.update({"ER_HOME": str(home), "ER_STORE": "lance"})
    settings = Settings()
    ports = [free_port() for _ in range(4)]
    stack = LocalStack(settings, app_port=ports[0], rest_port=ports[1], grpc_port=ports[2]).start()
    if 2 not in available_versions(settings.model_dir):
        train_version(settings.model_dir, 2, TrainConfig(dims=96), until=None)
    env = {"ER_HOME": str(home), "ER_STORE": "lance", "ER_GENERATOR_GRPC": stack.grpc_address,
           "ER_GENERATOR_REST": stack.rest_url, "ER_APP_URL": stack.app_url, "ER_AIRFLOW_RUNTIME": "local",
           "ER_RETRAIN_SCHEDULE": "none"}
    airflow = AirflowStack(home / "airflow", port=ports[3], parallelism=4, env=env, app_url=stack.app_url,
                           app_token=token_for(settings.tokens_path, "operator"))
    results, started = [], time.monotonic()
    try:
        airflow.start()
        api = airflow.api()
        api.unpause(DAG)
        steps = len(range(step_percent, 100, step_percent)) + 1
        with Traffic(stack.app_url, lambda: stack.state.read().weights) as record:
            for n in range(rollouts):
                current = stack.state.read().stable
                new = "v1" if current == "v2" else "v2"
                before = len(record.failures)
                run_id = api.trigger(DAG, {"new_version": new, "step_percent": step_percent,
                                           "step_interval_seconds": interval, "min_requests": 5})
                run = api.wait(DAG, run_id, timeout=3600)
                result = measure(run, list(api.task_instances(DAG, run_id).values()), steps, interval, record,
                                 before)
                results.append({"rollout": f"{current} -> {new}", **result})
                print(json.dumps(results[-1]), flush=True)
            answered = len(record.responses)
        log = (home / "airflow" / "component-logs" / "scheduler.log").read_text(errors="replace")
        return {"rollouts": results, "scheduler_failed_tasks": len(RACE.findall(log)), "answers": answered,
                "total_s": round(time.monotonic() - started), "interval_s": interval, "step_percent": step_percent}
    finally:
        airflow.stop()
        stack.stop()


def markdown(report: dict) -> str:
    rows = report["rollouts"]
    ok = sum(r["state"] == "success" for r in rows)
    mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
    lines = [
        "<!-- soak:begin -->",
        f"### Soak: {len(rows)} consecutive ramped rollouts through the scheduler (`python -m bench.soak`)",
        "",
        f"Run {dt.date.today().isoformat()}: `step_percent` {report['step_percent']} "
        f"({len(range(report['step_percent'], 100, report['step_percent'])) + 1} steps), "
        f"`step_interval_seconds` {report['interval_s']}, LocalExecutor parallelism 4, LanceDB, one client "
        f"searching and writing throughout ({report['answers']} answers); {report['total_s']} s in all.",
        "",
        f"- successes: **{ok} of {len(rows)}**; scheduler-failed task instances: "
        f"**{report['scheduler_failed_tasks']}** (goal 0); failed requests: "
        f"**{sum(r['failed_requests'] for r in rows)}**",
        f"- per rollout, mean: wall {mean('wall_s'):.0f} s = configured intervals {mean('intervals_s'):.0f} s "
        f"+ task work {mean('tasks_running_s') - mean('intervals_s'):.0f} s (deploy, dual-write, backfill, "
        f"analysis, promote, remove) + Airflow's own overhead {mean('airflow_overhead_s'):.0f} s "
        f"(no task running: scheduling, queueing, worker start; {mean('tasks'):.0f} tasks, queued to started "
        f"{statistics.mean(r['mean_queued_to_start_s'] or 0 for r in rows):.2f} s each on average)",
        "",
        "| # | rollout | state | wall (s) | intervals (s) | tasks running (s) | Airflow overhead (s) | "
        "queued→started (s/task) | failed requests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['rollout']} | {r['state']} | {r['wall_s']} | {r['intervals_s']} | "
                     f"{r['tasks_running_s']} | {r['airflow_overhead_s']} | {r['mean_queued_to_start_s']} | "
                     f"{r['failed_requests']} |")
    lines += ["<!-- soak:end -->", ""]
    return "\n".join(lines)


def write(section: str, output: Path) -> None:
    text = output.read_text() if output.exists() else ""
    if "<!-- soak:begin -->" in text:
        head, rest = text.split("<!-- soak:begin -->", 1)
        text = head + section + rest.split("<!-- soak:end -->", 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    output.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=10)
    parser.add_argument("--step-percent", type=int, default=25)
    parser.add_argument("--interval", type=int, default=15)
    parser.add_argument("--home", type=Path, default=None, help="ER_HOME to use (default: a new temporary one)")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="er-soak-"))
    report = soak(args.rollouts, args.step_percent, args.interval, home.resolve())
    (home / "soak.json").write_text(json.dumps(report, indent=2))
    write(markdown(report), args.output)
    print(markdown(report))


if __name__ == "__main__":
    main()
