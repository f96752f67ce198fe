"""Where the deployment state lives: a JSON file next to the app (local runtime, Compose) or a
ConfigMap (kubernetes runtime, ``ER_STATE_BACKEND=kubernetes``). Both offer ``read()`` and
``update(change, expected_revision=None)`` with the same meaning. The rollout's records -- backfill
checkpoints and A/B decisions (``records``) -- live beside it: files, or keys of that ConfigMap."""
from __future__ import annotations

from pathlib import Path

from ..config import Settings
from ..domain.state import StateFile
from .records import ConfigMapDecisionLog, ConfigMapSlot, DecisionLog, FileSlot

FILE, KUBERNETES = "file", "kubernetes"


def open_state(settings: Settings, *, watch: bool = False):
    """The deployment state the settings name; ``watch``: kept current by a watch (the app)."""
    if settings.state_backend == KUBERNETES:
        from .configmap import ConfigMapState
        state = ConfigMapState(settings.state_configmap, settings.k8s_namespace)
        return state.watch() if watch else state
    if settings.state_backend == FILE:
        return StateFile(settings.state_path)
    raise ValueError(f"ER_STATE_BACKEND must be '{FILE}' or '{KUBERNETES}', got {settings.state_backend!r}")


def checkpoint_path(settings: Settings, version: str, source: str, part: str | None = None) -> Path:
    return settings.home / "checkpoints" / f"{version}-from-{source}{'.' + part if part else ''}.json"


def checkpoint_slot(settings: Settings, version: str, source: str, state=None,
                    part: str | None = None) -> FileSlot | ConfigMapSlot:
    """Where the backfill of ``version`` from ``source`` keeps its checkpoint; ``part``: one of
    its records when it runs in slices (``plan``, ``slice-2-of-4``). ``state``: an open state (the
    app's watched one) to read it through."""
    if settings.state_backend == KUBERNETES:
        return ConfigMapSlot(state or open_state(settings),
                             f"backfill.{version}.from.{source}{'.' + part if part else ''}.json")
    return FileSlot(checkpoint_path(settings, version, source, part))


def forget_checkpoints(settings: Settings, version: str) -> None:
    """Drop every checkpoint of a backfill into ``version``: a later deployment of the same version
    must backfill again."""
    if settings.state_backend == KUBERNETES:
        open_state(settings).remove_keys(f"backfill.{version}.from.")
        return
    for path in (settings.home / "checkpoints").glob(f"{version}-from-*.json"):
        path.unlink()


def open_decisions(settings: Settings, state=None) -> DecisionLog | ConfigMapDecisionLog:
    """The A/B decisions' log; ``state`` as for ``checkpoint_slot``."""
    if settings.state_backend == KUBERNETES:
        return ConfigMapDecisionLog(state or open_state(settings))
    return DecisionLog(settings.decisions_path)
