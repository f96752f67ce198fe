"""The backfill at scale: sliced backfills of v2 from v1 beside the generator's own rate, in one run.

    python -m bench.backfill_scale --store lance|elasticsearch --documents N
           [--slices 1,2,4] [--batch-size N] [--shards 1,2] [--home DIR] [--skip-bootstrap-if-present]

1. Setup: a fresh ER_HOME (a temporary folder, or ``--home``); v1 and v2 trained once with the tests'
   small settings (``TEST_MODELS``) and cached under ``~/.cache/embedding-rollout/bench-models``; the
   project's model server (``ModelServer`` + ``ModelManager``, v1 and v2) in its own process on
   ephemeral ports; a corpus of N documents from ``embedding-rollout corpus synth`` (seed fixed) as
   ``ER_CORPUS``; v1 bootstrapped (``steps.bootstrap``, timed).
2. Encoder only: the v2 generator over gRPC embedding every document's embedding text in the
   backfill's generator calls (``steps.GENERATOR_BATCH``), from 1, 2, 4 client processes at once
   (each its share), no store. ``--batch-size`` (default: the store's ``BULK_BATCH``) is the
   documents per bulk write of the loads and the bulk-rate writers.
3. Backfill at 1, 2, 4 slices: v2 deployed afresh, dual-write, ``index plan --slices S``, then S
   ``index load --version v2 --source v1 --slice K`` processes started at once, then ``index finish``
   (the end of the bulk load: LanceDB's compaction and vector index) in its own process; wall time
   from the start to the finish's exit, the rate against the encoder-only rate with as many
   processes, each slice's and the finish's peak RSS. Then ``index verify`` and ``index repair``
   once, timed.
4. Elasticsearch only: the server's bulk-index rate with precomputed (random) vectors, the same
   documents, ``bulk_write`` inside ``begin_bulk_load``/``end_bulk_load``, 1 and 2 writer processes,
   into indices of 1 and 2 shards (``--shards``).

Prints markdown tables and appends JSON lines to bench/results/backfill_scale.jsonl. Every process
that is timed is a child of this one (``os.wait4`` gives its peak RSS); processes that take part
in a timed phase load their input first and start together on a "go" line, except the slice
loads, whose wall time includes their start-up as an operator's would.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "backfill_scale.jsonl"
MODEL_CACHE = Path.home() / ".cache" / "embedding-rollout" / "bench-models"
# The tests' models (tests/conftest.py: TEST_MODELS, 1 epoch, vocabulary 8000): small, and v1 and
# v2 differ in training window and size. Copied, not imported: conftest sets up Airflow on import.
MODELS = {1: ("2019-01-01", 32), 2: (None, 48)}
TRAIN = {"epochs": 1, "vocab_size": 8000}
SEED = 7
# The load's last log line (pipeline.indexing.load_index): its time, documents written, seconds.
COMPLETE = re.compile(r"^(\S+ \S+) INFO .* complete: (\d+) written, \d+ already newer, ([\d.]+)s$", re.M)
now = time.monotonic  # system-wide on Linux: comparable between processes


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# -- child processes ---------------------------------------------------------------------------
class Child:
    """A child process reaped with ``os.wait4``, for its exit code, end time and peak RSS.
    ``talk``: stdin/stdout pipes for the ready/go protocol of the workers below."""

    def __init__(self, command: list[str], env: dict, log_path: Path, talk: bool = False):
        self.log_path, self.started, self.started_wall = log_path, now(), time.time()
        self.log_file = open(log_path, "w")
        pipe = subprocess.PIPE if talk else subprocess.DEVNULL
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdin=pipe,
                                        stdout=pipe if talk else self.log_file, stderr=self.log_file, text=True)
        self.exit_code = self.ended = self.peak_rss_kib = None

    def reap(self, block: bool = False) -> bool:
        if self.exit_code is not None:
            return True
        pid, status, usage = os.wait4(self.process.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.ended, self.ended_wall, self.peak_rss_kib = now(), time.time(), usage.ru_maxrss  # KiB on Linux
        self.exit_code = self.process.returncode = os.waitstatus_to_exitcode(status)
        self.log_file.close()
        return True

    def check(self) -> "Child":
        if self.exit_code != 0:
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-25:])
            raise RuntimeError(f"{self.log_path.name} exited with {self.exit_code}:\n{tail}")
        return self

    def kill(self) -> None:
        # os.kill, not Popen.kill: that one reaps an exited child itself, and wait4 then finds none.
        if not self.reap():
            os.kill(self.process.pid, signal.SIGKILL)
            self.reap(block=True)

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def rss_mib(self) -> float:
        return self.peak_rss_kib / 1024


def wait_all(children: list[Child]) -> None:
    # Polled rather than waited in order: each child's own end time and rusage.
    while not all(c.reap() for c in children):
        time.sleep(0.05)
    for child in children:
        child.check()


class Run:
    """The run's deployment: its environment, folders, and every child started (for the cleanup)."""

    def __init__(self, args, home: Path):
        self.args, self.home = args, home
        self.logs = home / "bench-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.env: dict[str, str] = {}

    def child(self, name: str, command: list[str], talk: bool = False, env: dict | None = None) -> Child:
        started = Child(command, env or {**os.environ, **self.env}, self.logs / f"{name}.log", talk)
        self.children.append(started)
        return started

    def cli(self, name: str, *arguments: str) -> Child:
        return self.child(name, [sys.executable, "-m", "embedding_rollout.cli", *arguments])

    def worker(self, name: str, kind: str, spec: dict, talk: bool = True, env: dict | None = None) -> Child:
        return self.child(name, [sys.executable, "-m", "bench.backfill_scale", "--worker", kind,
                                 "--spec", json.dumps(spec)], talk, env)

    def run_cli(self, name: str, *arguments: str) -> Child:
        child = self.cli(name, *arguments)
        child.reap(block=True)
        return child.check()

    def cleanup(self) -> None:
        for child in self.children:
            child.kill()


def together(children: list[Child]) -> tuple[float, list[dict]]:
    """The ready/go protocol: every worker loads its input and says "ready"; all get "go" at once;
    the phase lasts until the last one's reported end. Returns (seconds, their reports)."""
    for child in children:
        if child.process.stdout.readline().strip() != "ready":
            child.reap(block=True)
            child.check()
            raise RuntimeError(f"{child.log_path.name}: no ready line")
    started = now()
    for child in children:
        child.process.stdin.write("go\n")
        child.process.stdin.flush()
    lines = [child.process.stdout.readline() for child in children]
    for child in children:
        child.reap(block=True)
        child.check()
    reports = [json.loads(line) for line in lines]
    return max(r["finished"] for r in reports) - started, reports


# -- setup: models, model server, corpus, v1 ----------------------------------------------------------
def clean_env(env: dict) -> dict:
    """The environment without ER_CORPUS: training and synth must read the real corpus."""
    return {k: v for k, v in env.items() if k != "ER_CORPUS"}


def cached_models(run: Run) -> tuple[Path, str]:
    """``<cache>/<key>`` holding ``embedder/1`` and ``embedder/2``; trained once per settings."""
    corpus = REPO / "data" / "corpus.jsonl.gz"
    key = hashlib.sha256(json.dumps([MODELS, TRAIN, corpus.stat().st_size]).encode()).hexdigest()[:12]
    base = MODEL_CACHE / f"test-models-{key}"
    if all((base / "embedder" / str(n) / "saved_model.pb").exists() for n in MODELS):
        return base, f"cached {base}"
    staging = MODEL_CACHE / f".staging-{uuid.uuid4().hex[:8]}"
    trainer = run.worker("train", "train", {"folder": str(staging / "embedder")}, talk=False,
                         env=clean_env(os.environ))
    trainer.reap(block=True)
    trainer.check()
    shutil.rmtree(base, ignore_errors=True)
    os.replace(staging, base)  # whole or not at all: a killed training leaves only a staging folder
    return base, f"trained {base} ({trainer.seconds:.0f} s)"


def start_model_server(run: Run, model_base: Path) -> tuple[Child, dict]:
    server = run.worker("model-server", "serve", {"repo": str(model_base / "embedder"), "versions": [1, 2]})
    line = server.process.stdout.readline()
    if not line:
        server.reap(block=True)
        server.check()
    return server, json.loads(line)


def stop_model_server(server: Child) -> None:
    server.process.stdin.close()  # end of stdin: the server stops
    deadline = now() + 30
    while not server.reap() and now() < deadline:
        time.sleep(0.1)
    server.kill()


def synthesize_corpus(run: Run) -> tuple[Path, float | None]:
    path = run.home / f"corpus-{run.args.documents}-seed{SEED}.jsonl.gz"
    if path.exists():
        return path, None
    partial = path.with_name(path.name + ".partial.gz")
    child = run.child("corpus-synth", [sys.executable, "-m", "embedding_rollout.cli", "corpus", "synth",
                                       "--documents", str(run.args.documents), "--seed", str(SEED),
                                       "--output", str(partial)], env=clean_env({**os.environ, **run.env}))
    child.reap(block=True)
    child.check()
    os.replace(partial, path)
    return path, child.seconds


def bootstrapped(settings, documents: int) -> bool:
    """v1 serves all the traffic and its index holds the corpus: a reused home's bootstrap."""
    from embedding_rollout import steps
    from embedding_rollout.store import open_store
    state = steps.state_file(settings).read()
    if state.stable != "v1" or state.weights != {"v1": 100}:
        return False
    return open_store(settings).count(state.spec("v1").index) == documents


def bootstrap(run: Run, settings) -> dict:
    if run.args.skip_bootstrap_if_present and bootstrapped(settings, run.args.documents):
        log("v1 already bootstrapped with the corpus: reused")
        return {"reused": True}
    child = run.worker("bootstrap", "bootstrap", {})
    seconds, [report] = together([child])
    return {"reused": False, "seconds": report["seconds"], "docs_per_s": run.args.documents / report["seconds"],
            "load_s": slice_phases(child)["load"], "process_s": child.seconds, "peak_rss_mib": child.rss_mib}


def index_prefix(run: Run) -> str:
    """Unique per run (a shared Elasticsearch server); kept in the home, for a reused bootstrap."""
    kept = run.home / "bench-index-prefix"
    if run.args.skip_bootstrap_if_present and kept.exists():
        return kept.read_text().strip()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    kept.write_text(prefix)
    return prefix


def deployment_env(run: Run, ports: dict, corpus: Path, model_base: Path) -> dict:
    return {"ER_HOME": str(run.home), "ER_STORE": run.args.store, "ER_ES_URL": run.args.es_url,
            "ER_MODEL_BASE": str(model_base), "ER_MODEL_NAME": "embedder", "ER_CORPUS": str(corpus),
            "ER_GENERATOR_GRPC": f"127.0.0.1:{ports['grpc']}", "ER_GENERATOR_REST": f"http://127.0.0.1:{ports['rest']}",
            "ER_GENERATOR_PROTOCOL": "grpc", "ER_INDEX_PREFIX": index_prefix(run),
            "ER_DRAIN_SECONDS": "0",  # nothing serves v2 between the runs: no requests to drain
            "TF_CPP_MIN_LOG_LEVEL": "2"}


def store_class(name: str):
    if name == "lance":
        from embedding_rollout.store.lance import LanceStore
        return LanceStore
    from embedding_rollout.store.elastic import ElasticsearchStore
    return ElasticsearchStore


# -- 2. encoder only --------------------------------------------------------------------------------------
def encoder_only(run: Run, processes: int) -> dict:
    from embedding_rollout.steps import GENERATOR_BATCH
    workers = [run.worker(f"encode-{processes}p-{k}", "encode",
                          {"share": k, "shares": processes, "total": run.args.documents,
                           "batch": min(run.args.batch_size, GENERATOR_BATCH)})
               for k in range(processes)]
    seconds, reports = together(workers)
    docs = sum(r["docs"] for r in reports)
    assert docs == run.args.documents, (docs, run.args.documents)
    return {"processes": processes, "docs": docs, "seconds": seconds, "docs_per_s": docs / seconds,
            "peak_rss_mib": [w.rss_mib for w in workers]}


# -- 3. backfill in slices ----------------------------------------------------------------------------------
def fresh_v2(settings) -> None:
    """v2 deployed with an empty index and written to, as a rollout's step 1 and 2 leave it."""
    from embedding_rollout import steps
    if "v2" in steps.state_file(settings).read().versions:
        steps.remove_version(settings, "v2", drain_seconds=0)  # drops its index and its checkpoints
    steps.deploy_version(settings, "v2", run_id="bench")
    steps.start_dual_write(settings, "v2")


def backfill_in_slices(run: Run, settings, slices: int) -> dict:
    from embedding_rollout.store import open_store
    fresh_v2(settings)
    plan = run.run_cli(f"plan-{slices}", "index", "plan", "--version", "v2", "--source", "v1",
                       "--slices", str(slices))
    started = now()
    loads = [run.cli(f"load-{slices}s-{k}", "index", "load", "--version", "v2", "--source", "v1",
                     "--batch-size", str(run.args.batch_size), "--slice", str(k)) for k in range(1, slices + 1)]
    wait_all(loads)
    finish = run.run_cli(f"finish-{slices}s", "index", "finish", "--version", "v2", "--source", "v1")
    seconds = finish.ended - started
    count = open_store(settings).count(settings.index_name("v2"))
    assert count == run.args.documents, f"v2 holds {count} of {run.args.documents} documents"
    phases = [slice_phases(c) for c in loads]
    return {"slices": slices, "docs": count, "seconds": seconds, "docs_per_s": count / seconds,
            "plan_s": plan.seconds, "slice_s": [c.seconds for c in loads], "slice_phases_s": phases,
            "written": sum(p["written"] for p in phases), "peak_rss_mib": [c.rss_mib for c in loads],
            "finish_s": finish.seconds, "finish_rss_mib": finish.rss_mib}


def slice_phases(load: Child) -> dict:
    """A slice process's time split at its load, from the load's last log line: start-up (Python,
    TensorFlow, state, plan), the load itself, and after it: the process's exit (closing its clients,
    the interpreter's and TensorFlow's shutdown; a background compaction its writes started runs in a
    daemon thread and is not waited for). The end of the load is ``index finish``'s."""
    found = COMPLETE.search(load.log_path.read_text())
    if not found:
        return {"startup": None, "load": None, "after": None, "written": 0}
    logged = dt.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logged
    load_s = float(found.group(3))
    return {"startup": logged - load_s - load.started_wall, "load": load_s, "after": load.ended_wall - logged,
            "written": int(found.group(2))}


def verify_and_repair(run: Run) -> list[dict]:
    rows = []
    for name, arguments in (("verify", ("index", "verify", "--version", "v2", "--source", "v1")),
                            ("repair", ("index", "repair", "--version", "v2", "--source", "v1",
                                        "--batch-size", str(run.args.batch_size)))):
        child = run.run_cli(name, *arguments)
        rows.append({"command": f"index {' '.join(arguments[1:])}", "seconds": child.seconds,
                     "docs_per_s": run.args.documents / child.seconds, "peak_rss_mib": child.rss_mib})
    return rows


# -- 4. Elasticsearch's own bulk rate ------------------------------------------------------------------------
def es_bulk(run: Run, shards: int, writers: int, dims: int) -> dict:
    from embedding_rollout.store.elastic import ElasticsearchStore
    store = ElasticsearchStore(run.args.es_url, timeout=30.0, shards=shards)
    index = f"{run.env['ER_INDEX_PREFIX']}-bulk-{shards}s-{writers}w"
    store.create_index(index, dims, {"model_version": "bench"})
    try:
        workers = [run.worker(f"bulk-{shards}s-{writers}w-{k}", "bulk",
                              {"share": k, "shares": writers, "total": run.args.documents,
                               "batch": run.args.batch_size, "index": index, "dims": dims}) for k in range(writers)]
        store.begin_bulk_load(index)
        write_s, reports = together(workers)
        ended = now()
        store.end_bulk_load(index)
        end_s = now() - ended
        count = store.count(index)
        assert count == run.args.documents == sum(r["written"] for r in reports), (count, reports)
    finally:
        store.drop_index(index)
    return {"shards": shards, "writers": writers, "docs": count, "write_s": write_s, "end_bulk_load_s": end_s,
            "docs_per_s": count / (write_s + end_s), "peak_rss_mib": [w.rss_mib for w in workers]}


def drop_indices(settings, keep: tuple[str, ...] = ()) -> None:
    from embedding_rollout.store import open_store
    store = open_store(settings)
    for name in store.indices():
        if name.startswith(settings.index_prefix + "-") and name not in keep:
            store.drop_index(name)


# -- workers (this file run with --worker) -------------------------------------------------------------------
def share_of_corpus(spec: dict):
    """Worker ``share`` of ``shares``: a contiguous part of the corpus file."""
    from embedding_rollout.corpus import load_documents
    total = spec["total"]
    low, high = total * spec["share"] // spec["shares"], total * (spec["share"] + 1) // spec["shares"]
    return list(itertools.islice(load_documents(), low, high))


def ready_and_wait() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


def report(data: dict) -> None:
    print(json.dumps({**data, "finished": now()}), flush=True)


def worker_encode(spec: dict) -> None:
    from embedding_rollout.config import Settings
    from embedding_rollout.generator.client import GeneratorTarget, generator_client
    from embedding_rollout.pipeline.indexing import embedding_text
    settings, batch = Settings(), spec["batch"]
    texts = [embedding_text({"title": d.title, "text": d.text}) for d in share_of_corpus(spec)]
    # As steps._embedder builds the backfill's client.
    client = generator_client(GeneratorTarget("v2", settings.generator_grpc, settings.generator_rest),
                              protocol="grpc", timeout=max(settings.generator_timeout, 30.0), batch_size=batch)
    client.embed(texts[:batch])  # warm-up: the channel
    ready_and_wait()
    for i in range(0, len(texts), batch):
        assert client.embed(texts[i:i + batch]).shape[0] == len(texts[i:i + batch])
    report({"docs": len(texts)})


def worker_bulk(spec: dict) -> None:
    import numpy as np
    from embedding_rollout.config import Settings
    from embedding_rollout.store.base import StoredDocument
    from embedding_rollout.store.elastic import ElasticsearchStore
    docs = share_of_corpus(spec)
    vectors = np.random.default_rng(spec["share"]).standard_normal((len(docs), spec["dims"])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # unit vectors, as the models give
    stored = [StoredDocument(d.id, 1, {"title": d.title, "text": d.text, "category": d.category, "date": d.date}, v)
              for d, v in zip(docs, vectors)]
    store = ElasticsearchStore(Settings().es_url, timeout=30.0)
    ready_and_wait()
    written = 0
    for i in range(0, len(stored), spec["batch"]):
        result = store.bulk_write(spec["index"], stored[i:i + spec["batch"]])
        assert not result.failed, result.failed[:3]
        written += result.written
    report({"written": written})


def worker_bootstrap(spec: dict) -> None:
    from embedding_rollout import steps
    from embedding_rollout.config import Settings
    # TensorFlow (TF Serving's protos) and the store, imported before the clock starts.
    from embedding_rollout.generator import admin, grpc_client  # noqa: F401
    from embedding_rollout.pipeline import indexing  # noqa: F401
    from embedding_rollout.store import open_store
    open_store(Settings())
    ready_and_wait()
    started = now()
    steps.bootstrap(Settings(), "v1")
    report({"seconds": now() - started})


def worker_serve(spec: dict) -> None:
    from embedding_rollout.generator.models import ModelManager
    from embedding_rollout.generator.server import ModelServer
    manager = ModelManager("embedder", Path(spec["repo"]))
    manager.serve(spec["versions"])
    server = ModelServer(manager, rest_port=0, grpc_port=0).start()
    print(json.dumps({"grpc": server.grpc_port, "rest": server.rest_port}), flush=True)
    sys.stdin.read()  # until the benchmark closes stdin
    server.stop()


def worker_train(spec: dict) -> None:
    from embedding_rollout.model.trainer import TrainConfig
    from embedding_rollout.model.training import train_version
    for number, (until, dims) in MODELS.items():
        train_version(Path(spec["folder"]), number, TrainConfig(dims=dims, **TRAIN), until)


WORKERS = {"encode": worker_encode, "bulk": worker_bulk, "bootstrap": worker_bootstrap, "serve": worker_serve,
           "train": worker_train}


# -- the report ----------------------------------------------------------------------------------------------
def shell(command: str) -> str:
    try:
        return subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # a fact we can't read is reported, not fatal
        return f"({command}: {exc})"


def machine_facts(args) -> dict:
    facts = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "nproc": shell("nproc"),
             "platform": platform.platform(), "python": platform.python_version(),
             "memory": shell("free -h | sed -n 2p | awk '{print $2}'"), "load_start": os.getloadavg(),
             "git": shell("git rev-parse --short HEAD") + (" (with uncommitted changes)" if shell("git status --porcelain") else "")}
    if args.store == "elasticsearch":
        import requests
        # Not `GET /`: the test distribution has no rest-root module (scripts/elasticsearch.sh).
        nodes = requests.get(f"{args.es_url}/_nodes/_local", params={"filter_path": "nodes.*.version"},
                             timeout=5).json()["nodes"]
        facts["elasticsearch"] = next(iter(nodes.values()))["version"]
    return facts


def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def _list(values, digits: int = 0) -> str:
    return " / ".join("?" if v is None else _f(v, digits) for v in values)


def _phases(phases: list[dict]) -> str:
    return " / ".join(" + ".join("?" if p[k] is None else _f(p[k]) for k in ("startup", "load", "after"))
                      for p in phases)


def render(results: dict) -> str:
    m, setup, out = results["machine"], results["setup"], []
    add = out.append
    add(f"### Backfill at scale: {results['store']}, {results['documents']:,} documents, batch {results['batch_size']}")
    add("")
    add(f"`{results['command']}` on {m['date']} (git {m['git']}): nproc {m['nproc']}, {m['memory']} memory, "
        f"{m['platform']}, Python {m['python']}"
        + (f", Elasticsearch {m['elasticsearch']}" if "elasticsearch" in m else "")
        + f"; load average {m['load_start'][0]:.2f} at the start, {m['load_end'][0]:.2f} at the end; "
        f"whole run {_f(results['wall_s'], 0)} s. Models: {setup['models']}.")
    add("")
    add("| setup step | seconds | docs/s | peak RSS MiB |")
    add("|---|---|---|---|")
    if setup["corpus_synth_s"] is not None:
        add(f"| `corpus synth --documents {results['documents']}` | {_f(setup['corpus_synth_s'])} | "
            f"{_f(results['documents'] / setup['corpus_synth_s'], 0)} | |")
    boot = setup["bootstrap"]
    if boot["reused"]:
        add("| `steps.bootstrap` v1 | reused | | |")
    else:
        load = "?" if boot["load_s"] is None else _f(boot["load_s"])
        add(f"| `steps.bootstrap` v1 (of which the load {load} s; the process {_f(boot['process_s'])} s) | "
            f"{_f(boot['seconds'])} | {_f(boot['docs_per_s'], 0)} | {_f(boot['peak_rss_mib'], 0)} |")
    add("")
    add("| processes | encoder only (v2, gRPC): docs/s | seconds | backfill wall s | backfill docs/s | "
        "backfill / encoder | per slice: start-up + load + after s | peak RSS per slice MiB | "
        "`index finish` s / RSS MiB |")
    add("|---|---|---|---|---|---|---|---|---|")
    encoder = {row["processes"]: row for row in results["encoder"]}
    for row in results["backfill"]:
        enc = encoder.get(row["slices"])
        ratio = f"{100 * row['docs_per_s'] / enc['docs_per_s']:.0f} %" if enc else "–"
        add(f"| {row['slices']} | {_f(enc['docs_per_s'], 0) if enc else '–'} | {_f(enc['seconds']) if enc else '–'} | "
            f"{_f(row['seconds'])} | {_f(row['docs_per_s'], 0)} | {ratio} | {_phases(row['slice_phases_s'])} | "
            f"{_list(row['peak_rss_mib'])} | {_f(row['finish_s'])} / {_f(row['finish_rss_mib'], 0)} |")
    for processes, enc in encoder.items():
        if processes not in {r["slices"] for r in results["backfill"]}:
            add(f"| {processes} | {_f(enc['docs_per_s'], 0)} | {_f(enc['seconds'])} | – | – | – | | | |")
    add("")
    add("| after the last backfill | seconds | docs/s | peak RSS MiB |")
    add("|---|---|---|---|")
    for row in results["verify_repair"]:
        add(f"| `{row['command']}` | {_f(row['seconds'])} | {_f(row['docs_per_s'], 0)} | {_f(row['peak_rss_mib'], 0)} |")
    if results.get("bulk"):
        add("")
        add("| Elasticsearch bulk, precomputed vectors | writers | docs/s | writes s | `end_bulk_load` s | "
            "peak RSS per writer MiB |")
        add("|---|---|---|---|---|---|")
        for row in results["bulk"]:
            add(f"| {row['shards']} shard{'s' if row['shards'] > 1 else ''} | {row['writers']} | "
                f"{_f(row['docs_per_s'], 0)} | {_f(row['write_s'], 2)} | {_f(row['end_bulk_load_s'], 2)} | "
                f"{_list(row['peak_rss_mib'])} |")
    add("")
    add("Encoder only: each client process embeds its share of the documents' embedding texts in the "
        "backfill's generator calls, started together once loaded. Backfill: wall time from starting the S "
        "`index load --slice K` processes to the exit of the `index finish` run after them. Per slice, from its "
        "log: start-up (Python, TensorFlow, state and plan), the load (embed + write), after it (the process's "
        "exit; a background compaction still running is not waited for). `index finish`: the end of the bulk load (`end_bulk_load`: on LanceDB "
        "compaction, column indices and the vector index) and the state change.")
    return "\n".join(out)


def append_results(results: dict) -> None:
    """One JSON line per measurement, each with the run's facts (for `jq` and the docs)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    common = {"run": results["run"], "store": results["store"], "documents": results["documents"],
              "batch_size": results["batch_size"], **{k: results["machine"][k] for k in ("date", "nproc", "platform")}}
    lines = [{**common, "section": "run", "machine": results["machine"], "setup": results["setup"],
              "command": results["command"], "wall_s": results["wall_s"]}]
    for section in ("encoder", "backfill", "verify_repair", "bulk"):
        lines += [{**common, "section": section, **row} for row in results.get(section, [])]
    with open(RESULTS, "a") as out:
        out.writelines(json.dumps(line, default=str) + "\n" for line in lines)


# -- the run ------------------------------------------------------------------------------------------------
def measure(run: Run, settings, results: dict) -> None:
    for processes in run.args.slices:
        log(f"encoder only, {processes} client process(es)")
        results["encoder"].append(encoder_only(run, processes))
        log(f"  {results['encoder'][-1]['docs_per_s']:,.0f} docs/s")
    for slices in run.args.slices:
        log(f"backfill v2 from v1 in {slices} slice(s)")
        results["backfill"].append(backfill_in_slices(run, settings, slices))
        log(f"  {results['backfill'][-1]['docs_per_s']:,.0f} docs/s in {results['backfill'][-1]['seconds']:.1f} s")
    log("index verify and index repair")
    results["verify_repair"] = verify_and_repair(run)
    if run.args.store == "elasticsearch":
        from embedding_rollout import steps
        dims = steps.model_dims(settings, "v2")
        for shards, writers in itertools.product(run.args.shards, (1, 2)):
            log(f"Elasticsearch bulk index, {shards} shard(s), {writers} writer(s)")
            results["bulk"].append(es_bulk(run, shards, writers, dims))


def setup(run: Run) -> dict:
    model_base, models = cached_models(run)
    log(f"models: {models}")
    server, ports = start_model_server(run, model_base)
    run.server = server
    corpus, synth_s = synthesize_corpus(run)
    run.env = deployment_env(run, ports, corpus, model_base)
    os.environ.update(run.env)  # the steps called here read their settings from it
    from embedding_rollout.config import Settings
    run.settings = Settings()
    log(f"bootstrap v1 ({run.args.documents:,} documents, index prefix {run.env['ER_INDEX_PREFIX']})")
    return {"models": models, "corpus": str(corpus), "corpus_synth_s": synth_s,
            "bootstrap": bootstrap(run, run.settings)}


def teardown(run: Run, keep_home: bool) -> None:
    if getattr(run, "server", None) is not None:
        stop_model_server(run.server)
    run.cleanup()
    settings = getattr(run, "settings", None)
    if settings is not None and run.args.store == "elasticsearch":
        try:  # the v1 index stays when a later run may reuse it
            keep = (settings.index_name("v1"),) if run.args.skip_bootstrap_if_present else ()
            drop_indices(settings, keep)
        except Exception as exc:  # cleanup only
            log(f"could not drop the indices of {settings.index_prefix}: {exc}")
    if not keep_home:
        shutil.rmtree(run.home, ignore_errors=True)


def run_benchmark(args) -> dict:
    started = now()
    results = {"run": uuid.uuid4().hex[:12], "store": args.store, "documents": args.documents,
               "batch_size": args.batch_size, "command": " ".join(["python -m bench.backfill_scale", *sys.argv[1:]]),
               "machine": machine_facts(args), "encoder": [], "backfill": [], "bulk": []}
    home = Path(args.home).resolve() if args.home else Path(tempfile.mkdtemp(prefix="er-backfill-scale-"))
    if args.home and (home / "state.json").exists() and not args.skip_bootstrap_if_present:
        raise SystemExit(f"{home} holds a deployment: use --skip-bootstrap-if-present, or another --home")
    run = Run(args, home)
    failed = True
    try:
        results["setup"] = setup(run)
        measure(run, run.settings, results)
        failed = False
    finally:
        teardown(run, keep_home=bool(args.home) or failed)
        if failed:
            log(f"failed: kept {home} (the children's logs are in {run.logs})")
    results["machine"]["load_end"] = os.getloadavg()
    results["wall_s"] = now() - started
    return results


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=("lance", "elasticsearch"))
    parser.add_argument("--documents", type=int, help="corpus size (embedding-rollout corpus synth)")
    parser.add_argument("--slices", default="1,2,4", help="slice counts, also the encoder-only process counts")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="documents per bulk write (default: the store's BULK_BATCH)")
    parser.add_argument("--shards", default="1,2", help="Elasticsearch bulk-rate index shard counts")
    parser.add_argument("--es-url", default=os.environ.get("ER_ES_URL", "http://127.0.0.1:9200"))
    parser.add_argument("--home", help="ER_HOME to use and keep (default: a temporary folder, removed)")
    parser.add_argument("--skip-bootstrap-if-present", action="store_true",
                        help="reuse --home's v1 when it holds the corpus (its index is then kept at the end)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.worker and (not args.store or not args.documents or (args.batch_size or 1) < 1):
        parser.error("--store and --documents are required, and --batch-size must be at least 1")
    if not args.worker and args.batch_size is None:
        args.batch_size = store_class(args.store).BULK_BATCH
    args.slices = [int(s) for s in args.slices.split(",")]
    args.shards = [int(s) for s in args.shards.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:  # logging as the CLI's: the load's last line is read from the log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("elastic_transport.transport").setLevel(logging.WARNING)
        WORKERS[args.worker](json.loads(args.spec))
        return
    results = run_benchmark(args)
    print(render(results), flush=True)
    append_results(results)
    log(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
