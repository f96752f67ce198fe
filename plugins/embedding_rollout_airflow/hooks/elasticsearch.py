"""The Elasticsearch the step commands use, from the Airflow Connection ``elasticsearch_default``
(apache-airflow-providers-elasticsearch's connection type), where Airflow users keep it. Without
the connection the worker's ``ER_ES_URL`` stands (the local stack's default)."""
from __future__ import annotations

from airflow.sdk.exceptions import AirflowNotFoundException

DEFAULT_CONN_ID = "elasticsearch_default"


def elasticsearch_step_env(conn_id: str = DEFAULT_CONN_ID) -> dict[str, str]:
    """``{"ER_ES_URL": ...}`` from the connection (scheme, host, port), or nothing without it.

    The connection's login is not passed on: a step pod's environment is readable by whoever may
    read the pod, so credentials would belong in a Secret the pod mounts."""
    from airflow.providers.elasticsearch.hooks.elasticsearch import ElasticsearchSQLHook
    try:
        connection = ElasticsearchSQLHook(elasticsearch_conn_id=conn_id).connection
    except AirflowNotFoundException:
        return {}
    if connection.login or connection.password:
        raise ValueError(f"connection {conn_id}: credentials are not supported for the step commands yet; "
                         "use an Elasticsearch reachable without them")
    host = (connection.host or "127.0.0.1").rstrip("/")
    if "://" not in host:
        host = f"{connection.schema or 'http'}://{host}"
    return {"ER_ES_URL": f"{host}:{connection.port or 9200}"}
