"""The search app in its own process for the benchmarks, with optional per-layer probes and cProfile.

    python -m bench.appserver --state STATE.json --store lance --lance-uri DIR
    python -m bench.appserver --state STATE.json --store elasticsearch --es-url URL

It builds the app exactly as the tests do (``create_app(service=EmbeddingService(StateFile, store))``
served by ``AppServer``, i.e. Connexion's ASGI middleware stack → a2wsgi → Flask under uvicorn), and
next to it a *floor* server: a bare ASGI app under the same uvicorn settings that answers every
request with a canned JSON body, so the cost of the HTTP hop itself can be told apart from the app's.

A third server, *lean*, runs the same search as a bare ASGI handler (a lower bound, see
``lean_app``); ``--variant`` applies a what-if change to the app (see ``apply_variant``).

It prints one JSON line ``{"app": URL, "floor": URL, "lean": URL}`` when all listen, then reads commands from
stdin, one a line, answering each with a line ``ok ...``:

    probe on|off        record per-request timestamps at the layer boundaries (see ``Probe``)
    probe dump PATH     write the records since the last dump to PATH (JSON) and clear them
    profile start       cProfile every thread that serves a request (the event loop and a2wsgi's workers)
    profile stop PATH   write the merged pstats to PATH
    quit                stop (end of stdin does the same)

Nothing here changes the app: the probes wrap objects from the outside, and are off unless asked.
"""
from __future__ import annotations

import argparse
import asyncio
import contextvars
import cProfile
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from embedding_rollout.statestore import DecisionLog  # noqa: E402
from embedding_rollout.domain.state import StateFile  # noqa: E402
from embedding_rollout.service import EmbeddingService  # noqa: E402
from embedding_rollout.auth import ensure_tokens_file  # noqa: E402
from serving_app import AppServer, create_app  # noqa: E402

now = time.perf_counter
_RECORD: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bench_record", default=None)


def _mark(name: str) -> None:
    record = _RECORD.get()
    if record is not None and name not in record:
        record[name] = now()


class Probe:
    """Timestamps (perf_counter, seconds) of one request as it crosses the app's layers.

    ``asgi_in``        uvicorn hands the request to the app (Connexion's middleware stack starts)
    ``a2wsgi_in``      Connexion's middlewares (routing, security, request validation) are done
    ``wsgi_in``        a2wsgi's worker thread starts the Flask WSGI call (after the thread hop)
    ``view_in``        Flask routed the request to the endpoint (Connexion's ``FlaskOperation``)
    ``handler_in/out`` ``serving_app.views.search`` (with its ``observed`` wrapper: metrics)
    ``service_in/out`` ``EmbeddingService.search``
    ``embed_in/out``   the generator client's ``embed`` (gRPC to the model server)
    ``store_in/out``   ``store.search``
    ``view_out``       the endpoint returns (Connexion serialised the payload into a Flask response)
    ``wsgi_out``       Flask's ``wsgi_app`` returns (response object serialised)
    ``body_sent``      the last body message is handed to uvicorn (the client can have it all)
    ``asgi_out``       the app's ASGI call returns (after the response: a2wsgi and middleware unwinding)

    The wrappers are installed once at start; they cost a few microseconds and only record when on.
    """

    def __init__(self) -> None:
        self.on = False
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.inflight = 0  # requests recorded but not yet finished (their tail runs after the response)

    def take(self) -> list[dict]:
        deadline = time.monotonic() + 2.0
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.005)
        with self.lock:
            records, self.records = self.records, []
        return records


def install_service_probes(service: EmbeddingService) -> None:
    """Time ``EmbeddingService.search``, the store query and the generator call inside the app."""

    def timed(name, func):
        def wrapper(*args, **kwargs):
            _mark(f"{name}_in")
            try:
                return func(*args, **kwargs)
            finally:
                _mark(f"{name}_out")
        return wrapper

    service.search = timed("service", service.search)
    service.store.search = timed("store", service.store.search)
    factory = service._client_factory

    def client_factory(target, **kwargs):
        client = factory(target, **kwargs)
        client.embed = timed("embed", client.embed)
        return client

    service._client_factory = client_factory


def install(app, probe: Probe, profiler: "ThreadProfiler"):
    """Wrap the Flask app's layers from outside; returns the ASGI callable to serve."""
    import functools

    import serving_app.views as views

    if not getattr(views.search, "_bench_probe", False):
        original = views.search

        @functools.wraps(original)  # Connexion reads the parameters through __wrapped__
        def handler(*args, **kwargs):
            _mark("handler_in")
            try:
                return original(*args, **kwargs)
            finally:
                _mark("handler_out")

        handler._bench_probe = True
        views.search = handler  # resolved by operationId when the stack is built, just below
    # Connexion builds its middleware stack (and registers the Flask views) on the first ASGI call;
    # build it now, exactly as that call would, so the views exist to be wrapped.
    middleware = app.middleware
    if middleware.middleware_stack is None:
        middleware.app, middleware.middleware_stack = middleware._build_middleware_stack()
    flask_asgi = app._middleware_app          # connexion.apps.flask.FlaskASGIApp
    wsgi_middleware = flask_asgi.asgi_app     # a2wsgi.WSGIMiddleware around Flask's wsgi_app
    flask_wsgi = wsgi_middleware.app

    async def a2wsgi_entry(scope, receive, send):
        _mark("a2wsgi_in")
        return await wsgi_middleware(scope, receive, send)

    flask_asgi.asgi_app = a2wsgi_entry

    def wsgi_entry(environ, start_response):
        _mark("wsgi_in")

        def starting(*args, **kwargs):
            _mark("start_response_in")
            try:
                return start_response(*args, **kwargs)
            finally:
                _mark("start_response_out")

        profile = profiler.worker_enter()
        try:
            return flask_wsgi(environ, starting)
        finally:
            if profile is not None:
                profile.disable()
            _mark("wsgi_out")

    wsgi_middleware.app = wsgi_entry

    flask = app.app
    for endpoint, view in list(flask.view_functions.items()):
        if endpoint.endswith("search"):
            def view_entry(*args, __view=view, **kwargs):
                _mark("view_in")
                try:
                    return __view(*args, **kwargs)
                finally:
                    _mark("view_out")
            flask.view_functions[endpoint] = view_entry

    return recording(app, "app", probe, profiler)


def recording(asgi, tag: str, probe: Probe, profiler: "ThreadProfiler | None" = None):
    """The ASGI app with a probe record per HTTP request (``tag`` names the server) while probes are on."""

    async def outer(scope, receive, send):
        if profiler is not None:
            profiler.loop_enter()
        if scope["type"] != "http" or not probe.on:
            return await asgi(scope, receive, send)
        record = {"asgi_in": now(), "path": scope["path"], "server": tag}
        token = _RECORD.set(record)
        with probe.lock:
            probe.inflight += 1

        async def send_marking(message):
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record.setdefault("body_sent", now())

        try:
            await asgi(scope, receive, send_marking)
        finally:
            record["asgi_out"] = now()
            _RECORD.reset(token)
            with probe.lock:
                probe.records.append(record)
                probe.inflight -= 1

    return outer


class ThreadProfiler:
    """cProfile on the event-loop thread and on each a2wsgi worker thread, merged at the end.

    cProfile profiles one thread; the app's work for one request is split between uvicorn's event
    loop (Connexion's middlewares, a2wsgi's coroutine side) and a worker thread (Flask and the view).
    """

    def __init__(self) -> None:
        self.on = False
        self.loop_profile: cProfile.Profile | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.workers: list[cProfile.Profile] = []
        self.local = threading.local()
        self.lock = threading.Lock()

    def loop_enter(self) -> None:
        if self.on and self.loop_profile is None:
            self.loop = asyncio.get_running_loop()
            self.loop_profile = cProfile.Profile()
            self.loop_profile.enable()  # stays on for this thread until stop()

    def worker_enter(self) -> cProfile.Profile | None:
        if not self.on:
            return None
        profile = getattr(self.local, "profile", None)
        if profile is None:
            profile = self.local.profile = cProfile.Profile()
            with self.lock:
                self.workers.append(profile)
        profile.enable()
        return profile

    def start(self) -> None:
        self.loop_profile, self.workers, self.local = None, [], threading.local()
        self.on = True

    def stop(self, path: str) -> None:
        import pstats
        self.on = False
        profiles = list(self.workers)
        if self.loop_profile is not None and self.loop is not None:
            done = threading.Event()
            self.loop.call_soon_threadsafe(lambda: (self.loop_profile.disable(), done.set()))
            done.wait(5)
            profiles.insert(0, self.loop_profile)
        dumps = []
        for profile in profiles:
            handle, name = tempfile.mkstemp(suffix=".pstats")
            os.close(handle)
            profile.dump_stats(name)
            dumps.append(name)
        if dumps:
            pstats.Stats(*dumps).dump_stats(path)
        for name in dumps:
            os.unlink(name)


def floor_app():
    """A bare ASGI app: reads the request, answers 200 with a JSON body of ``?bytes=N`` bytes."""
    bodies: dict[int, bytes] = {}

    def body_of(size: int) -> bytes:
        if size not in bodies:
            bodies[size] = json.dumps({"model_version": "v0", "pad": "x" * max(0, size - 36)}).encode()
        return bodies[size]

    async def app(scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    else:
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        query = dict(part.split(b"=", 1) for part in scope["query_string"].split(b"&") if b"=" in part)
        body = body_of(int(query.get(b"bytes", b"4000")))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"x-model-version", b"v0")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


VARIANTS = ("as-is", "compact-json", "compact-json+cached-decorators", "asyncapp")


def apply_variant(app, variant: str) -> None:
    """What-if changes, applied from outside before Connexion builds its stack (``as-is``: none).

    ``compact-json``: the API's jsonifier without ``indent=2`` (Connexion's FlaskApi default), so the
    stdlib's C encoder serialises responses: one argument to ``add_api``/``FlaskApp`` in the app
    (which ``create_app`` passes since 2026-12-03: the variant now equals ``as-is``).
    ``asyncapp``: see ``async_app``.
    ``cached-decorators``: Connexion 3.3 rebuilds each operation's Flask-side decorator chain on every
    request (``FlaskOperation.fn`` is a property; ``WSGIDecorator.__call__`` calls ``decorate`` per call,
    which inspects the view's signature). Here it is built once per operation, a patch of Connexion
    internals that measures what that costs.
    """
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}")
    if variant == "asyncapp":
        return  # a different app: see async_app
    if "compact-json" in variant:
        import flask
        from connexion.jsonifier import Jsonifier
        for api in app.middleware.apis:
            api.kwargs["jsonifier"] = Jsonifier(flask.json)
    if "cached-decorators" in variant:
        import functools

        from connexion.apps.flask import FlaskOperation
        from connexion.decorators.main import WSGIDecorator

        build_fn = FlaskOperation.fn.fget

        def cached_fn(self):
            if "_bench_fn" not in self.__dict__:
                self.__dict__["_bench_fn"] = build_fn(self)
            return self.__dict__["_bench_fn"]

        FlaskOperation.fn = property(cached_fn)

        def call(self, function):
            decorated = []

            @functools.wraps(function)
            def wrapper(*args, **kwargs):
                request = self.framework.get_request(uri_parser=self.uri_parser)
                if not decorated:
                    decorated.append(self.decorate(function))
                return decorated[0](request)

            return wrapper

        WSGIDecorator.__call__ = call


def async_app(service: EmbeddingService):
    """What-if ``asyncapp``: the same OpenAPI document and validation (``strict_validation``) under
    Connexion's ``AsyncApp`` (Starlette, no Flask, no a2wsgi), with the search view ported to
    ``async def``: the blocking work (state, assignment, generator, store) in one worker-thread hop
    (``asyncio.to_thread``), Prometheus metrics as in ``views.observed``, compact JSON (AsyncApp's
    default jsonifier). Error mapping is left out (no request fails here); the other operations
    answer 501 in this sketch."""
    import connexion
    from connexion.resolver import Resolver

    import serving_app
    from embedding_rollout.generator.client import VERSION_HEADER
    from embedding_rollout.store.base import Filters
    from serving_app.metrics import AppMetrics
    from serving_app.views import USER_COOKIE, USER_HEADER

    metrics = AppMetrics()

    def work(body: dict, requested: str | None, user: str | None, labels: dict):
        version = service.state().assign(requested, user)
        labels["model_version"] = version
        return service.search(version, body["query"], body.get("k", 10), Filters.from_dict(body.get("filters")))

    async def search(body: dict):
        started = time.perf_counter()
        request = connexion.request
        labels = {"endpoint": "search", "model_version": "none"}
        user = request.headers.get(USER_HEADER) or request.cookies.get(USER_COOKIE)
        result = await asyncio.to_thread(work, body, request.headers.get(VERSION_HEADER), user, labels)
        payload = {"model_version": result.model_version,
                   "results": [{"id": h.id, "score": round(h.score, 6), "fields": dict(h.fields)}
                               for h in result.hits]}
        metrics.requests.labels(status="200", **labels).inc()
        metrics.latency.labels(**labels).observe(time.perf_counter() - started)
        return payload, 200, {"Content-Type": "application/json", VERSION_HEADER: result.model_version}

    async def unsupported(*args, **kwargs):
        return {"title": "Not Implemented", "status": 501, "detail": "not in this sketch"}, 501

    def resolve(operation_id: str):
        return search if operation_id == "serving_app.views.search" else unsupported

    app = connexion.AsyncApp(__name__, specification_dir=str(Path(serving_app.__file__).parent))
    app.add_api("openapi.yaml", strict_validation=True, validate_responses=False,
                resolver=Resolver(function_resolver=resolve))
    return app


def lean_app(service: EmbeddingService):
    """A lower bound, not a proposal: the same search (state, assignment, generator, store) as a bare
    ASGI handler under the same uvicorn, the blocking work in one worker-thread hop, compact JSON;
    no OpenAPI validation, no metrics, no error mapping."""
    from concurrent.futures import ThreadPoolExecutor

    from embedding_rollout.store.base import Filters

    executor = ThreadPoolExecutor(4, thread_name_prefix="lean")

    def work(body: dict, requested: str | None, user: str | None) -> tuple[bytes, str]:
        version = service.state().assign(requested, user)
        result = service.search(version, body["query"], body.get("k", 10), Filters.from_dict(body.get("filters")))
        payload = {"model_version": result.model_version,
                   "results": [{"id": h.id, "score": round(h.score, 6), "fields": dict(h.fields)}
                               for h in result.hits]}
        return json.dumps(payload).encode(), result.model_version

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        headers = dict(scope["headers"])
        requested = headers.get(b"x-model-version", b"").decode() or None
        user = headers.get(b"x-user-id", b"").decode() or None
        body, version = await asyncio.get_running_loop().run_in_executor(
            executor, contextvars.copy_context().run, work, json.loads(b"".join(chunks)), requested, user)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"x-model-version", version.encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def open_store(args):
    if args.store == "lance":
        from embedding_rollout.store.lance import LanceStore
        return LanceStore(args.lance_uri)
    from embedding_rollout.store.elastic import ElasticsearchStore
    return ElasticsearchStore(args.es_url, timeout=args.timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", required=True)
    parser.add_argument("--store", choices=["lance", "elasticsearch"], required=True)
    parser.add_argument("--lance-uri")
    parser.add_argument("--es-url", default="http://127.0.0.1:9200")
    parser.add_argument("--protocol", default="grpc", choices=["grpc", "rest"])
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--variant", default="as-is", help=f"what-if: {', '.join(VARIANTS)}")
    args = parser.parse_args()

    service = EmbeddingService(StateFile(Path(args.state)), open_store(args), protocol=args.protocol,
                               timeout=args.timeout)
    scratch = Path(tempfile.mkdtemp(prefix="er-bench-decisions-"))
    decisions = DecisionLog(scratch / "decisions.jsonl")
    # Search is public; the app still signs each answer's feedback reference, with this file's key.
    os.environ.setdefault("ER_TOKENS", str(scratch / "tokens.json"))
    ensure_tokens_file(Path(os.environ["ER_TOKENS"]))
    probe, profiler = Probe(), ThreadProfiler()
    install_service_probes(service)
    if args.variant == "asyncapp":
        served = recording(async_app(service), "app", probe, profiler)
    else:
        app = create_app(service=service, decisions=decisions)
        apply_variant(app, args.variant)
        served = install(app, probe, profiler)
    server = AppServer(served).start()
    floor = AppServer(floor_app()).start()
    lean = AppServer(recording(lean_app(service), "lean", probe)).start()
    print(json.dumps({"app": server.url, "floor": floor.url, "lean": lean.url}), flush=True)

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        reply = "ok"
        if words[:2] == ["probe", "on"]:
            probe.on = True
        elif words[:2] == ["probe", "off"]:
            probe.on = False
        elif words[:2] == ["probe", "dump"]:
            records = probe.take()
            Path(words[2]).write_text(json.dumps(records))
            reply = f"ok {len(records)}"
        elif words[:2] == ["profile", "start"]:
            profiler.start()
        elif words[:2] == ["profile", "stop"]:
            profiler.stop(words[2])
        elif words[0] == "quit":
            break
        else:
            reply = f"error unknown command {line.strip()!r}"
        print(reply, flush=True)
    lean.stop()
    floor.stop()
    server.stop()


if __name__ == "__main__":
    main()
