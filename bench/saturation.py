"""Search throughput at saturation: the app beside its parts, at 1 and 4 concurrent clients.

    python -m bench.saturation [--store lance|elasticsearch] [--es-url URL] [--seconds 20]
           [--clients 1,4] [--warmup 2]

1. Setup: a fresh temporary ER_HOME (removed at the end); v1 and v2 as ``bench/backfill_scale.py``
   trains them (the tests' small settings), taken from its cache ``~/.cache/embedding-rollout/
   bench-models`` (trained once into it when missing); the project's model server (``ModelServer``
   + ``ModelManager``, backfill_scale's ``serve`` worker) in its own process on ephemeral ports; the
   real corpus (``data/corpus.jsonl.gz``) bootstrapped into v1 with ``steps.bootstrap`` (timed); the
   app as the tests build it (``create_app(Settings())`` under ``AppServer``, as
   ``tests/rollout_harness.py``'s ``LocalDeployment``) in its own process, announced after it has
   answered one search (the first imports TensorFlow's protos). Everything on 127.0.0.1.
2. Per client count C (``--clients``) the three paths, one after the other, each with C client
   processes that loop over the queries of ``load_queries()`` (client K starting K/C of the way in):
   - generator: ``client.embed([query])``, the v1 generator over gRPC, built as the app builds it
     (``generator_client(GeneratorTarget(...), protocol, timeout)`` from v1's spec);
   - store: ``store.search(v1's index, vector, 10, Filters())`` (``open_store(settings)``) with the
     queries' vectors precomputed by the same generator;
   - app: ``POST /search {"query": ..., "k": 10}`` over one keep-alive ``http.client`` connection
     (``bench.run.RawClient``) to the app server.
   Each client warms up for ``--warmup`` seconds (connections, caches, the app's first requests),
   says "ready"; all get "go" at once (backfill_scale's ``together``) and run until ``--seconds``
   after it, recording each completed request's latency; a failed request is counted as an error.

Per path and client count: requests/s = completed requests / the phase's wall time (from "go" to
the last client's end), p50 and p99 latency (nearest rank) over every client's requests, errors.
Then the app's rate against its slowest part's at each client count, and its overhead at p50 with
1 client: app p50 − (generator p50 + store p50). Prints markdown tables and appends JSON lines to
bench/results/saturation.jsonl (a ``run`` line with the machine's facts, one line per measurement).
The machine may be shared: each measurement records the 1-minute load average before and after.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.backfill_scale import (REPO, Child, Run, bootstrap, cached_models, deployment_env,  # noqa: E402
                                  machine_facts, now, ready_and_wait, report, start_model_server,
                                  stop_model_server, teardown, together)
from bench.run import RawClient, percentile  # noqa: E402

RESULTS = REPO / "bench" / "results" / "saturation.jsonl"
CORPUS = REPO / "data" / "corpus.jsonl.gz"
PATHS = ("generator", "store", "app")
K = 10


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# -- setup: models, model server, v1 bootstrapped, query vectors, the app -----------------------------
def start_worker(run: Run, name: str, kind: str, spec: dict) -> Child:
    """This file run with ``--worker kind``: stdin/stdout for the ready/go protocol, stderr to its log."""
    return run.child(name, [sys.executable, "-m", "bench.saturation", "--worker", kind, "--spec", json.dumps(spec)],
                     talk=True)


def first_line(child: Child) -> dict:
    line = child.process.stdout.readline()
    if not line:
        child.reap(block=True)
        child.check()
        raise RuntimeError(f"{child.log_path.name}: exited 0 without a first line")
    return json.loads(line)


def corpus_size() -> int:
    from embedding_rollout.corpus import load_documents
    return sum(1 for _ in load_documents(CORPUS))


def deploy(run: Run, model_base: Path, ports: dict):
    """The deployment's settings (also in os.environ, for the steps called here), its token file."""
    from embedding_rollout.auth import ensure_tokens_file
    from embedding_rollout.config import Settings
    run.env = {**deployment_env(run, ports, CORPUS, model_base), "ER_TOKENS": str(run.home / "tokens.json")}
    os.environ.update(run.env)
    run.settings = Settings()
    ensure_tokens_file(Path(run.settings.tokens_path))  # the app signs each answer's feedback reference
    return run.settings


def v1_generator(settings):
    """The v1 generator client, built as the app's ``EmbeddingService.generator`` builds it."""
    from embedding_rollout import steps
    from embedding_rollout.generator.client import GeneratorTarget, generator_client
    spec = steps.state_file(settings).read().spec("v1")
    target = GeneratorTarget(spec.name, spec.generator_grpc, spec.generator_rest, spec.model_name)
    return generator_client(target, protocol=settings.generator_protocol, timeout=settings.generator_timeout)


def query_texts() -> list[str]:
    from embedding_rollout.corpus import load_queries
    return [q.query for q in load_queries()]


def save_query_vectors(run: Run, settings) -> Path:
    """Every query's v1 vector, for the store clients: one file, in ``load_queries()`` order."""
    import numpy as np
    texts = query_texts()
    client = v1_generator(settings)
    vectors = np.vstack([client.embed(texts[i:i + 64]) for i in range(0, len(texts), 64)])
    path = run.home / "query-vectors-v1.npy"
    np.save(path, vectors)
    return path


def start_app(run: Run) -> tuple[Child, str]:
    app = start_worker(run, "app", "app", {})
    run.app = app
    return app, first_line(app)["url"]


def setup(run: Run) -> dict:
    model_base, models = cached_models(run)
    log(f"models: {models}")
    run.server, ports = start_model_server(run, model_base)
    settings = deploy(run, model_base, ports)
    run.args.documents = corpus_size()
    log(f"bootstrap v1 ({run.args.documents:,} documents, {run.args.store}, index prefix "
        f"{run.env['ER_INDEX_PREFIX']})")
    boot = bootstrap(run, settings)
    run.vectors = save_query_vectors(run, settings)
    _, run.app_url = start_app(run)
    log(f"app at {run.app_url}")
    return {"models": models, "corpus": str(CORPUS), "bootstrap": boot, "queries": len(query_texts()),
            "index": settings.index_name("v1")}


# -- measurements ------------------------------------------------------------------------------------
def client_spec(run: Run, path: str, client: int, clients: int) -> dict:
    return {"path": path, "client": client, "clients": clients, "seconds": run.args.seconds,
            "warmup": run.args.warmup, "url": run.app_url, "vectors": str(run.vectors),
            "index": run.settings.index_name("v1")}


def measure(run: Run, path: str, clients: int) -> dict:
    load_before = os.getloadavg()[0]
    workers = [start_worker(run, f"{path}-{clients}c-{k}", "client", client_spec(run, path, k, clients))
               for k in range(clients)]
    seconds, reports = together(workers)
    return summarize(path, clients, seconds, reports, load_before)


def summarize(path: str, clients: int, seconds: float, reports: list[dict], load_before: float) -> dict:
    latencies = [value for r in reports for value in r["latencies_ms"]]
    errors = sum(r["errors"] for r in reports)
    return {"path": path, "clients": clients, "seconds": seconds, "completed": len(latencies),
            "rps": len(latencies) / seconds, "p50_ms": percentile(latencies, .5), "p99_ms": percentile(latencies, .99),
            "errors": errors, "first_error": next((r["first_error"] for r in reports if r["first_error"]), None),
            "per_client": [len(r["latencies_ms"]) for r in reports], "load_before": load_before,
            "load_after": os.getloadavg()[0]}


def measure_all(run: Run, results: dict) -> None:
    for clients in run.args.clients:  # the three paths of one client count close together in time
        for path in PATHS:
            log(f"{path}, {clients} client(s), {run.args.seconds:g} s")
            row = measure(run, path, clients)
            results["measurements"].append(row)
            log(f"  {row['rps']:,.0f} requests/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                f"{row['errors']} errors")


# -- workers (this file run with --worker) --------------------------------------------------------------
def worker_app(spec: dict) -> None:
    from embedding_rollout.config import Settings
    from serving_app import AppServer, create_app
    server = AppServer(create_app(Settings()), host="127.0.0.1").start()
    first_search(server.url)
    print(json.dumps({"url": server.url}), flush=True)
    sys.stdin.read()  # until the benchmark closes stdin
    server.stop()


def first_search(url: str) -> None:
    """One search before the app is announced: the first builds Connexion's stack and imports
    TensorFlow's protos for the gRPC client (seconds, longer than a client's timeout)."""
    import urllib.request
    request = urllib.request.Request(f"{url}/search", data=json.dumps({"query": "warm-up", "k": K}).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        reply.read()


def rotated(items: list, spec: dict) -> list:
    start = len(items) * spec["client"] // spec["clients"]
    return items[start:] + items[:start]


def generator_request(spec: dict):
    from embedding_rollout.config import Settings
    client, texts = v1_generator(Settings()), rotated(query_texts(), spec)

    def call(i: int) -> None:
        if client.embed([texts[i % len(texts)]]).shape[0] != 1:
            raise RuntimeError("the generator answered no vector")
    return call


def store_request(spec: dict):
    import numpy as np
    from embedding_rollout.config import Settings
    from embedding_rollout.store import Filters, open_store
    store, index, vectors = open_store(Settings()), spec["index"], rotated(list(np.load(spec["vectors"])), spec)

    def call(i: int) -> None:
        if len(store.search(index, vectors[i % len(vectors)], K, Filters())) != K:
            raise RuntimeError(f"the store answered fewer than {K} hits")
    return call


def app_request(spec: dict):
    client, texts = RawClient(spec["url"]), rotated(query_texts(), spec)

    def call(i: int) -> None:
        status, body = client.post("/search", {"query": texts[i % len(texts)], "k": K})
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
    return call


REQUESTS = {"generator": generator_request, "store": store_request, "app": app_request}


def warm_up(call, seconds: float) -> int:
    """Requests until ``seconds`` have passed (at least one); a failure here fails the client."""
    deadline, i = now() + seconds, 0
    while i == 0 or now() < deadline:
        call(i)
        i += 1
    return i


def worker_client(spec: dict) -> None:
    call = REQUESTS[spec["path"]](spec)
    i = warm_up(call, spec["warmup"])
    ready_and_wait()
    latencies, errors, first_error = [], 0, None
    deadline = now() + spec["seconds"]
    while (started := now()) < deadline:
        try:
            call(i)
            latencies.append(round(1000 * (now() - started), 4))
        except Exception as exc:  # counted, and the loop goes on: the rate under errors is measured too
            errors, first_error = errors + 1, first_error or f"{type(exc).__name__}: {exc}"[:300]
        i += 1
    report({"latencies_ms": latencies, "errors": errors, "first_error": first_error})


WORKERS = {"app": worker_app, "client": worker_client}


# -- the report ------------------------------------------------------------------------------------------
def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def rows_by(results: dict) -> dict[tuple[str, int], dict]:
    return {(row["path"], row["clients"]): row for row in results["measurements"]}


def rate_and_p50(row: dict) -> str:
    return f"{_f(row['rps'], 0)} / {_f(row['p50_ms'], 2)} ms"


def slowest_part(rows: dict, clients: int) -> dict:
    return min((rows[(path, clients)] for path in ("generator", "store")), key=lambda row: row["rps"])


def app_overhead(results: dict) -> dict | None:
    """app p50 − (generator p50 + store p50), with 1 client."""
    rows = rows_by(results)
    if not all((path, 1) in rows for path in PATHS):
        return None
    gen, store, app = (rows[(path, 1)]["p50_ms"] for path in PATHS)
    return {"app_p50_ms": app, "generator_p50_ms": gen, "store_p50_ms": store, "overhead_ms": app - gen - store}


def summary_table(results: dict) -> list[str]:
    rows = rows_by(results)
    out = ["| clients | generator rps / p50 | store rps / p50 | app rps / p50 | slowest part | app / slowest part |",
           "|---|---|---|---|---|---|"]
    for clients in results["clients"]:
        slowest = slowest_part(rows, clients)
        app = rows[("app", clients)]
        out.append(f"| {clients} | " + " | ".join(rate_and_p50(rows[(path, clients)]) for path in PATHS)
                   + f" | {slowest['path']} | {100 * app['rps'] / slowest['rps']:.0f} % |")
    return out


def detail_table(results: dict) -> list[str]:
    out = ["| path | clients | requests | errors | seconds | requests/s | p50 ms | p99 ms | per client | "
           "load 1-min before / after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["measurements"]:
        out.append(f"| {row['path']} | {row['clients']} | {row['completed']:,} | {row['errors']} | "
                   f"{_f(row['seconds'], 2)} | {_f(row['rps'], 0)} | {_f(row['p50_ms'], 2)} | {_f(row['p99_ms'], 2)} | "
                   f"{' / '.join(map(str, row['per_client']))} | {row['load_before']:.2f} / {row['load_after']:.2f} |")
    return out


def render(results: dict) -> str:
    m, setup_ = results["machine"], results["setup"]
    boot = setup_["bootstrap"]
    out = [f"### Search throughput at saturation: {results['store']}, {results['documents']:,} documents, "
           f"{results['seconds']:g} s per measurement", "",
           f"`{results['command']}` on {m['date']} (git {m['git']}): nproc {m['nproc']}, {m['memory']} memory, "
           f"{m['platform']}, Python {m['python']}"
           + (f", Elasticsearch {m['elasticsearch']}" if "elasticsearch" in m else "")
           + f"; load average {m['load_start'][0]:.2f} at the start, {m['load_end'][0]:.2f} at the end; whole run "
           f"{_f(results['wall_s'], 0)} s. Models: {setup_['models']}. Bootstrap of v1: {_f(boot['seconds'])} s. "
           f"{setup_['queries']} queries, k {K}, warm-up {results['warmup']:g} s per client.", ""]
    out += summary_table(results) + [""]
    overhead = results["overhead"]
    if overhead:
        out += [f"App overhead at p50, 1 client: app p50 − (generator p50 + store p50) = "
                f"{_f(overhead['app_p50_ms'], 2)} − ({_f(overhead['generator_p50_ms'], 2)} + "
                f"{_f(overhead['store_p50_ms'], 2)}) = **{_f(overhead['overhead_ms'], 2)} ms**.", ""]
    out += detail_table(results) + [""]
    out.append("Each client is its own process looping over the queries until the deadline; requests/s = "
               "completed requests / wall time from \"go\" to the last client's end. Generator: "
               "`client.embed([query])` over gRPC; store: `store.search` with precomputed vectors; app: "
               "`POST /search` over one keep-alive `http.client` connection per client. Percentiles are "
               "nearest-rank over all clients' requests.")
    errors = [row for row in results["measurements"] if row["first_error"]]
    out += [f"First error of {row['path']} with {row['clients']} client(s): `{row['first_error']}`" for row in errors]
    return "\n".join(out)


def append_results(results: dict) -> None:
    """One JSON line per measurement, each with the run's facts, after a ``run`` line (for `jq`)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    common = {"run": results["run"], "store": results["store"], "documents": results["documents"],
              "seconds_per_measurement": results["seconds"], "warmup_s": results["warmup"],
              **{k: results["machine"][k] for k in ("date", "nproc", "platform")}}
    lines = [{**common, "section": "run", "machine": results["machine"], "setup": results["setup"],
              "command": results["command"], "wall_s": results["wall_s"], "overhead": results["overhead"]}]
    lines += [{**common, "section": "measurement", **row} for row in results["measurements"]]
    with open(RESULTS, "a") as out:
        out.writelines(json.dumps(line, default=str) + "\n" for line in lines)


# -- the run -------------------------------------------------------------------------------------------
def stop_app(run: Run) -> None:
    if getattr(run, "app", None) is not None:
        stop_model_server(run.app)  # any worker that serves until the end of its stdin


def run_benchmark(args) -> dict:
    started = now()
    results = {"run": uuid.uuid4().hex[:12], "store": args.store, "seconds": args.seconds, "warmup": args.warmup,
               "clients": args.clients, "command": " ".join(["python -m bench.saturation", *sys.argv[1:]]),
               "machine": machine_facts(args), "measurements": []}
    run = Run(args, Path(tempfile.mkdtemp(prefix="er-saturation-")))
    try:
        results["setup"] = setup(run)
        results["documents"] = args.documents
        measure_all(run, results)
    finally:
        stop_app(run)
        teardown(run, keep_home=False)  # the model server, every other child (killed), ES indices, ER_HOME
    results["machine"]["load_end"] = os.getloadavg()
    results["wall_s"] = now() - started
    results["overhead"] = app_overhead(results)
    return results


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=("lance", "elasticsearch"), default="lance")
    parser.add_argument("--es-url", default=os.environ.get("ER_ES_URL", "http://127.0.0.1:9200"))
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per path and client count")
    parser.add_argument("--clients", default="1,4", help="client process counts (comma-separated)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per client before the start")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    # What backfill_scale's setup functions read: a fresh home, never reused.
    args.home, args.skip_bootstrap_if_present, args.documents = None, False, 0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        WORKERS[args.worker](json.loads(args.spec))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run still stops its children
    results = run_benchmark(args)
    print(render(results), flush=True)
    append_results(results)
    log(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
