"""The app verifies ServiceAccount JWTs against the real kube-apiserver's keys (its OIDC JWKS,
fetched with the app's own ServiceAccount token, as in a pod): Airflow's projected token for
audience embedding-rollout holds rollout:operate only; any other identity or audience holds nothing."""
from __future__ import annotations

import requests

from embedding_rollout.config import Settings
from kube_cluster import CA, URL
from rollout_harness import LocalDeployment, small_corpus
from serving_app import AppServer, create_app
from test_rbac import AIRFLOW, APP, STEPS

AUDIENCE = "embedding-rollout"
DOC = {"title": "t", "text": "from a pod", "category": "c", "date": "2024-01-01"}


def test_the_app_takes_airflows_serviceaccount_token_for_rollout_operate_only(kube, model_repo, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("ER_CORPUS", str(small_corpus(tmp_path / "corpus.jsonl.gz", 50)))
    deployment = LocalDeployment(tmp_path / "home", model_repo, monkeypatch)
    app_token = tmp_path / "app-token"  # what the kubelet projects into the app's pod
    app_token.write_text(kube.service_account_token(*APP))
    for name, value in {"ER_JWT_ISSUER": "https://kubernetes.default.svc", "ER_JWT_JWKS_URL": f"{URL}/openid/v1/jwks",
                        "ER_JWT_AUDIENCE": AUDIENCE, "ER_JWT_CA_FILE": str(CA), "ER_JWT_JWKS_TOKEN_FILE": str(app_token),
                        "ER_JWT_SUBJECT_SCOPES": f"system:serviceaccount:{AIRFLOW[0]}:{AIRFLOW[1]}=rollout:operate"}.items():
        monkeypatch.setenv(name, value)
    server = AppServer(create_app(Settings())).start()
    try:
        def call(method, path, token, **request):
            return requests.request(method, f"{server.url}{path}", headers={"Authorization": f"Bearer {token}"},
                                    timeout=30, **request).status_code
        airflow = kube.service_account_token(*AIRFLOW, audience=AUDIENCE)
        assert call("GET", "/deployment", airflow) == 200
        assert call("PUT", "/deployment/weights", airflow, json={"weights": {"v1": 100}}) == 200
        assert call("PUT", "/documents/pod-1", airflow, json=DOC) == 403  # not a writer
        # The same identity's token for the API server's audience: not for the app.
        assert call("GET", "/deployment", kube.service_account_token(*AIRFLOW)) == 401
        # Another workload's token for the app's audience: valid, but it was granted nothing.
        assert call("GET", "/deployment", kube.service_account_token(*STEPS, audience=AUDIENCE)) == 403
        assert call("GET", "/deployment", airflow[:-4] + "AAAA") == 401  # the signature altered
    finally:
        server.stop()
        deployment.stop()
