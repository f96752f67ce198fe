"""DAG run configuration: Params (the trigger form, validated at trigger time) and the semantic
checks no JSON schema can make (the current version exists, the model artifact is there), run as
the first task so that an invalid conf is refused before anything changes."""
from __future__ import annotations

from airflow.sdk import Param

from embedding_rollout.domain.slices import DOCS_PER_SLICE, MAX_SLICES, default_slices
from embedding_rollout.domain.traffic import InvalidWeights, ramp_plan, validate_plan
from embedding_rollout.store.base import IndexNotFound, StoreUnavailable

from .hooks.deployment import DeploymentStateError, LocalDeploymentHook

VERSION_PATTERN = "^v[1-9][0-9]{0,8}$"


class InvalidConf(ValueError):
    pass


def rollout_params() -> dict[str, Param]:
    """What every deployment DAG asks for."""
    return {
        "new_version": Param(type="string", pattern=VERSION_PATTERN, title="New model version",
                             description="The version to roll out, e.g. v2 (TF Serving version 2)."),
        "model_artifact": Param(None, type=["null", "string"], title="Model artifact",
                                description="A SavedModel folder to deploy as the new version; empty: the "
                                            "model repository's folder of that version."),
        "current_version": Param(None, type=["null", "string"], pattern=VERSION_PATTERN, title="Current version",
                                 description="The version serving now; empty: the deployment's stable version."),
        "max_error_rate": Param(0.05, type="number", minimum=0, maximum=1, title="Maximum error rate",
                                description="Analysis fails when the new version's error rate exceeds this."),
        "max_p99_ratio": Param(2.0, type="number", minimum=1, title="Maximum p99 ratio",
                               description="Analysis fails when the new version's p99 latency exceeds this "
                                           "multiple of the stable version's."),
        "min_requests": Param(20, type="integer", minimum=1, title="Minimum requests",
                              description="Fewer requests than this on either version in an analysis window: "
                                          "inconclusive, nothing judged."),
        "min_requests_p99": Param(100, type="integer", minimum=1, title="Minimum requests for p99",
                                  description="The versions' p99 latencies are compared only once both served "
                                              "this many requests in the window."),
        "backfill_slices": Param(None, type=["null", "integer"], minimum=1, maximum=MAX_SLICES,
                                 title="Backfill slices",
                                 description="How many tasks (pods in a cluster) backfill the new index in parallel, "
                                             f"each an id range of the current index; empty: one per "
                                             f"{DOCS_PER_SLICE:,} documents."),
        "rollback_window_seconds": Param(0, type="integer", minimum=0, maximum=7 * 86400, title="Rollback window",
                                         description="Keep the old version this long after promotion."),
    }


def ramped_params() -> dict[str, Param]:
    return {
        **rollout_params(),
        "step_percent": Param(25, type="integer", minimum=1, maximum=100, title="Step (%)",
                              description="Weight added to the new version at each step."),
        "step_interval_seconds": Param(30, type="integer", minimum=0, maximum=86400, title="Step interval (s)"),
        "weights": Param(None, type=["null", "array"], items={"type": "integer", "minimum": 0, "maximum": 100},
                         title="Explicit weights",
                         description="Instead of steps: the new version's weight at each step, ending at 100, "
                                     "e.g. [5, 25, 50, 100]. Leave empty to ramp by the step."),
        "inconclusive_limit": Param(2, type="integer", minimum=0, maximum=20, title="Inconclusive limit",
                                    description="How many more intervals of data an inconclusive step gathers "
                                                "before the inconclusive action."),
        "on_inconclusive": Param("rollback", type="string", enum=["rollback", "ask"], title="When inconclusive",
                                 description="rollback, or ask a person in the Airflow UI whether to continue."),
    }


def ab_params() -> dict[str, Param]:
    return {
        **rollout_params(),
        "initial_weight": Param(10, type="integer", minimum=1, maximum=99, title="Initial split (%)",
                                description="The new version's share while the experiment runs."),
        "decision_source": Param("messages", type="string", enum=["messages", "ui", "auto"], title="Decisions from",
                                 description="messages: POST /rollout/decisions on the app; ui: a person in the "
                                             "Airflow UI; auto: online metrics and click-through, significance-tested."),
        "decision_timeout_seconds": Param(3600, type="integer", minimum=1, maximum=30 * 86400,
                                          title="Decision timeout (s)",
                                          description="No decision by then: rollback."),
        "min_feedback": Param(50, type="integer", minimum=1, title="Minimum feedback per version (auto)"),
    }


def resolve_conf(params: dict, deployment=None) -> dict:
    """Check the conf against the deployment (a deployment hook: the state file, or the app's API);
    return it with the current version and plan resolved."""
    deployment = deployment or LocalDeploymentHook()
    state = deployment.state()
    new = params["new_version"]
    current = params.get("current_version") or state.stable
    if current is None:
        raise InvalidConf("there is no current version: deploy a first version before rolling out another")
    if current not in state.weights:
        raise InvalidConf(f"current version {current} is not live (live: {sorted(state.weights)})")
    if new == current:
        raise InvalidConf(f"new version {new} is the current version")
    if state.weights.get(new, 0) == 100:
        raise InvalidConf(f"{new} already serves all traffic")
    try:
        model = deployment.model(new, params.get("model_artifact"))
    except DeploymentStateError as exc:
        raise InvalidConf(str(exc)) from exc
    if model.get("refused"):
        raise InvalidConf(f"model {new} was refused: {model['refused'].get('reason')}")
    folder = model["path"]
    resolved = {**params, "current_version": current, "model_artifact": folder}
    if "step_percent" in params:
        try:
            resolved["plan"] = validate_plan(params["weights"]) if params.get("weights") else ramp_plan(
                params["step_percent"])
        except InvalidWeights as exc:
            raise InvalidConf(str(exc)) from exc
    resolved["backfill_slices"] = params.get("backfill_slices") or default_slices(_documents(deployment, current))
    resolved["thresholds"] = {k: params.get(k) for k in ("max_error_rate", "max_p99_ratio", "min_requests",
                                                         "min_requests_p99")}
    return resolved


def _documents(deployment, version: str) -> int:
    try:
        return deployment.documents(version)
    except (DeploymentStateError, IndexNotFound, StoreUnavailable) as exc:
        raise InvalidConf(f"cannot count the documents of {version}'s index, which the default "
                          f"backfill_slices needs (or set backfill_slices): {exc}") from exc
