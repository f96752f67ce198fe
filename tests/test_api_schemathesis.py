"""schemathesis against the running app, on LanceDB and on the real Elasticsearch server, with no
token and with one holding every scope: every operation of the OpenAPI contract, with schema-valid
and schema-invalid input, not one server error, and every status the app answers documented.
(More examples: ``bench/data_soak.py``.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from conftest import ALL_SCOPES, ES_URL, elasticsearch_store
from rollout_harness import LocalDeployment, small_corpus

EXAMPLES = int(os.environ.get("ER_FUZZ_EXAMPLES", "25"))  # per operation and phase
SEED = 20261201


@pytest.fixture(params=["lance", "elasticsearch"])
def running_app(request, tmp_path, model_repo, monkeypatch):
    if request.param == "elasticsearch":
        elasticsearch_store()  # fails in CI, skips elsewhere, when the server is not running
    monkeypatch.setenv("ER_CORPUS", str(small_corpus(tmp_path / "corpus.jsonl.gz", 300)))
    deployment = LocalDeployment(tmp_path / "home", model_repo, monkeypatch, store=request.param, es_url=ES_URL,
                                 index_prefix=f"fuzz-{uuid.uuid4().hex[:8]}")
    yield deployment
    deployment.stop(drop_indices=True)


def schemathesis(url: str, report: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("st")), "run", f"{url}/openapi.json", "--checks",
               "not_a_server_error,status_code_conformance", "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
               "--request-timeout", "30", "--report", "junit", "--report-junit-path", str(report), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=report.parent,  # its cache
                          env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"})


@pytest.mark.parametrize("caller", ["anonymous", "all scopes"])
def test_no_request_the_contract_allows_or_refuses_gets_a_server_error(running_app, tmp_path, caller):
    token = [] if caller == "anonymous" else ["--header", f"Authorization: {ALL_SCOPES['Authorization']}"]
    run = schemathesis(running_app.app.url, tmp_path / "junit.xml", *token)
    summary = run.stdout[run.stdout.find("SUMMARY"):]
    print(summary)
    assert run.returncode == 0, run.stdout[-6000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", run.stdout).groups())
    assert generated == passed >= 300  # every operation got many cases, and none got a 5xx
    tested = re.search(r"Tested: (\d+)", run.stdout)
    served = requests.get(f"{running_app.app.url}/openapi.json", timeout=30).json()  # public and operator APIs
    operations = sum(method in ("get", "put", "post", "delete") for path in served["paths"].values() for method in path)
    assert tested and int(tested.group(1)) == operations
    state = running_app.state.read()  # whatever the fuzzer changed, the state stayed consistent
    assert state.validate() is state and state.weights
