"""Benchmarks of the embedding system on this machine, in one run; figures go to docs/benchmarks.md.

    python -m bench.run [--quick] [--model-repo DIR] [--es-url URL] [--output FILE]

1. Generator throughput, texts/s at batch 64, over gRPC and REST, per model version: the project's
   model server (``embedding-rollout serve``, its own process) and client (``generator_client``).
2. Store write rates for LanceDB and Elasticsearch: bulk index of the 10,017 corpus documents with
   precomputed vectors (``bulk_write`` in batches of 500 inside ``begin_bulk_load``/``end_bulk_load``)
   and the end-to-end backfill (embed + write, ``load_index``).
3. Search latency p50/p99 through the app's real HTTP server (``create_app`` + ``AppServer`` in its
   own process, ``bench/appserver.py``) beside its parts measured the same way, interleaved request
   by request: the generator call (``client.embed`` of one query) and the store query
   (``store.search``); plus two references (the app's ``GET /healthz`` and a bare ASGI app under the
   same uvicorn), a per-layer breakdown from probes inside the app, a cProfile of the app, and
   what-if variants of the app (``bench/appserver.py --variant``) measured side by side.

Models: v1 (documents before 2019, 64 dims) and v2 (all documents, 96 dims) are trained into a
temporary model repository (2 epochs; 1 with --quick) unless ``--model-repo`` names one
(``<base>/embedder`` with integer version folders). Elasticsearch rows need a server at
``--es-url`` (``scripts/elasticsearch.sh start``); without one they are marked as not measured.

A full run writes the generated part of docs/benchmarks.md (between the ``bench:begin``/``bench:end``
markers; the rest of the file is kept). ``--quick`` is a smoke run with small samples; it writes to a
temporary file unless ``--output`` is given. Timing goals live here and in that page, never in tests.
"""
from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import os
import platform
import pstats
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import requests  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
now = time.perf_counter


# -- small helpers ---------------------------------------------------------------------------
def percentile(values, q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def ms(seconds: float) -> float:
    return 1000.0 * seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shell(command: str) -> str:
    try:
        return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # a fact we can't read is reported, not fatal
        return f"({command}: {exc})"


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Phases:
    """Wall time, load average and whole-machine CPU use of each phase of the run."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @contextmanager
    def __call__(self, name: str):
        load_before = os.getloadavg()[0]
        busy0, total0 = cpu_times()
        started = now()
        print(f"[bench] {name} (load {load_before:.2f})", flush=True)
        try:
            yield
        finally:
            busy1, total1 = cpu_times()
            self.rows.append({"phase": name, "seconds": now() - started, "load_before": load_before,
                              "load_after": os.getloadavg()[0],
                              "machine_busy": (busy1 - busy0) / max(total1 - total0, 1.0)})


def versions_of_packages() -> dict[str, str]:
    names = ["tensorflow", "keras", "grpcio", "tensorflow-serving-api", "lancedb", "pylance", "pyarrow",
             "elasticsearch", "connexion", "Flask", "Werkzeug", "starlette", "a2wsgi", "uvicorn", "httptools",
             "uvloop", "jsonschema", "requests", "numpy"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


# -- models and the model server ----------------------------------------------------------------
MODELS = {1: ("2019-01-01", 64), 2: (None, 96)}  # version: (trained until, dims)


def prepare_models(args, phases: Phases) -> tuple[Path, dict]:
    if args.model_repo:
        repo = Path(args.model_repo).resolve()
        if not any(p.name.isdigit() for p in repo.iterdir()) and (repo / "embedder").is_dir():
            repo = repo / "embedder"
        return repo, {"source": f"reused {repo}"}
    from embedding_rollout.model.trainer import TrainConfig
    from embedding_rollout.model.training import train_version
    repo = Path(tempfile.mkdtemp(prefix="er-bench-models-")) / "embedder"
    epochs = 1 if args.quick else 2
    info = {"source": f"trained for this run ({epochs} epochs each)"}
    for number, (until, dims) in MODELS.items():
        with phases(f"train v{number}"):
            result = train_version(repo, number, TrainConfig(dims=dims, epochs=epochs), until)
        info[f"v{number}"] = {"dims": dims, "until": until, "recall@10": result.get(result.get("metric", ""), None),
                              "seconds": result.get("seconds")}
    return repo, info


def served_versions(repo: Path) -> list[int]:
    return sorted(int(p.name) for p in repo.iterdir() if p.name.isdigit() and (p / "saved_model.pb").exists())


class ModelServerProcess:
    """``embedding-rollout serve`` in its own process, on free ports."""

    def __init__(self, repo: Path, versions: list[int]):
        self.grpc_port, self.rest_port = free_port(), free_port()
        env = {**os.environ, "ER_MODEL_BASE": str(repo.parent), "ER_MODEL_NAME": repo.name}
        self.command = [sys.executable, "-m", "embedding_rollout.cli", "--log-level", "WARNING", "serve",
                        "--versions", ",".join(map(str, versions)), "--rest-port", str(self.rest_port),
                        "--grpc-port", str(self.grpc_port)]
        self.process = subprocess.Popen(self.command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def target(self, version: str):
        from embedding_rollout.generator.client import GeneratorTarget
        return GeneratorTarget(version, f"127.0.0.1:{self.grpc_port}", f"http://127.0.0.1:{self.rest_port}")

    def wait(self, versions: list[str], seconds: float = 180) -> None:
        from embedding_rollout.generator.client import GeneratorError, generator_client
        deadline = time.monotonic() + seconds
        for version in versions:
            client = generator_client(self.target(version), protocol="rest", timeout=2)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the model server exited with {self.process.returncode}")
                try:
                    if client.status() == "AVAILABLE":
                        break
                except GeneratorError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the model server did not come up")
                time.sleep(0.3)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# -- 1. generator throughput ------------------------------------------------------------------
def generator_throughput(target, protocol: str, texts: list[str], batches: int, rounds: int) -> dict:
    from embedding_rollout.generator.client import generator_client
    client = generator_client(target, protocol=protocol, batch_size=64, timeout=30)
    for i in range(3):  # warm-up: connections, TF's first calls
        client.embed(texts[i * 64:(i + 1) * 64])
    rates = []
    position = 0
    for _ in range(rounds):
        started = now()
        for _ in range(batches):
            if position + 64 > len(texts):
                position = 0
            vectors = client.embed(texts[position:position + 64])
            assert vectors.shape[0] == 64
            position += 64
        rates.append(batches * 64 / (now() - started))
    return {"texts_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "rounds": rounds,
            "texts_per_round": batches * 64}


# -- 2. stores ------------------------------------------------------------------------------------
def open_store(backend: str, args, timeout: float):
    if backend == "lance":
        from embedding_rollout.store.lance import LanceStore
        return LanceStore(str(Path(args.workdir) / "lancedb"))
    from embedding_rollout.store.elastic import ElasticsearchStore
    return ElasticsearchStore(args.es_url, timeout=timeout)


def bulk_index(store, index: str, dims: int, embedded: list, batch: int = 500) -> dict:
    store.create_index(index, dims, {"model_version": "bench"})
    started = now()
    store.begin_bulk_load(index)
    written = 0
    for i in range(0, len(embedded), batch):
        result = store.bulk_write(index, embedded[i:i + batch])
        assert not result.failed, result.failed[:3]
        written += result.written
    writes_done = now()
    store.end_bulk_load(index)
    finished = now()
    count = store.count(index)
    assert count == len(embedded) == written, (count, written, len(embedded))
    return {"docs": count, "write_s": writes_done - started, "end_bulk_load_s": finished - writes_done,
            "total_s": finished - started, "docs_per_s": count / (finished - started),
            "write_docs_per_s": count / (writes_done - started)}


def backfill(store, index: str, dims: int, embed) -> dict:
    from embedding_rollout.pipeline.indexing import corpus_source, load_index
    store.create_index(index, dims, {"model_version": "bench"})
    started = now()
    checkpoint = load_index(corpus_source, store, index, embed, batch_size=256)
    seconds = now() - started
    count = store.count(index)
    assert checkpoint.done and count == checkpoint.written, (count, checkpoint)
    return {"docs": count, "total_s": seconds, "docs_per_s": count / seconds}


# -- 3. search latency ------------------------------------------------------------------------------
class AppProcess:
    """``bench/appserver.py``: the app (create_app + AppServer) and the floor server, in one process."""

    def __init__(self, state_path: Path, backend: str, args, variant: str = "as-is"):
        command = [sys.executable, "-m", "bench.appserver", "--state", str(state_path), "--store", backend,
                   "--variant", variant]
        command += (["--lance-uri", str(Path(args.workdir) / "lancedb")] if backend == "lance"
                    else ["--es-url", args.es_url])
        self.process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the app process exited with {self.process.wait()}")
        urls = json.loads(line)
        self.url, self.floor_url, self.lean_url = urls["app"], urls["floor"], urls["lean"]

    def command(self, text: str) -> str:
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline().strip()
        if not reply.startswith("ok"):
            raise RuntimeError(f"app process: {text!r} -> {reply!r}")
        return reply

    def stop(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(20)
        except Exception:
            self.process.kill()


class RawClient:
    """One keep-alive ``http.client`` connection: an HTTP client with almost no Python on top."""

    def __init__(self, base_url: str):
        host, port = base_url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.connection = http.client.HTTPConnection(self.host, self.port, timeout=10)

    def post(self, path: str, body: dict) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        for attempt in (1, 2):  # the server may have closed an idle keep-alive connection
            try:
                self.connection.request("POST", path, body=data, headers={"content-type": "application/json"})
                response = self.connection.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                self.connection.close()
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def search_latency(app: AppProcess, client, store, index: str, queries: list[str], warmup: int) -> dict:
    from embedding_rollout.store.base import Filters
    session = requests.Session()
    search_url, health_url = f"{app.url}/search", f"{app.url}/healthz"
    rows: dict[str, list[float]] = {"app": [], "gen": [], "store": [], "app_raw": [], "healthz": [], "floor": [],
                                    "floor_raw": []}
    app_raw, floor_raw = RawClient(app.url), RawClient(app.floor_url)
    sizes: list[int] = []
    mismatches = 0

    def one(query: str, floor_url: str) -> tuple[float, ...]:
        nonlocal mismatches
        body = {"query": query, "k": 10}
        started = now()
        reply = session.post(search_url, json=body, timeout=10)
        app_s = now() - started
        assert reply.status_code == 200, reply.text[:300]
        started = now()
        vector = client.embed([query])[0]
        gen_s = now() - started
        started = now()
        hits = store.search(index, vector, 10, Filters())
        store_s = now() - started
        mismatches += [h.id for h in hits] != [r["id"] for r in reply.json()["results"]]
        sizes.append(len(reply.content))
        started = now()
        status, _ = app_raw.post("/search", body)
        app_raw_s = now() - started
        assert status == 200
        started = now()
        assert session.get(health_url, timeout=10).status_code == 200
        health_s = now() - started
        started = now()
        assert session.post(floor_url, json=body, timeout=10).status_code == 200
        floor_s = now() - started
        started = now()
        status, _ = floor_raw.post(floor_url.removeprefix(app.floor_url), body)
        raw_s = now() - started
        assert status == 200
        return app_s, gen_s, store_s, app_raw_s, health_s, floor_s, raw_s

    for query in queries[:warmup]:  # warm-up: connections, caches, the app's first requests
        one(query, f"{app.floor_url}/search?bytes=4000")
    floor_url = f"{app.floor_url}/search?bytes={int(statistics.median(sizes))}"
    sizes.clear()
    mismatches = 0
    for query in queries[warmup:]:
        for name, value in zip(rows, one(query, floor_url)):
            rows[name].append(value)
    result = {"requests": len(rows["app"]), "warmup": warmup, "response_bytes": statistics.median(sizes),
              "ranking_mismatches": mismatches}
    for name, values in rows.items():
        result[name] = {"p50": ms(percentile(values, .5)), "p90": ms(percentile(values, .9)),
                        "p99": ms(percentile(values, .99)), "mean": ms(statistics.fmean(values))}
    result["parts_p50"] = result["gen"]["p50"] + result["store"]["p50"]
    result["overhead_p50"] = result["app"]["p50"] - result["parts_p50"]
    paired = [a - g - s for a, g, s in zip(rows["app"], rows["gen"], rows["store"])]
    result["paired_overhead_p50"] = ms(percentile(paired, .5))
    result["overhead_raw_p50"] = result["app_raw"]["p50"] - result["parts_p50"]
    return result


SEGMENTS = [  # (name, start mark, end mark, what it is)
    ("http", None, None, "client ↔ uvicorn: requests, loopback TCP, HTTP parsing, event-loop scheduling"),
    ("connexion_asgi", "asgi_in", "a2wsgi_in",
     "Connexion's ASGI middlewares: routing, security, request body read + JSON Schema validation"),
    ("a2wsgi_in", "a2wsgi_in", "wsgi_in", "a2wsgi: WSGI environ, hand-off to a worker thread"),
    ("flask_in", "wsgi_in", "view_in", "Flask: request context, URL routing"),
    ("connexion_flask_in", "view_in", "handler_in",
     "Connexion's Flask-side decorators, rebuilt per request: signature inspection, body parsed again, kwargs"),
    ("view_pre", "handler_in", "service_in", "the view before the service: state read, version assignment, filters"),
    ("service_own", None, None, "EmbeddingService.search minus its two calls (second state read)"),
    ("embed", "embed_in", "embed_out", "generator call inside the app (gRPC)"),
    ("store", "store_in", "store_out", "store query inside the app"),
    ("view_post", "service_out", "handler_out", "the view after the service: payload dict, Prometheus metrics"),
    ("connexion_flask_out", "handler_out", "view_out",
     "Connexion's response decorator: JSON serialisation (indent=2, pure-Python encoder), Flask response"),
    ("flask_finalize", "view_out", "start_response_in", "Flask: finalize the response, after-request hooks"),
    ("a2wsgi_start", "start_response_in", "start_response_out",
     "a2wsgi: start_response hands the response start to the event loop and waits (hop 1 of 3)"),
    ("flask_teardown", "start_response_out", "wsgi_out", "Flask: app and request context teardown"),
    ("a2wsgi_out", "wsgi_out", "body_sent", "a2wsgi: body and end of body handed to the event loop (hops 2 and 3)"),
]


def probe_breakdown(app: AppProcess, queries: list[str], workdir: Path) -> dict:
    session = requests.Session()
    for query in queries[:20]:
        session.post(f"{app.url}/search", json={"query": query, "k": 10}, timeout=10)
    app.command("probe on")
    app.command(f"probe dump {workdir / 'discard.json'}")
    client_s = []
    for query in queries:
        started = now()
        reply = session.post(f"{app.url}/search", json={"query": query, "k": 10}, timeout=10)
        client_s.append(now() - started)
        assert reply.status_code == 200
    app.command("probe off")
    path = workdir / f"probe-{uuid.uuid4().hex[:6]}.json"
    app.command(f"probe dump {path}")
    records = [r for r in json.loads(path.read_text()) if r["path"] == "/search"]
    assert len(records) == len(client_s), (len(records), len(client_s))
    segments: dict[str, list[float]] = {name: [] for name, *_ in SEGMENTS}
    in_app, after, overhead, totals = [], [], [], []
    for record, total in zip(records, client_s):
        span = record["body_sent"] - record["asgi_in"]
        for name, start, end, _ in SEGMENTS:
            if name == "http":
                value = total - span
            elif name == "service_own":
                value = ((record["service_out"] - record["service_in"]) - (record["embed_out"] - record["embed_in"])
                         - (record["store_out"] - record["store_in"]))
            else:
                value = record[end] - record[start]
            segments[name].append(value)
        totals.append(total)
        in_app.append(span)
        after.append(record["asgi_out"] - record["body_sent"])
        overhead.append(total - (record["embed_out"] - record["embed_in"]) - (record["store_out"] - record["store_in"]))
    summary = {name: {"p50": ms(percentile(v, .5)), "mean": ms(statistics.fmean(v))} for name, v in segments.items()}
    return {"requests": len(records), "segments": summary,
            "client_total": {"p50": ms(percentile(totals, .5)), "mean": ms(statistics.fmean(totals))},
            "in_app": {"p50": ms(percentile(in_app, .5)), "mean": ms(statistics.fmean(in_app))},
            "after_response": {"p50": ms(percentile(after, .5)), "mean": ms(statistics.fmean(after))},
            "overhead": {"p50": ms(percentile(overhead, .5)), "mean": ms(statistics.fmean(overhead))}}


PROFILE_GROUPS = [  # first match wins; (group, substrings of the function's file or name)
    ("waiting: locks, futures, sockets (wall time blocked, not CPU)",
     ["method 'acquire' of", "method 'wait' of", "method 'recv", "method 'send", "'select'", "poll' of",
      "method 'result' of"]),
    ("Connexion request validation + jsonschema", ["connexion/validators", "connexion/middleware/request_validation",
                                                   "jsonschema/", "referencing/", "jsonschema_specifications"]),
    ("Connexion (routing, security, context, other middlewares)", ["connexion/"]),
    ("Starlette (Request, datastructures)", ["starlette/"]),
    ("a2wsgi", ["a2wsgi/"]),
    ("Flask + Werkzeug", ["flask/", "werkzeug/"]),
    ("uvicorn + httptools", ["uvicorn/", "httptools"]),
    ("asyncio + threads + futures (stdlib)", ["asyncio/", "concurrent/futures", "threading.py", "queue.py",
                                              "contextvars", "selectors.py"]),
    ("generator client: gRPC, protobuf, tenacity", ["grpc/", "google/protobuf", "tenacity/", "tensorflow/",
                                                    "tensorflow_serving", "embedding_rollout/generator/"]),
    ("store: LanceDB / pyarrow", ["lancedb/", "lance/", "pyarrow/", "embedding_rollout/store/lance"]),
    ("store: Elasticsearch client / urllib3", ["elasticsearch/", "elastic_transport/", "urllib3/",
                                               "embedding_rollout/store/elastic"]),
    ("app: views, service, state, metrics", ["serving_app/", "embedding_rollout/", "prometheus_client/"]),
    ("json (stdlib)", ["json/"]),
    ("numpy", ["numpy/"]),
]


def _group(func: tuple) -> str:
    filename, _, name = func
    text = f"{filename}:{name}"
    for group, needles in PROFILE_GROUPS:
        if any(n in text for n in needles):
            return group
    return "other (stdlib, builtins)"


def profile_app(app: AppProcess, queries: list[str], workdir: Path) -> dict:
    session = requests.Session()
    for query in queries[:20]:
        session.post(f"{app.url}/search", json={"query": query, "k": 10}, timeout=10)
    app.command("profile start")
    started = now()
    for query in queries:
        assert session.post(f"{app.url}/search", json={"query": query, "k": 10}, timeout=10).status_code == 200
    wall = now() - started
    path = workdir / f"profile-{uuid.uuid4().hex[:6]}.pstats"
    app.command(f"profile stop {path}")
    stats = pstats.Stats(str(path))
    groups: dict[str, float] = {}
    for func, (_, _, tottime, _, _) in stats.stats.items():
        groups[_group(func)] = groups.get(_group(func), 0.0) + tottime
    n = len(queries)
    cumulative = sorted(((ct, f) for f, (_, _, _, ct, _) in stats.stats.items()), reverse=True)
    interesting = ["connexion/", "jsonschema/", "a2wsgi/", "flask/app.py", "serving_app/", "embedding_rollout/",
                   "uvicorn/", "starlette/"]
    top = []
    for ct, (filename, line, name) in cumulative:
        if any(k in filename for k in interesting):
            short = filename.split("site-packages/")[-1].replace(str(REPO) + "/", "")
            top.append({"function": f"{short}:{line}({name})", "cum_ms_per_request": ms(ct) / n})
        if len(top) >= 18:
            break
    return {"requests": n, "wall_ms_per_request": ms(wall) / n, "pstats": str(path),
            "groups_ms_per_request": {g: ms(t) / n for g, t in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_cumulative": top}


def what_ifs(state_path: Path, backend: str, queries: list[str], args) -> dict:
    """The app as it is, with what-if changes (``bench/appserver.py``'s variants) and the lean lower
    bound, all running at once and asked in turn for each query (rotating the order), so that the
    machine's changing load hits each alike. Probes are on in every process: the figures that compare
    are the overheads (time minus the generator and store calls timed inside the server), which the
    store's and generator's jitter (milliseconds) does not blur."""
    from bench.appserver import VARIANTS
    apps = {variant: AppProcess(state_path, backend, args, variant) for variant in VARIANTS}
    lean = "lean ASGI handler (lower bound)"
    try:
        targets = {variant: (app, app.url, "app") for variant, app in apps.items()}
        targets[lean] = (apps["as-is"], apps["as-is"].lean_url, "lean")
        sessions = {name: requests.Session() for name in targets}
        raws = {name: RawClient(url) for name, (_, url, _) in targets.items()}
        client_times: dict[str, list[tuple[str, float]]] = {name: [] for name in targets}
        for app in apps.values():
            app.command("probe on")
        names = list(targets)
        reference = None
        for i, query in enumerate(queries):
            body = {"query": query, "k": 10}
            for name in names[i % len(names):] + names[:i % len(names)]:
                _, url, _ = targets[name]
                started = now()
                reply = sessions[name].post(f"{url}/search", json=body, timeout=10)
                client_times[name].append(("requests", now() - started))
                assert reply.status_code == 200, reply.text[:300]
                started = now()
                status, _ = raws[name].post("/search", body)
                client_times[name].append(("http.client", now() - started))
                assert status == 200
                if i == 0:  # every variant must answer exactly like the app
                    reference = reference or reply.json()
                    assert reply.json() == reference, f"{name} answers differently"
        records: dict[str, list[dict]] = {}
        for variant, app in apps.items():
            app.command("probe off")
            path = Path(args.workdir) / f"whatif-{uuid.uuid4().hex[:6]}.json"
            app.command(f"probe dump {path}")
            for record in json.loads(path.read_text()):
                key = variant if record["server"] == "app" else lean
                records.setdefault(key, []).append(record)
        result: dict = {"requests": len(queries) - args.warmup}
        for name in names:
            assert len(records[name]) == len(client_times[name]), (name, len(records[name]), len(client_times[name]))
            rows: dict[str, list[float]] = {"requests": [], "http.client": [], "overhead requests": [],
                                            "overhead http.client": [], "in-app overhead": []}
            for n, (record, (client, elapsed)) in enumerate(zip(records[name], client_times[name])):
                if n < 2 * args.warmup:
                    continue
                parts = (record["embed_out"] - record["embed_in"]) + (record["store_out"] - record["store_in"])
                rows[client].append(elapsed)
                rows[f"overhead {client}"].append(elapsed - parts)
                rows["in-app overhead"].append(record["body_sent"] - record["asgi_in"] - parts)
            result[name] = {key: {"p50": ms(percentile(v, .5)), "p99": ms(percentile(v, .99))}
                            for key, v in rows.items()}
        return result
    finally:
        for app in apps.values():
            app.stop()


def latency_for_backend(backend: str, store, index: str, dims: int, servers: ModelServerProcess,
                        version: str, queries: list[str], args, phases: Phases) -> dict:
    from embedding_rollout.domain.state import StateFile, VersionSpec
    from embedding_rollout.generator.client import generator_client
    target = servers.target(version)
    state = StateFile(Path(args.workdir) / f"state-{backend}.json")
    spec = VersionSpec(version, dims, index, generator_grpc=target.grpc_address, generator_rest=target.rest_url)
    state.update(lambda s: s.with_version(spec).with_write_target(version).with_backfill(version)  # loaded above
                 .with_verification(version, {"source": "corpus", "complete": True, "by": "bench"})
                 .with_weights({version: 100}).with_stable(version))
    client = generator_client(target, protocol="grpc", timeout=2.0)
    app = AppProcess(state.path, backend, args)
    try:
        with phases(f"{backend}: search latency"):
            result = search_latency(app, client, store, index, queries, warmup=args.warmup)
        with phases(f"{backend}: probed breakdown"):
            result["breakdown"] = probe_breakdown(app, queries[:args.probe_requests], Path(args.workdir))
        if not args.no_profile:
            with phases(f"{backend}: cProfile"):
                result["profile"] = profile_app(app, queries[:args.probe_requests], Path(args.workdir))
    finally:
        app.stop()
    if backend in args.what_if_backends:
        with phases(f"{backend}: what-ifs"):
            result["what_ifs"] = what_ifs(state.path, backend, queries[:args.warmup + args.probe_requests], args)
    return result


# -- the run ----------------------------------------------------------------------------------------
def es_available(url: str) -> str | None:
    try:
        requests.get(f"{url}/_cluster/health", timeout=3).raise_for_status()
        reply = requests.get(f"{url}/_nodes/_local", params={"filter_path": "nodes.*.version"}, timeout=3)
        return next(iter(reply.json()["nodes"].values()))["version"]
    except (requests.RequestException, ValueError, KeyError, StopIteration):
        return None


def run(args) -> dict:
    from embedding_rollout.corpus import load_queries
    from embedding_rollout.generator.client import generator_client
    from embedding_rollout.pipeline.indexing import corpus_source, embed_batch, embedding_text

    phases = Phases()
    results: dict = {"started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "command": "python -m bench.run " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                     "quick": args.quick, "uptime_start": shell("uptime"),
                     "machine": {"nproc": shell("nproc"), "free": shell("free -h"), "lscpu": shell("lscpu | head -20"),
                                 "kernel": platform.release()},
                     "python": platform.python_version(), "packages": versions_of_packages(),
                     "git": shell(f"git -C {REPO} rev-parse --short HEAD") +
                     (" (with uncommitted changes)" if shell(f"git -C {REPO} status --porcelain") else "")}
    es_version = es_available(args.es_url)
    results["elasticsearch"] = {"url": args.es_url, "server": es_version}
    backends = ["lance"] + (["elasticsearch"] if es_version else [])
    if not es_version:
        print(f"[bench] no Elasticsearch at {args.es_url}: its rows are not measured", flush=True)

    repo, results["models"] = prepare_models(args, phases)
    numbers = served_versions(repo)
    labels = [f"v{n}" for n in numbers]
    latest = labels[-1]
    servers = ModelServerProcess(repo, numbers)
    results["model_server"] = " ".join(servers.command[1:])
    try:
        with phases("model server start"):
            servers.wait(labels)
        docs = list(corpus_source())
        texts = [embedding_text(d.fields) for d in docs]
        results["corpus"] = {"documents": len(docs), "mean_text_chars": statistics.fmean(len(t) for t in texts)}

        # 1. generator throughput
        batches, rounds = (10, 1) if args.quick else (40, 3)
        results["generator"] = {}
        for label in labels:
            for protocol in ("grpc", "rest"):
                with phases(f"generator {label} {protocol}"):
                    results["generator"][f"{label} {protocol}"] = generator_throughput(
                        servers.target(label), protocol, texts, batches, rounds)
                print(f"[bench]   {label} {protocol}: {results['generator'][f'{label} {protocol}']['texts_per_s']:.0f}"
                      " texts/s", flush=True)

        # 2. stores: precomputed vectors, then the end-to-end backfill
        embedder = generator_client(servers.target(latest), protocol="grpc", batch_size=256, timeout=60)
        with phases(f"embed corpus with {latest}"):
            started = now()
            embedded = [d for i in range(0, len(docs), 500) for d in embed_batch(docs[i:i + 500], embedder.embed)]
            results["embed_corpus"] = {"docs": len(embedded), "seconds": now() - started,
                                       "docs_per_s": len(embedded) / (now() - started)}
        dims = int(len(embedded[0].vector))
        queries = [q.query for q in load_queries()]
        n_latency = args.requests or (100 if args.quick else 500)
        args.warmup = 20 if args.quick else 50
        latency_queries = (queries * (1 + (n_latency + args.warmup) // len(queries)))[:n_latency + args.warmup]
        args.probe_requests = 60 if args.quick else 300
        results["stores"], results["latency"] = {}, {}
        run_id = uuid.uuid4().hex[:6]
        for backend in backends:
            store = open_store(backend, args, timeout=60)
            bulk_index_name, backfill_name = f"bench-{run_id}-bulk", f"bench-{run_id}-backfill"
            warm = f"bench-{run_id}-warmup"  # first writes pay for connections, JIT, caches: not timed
            try:
                store.create_index(warm, dims, {"model_version": "bench"})
                store.bulk_write(warm, embedded[:1000])
                store.drop_index(warm)
                with phases(f"{backend}: bulk index"):
                    bulk = bulk_index(store, bulk_index_name, dims, embedded)
                store.drop_index(bulk_index_name)
                with phases(f"{backend}: backfill"):
                    fill = backfill(store, backfill_name, dims, embedder.embed)
                results["stores"][backend] = {"bulk": bulk, "backfill": fill}
                print(f"[bench]   {backend}: bulk {bulk['docs_per_s']:.0f} docs/s, backfill "
                      f"{fill['docs_per_s']:.0f} docs/s", flush=True)
                search_store = open_store(backend, args, timeout=2.0)
                results["latency"][backend] = latency_for_backend(
                    backend, search_store, backfill_name, dims, servers, latest, latency_queries, args, phases)
                r = results["latency"][backend]
                print(f"[bench]   {backend}: app p50 {r['app']['p50']:.2f} ms = parts {r['parts_p50']:.2f} + "
                      f"{r['overhead_p50']:.2f} ms", flush=True)
            finally:
                for name in (warm, bulk_index_name, backfill_name):
                    try:
                        store.drop_index(name)
                    except Exception as exc:  # cleanup only
                        print(f"[bench] could not drop {name}: {exc}", flush=True)
    finally:
        servers.stop()
    results["phases"] = phases.rows
    results["uptime_end"] = shell("uptime")
    return results


# -- the report -------------------------------------------------------------------------------------
def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def render(results: dict) -> str:
    out: list[str] = []
    add = out.append
    gen = results["generator"]
    add(f"Generated by `{results['command']}` on {results['started']} (git {results['git']}); "
        f"{'a --quick smoke run: small samples, ' if results['quick'] else ''}one run, figures vary with the "
        "machine's load (below).")
    add("")
    add("### Machine and load")
    add("")
    add("```text")
    add(f"$ nproc\n{results['machine']['nproc']}\n$ free -h\n{results['machine']['free']}")
    add(f"$ lscpu | head -20\n{results['machine']['lscpu']}")
    add(f"$ uptime   # at the start\n{results['uptime_start']}\n$ uptime   # at the end\n{results['uptime_end']}")
    add("```")
    add("")
    add("The machine is shared with other work. Per phase: the 1-minute load average when it began and "
        "the whole machine's CPU use during it (all processes, 100 % = both cores busy).")
    add("")
    add("| phase | seconds | load at start | machine CPU busy |")
    add("|---|---|---|---|")
    for row in results["phases"]:
        add(f"| {row['phase']} | {_f(row['seconds'])} | {row['load_before']:.2f} | {100 * row['machine_busy']:.0f} % |")
    add("")
    packages = ", ".join(f"{k} {v}" for k, v in results["packages"].items())
    es = results["elasticsearch"]
    add(f"Versions: Python {results['python']}, {packages}; Elasticsearch server "
        f"{es['server'] or 'not available'} (`scripts/elasticsearch.sh`, single node, heap 512m) at {es['url']}. "
        f"Linux {results['machine']['kernel']}.")
    add("")
    models = results["models"]
    trained = "; ".join(f"{k}: {v['dims']} dims, trained on documents before {v['until'] or 'the end'}, "
                        f"recall@10 {v['recall@10']:.3f}" for k, v in models.items() if k.startswith("v"))
    add(f"Models: {models['source']}{'; ' + trained if trained else ''}. Model server: "
        f"`{results['model_server']}` (its own process). Corpus: {results['corpus']['documents']:,} documents, "
        f"mean embedded text {results['corpus']['mean_text_chars']:.0f} characters.")
    add("")
    add("### 1. Generator throughput (batch 64, corpus texts, sequential calls from one client)")
    add("")
    add("| version | protocol | texts/s (median of rounds) | min – max | rounds × texts |")
    add("|---|---|---|---|---|")
    for key, row in gen.items():
        version, protocol = key.split()
        name = "gRPC `PredictionService.Predict`" if protocol == "grpc" else "REST `:predict` (row format)"
        add(f"| {version} | {name} | {_f(row['texts_per_s'], 0)} | {_f(row['min'], 0)} – {_f(row['max'], 0)} | "
            f"{row['rounds']} × {row['texts_per_round']} |")
    add("")
    emb = results["embed_corpus"]
    add(f"Embedding the whole corpus for the store benchmark (gRPC, batch 256): {emb['docs']:,} documents in "
        f"{_f(emb['seconds'])} s = {_f(emb['docs_per_s'], 0)} docs/s.")
    add("")
    add("### 2. Store write rates (10,017 corpus documents)")
    add("")
    add("| backend | bulk index, precomputed vectors: docs/s | of which writes / `end_bulk_load` (s) | "
        "backfill, embed + write (`load_index`): docs/s | backfill seconds |")
    add("|---|---|---|---|---|")
    for backend, row in results["stores"].items():
        bulk, fill = row["bulk"], row["backfill"]
        add(f"| {backend} | {_f(bulk['docs_per_s'], 0)} | {_f(bulk['write_s'], 2)} / {_f(bulk['end_bulk_load_s'], 2)} | "
            f"{_f(fill['docs_per_s'], 0)} | {_f(fill['total_s'], 1)} |")
    if "elasticsearch" not in results["stores"]:
        add("| elasticsearch | not measured (no server) | | | |")
    add("")
    add("Bulk index: `create_index`, `begin_bulk_load`, `bulk_write` in batches of 500, `end_bulk_load` (Lance: "
        "`optimize`; Elasticsearch: refresh interval and replicas restored, refresh), timed from "
        "`begin_bulk_load` to the end of `end_bulk_load`; the count is checked afterwards. Backfill: "
        "`load_index(corpus_source, ...)` with the v2 generator over gRPC, batch 256, timed whole.")
    add("")
    add("### 3. Search latency through the app vs the sum of its parts (ms)")
    add("")
    add("Sequential requests from one `requests.Session`, `POST /search {query, k: 10}` without filters, "
        "queries from `load_queries()`; per query, in this order: the app request, the generator call "
        "(`client.embed([query])`, gRPC, same model server), the store query (`store.search`, k 10) from "
        "the benchmark process, `GET /healthz` on the app, and the same POST to the floor server (a bare "
        "ASGI app under the same uvicorn returning a body of the search response's size). "
        "Percentiles are nearest-rank.")
    add("")
    add("| backend | requests | app p50 | app p99 | generator p50 / p99 | store p50 / p99 | parts p50 (gen + store) | "
        "**app overhead at p50** | median per-request app − gen − store |")
    add("|---|---|---|---|---|---|---|---|---|")
    for backend, r in results["latency"].items():
        verdict = "met" if r["overhead_p50"] < 3.0 else "not met"
        add(f"| {backend} | {r['requests']} | {_f(r['app']['p50'], 2)} | {_f(r['app']['p99'], 2)} | "
            f"{_f(r['gen']['p50'], 2)} / {_f(r['gen']['p99'], 2)} | {_f(r['store']['p50'], 2)} / "
            f"{_f(r['store']['p99'], 2)} | {_f(r['parts_p50'], 2)} | **{_f(r['overhead_p50'], 2)}** "
            f"(goal < 3: {verdict}) | {_f(r['paired_overhead_p50'], 2)} |")
    add("")
    add("References measured in the same loop (p50 / p99 ms): the app's `GET /healthz` (Connexion, a2wsgi and "
        "Flask around a view that does nothing), and the floor: the same POST to a bare ASGI app under the same "
        "uvicorn settings answering a body of the search response's size, from the same `requests.Session` "
        "and from a plain `http.client` connection (what the HTTP hop costs without the app, and how much of "
        "it is the client library).")
    add("")
    add("| backend | app via http.client p50 / p99 | overhead with http.client at p50 | `/healthz` | "
        "floor, requests | floor, http.client | response bytes (median) | app vs parts ranking mismatches |")
    add("|---|---|---|---|---|---|---|---|")
    for backend, r in results["latency"].items():
        add(f"| {backend} | {_f(r['app_raw']['p50'], 2)} / {_f(r['app_raw']['p99'], 2)} | "
            f"{_f(r['overhead_raw_p50'], 2)} | {_f(r['healthz']['p50'], 2)} / {_f(r['healthz']['p99'], 2)} | "
            f"{_f(r['floor']['p50'], 2)} / {_f(r['floor']['p99'], 2)} | "
            f"{_f(r['floor_raw']['p50'], 2)} / {_f(r['floor_raw']['p99'], 2)} | {r['response_bytes']:,.0f} | "
            f"{r['ranking_mismatches']} |")
    add("")
    add("The overhead is app p50 − (generator p50 + store p50), as the issue defines it; it includes the "
        "HTTP hop to the app (the floor) and the client library's own time.")
    add("")
    for backend, r in results["latency"].items():
        b = r["breakdown"]
        add(f"#### Where the app's time goes: {backend} ({b['requests']} probed requests)")
        add("")
        add(f"Probes inside the app process (`bench/appserver.py`, timestamps at each layer boundary). "
            f"Client-measured p50 {_f(b['client_total']['p50'], 2)} ms (mean {_f(b['client_total']['mean'], 2)}); "
            f"inside the app, from uvicorn's hand-off to the last body byte: p50 {_f(b['in_app']['p50'], 2)} ms; "
            f"after the response (not on the latency path): mean {_f(b['after_response']['mean'], 2)} ms. "
            f"Per-request overhead (client total − generator − store, both timed inside the app): "
            f"p50 **{_f(b['overhead']['p50'], 2)} ms**, mean {_f(b['overhead']['mean'], 2)} ms.")
        add("")
        add("| segment | p50 ms | mean ms | what |")
        add("|---|---|---|---|")
        for name, _, _, what in SEGMENTS:
            seg = b["segments"][name]
            add(f"| {name} | {_f(seg['p50'], 3)} | {_f(seg['mean'], 3)} | {what} |")
        add("")
        whatif = r.get("what_ifs")
        if whatif:
            base = whatif["as-is"]
            add(f"What-ifs on {backend}, all running at once and asked in turn for each of {whatif['requests']} "
                "queries (rotating order), each query once through `requests` and once through `http.client`:")
            add("")
            add("- `as-is`: `create_app` unchanged;")
            add("- `compact-json`: the API's jsonifier without Connexion's default `indent=2` (C encoder);")
            add("- `compact-json+cached-decorators`: also Connexion's Flask-side decorator chain built once per "
                "operation instead of per request (a patch of Connexion internals, to price that cost);")
            add("- `asyncapp`: the same `openapi.yaml` and strict validation under Connexion's `AsyncApp` "
                "(Starlette: no Flask, no a2wsgi), search ported to `async def` with the blocking calls in one "
                "`asyncio.to_thread` hop, the same Prometheus metrics, compact JSON;")
            add("- `lean`: a bare ASGI handler doing the same search in one thread hop, no validation, no metrics: "
                "a lower bound, not a proposal.")
            add("")
            add("The changes are applied from outside by `bench/appserver.py --variant` (see there); every "
                "variant's answer to the first query is checked equal to the app's. Overhead = the request's "
                "time minus the generator and store calls timed inside the server; in-app = from uvicorn's "
                "hand-off to the last body byte, minus the same (both clients' requests). p50, ms:")
            add("")
            add("| variant | latency (requests) | overhead (requests) | latency (http.client) | "
                "overhead (http.client) | in-app overhead | in-app overhead saved vs as-is |")
            add("|---|---|---|---|---|---|---|")
            for name, row in whatif.items():
                if name == "requests":
                    continue
                saved = base["in-app overhead"]["p50"] - row["in-app overhead"]["p50"]
                add(f"| {name} | {_f(row['requests']['p50'], 2)} | {_f(row['overhead requests']['p50'], 2)} | "
                    f"{_f(row['http.client']['p50'], 2)} | {_f(row['overhead http.client']['p50'], 2)} | "
                    f"{_f(row['in-app overhead']['p50'], 2)} | {_f(saved, 2) if name != 'as-is' else '–'} |")
            add("")
        prof = r.get("profile")
        if prof:
            add(f"cProfile of the app process ({prof['requests']} requests, the event-loop thread and the a2wsgi "
                f"worker threads merged; profiling slows the app: {_f(prof['wall_ms_per_request'], 2)} ms per "
                "request while profiled). Own time per request, by package:")
            add("")
            add("| package group | ms/request |")
            add("|---|---|")
            for group, value in prof["groups_ms_per_request"].items():
                if value >= 0.01:
                    add(f"| {group} | {_f(value, 3)} |")
            add("")
            add("Largest cumulative times (ms/request, profiled):")
            add("")
            add("| function | cum ms/request |")
            add("|---|---|")
            for row in prof["top_cumulative"][:12]:
                add(f"| `{row['function']}` | {_f(row['cum_ms_per_request'], 3)} |")
            add("")
    return "\n".join(out)


def write_report(path: Path, body: str) -> None:
    block = f"{BEGIN}\n{body}\n{END}"
    if path.exists() and BEGIN in path.read_text() and END in path.read_text():
        text = path.read_text()
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        path.write_text(head + block + tail)
    else:
        path.write_text("# Benchmarks\n\nRun: `python -m bench.run` (see `bench/run.py`). The block below is "
                        "generated; text outside it is kept on the next run.\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1-epoch models, small samples")
    parser.add_argument("--model-repo", help="reuse this model repository (<base>/embedder with versions) "
                                             "instead of training v1 and v2")
    parser.add_argument("--es-url", default=os.environ.get("ER_ES_URL", "http://127.0.0.1:9200"))
    parser.add_argument("--requests", type=int, default=0, help="measured search requests per backend "
                                                                "(default 500; 100 with --quick)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile pass")
    parser.add_argument("--what-ifs", default="lance", help="backends to run the what-if variants on "
                                                           "(comma-separated; 'none' to skip)")
    parser.add_argument("--output", help="Markdown file (default docs/benchmarks.md; a temporary file with --quick)")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    args.what_if_backends = [] if args.what_ifs == "none" else args.what_ifs.split(",")
    args.workdir = tempfile.mkdtemp(prefix="er-bench-")
    output = Path(args.output) if args.output else (
        Path(args.workdir) / "benchmarks.md" if args.quick else REPO / "docs" / "benchmarks.md")
    results = run(args)
    json_path = Path(args.json) if args.json else Path(args.workdir) / "results.json"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    write_report(output, render(results))
    print(f"[bench] wrote {output} and {json_path}", flush=True)


if __name__ == "__main__":
    main()
