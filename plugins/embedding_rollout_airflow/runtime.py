"""One setting chooses where the step commands run: ``ER_AIRFLOW_RUNTIME=local|kubernetes``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

LOCAL, KUBERNETES = "local", "kubernetes"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Runtime:
    kind: str = field(default_factory=lambda: _env("ER_AIRFLOW_RUNTIME", LOCAL))
    image: str = field(default_factory=lambda: _env("ER_IMAGE", "embedding-rollout:0.1.0"))
    namespace: str = field(default_factory=lambda: _env("ER_K8S_NAMESPACE", "embeddings"))
    service_account: str = field(default_factory=lambda: _env("ER_STEP_SERVICE_ACCOUNT", "rollout-steps"))
    gateway_virtual_service: str = field(default_factory=lambda: _env("ER_GATEWAY_VIRTUAL_SERVICE", "embedding-app"))
    # The analysis's metrics: Prometheus (every app pod) when set, else the app's own /metrics.
    prometheus_url: str = field(default_factory=lambda: _env("ER_PROMETHEUS_URL", ""))
    prometheus_selector: str = field(default_factory=lambda: _env("ER_PROMETHEUS_SELECTOR", ""))
    prometheus_scrape_interval: float = field(
        default_factory=lambda: float(_env("ER_PROMETHEUS_SCRAPE_INTERVAL", "15")))

    def __post_init__(self):
        if self.kind not in (LOCAL, KUBERNETES):
            raise ValueError(f"ER_AIRFLOW_RUNTIME must be '{LOCAL}' or '{KUBERNETES}', got {self.kind!r}")

    def app(self):
        """Where the app is, and the token to call it with (the ``embedding_rollout_app`` Connection)."""
        from .hooks.app import AppHook
        return AppHook().endpoint()

    def metrics_source(self):
        from embedding_rollout.online_metrics import metrics_source
        return metrics_source(self.app().url, self.prometheus_url, self.prometheus_selector,
                              self.prometheus_scrape_interval)

    @property
    def step_env(self) -> dict[str, str]:
        """The ER_* settings the step commands need, passed on to pods and processes alike; not the
        app's token: the steps never call the app."""
        return {k: v for k, v in os.environ.items() if k.startswith("ER_") and k != "ER_APP_TOKEN"}
