"""AppHook: where the app is and the token the rollout tasks call it with, from the Airflow
Connection ``embedding_rollout_app`` (an HTTP connection), where Airflow users keep credentials.

The connection's host (with its scheme, or ``schema`` as the scheme) and port give the URL; its
password is the bearer token, or ``extra.token_file`` names a file that holds it (a projected
ServiceAccount token, which the kubelet rotates: read at each call). Without the connection the
local stack's defaults apply: ``ER_APP_URL``, then ``ER_APP_TOKEN`` or the token file's
``operator``. Tokens are Connection passwords so that Airflow masks them in task logs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

DEFAULT_URL = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class AppEndpoint:
    url: str
    token: str | None = None
    token_file: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        token = Path(self.token_file).read_text().strip() if self.token_file else self.token
        return {"Authorization": f"Bearer {token}"} if token else {}


def _from_connection(conn) -> AppEndpoint:
    host = (conn.host or "127.0.0.1").rstrip("/")
    if "://" not in host:
        host = f"{conn.schema or 'http'}://{host}"
    url = f"{host}:{conn.port}" if conn.port else host
    token_file = (conn.extra_dejson or {}).get("token_file")
    return AppEndpoint(url, conn.password or None, token_file)


def default_endpoint() -> AppEndpoint:
    from embedding_rollout.auth import InvalidTokenFile, token_for
    from embedding_rollout.config import Settings
    token = os.environ.get("ER_APP_TOKEN")
    if not token:
        try:
            token = token_for(Settings().tokens_path, "operator")
        except InvalidTokenFile:
            token = None
    return AppEndpoint(os.environ.get("ER_APP_URL", DEFAULT_URL).rstrip("/"), token)


class AppHook(BaseHook):
    conn_name_attr = "app_conn_id"
    default_conn_name = "embedding_rollout_app"
    conn_type = "http"
    hook_name = "embedding-rollout app"

    def __init__(self, app_conn_id: str = default_conn_name):
        super().__init__()
        self.app_conn_id = app_conn_id

    def endpoint(self) -> AppEndpoint:
        try:
            return _from_connection(self.get_connection(self.app_conn_id))
        except AirflowNotFoundException:
            return default_endpoint()

    async def aendpoint(self) -> AppEndpoint:
        """The same, from a trigger: the async lookup does not block the triggerer's loop."""
        try:
            return _from_connection(await self.aget_connection(self.app_conn_id))
        except AirflowNotFoundException:
            return default_endpoint()
