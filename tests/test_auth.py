"""No anonymous caller changes documents, weights, decisions or the A/B signal: every write and
control operation of the running app, on both stores, refused without a token (401) and with
another caller's (403), nothing changed afterwards; the same calls succeed with the right token.
Feedback counts once, for the version that served the search, and cannot be forged."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jwt
import pytest
import requests

from conftest import ALL_SCOPES, ES_URL, FEEDBACK, OPERATE, TOKENS, WRITE, bearer, elasticsearch_store
from embedding_rollout import auth, steps
from embedding_rollout.airflow_stack import free_port
from embedding_rollout.config import Settings
from embedding_rollout.feedback import ElasticsearchLedger, FeedbackReferences, Reference
from embedding_rollout.online_metrics import AppScrape
from embedding_rollout.store import open_store
from rollout_harness import LocalDeployment, small_corpus
from serving_app import AppServer, create_app

DOC = {"title": "t", "text": "a write that must not land", "category": "Streaming", "date": "2024-05-01"}
ANONYMOUS, UNKNOWN = {}, {"Authorization": "Bearer not-a-token-of-this-deployment"}
LIVE = {"v1": 100, "v2": 0}
CALLERS = {"operator": auth.ROLLOUT_OPERATE, "writer": auth.DOCUMENTS_WRITE, "feedback": auth.FEEDBACK_WRITE,
           "search": auth.SEARCH}


@pytest.fixture(scope="module", params=["lance", "elasticsearch"])
def live(request, model_repo, tmp_path_factory):
    """v1 serving, v2 deployed as a write target: a deployment with something to change."""
    es_url = ""
    if request.param == "elasticsearch":
        elasticsearch_store()  # fails in CI, skips elsewhere, when the server is missing
        es_url = ES_URL
    home = tmp_path_factory.mktemp(f"auth-{request.param}")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ER_CORPUS", str(small_corpus(home / "corpus.jsonl.gz", 200)))
        deployment = LocalDeployment(home, model_repo, env, store=request.param, es_url=es_url,
                                     index_prefix=f"auth-{uuid.uuid4().hex[:8]}")
        steps.deploy_version(deployment.settings, "v2")
        steps.start_dual_write(deployment.settings, "v2")
        steps.backfill(deployment.settings, "v2", "v1")
        assert steps.verify(deployment.settings, "v2", "v1").complete
        steps.set_weights(deployment.settings, LIVE)  # v2 live at 0: reachable by its header
        yield deployment
        deployment.stop(drop_indices=True)


def _search(url, headers=None, **extra):
    reply = requests.post(f"{url}/search", json={"query": "asyncio event loop", "k": 3}, headers=headers or {},
                          timeout=30, **extra)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _operations(live) -> list[tuple[str, str, str, dict]]:
    """(scope, method, path, request) of every write and control operation, and the operator reads."""
    ref = _search(live.app.url)["feedback_ref"]
    return [
        (auth.DOCUMENTS_WRITE, "PUT", "/documents/auth-1", {"json": DOC}),
        (auth.DOCUMENTS_WRITE, "DELETE", "/documents/auth-1", {"params": {"version": 2 ** 62}}),
        (auth.ROLLOUT_OPERATE, "PUT", "/deployment/weights", {"json": {"weights": {"v1": 90, "v2": 10}}}),
        (auth.ROLLOUT_OPERATE, "POST", "/rollout/decisions", {"json": {"new_version": "v2", "action": "rollback"}}),
        (auth.ROLLOUT_OPERATE, "POST", "/deployment/rollout",
         {"json": {"transition": "begin", "run_id": "intruder", "rollout": {"new": "v2", "current": "v1"}}}),
        (auth.FEEDBACK_WRITE, "POST", "/feedback", {"json": {"ref": ref, "clicked": False}}),
        (auth.ROLLOUT_OPERATE, "GET", "/deployment", {}),
        (auth.ROLLOUT_OPERATE, "GET", "/deployment/rollout", {}),
        (auth.ROLLOUT_OPERATE, "GET", "/rollout/decisions", {}),
        (auth.ROLLOUT_OPERATE, "GET", "/deployment/backfills/v2", {"params": {"source": "corpus"}}),
        (auth.ROLLOUT_OPERATE, "GET", "/deployment/models", {}),
        (auth.ROLLOUT_OPERATE, "GET", "/deployment/models/v1", {}),
    ]


def _snapshot(live) -> dict:
    """Everything a refused call could have changed."""
    state = live.state.read()
    store = open_store(live.settings)
    counts = {v: store.count(spec.index) for v, spec in state.versions.items()}
    stored = {v: store.get_many(spec.index, ["auth-1"]) for v, spec in state.versions.items()}
    decisions = live.settings.decisions_path
    metrics = requests.get(f"{live.app.url}/metrics", timeout=30).text
    feedback = sorted(line for line in metrics.splitlines() if line.startswith("embedding_app_feedback_total"))
    return {"state": live.settings.state_path.read_bytes(), "counts": counts, "stored": repr(stored),
            "decisions": decisions.read_bytes() if decisions.exists() else b"", "feedback": feedback}


def test_every_write_and_control_operation_is_refused_without_the_scope_and_changes_nothing(live):
    operations = _operations(live)
    before = _snapshot(live)
    for scope, method, path, request in operations:
        wrong = [(name, bearer(name), 403) for name, held in CALLERS.items() if held != scope]
        for who, headers, status in [("anonymous", ANONYMOUS, 401), ("unknown", UNKNOWN, 401), *wrong]:
            reply = requests.request(method, f"{live.app.url}{path}", headers=headers, timeout=30, **request)
            assert reply.status_code == status, (method, path, who, reply.text)  # never the token itself
            assert reply.headers["content-type"].startswith("application/problem+json")
            assert reply.headers["WWW-Authenticate"].startswith('Bearer realm="embedding-rollout"')
            if status == 403:
                assert scope in reply.json()["detail"] and f'scope="{scope}"' in reply.headers["WWW-Authenticate"]
            if headers:  # a refusal never echoes the token it refused
                token = headers["Authorization"].split()[1]
                assert token not in reply.text and token not in str(reply.headers)
    assert _snapshot(live) == before  # the state file byte for byte, the documents, decisions, feedback


def test_the_same_calls_succeed_with_the_right_token(live):
    right = {auth.DOCUMENTS_WRITE: WRITE, auth.ROLLOUT_OPERATE: OPERATE, auth.FEEDBACK_WRITE: FEEDBACK}
    outcomes = {}
    for scope, method, path, request in _operations(live):
        if path == "/deployment/rollout" and method == "POST":
            continue  # taking the deployment for a run: the Airflow tests do, through their Connection
        if method == "DELETE":
            request = {}  # a version of now: 2^62 is refused (400) for running ahead of the clock
        reply = requests.request(method, f"{live.app.url}{path}", headers=right[scope], timeout=30, **request)
        outcomes[(method, path)] = reply.status_code
        if path == "/deployment/weights":  # back to where it was, for the other tests
            assert reply.json()["weights"] == {"v1": 90, "v2": 10}
            requests.put(f"{live.app.url}{path}", headers=OPERATE, json={"weights": LIVE}, timeout=30)
    # No rollout has begun: the one 404 that says so, not a refusal.
    assert outcomes.pop(("GET", "/deployment/rollout")) == 404
    assert all(200 <= status < 300 for status in outcomes.values()), outcomes
    decisions = requests.get(f"{live.app.url}/rollout/decisions", headers=OPERATE, timeout=30).json()
    assert decisions[-1]["by"] == "operator"


def test_feedback_counts_once_for_the_version_that_served_the_search(live):
    url = live.app.url
    served = {v: _search(url, {"x-model-version": v}) for v in ("v1", "v2")}
    scrape = AppScrape(url)
    mark = scrape.mark()
    for version, answer in served.items():
        assert requests.post(f"{url}/feedback", headers=FEEDBACK, json={"ref": answer["feedback_ref"], "clicked": True},
                             timeout=30).status_code == 204
    replay = requests.post(f"{url}/feedback", headers=FEEDBACK,
                           json={"ref": served["v2"]["feedback_ref"], "clicked": True}, timeout=30)
    assert replay.status_code == 409 and "counted already" in replay.json()["detail"]
    assert _counted(scrape.since(mark)) == {"v1": (1, 1), "v2": (1, 1)}  # (clicks, reports)


def _counted(window) -> dict:
    return {v: (clicks, reports) for v, (clicks, reports) in window.clicks.items() if reports}


def _reference(answer: dict) -> dict:
    return jwt.decode(answer["feedback_ref"], options={"verify_signature": False})


@pytest.mark.parametrize("forgery", ["other key", "altered version", "unsigned", "expired", "garbage"])
def test_forged_or_expired_feedback_references_are_refused_and_not_counted(live, forgery):
    url = live.app.url
    claims = _reference(_search(url, {"x-model-version": "v1"}))
    if forgery == "other key":
        ref = jwt.encode(claims, "a key this deployment does not have", algorithm="HS256")
    elif forgery == "altered version":  # the signature of the v1 answer on a claim of v2
        header, _, signature = _search(url, {"x-model-version": "v1"})["feedback_ref"].split(".")
        body = jwt.utils.base64url_encode(json.dumps({**claims, "ver": "v2"}).encode()).decode()
        ref = f"{header}.{body}.{signature}"
    elif forgery == "unsigned":
        ref = jwt.encode(claims, None, algorithm="none")
    elif forgery == "expired":
        ref = FeedbackReferences(auth.feedback_key(live.settings), ttl=1).issue("v1", now=time.time() - 60)
    else:
        ref = "not.a.reference"
    scrape = AppScrape(url)
    mark = scrape.mark()
    reply = requests.post(f"{url}/feedback", headers=FEEDBACK, json={"ref": ref, "clicked": False}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    assert _counted(scrape.since(mark)) == {}


def test_feedback_for_a_version_no_longer_deployed_is_refused(live):
    references = FeedbackReferences(auth.feedback_key(live.settings))
    ref = references.issue("v7")  # a validly signed answer of a version since removed
    reply = requests.post(f"{live.app.url}/feedback", headers=FEEDBACK, json={"ref": ref, "clicked": True}, timeout=30)
    assert reply.status_code == 409 and "v7" in reply.json()["detail"]


def test_an_anonymous_flood_does_not_move_the_automatic_decision(live):
    from embedding_rollout.domain.analysis import Thresholds, automatic_decision
    url = live.app.url
    scrape = AppScrape(url)
    mark = scrape.mark()
    answers = [_search(url, {"x-model-version": "v2"}) for _ in range(3)]
    for answer in answers * 17:  # 51 reports of unclicked v2 answers, none with a token
        reply = requests.post(f"{url}/feedback", json={"ref": answer["feedback_ref"], "clicked": False}, timeout=30)
        assert reply.status_code == 401
    measured = scrape.since(mark)
    assert _counted(measured) == {}
    decision, reason = automatic_decision(measured.versions, measured.clicks, "v2", "v1", Thresholds(), 50)
    assert decision is None, reason


def test_a_reference_counted_by_one_app_process_is_refused_by_another(live):
    """Two app processes over one deployment (two pods, or a restart): one ledger."""
    second = AppServer(create_app(Settings())).start()
    try:
        answer = _search(live.app.url)
        body = {"ref": answer["feedback_ref"], "clicked": True}
        assert requests.post(f"{live.app.url}/feedback", headers=FEEDBACK, json=body, timeout=30).status_code == 204
        again = requests.post(f"{second.url}/feedback", headers=FEEDBACK, json=body, timeout=30)
        assert again.status_code == 409, again.text
    finally:
        second.stop()


@pytest.mark.elasticsearch
def test_the_elasticsearch_ledger_prunes_only_expired_ids():
    store = elasticsearch_store()
    ledger = ElasticsearchLedger(store.client, f"auth-ledger-{uuid.uuid4().hex[:8]}")
    now = time.time()
    try:
        ledger.count_once(Reference("old", "v1", None, now - 7200, now - 3600))
        ledger.count_once(Reference("live", "v1", None, now, now + 3600))
        assert ledger.prune(now) == 1
        ledger.count_once(Reference("old", "v1", None, now - 7200, now - 3600))  # gone: it could be stored again
        with pytest.raises(Exception, match="counted already"):
            ledger.count_once(Reference("live", "v1", None, now, now + 3600))
    finally:
        store.client.indices.delete(index=ledger.index, ignore_unavailable=True)


# -- the token file ------------------------------------------------------------------------------
def test_the_token_file_is_private_kept_and_reloaded_without_a_restart(tmp_path):
    path = tmp_path / "tokens.json"
    assert auth.ensure_tokens_file(path) and not auth.ensure_tokens_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = auth.token_for(path, "writer")
    tokens = auth.FileTokens(path)
    assert tokens.verify(first).scopes == {auth.DOCUMENTS_WRITE}
    replaced = auth.add_token(path, "writer", [auth.DOCUMENTS_WRITE, auth.SEARCH])
    assert tokens.verify(first) is None  # revoked at once
    assert tokens.verify(replaced).scopes == {auth.DOCUMENTS_WRITE, auth.SEARCH}
    path.write_text("{broken")  # a bad edit: the last good tokens stay in force
    assert tokens.verify(replaced).name == "writer"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_search_needs_a_token_when_the_deployment_says_so(live, monkeypatch):
    monkeypatch.setenv("ER_SEARCH_AUTH", "token")
    server = AppServer(create_app(Settings())).start()
    try:
        body = {"query": "asyncio", "k": 1}
        assert requests.post(f"{server.url}/search", json=body, timeout=30).status_code == 401
        assert requests.post(f"{server.url}/search", json=body, headers=WRITE, timeout=30).status_code == 403
        assert requests.post(f"{server.url}/search", json=body, headers=bearer("search"), timeout=30).status_code == 200
        served = requests.get(f"{server.url}/openapi.json", timeout=30).json()
        assert served["paths"]["/search"]["post"]["security"] == [{"bearer": ["search"]}]
    finally:
        server.stop()
    public = requests.get(f"{live.app.url}/openapi.json", timeout=30).json()
    assert public["paths"]["/search"]["post"]["security"] == []


def test_the_operator_api_can_be_served_apart_from_the_public_one(live, monkeypatch):
    servers = {}
    try:
        for apis in ("public", "operator"):
            monkeypatch.setenv("ER_APP_APIS", apis)
            servers[apis] = AppServer(create_app(Settings())).start()
        public, operator = servers["public"].url, servers["operator"].url
        assert requests.get(f"{public}/deployment", headers=OPERATE, timeout=30).status_code == 404
        assert requests.get(f"{operator}/deployment", headers=OPERATE, timeout=30).status_code == 200
        assert requests.post(f"{operator}/search", json={"query": "x"}, timeout=30).status_code == 404
        assert requests.post(f"{public}/search", json={"query": "x"}, timeout=30).status_code == 200
        for url in (public, operator):
            assert requests.get(f"{url}/readyz", timeout=30).status_code == 200
    finally:
        for server in servers.values():
            server.stop()


def test_up_creates_private_tokens_and_refuses_anonymous_writes(model_repo, tmp_path):
    home, ports = tmp_path / "home", [free_port() for _ in range(3)]
    (home / "models").mkdir(parents=True)
    (home / "models" / "embedder").symlink_to(model_repo)
    env = {**os.environ, "ER_HOME": str(home), "ER_CORPUS": str(small_corpus(tmp_path / "corpus.jsonl.gz", 100)),
           "ER_STORE": "lance"}
    env.pop("ER_TOKENS")  # up's own default: $ER_HOME/tokens.json
    up = subprocess.Popen([sys.executable, "-m", "embedding_rollout.cli", "up", "--port", str(ports[0]),
                           "--rest-port", str(ports[1]), "--grpc-port", str(ports[2])],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if "tokens created in" in line:
                break
        assert f"tokens created in {home / 'tokens.json'}" in "".join(lines), "".join(lines)
        tokens = home / "tokens.json"
        assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
        url = f"http://127.0.0.1:{ports[0]}"
        anonymous = requests.put(f"{url}/documents/up-1", json={**DOC, "text": "x"}, timeout=30)
        assert anonymous.status_code == 401
        writer = {"Authorization": f"Bearer {auth.token_for(tokens, 'writer')}"}
        assert requests.put(f"{url}/documents/up-1", json=DOC, headers=writer, timeout=60).status_code == 200
    finally:
        up.terminate()
        up.wait(30)


# -- JWTs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def issuer():
    """An issuer's signing key and its JWKS served over HTTP on 127.0.0.1."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = json.dumps({"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Keys(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(jwks)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield key, f"http://127.0.0.1:{server.server_port}/keys", public
    server.shutdown()


def _jwt(key, **claims) -> str:
    now = int(time.time())
    body = {"iss": "https://issuer.test", "aud": "embedding-rollout", "sub": "system:serviceaccount:airflow:airflow",
            "iat": now, "exp": now + 300, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm="RS256",
                      headers={"kid": "k1"})


def test_jwts_are_checked_against_the_issuers_keys(issuer):
    key, jwks_url, public = issuer
    subject = "system:serviceaccount:airflow:airflow"
    verifier = auth.JwtTokens("https://issuer.test", jwks_url, "embedding-rollout",
                              auth.parse_subject_scopes(f"{subject}={auth.ROLLOUT_OPERATE}"))
    assert verifier.verify(_jwt(key)).scopes == {auth.ROLLOUT_OPERATE}  # from the subject's mapping
    assert verifier.verify(_jwt(key, sub="someone", scope="documents:write")).scopes == {auth.DOCUMENTS_WRITE}
    assert verifier.verify(_jwt(key, sub="someone")).scopes == frozenset()
    assert verifier.verify(_jwt(key, sub="someone", scp=["feedback:write", "email"])).scopes == {auth.FEEDBACK_WRITE}
    assert verifier.verify(_jwt(key, sub="someone", scope=7)).scopes == frozenset()  # a malformed claim grants nothing
    for refused in (_jwt(key, aud="another-service"), _jwt(key, iss="https://elsewhere.test"),
                    _jwt(key, exp=int(time.time()) - 60), _jwt(key, sub=None), _jwt(key, exp=None)):
        assert verifier.verify(refused) is None
    from cryptography.hazmat.primitives.asymmetric import rsa
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert verifier.verify(_jwt(stranger)) is None
    # A symmetric signature under the issuer's key id: never accepted, whatever the secret.
    claims = jwt.decode(_jwt(key), options={"verify_signature": False})
    assert verifier.verify(jwt.encode(claims, "a guessed secret of thirty-two bytes", algorithm="HS256", headers={"kid": "k1"})) is None


def test_the_app_takes_jwts_from_its_issuer_beside_static_tokens(live, issuer, monkeypatch):
    key, jwks_url, _ = issuer
    monkeypatch.setenv("ER_JWT_ISSUER", "https://issuer.test")
    monkeypatch.setenv("ER_JWT_JWKS_URL", jwks_url)
    monkeypatch.setenv("ER_JWT_SUBJECT_SCOPES", f"system:serviceaccount:airflow:airflow={auth.ROLLOUT_OPERATE}")
    server = AppServer(create_app(Settings())).start()
    try:
        airflow = {"Authorization": f"Bearer {_jwt(key)}"}
        assert requests.get(f"{server.url}/deployment", headers=airflow, timeout=30).status_code == 200
        refused = requests.put(f"{server.url}/documents/jwt-1", json=DOC, headers=airflow, timeout=30)
        assert refused.status_code == 403  # Airflow's identity holds rollout:operate only
        assert requests.get(f"{server.url}/deployment", headers=ALL_SCOPES, timeout=30).status_code == 200
        expired = {"Authorization": f"Bearer {_jwt(key, exp=int(time.time()) - 60)}"}
        assert requests.get(f"{server.url}/deployment", headers=expired, timeout=30).status_code == 401
    finally:
        server.stop()


def test_tokens_cli_creates_shows_and_replaces(tmp_path):
    env = {**os.environ, "ER_TOKENS": str(tmp_path / "tokens.json")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "embedding_rollout.cli", "tokens", *args], env=env,
                              capture_output=True, text=True, timeout=120)
    assert "created" in cli("init").stdout
    shown = cli("show", "operator").stdout.strip()
    assert shown == auth.token_for(tmp_path / "tokens.json", "operator")
    made = cli("create", "frontend", "--scope", "search", "--scope", "feedback:write").stdout.strip()
    assert auth.FileTokens(tmp_path / "tokens.json").verify(made).scopes == {auth.SEARCH, auth.FEEDBACK_WRITE}
    missing = cli("show", "nobody")
    assert missing.returncode != 0 and "no caller 'nobody'" in missing.stderr
    assert TOKENS.exists()  # the suite's own file untouched by these


def test_the_log_scan_finds_a_token_and_names_only_its_caller():
    # Outside the run's directory, which scripts/test.sh scans: this leak is made on purpose.
    with tempfile.TemporaryDirectory(prefix="er-log-scan-") as folder:
        _check_the_log_scan(Path(folder))


def _check_the_log_scan(tmp_path: Path):
    tokens = tmp_path / "tokens.json"
    auth.ensure_tokens_file(tokens)
    logs = tmp_path / "run" / "airflow" / "logs"
    logs.mkdir(parents=True)
    (logs / "task.log").write_text("calling the app\n")
    scan = [sys.executable, str(Path(__file__).parent.parent / "scripts" / "no_tokens_in_logs.py"), str(tokens),
            str(tmp_path / "run")]
    clean = subprocess.run(scan, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0 and "1 log files" in clean.stdout and "0 found" in clean.stdout
    (logs / "task.log").write_text(f"Authorization: Bearer {auth.token_for(tokens, 'writer')}\n")
    leaked = subprocess.run(scan, capture_output=True, text=True, timeout=60)
    assert leaked.returncode == 1 and "tokens.json:writer" in leaked.stderr
    assert auth.token_for(tokens, "writer") not in leaked.stdout + leaked.stderr


@pytest.mark.elasticsearch
def test_a_local_step_reaches_elasticsearch_through_its_airflow_connection(model_repo, monkeypatch):
    """ER_ES_URL leads nowhere; the Connection elasticsearch_default names the real server."""
    from urllib.parse import urlsplit

    from embedding_rollout_airflow.operators.steps import LocalStepOperator
    store = elasticsearch_store()
    server = urlsplit(ES_URL)
    prefix = f"conn-{uuid.uuid4().hex[:8]}"
    for name, value in {"ER_STORE": "elasticsearch", "ER_ES_URL": "http://127.0.0.1:9", "ER_INDEX_PREFIX": prefix,
                        "ER_MODEL_BASE": str(model_repo.parent),
                        "AIRFLOW_CONN_ELASTICSEARCH_DEFAULT": json.dumps({
                            "conn_type": "elasticsearch", "host": server.hostname, "port": server.port,
                            "schema": server.scheme})}.items():
        monkeypatch.setenv(name, value)
    try:
        LocalStepOperator(task_id="create_index", arguments=["index", "create", "--version", "v1"]).execute({})
        assert f"{prefix}-v1" in store.indices()
    finally:
        store.drop_index(f"{prefix}-v1")


def test_an_issuer_whose_keys_cannot_be_fetched_gets_a_503_not_a_refusal(live, monkeypatch):
    """Not the caller's fault: 503 with Retry-After, and static tokens keep working."""
    monkeypatch.setenv("ER_JWT_ISSUER", "https://issuer.test")
    monkeypatch.setenv("ER_JWT_JWKS_URL", f"http://127.0.0.1:{free_port()}/keys")  # nothing listens
    server = AppServer(create_app(Settings())).start()
    try:
        from cryptography.hazmat.primitives.asymmetric import rsa
        token = _jwt(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        reply = requests.get(f"{server.url}/deployment", headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert reply.status_code == 503 and reply.headers["Retry-After"], reply.text
        assert requests.get(f"{server.url}/deployment", headers=OPERATE, timeout=30).status_code == 200
    finally:
        server.stop()
