"""The application through its real HTTP server, on both store backends, with two live versions."""
from __future__ import annotations

import time
import uuid
from itertools import islice

import numpy as np
import pytest
import requests

from conftest import ALL_SCOPES, OPERATE, WRITE, elasticsearch_store, serving, spec_for, verified
from embedding_rollout.statestore import DecisionLog
from embedding_rollout.domain.state import StateFile, VersionSpec
from embedding_rollout.pipeline.indexing import corpus_source, load_index
from embedding_rollout.service import EmbeddingService
from embedding_rollout.store.base import Filters
from serving_app import AppServer, create_app

CORPUS_SLICE = 1500


@pytest.fixture(scope="module", params=["lance", "elasticsearch"])
def deployment(request, model_server, embedders, tmp_path_factory):
    """v1 and v2 deployed, both indices loaded from the corpus, both write targets, 50/50."""
    home = tmp_path_factory.mktemp(f"app-{request.param}")
    if request.param == "lance":
        from embedding_rollout.store.lance import LanceStore
        store = LanceStore(str(home / "lance"))
    else:
        store = elasticsearch_store()
    prefix = f"app-{uuid.uuid4().hex[:8]}"
    state = StateFile(home / "state.json")
    for version in ("v1", "v2"):
        spec = spec_for(model_server, version, f"{prefix}-{version}")
        store.create_index(spec.index, spec.dims, {"model_version": version})
        load_index(lambda after: islice(corpus_source(after), CORPUS_SLICE), store, spec.index, embedders[version].embed)
        state.update(lambda s, spec=spec: verified(s, spec))
    state.update(lambda s: s.with_weights({"v1": 50, "v2": 50}))
    decisions = DecisionLog(home / "decisions.jsonl")
    # Generous timeouts: these tests are about versions and writes, not about a loaded machine's speed.
    server = AppServer(create_app(service=EmbeddingService(state, store, timeout=10.0), decisions=decisions)).start()
    yield server.url, state, store, prefix
    server.stop()
    for version in ("v1", "v2"):
        store.drop_index(f"{prefix}-{version}")


def post_search_once(url, body, **headers):
    return requests.post(f"{url}/search", json=body, headers=headers, timeout=30)


def post_search(url, body, **headers):
    """A search as a well-behaved client sends it: a 503 with Retry-After (a generator or store
    busy beyond its timeout on a loaded machine) is sent again, a few times."""
    for _ in range(5):
        reply = post_search_once(url, body, **headers)
        if reply.status_code != 503 or "Retry-After" not in reply.headers:
            return reply
        time.sleep(float(reply.headers["Retry-After"]))
    return reply


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_search_uses_one_version_end_to_end_with_filters(deployment, embedders, version):
    url, state, store, _ = deployment
    body = {"query": "asyncio event loop", "k": 7, "filters": {"category": "Library", "date_from": "2019-01-01"}}
    reply = post_search(url, body, **{"x-model-version": version})
    assert reply.status_code == 200, reply.text
    payload = reply.json()
    assert "\n " not in reply.text  # compact, not indented: smaller, and the stdlib's C encoder
    assert payload["model_version"] == version == reply.headers["x-model-version"]
    timing = dict(part.split(";dur=") for part in reply.headers["Server-Timing"].split(", "))
    assert set(timing) == {"generator", "store"} and all(float(v) > 0 for v in timing.values())
    results = payload["results"]
    assert len(results) == 7
    assert all(r["fields"]["category"] == "Library" and r["fields"]["date"] >= "2019-01-01" for r in results)
    # The same ranking as that version's generator + that version's index, and not the other one's.
    vector = embedders[version].embed([body["query"]])[0]
    expected = store.search(state.read().spec(version).index, vector, 7, Filters.from_dict(body["filters"]))
    assert [r["id"] for r in results] == [h.id for h in expected]
    assert np.allclose([r["score"] for r in results], [h.score for h in expected], atol=1e-4)


def test_without_a_header_the_weights_assign_and_a_user_key_is_sticky(deployment):
    url, state, _, _ = deployment
    seen = {post_search(url, {"query": "unicode"}).json()["model_version"] for _ in range(30)}
    assert seen == {"v1", "v2"}
    for user in ("alice", "bob", "carol"):
        versions = {post_search(url, {"query": "unicode"}, **{"x-user-id": user}).json()["model_version"]
                    for _ in range(8)}
        assert len(versions) == 1
    cookie = requests.post(f"{url}/search", json={"query": "x"}, cookies={"uid": "alice"}).json()["model_version"]
    assert cookie == post_search(url, {"query": "x"}, **{"x-user-id": "alice"}).json()["model_version"]


def test_an_unknown_version_header_is_reassigned_not_refused(deployment):
    url, *_ = deployment
    reply = post_search(url, {"query": "x"}, **{"x-model-version": "v99"})
    assert reply.status_code == 200 and reply.json()["model_version"] in ("v1", "v2")


# These bounds only say that a change shows at all (a missed reload or refresh never would); how
# fast it shows is a benchmark's question, so a slow machine cannot fail them.
EVENTUALLY = 30.0


def test_a_weight_change_takes_effect_without_restart(deployment):
    url, state, *_ = deployment
    try:
        StateFile(state.path).update(lambda s: s.with_weights({"v1": 0, "v2": 100}))
        started = time.monotonic()
        while {post_search(url, {"query": "x"}).json()["model_version"] for _ in range(5)} != {"v2"}:
            assert time.monotonic() - started < EVENTUALLY, "the new weights never took effect"
    finally:
        state.update(lambda s: s.with_weights({"v1": 50, "v2": 50}))


def _visible_everywhere(url, doc_id, text, deadline=EVENTUALLY) -> float:
    started = time.monotonic()
    pending = {"v1", "v2"}
    while pending:
        for version in list(pending):
            hits = post_search(url, {"query": text, "k": 3, "filters": {"category": "Streaming"}},
                               **{"x-model-version": version}).json()["results"]
            if any(h["id"] == doc_id and h["fields"]["text"] == text for h in hits):
                pending.discard(version)
        elapsed = time.monotonic() - started
        assert elapsed <= deadline, f"{doc_id} not visible in {pending} after {elapsed:.2f}s"
    return time.monotonic() - started


def test_streaming_updates_reach_every_write_target(deployment):
    url, state, store, _ = deployment
    doc_id = f"stream-{uuid.uuid4().hex[:8]}"
    body = {"title": "Zero downtime rollout", "text": "dual write reaches both indices", "category": "Streaming",
            "date": "2024-05-01", "version": 100}
    reply = requests.put(f"{url}/documents/{doc_id}", headers=WRITE, json=body)
    assert reply.status_code == 200 and reply.json()["applied"] == {"v1": True, "v2": True}
    _visible_everywhere(url, doc_id, body["text"])
    for version in ("v1", "v2"):  # each target embedded it with its own generator
        stored = store.get_many(state.read().spec(version).index, [doc_id])[doc_id]
        assert stored.seq == 100


def test_an_older_write_never_overwrites_a_newer_one(deployment):
    url, state, store, _ = deployment
    doc_id = f"order-{uuid.uuid4().hex[:8]}"
    new = {"title": "new", "text": "the newer text", "category": "Streaming", "date": "2024-05-01", "version": 20}
    old = {**new, "text": "the older text", "version": 10}
    assert requests.put(f"{url}/documents/{doc_id}", headers=WRITE, json=new).json()["applied"] == {"v1": True, "v2": True}
    assert requests.put(f"{url}/documents/{doc_id}", headers=WRITE, json=old).json()["applied"] == {"v1": False, "v2": False}
    _visible_everywhere(url, doc_id, new["text"])
    assert requests.put(f"{url}/documents/{doc_id}", headers=WRITE, json=new).status_code == 200  # an idempotent retry


def test_an_older_write_after_a_delete_never_resurrects(deployment):
    url, state, store, _ = deployment
    doc_id = f"gone-{uuid.uuid4().hex[:8]}"
    body = {"title": "t", "text": "a document about to disappear", "category": "Streaming",
            "date": "2024-05-01", "version": 5}
    requests.put(f"{url}/documents/{doc_id}", headers=WRITE, json=body)
    deleted = requests.delete(f"{url}/documents/{doc_id}", headers=WRITE, params={"version": 6})
    assert deleted.status_code == 200 and deleted.json()["applied"] == {"v1": True, "v2": True}
    late = requests.put(f"{url}/documents/{doc_id}", headers=WRITE, json={**body, "version": 4})
    assert late.json()["applied"] == {"v1": False, "v2": False}
    time.sleep(1.0)  # past the refresh interval: had it been written, it would be visible now
    for version in ("v1", "v2"):
        hits = post_search(url, {"query": body["text"], "k": 10, "filters": {"category": "Streaming"}},
                           **{"x-model-version": version}).json()["results"]
        assert doc_id not in [h["id"] for h in hits]
        assert store.get_many(state.read().spec(version).index, [doc_id])[doc_id].deleted


@pytest.mark.parametrize("body,problem", [
    ({"k": 5}, "'query' is a required property"),
    ({"query": "x", "k": 0}, "less than the minimum of 1"),
    ({"query": "x", "k": 1000}, "greater than the maximum of 100"),
    ({"query": "x", "filters": {"colour": "red"}}, "'colour' was unexpected"),
    ({"query": "x", "filters": {"date_from": "last week"}}, "date"),
    ({"query": ""}, "should be non-empty"),
    ({"query": "x", "extra": 1}, "'extra' was unexpected"),
])
def test_bad_search_input_gets_a_400_naming_the_problem(deployment, body, problem):
    url, *_ = deployment
    reply = post_search(url, body)
    assert reply.status_code == 400
    assert problem in reply.json()["detail"]


def test_malformed_json_and_bad_documents_get_400(deployment):
    url, *_ = deployment
    reply = requests.post(f"{url}/search", data="{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400
    missing = requests.put(f"{url}/documents/x1", headers=WRITE, json={"title": "t", "text": "x", "category": "c"})
    assert missing.status_code == 400 and "'date' is a required property" in missing.json()["detail"]
    bad_id = requests.put(f"{url}/documents/bad%20id", headers=WRITE, json={"title": "t", "text": "x", "category": "c",
                                                               "date": "2020-01-01"})
    assert bad_id.status_code == 400
    bad_version = requests.delete(f"{url}/documents/x1", headers=WRITE, params={"version": "-3"})
    assert bad_version.status_code == 400


DOCUMENT = {"title": "t", "text": "x", "category": "c", "date": "2020-01-01"}


@pytest.mark.parametrize("method,path,data,problem", [
    ("POST", "/search", b'{"query": "\xff\xfe"}', "not UTF-8"),
    ("POST", "/rollout/decisions", b'{"new_version": "v2", "action": "\xff"}', "not UTF-8"),
    ("POST", "/search", b'{"query": "a\\ud800b"}', "lone surrogate"),
    ("PUT", "/documents/odd-1", b'{"title": "a\\udc00", "text": "x", "category": "c", "date": "2020-01-01"}',
     "lone surrogate"),
    ("POST", "/search", b"[" * 100_000 + b"]" * 100_000, "nested"),
    ("PUT", "/documents/odd-2", b'{"title": "t", "text": "x", "category": "c", "date": "not-a-date"}', "date"),
    ("PUT", "/documents/odd-3", b'{"title": "t", "text": "x", "category": "c", "date": "2024-01-01T00:00:00"}',
     "date"),
    ("PUT", "/documents/odd-4", b'{"title": "t", "text": "x", "category": "c", "date": "2024-02-31"}', "date"),
    ("POST", "/search", b'{"query": "x", "filters": {"date_to": "2024-02-31"}}', "date"),
    ("DELETE", "/documents/odd-5?version=9223372036854775808", None, "maximum"),
    ("GET", "/deployment/models/v1?artifact=%00", None, "artifact"),
    ("GET", "/deployment/backfills/%0A%F0%A4%96%86?source=corpus", None, "control character"),  # schemathesis
    ("PUT", "/documents/odd%0A6", b'{"title": "t", "text": "x", "category": "c", "date": "2024-01-01"}',
     "control character"),
])
def test_schema_valid_but_odd_input_gets_a_4xx_naming_the_problem_never_a_500(deployment, method, path, data,
                                                                                problem):
    url, state, store, _ = deployment
    counts = {v: store.count(state.read().spec(v).index) for v in ("v1", "v2")}
    reply = requests.request(method, f"{url}{path}", data=data, headers={"content-type": "application/json", **ALL_SCOPES},
                             timeout=30)
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    assert problem in reply.json()["detail"], reply.json()
    assert {v: store.count(state.read().spec(v).index) for v in ("v1", "v2")} == counts


def test_corpus_ids_with_a_tilde_can_be_written_and_deleted(deployment):
    url, state, store, _ = deployment
    doc_id = "3.10.0a1:bpo-1635741~8"
    assert requests.put(f"{url}/documents/{doc_id}", headers=WRITE, json=DOCUMENT).status_code == 200
    assert requests.delete(f"{url}/documents/{doc_id}", headers=WRITE).status_code == 200
    assert store.get_many(state.read().spec("v1").index, [doc_id])[doc_id].deleted


def test_a_version_beyond_the_clock_is_refused_naming_the_bound(deployment):
    """Versions are server time in microseconds (a caller may bring its own event time): one far in
    the future would make the document unchangeable until then."""
    url, state, store, _ = deployment
    reply = requests.delete(f"{url}/documents/frozen-1", headers=WRITE, params={"version": 2 ** 62})
    assert reply.status_code == 400 and "server clock" in reply.json()["detail"]
    assert "frozen-1" not in store.get_many(state.read().spec("v1").index, ["frozen-1"])
    reply = requests.put(f"{url}/documents/frozen-1", headers=WRITE, json={**DOCUMENT, "version": 2 ** 62})
    assert reply.status_code == 400 and "server clock" in reply.json()["detail"]
    now = time.time_ns() // 1000
    assert requests.put(f"{url}/documents/frozen-1", headers=WRITE, json={**DOCUMENT, "version": now}).status_code == 200


def test_health_readiness_and_metrics(deployment):
    url, *_ = deployment
    assert requests.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = requests.get(f"{url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["versions"]["v1"]["generator"] == "AVAILABLE"
    post_search(url, {"query": "metrics"}, **{"x-model-version": "v2"})
    post_search(url, {"query": "x", "k": 0})
    metrics = requests.get(f"{url}/metrics").text
    assert 'embedding_app_requests_total{endpoint="search",model_version="v2",status="200"}' in metrics
    assert 'embedding_app_request_seconds_bucket{endpoint="search",le="0.25",model_version="v2"}' in metrics
    assert requests.get(f"{url}/ui/").status_code == 200
    assert requests.get(f"{url}/openapi.json").json()["paths"]["/search"]


@pytest.fixture
def broken_app(model_server, tmp_path):
    """An app whose only live version has a generator on a closed port."""
    from embedding_rollout.store.lance import LanceStore
    store = LanceStore(str(tmp_path / "lance"))
    store.create_index("docs-v3", 32, {"model_version": "v3"})
    state = StateFile(tmp_path / "state.json")
    spec = VersionSpec("v3", 32, "docs-v3", generator_grpc="127.0.0.1:9", generator_rest="http://127.0.0.1:9")
    state.update(lambda s: serving(s, spec))
    server = AppServer(create_app(service=EmbeddingService(state, store, timeout=1.0))).start()
    yield server.url, store
    server.stop()


def test_a_down_generator_gives_503_in_time_and_writes_nothing(broken_app):
    url, store = broken_app
    started = time.monotonic()
    reply = post_search_once(url, {"query": "x"})
    assert reply.status_code == 503 and "unavailable" in reply.json()["detail"]
    assert time.monotonic() - started < 3.0
    write = requests.put(f"{url}/documents/d1", headers=WRITE, json={"title": "t", "text": "x", "category": "c",
                                                      "date": "2020-01-01", "version": 3})
    assert write.status_code == 503 and write.headers["Retry-After"] == "1"
    assert store.get_many("docs-v3", ["d1"]) == {}
    ready = requests.get(f"{url}/readyz")
    assert ready.status_code == 503 and "unavailable" in ready.json()["versions"]["v3"]["generator"]
    metrics = requests.get(f"{url}/metrics").text
    assert 'embedding_app_errors_total{cause="GeneratorUnavailable",endpoint="search",model_version="v3"}' in metrics


def test_a_down_store_gives_503(model_server, tmp_path):
    from embedding_rollout.store.elastic import ElasticsearchStore
    state = StateFile(tmp_path / "state.json")
    spec = spec_for(model_server, "v1", "docs-v1")
    state.update(lambda s: serving(s, spec))
    store = ElasticsearchStore("http://127.0.0.1:9", timeout=0.5)
    server = AppServer(create_app(service=EmbeddingService(state, store, timeout=5.0))).start()
    try:
        started = time.monotonic()
        reply = post_search_once(server.url, {"query": "x"})
        assert reply.status_code == 503 and "elasticsearch unavailable" in reply.json()["detail"]
        assert time.monotonic() - started < 5.0
    finally:
        server.stop()


def test_decisions_endpoints(deployment):
    url, *_ = deployment
    made = requests.post(f"{url}/rollout/decisions", headers=OPERATE, json={"new_version": "v2", "action": "set_weights",
                                                                            "weight": 30, "by": "alice"})
    assert made.status_code == 201 and made.json()["weight"] == 30 and made.json()["by"] == "alice"
    assert requests.post(f"{url}/rollout/decisions", headers=OPERATE,
                         json={"new_version": "v2", "action": "launch"}).status_code == 400
    missing = requests.post(f"{url}/rollout/decisions", headers=OPERATE, json={"new_version": "v2", "action": "set_weights"})
    assert missing.status_code == 400 and "weight" in missing.json()["detail"]
    unsigned = requests.post(f"{url}/rollout/decisions", headers=OPERATE,
                             json={"new_version": "v2", "action": "set_weights", "weight": 40})
    assert unsigned.json()["by"] == "operator"  # who sent it, when the body does not say on whose behalf
    listed = requests.get(f"{url}/rollout/decisions", headers=OPERATE, params={"new_version": "v2"}).json()
    assert [d["id"] for d in listed] == [made.json()["id"], unsigned.json()["id"]]


class _BuggyService(EmbeddingService):
    def search(self, *args, **kwargs):
        raise ZeroDivisionError("a bug")


def test_an_unexpected_error_is_a_counted_5xx_that_fails_the_analysis(model_server, tmp_path):
    """Every 5xx the app answers counts against its version, not only the failures it expects."""
    from embedding_rollout.domain.analysis import FAILED, Thresholds, judge, parse_metrics
    from embedding_rollout.store.lance import LanceStore
    state = StateFile(tmp_path / "state.json")
    for version in ("v1", "v2"):
        spec = spec_for(model_server, version, f"docs-{version}")
        state.update(lambda s, spec=spec: verified(s, spec))
    state.update(lambda s: s.with_weights({"v1": 50, "v2": 50}))
    server = AppServer(create_app(service=_BuggyService(state, LanceStore(str(tmp_path / "lance"))))).start()
    try:
        replies = [post_search(server.url, {"query": "x"}, **{"x-model-version": "v2"}) for _ in range(25)]
        assert {r.status_code for r in replies} == {500}
        assert replies[0].headers["content-type"] == "application/problem+json"
        assert "ZeroDivisionError" in replies[0].json()["detail"] and "a bug" not in replies[0].text
        metrics = parse_metrics(requests.get(f"{server.url}/metrics").text)
    finally:
        server.stop()
    assert metrics["v2"].failures == 25
    assert judge(metrics, "v2", "v1", Thresholds(min_requests=20), stable_weight=0).status == FAILED


@pytest.fixture
def operator_app(model_server, tmp_path):
    """An app over a deployment with v1 live and v2 deployed, for the operator endpoints."""
    from embedding_rollout.store.lance import LanceStore
    state, store = StateFile(tmp_path / "state.json"), LanceStore(str(tmp_path / "lance"))
    for version in ("v1", "v2"):
        spec = spec_for(model_server, version, f"docs-{version}")
        store.create_index(spec.index, spec.dims, {"model_version": version})  # ready to take traffic
        state.update(lambda s, spec=spec: verified(s, spec))
    state.update(lambda s: s.with_weights({"v1": 100}))
    server = AppServer(create_app(service=EmbeddingService(state, store))).start()
    yield server.url, state
    server.stop()


def test_the_rollout_endpoints_apply_only_legal_transitions(operator_app):
    url, state = operator_app

    def change(**body):
        return requests.post(f"{url}/deployment/rollout", headers=OPERATE, json=body, timeout=10)

    assert requests.get(f"{url}/deployment/rollout", headers=OPERATE).status_code == 404
    rollout = {"new": "v2", "current": "v1", "strategy": "ramped", "plan": [50, 100], "owner": "ramped"}
    begun = change(transition="begin", run_id="r1", rollout=rollout)
    assert begun.status_code == 200 and begun.json()["rollout"]["phase"] == "Progressing"
    refused = change(transition="begin", run_id="r2", rollout=rollout)
    assert refused.status_code == 409 and "another rollout holds the deployment" in refused.json()["detail"]
    assert change(transition="start_step", run_id="r1").status_code == 409  # names the missing step
    assert change(transition="start_step", run_id="r1", step=0).json()["rollout"]["step_started_at"]
    guard = {"weights": {"v1": 50, "v2": 50}, "rollout": {"run_id": "r1", "step": 0}}
    assert requests.put(f"{url}/deployment/weights", headers=OPERATE, json=guard).status_code == 200
    assert change(transition="abort", run_id="r1", reason="analysis failed").status_code == 200
    late = requests.put(f"{url}/deployment/weights", headers=OPERATE, json={**guard, "weights": {"v1": 0, "v2": 100}})
    assert late.status_code == 409 and "Aborted" in late.json()["detail"]
    assert state.read().weights == {"v1": 50, "v2": 50}  # the refused change changed nothing
    assert requests.get(f"{url}/deployment/rollout", headers=OPERATE).json()["message"] == "analysis failed"
    bad = change(transition="jump", run_id="r1")
    assert bad.status_code == 400 and "transition" in bad.json()["detail"]


def test_the_operator_api_gives_traffic_only_to_a_verified_version_and_shows_every_phase(operator_app):
    url, state = operator_app
    unverified = VersionSpec("v3", 8, "docs-v3")
    state.update(lambda s: s.with_version(unverified).with_write_target("v3").with_backfill("v3"))
    before = state.read()
    for weights in ({"v1": 90, "v3": 10}, {"v1": 100, "v3": 0}):
        refused = requests.put(f"{url}/deployment/weights", headers=OPERATE, json={"weights": weights})
        assert refused.status_code == 409, refused.text
        assert refused.json()["detail"] == ("v3 cannot take traffic: it is backfilled; it needs a backfill and a "
                                            "passed verification first (embedding-rollout index verify)")
    assert state.read() == before  # refused: nothing changed
    assert requests.put(f"{url}/deployment/weights", headers=OPERATE, json={"weights": {"v1": 90, "v2": 10}}).status_code == 200
    shown = requests.get(f"{url}/deployment", headers=OPERATE).json()["versions"]
    assert {name: spec["phase"] for name, spec in shown.items()} == {"v1": "live", "v2": "live", "v3": "backfilled"}
    assert shown["v2"]["verification"]["complete"] is True and shown["v3"]["verification"] is None


def app_with_a_broken_candidate(model_server, tmp_path):
    """v1 stable at 90 %, v2 at 10 % with its generator down (nothing listens on its port); the
    app over them, started. Returns (state, server)."""
    from embedding_rollout.store.lance import LanceStore
    store = LanceStore(str(tmp_path / "lance"))
    state = StateFile(tmp_path / "state.json")
    stable = spec_for(model_server, "v1", "docs-v1")
    broken = VersionSpec("v2", 48, "docs-v2", generator_grpc="127.0.0.1:9", generator_rest="http://127.0.0.1:9")
    for spec in (stable, broken):
        store.create_index(spec.index, spec.dims, {"model_version": spec.name})
    state.update(lambda s: verified(serving(s, stable), broken).with_weights({"v1": 90, "v2": 10}))
    server = AppServer(create_app(service=EmbeddingService(state, store, timeout=5.0))).start()
    return state, server


def test_a_broken_candidate_leaves_the_app_ready_and_gets_no_traffic(model_server, tmp_path):
    """A candidate at 10 % whose generator is down (its pods crash-loop): the app stays ready,
    because readiness gates on the stable version alone; /readyz and /metrics report the candidate
    not ready; its requests are served wholly by the stable version."""
    state, server = app_with_a_broken_candidate(model_server, tmp_path)
    try:
        ready = requests.get(f"{server.url}/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["ready"] is True and body["serving"] == ["v1"]
        assert body["versions"]["v1"] | {"role": "stable", "ready": True} == body["versions"]["v1"]
        assert body["versions"]["v2"]["role"] == "candidate" and body["versions"]["v2"]["ready"] is False
        assert "unavailable" in body["versions"]["v2"]["generator"]
        reply = post_search(server.url, {"query": "x"}, **{"x-model-version": "v2"})
        assert reply.status_code == 200 and reply.json()["model_version"] == "v1"
        metrics = requests.get(f"{server.url}/metrics").text
        assert 'embedding_app_version_ready{model_version="v1",role="stable"} 1.0' in metrics
        assert 'embedding_app_version_ready{model_version="v2",role="candidate"} 0.0' in metrics
    finally:
        server.stop()


def test_a_candidate_that_is_not_ready_gets_no_more_traffic(model_server, tmp_path):
    """Raising a candidate's weight while its generator is down is refused (409 naming it, the
    state unchanged), so neither the app nor Istio (the mesh router asks the app first) sends it
    more traffic; lowering its weight, and a rollback to the stable version, still go through."""
    state, server = app_with_a_broken_candidate(model_server, tmp_path)
    try:
        before = (tmp_path / "state.json").read_bytes()
        reply = requests.put(f"{server.url}/deployment/weights", headers=OPERATE, json={"weights": {"v1": 50, "v2": 50}})
        assert reply.status_code == 409, reply.text
        assert "v2 is not ready" in reply.json()["detail"] and "generator" in reply.json()["detail"]
        assert (tmp_path / "state.json").read_bytes() == before
        reply = requests.put(f"{server.url}/deployment/weights", headers=OPERATE, json={"weights": {"v1": 95, "v2": 5}})
        assert reply.status_code == 200, reply.text
        reply = requests.put(f"{server.url}/deployment/weights", headers=OPERATE, json={"weights": {"v1": 100}})
        assert reply.status_code == 200 and state.read().weights == {"v1": 100}
        reply = requests.put(f"{server.url}/deployment/weights", headers=OPERATE, json={"weights": {"v1": 90, "v2": 10}})
        assert reply.status_code == 409  # back from 0: a raise as well
    finally:
        server.stop()
