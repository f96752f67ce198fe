"""Deployment step commands as tasks: a KubernetesPodOperator pod of the project image, or the
same ``embedding-rollout`` command as a local process. The DAG's graph is the same in both."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from functools import cache, cached_property

from airflow.providers.standard.hooks.subprocess import SubprocessHook
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from ..hooks.elasticsearch import elasticsearch_step_env
from ..runtime import KUBERNETES, Runtime


class LocalStepOperator(BaseOperator):
    """Run ``embedding-rollout <arguments>`` as a local process, its output streamed to the task log
    (the standard provider's ``SubprocessHook``); killing the task (a timeout, the run marked failed)
    stops the process too."""

    template_fields: Sequence[str] = ("arguments",)
    ui_color = "#e8f4fd"

    def __init__(self, *, arguments: list[str], env: dict[str, str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.arguments = arguments
        self.env = env

    @cached_property
    def subprocess_hook(self) -> SubprocessHook:
        return SubprocessHook()

    def execute(self, context):
        command = [sys.executable, "-m", "embedding_rollout.cli", *map(str, self.arguments)]
        env = {**os.environ, **(self.env or {}), **elasticsearch_step_env()}
        result = self.subprocess_hook.run_command(command, env=env, cwd=os.getcwd())
        if result.exit_code != 0:
            raise AirflowException(f"`embedding-rollout {' '.join(map(str, self.arguments))}` exited {result.exit_code}")

    def on_kill(self) -> None:
        self.subprocess_hook.send_sigterm()


# The claim k8s/base/foundation defines for the model repository (the deployment state, the
# checkpoints and the decisions are in a ConfigMap: no volume).
STEP_VOLUMES = {"embedding-models": "/models"}


@cache
def step_pod_operator_class():
    """KubernetesPodOperator for step commands, under DAGs that render templates as native objects.

    There a setting such as ``ER_DRAIN_SECONDS=1`` renders to the number 1, and the API server
    refuses the pod ("cannot unmarshal number into ... EnvVar.value"). The step env is the worker's
    own settings, never a template, so it is not rendered; the rendered arguments become strings."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    class StepPodOperator(KubernetesPodOperator):
        template_fields: Sequence[str] = tuple(f for f in KubernetesPodOperator.template_fields if f != "env_vars")

        def execute(self, context):
            # Elasticsearch from its Airflow Connection, read when the step runs, not at parse time.
            from kubernetes.client import models as k8s
            overrides = elasticsearch_step_env()
            self.env_vars = [v for v in self.env_vars or [] if v.name not in overrides] + \
                [k8s.V1EnvVar(name=k, value=v) for k, v in overrides.items()]
            return super().execute(context)

        # Where the provider itself hooks rendering: a mapped task never calls render_template_fields.
        def _do_render_template_fields(self, parent, template_fields, context, jinja_env, seen_oids) -> None:
            super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)
            if parent is self:
                self.arguments = [str(argument) for argument in self.arguments or []]

    return StepPodOperator


def pod_operator(task_id: str, arguments: list[str], runtime: Runtime, **kwargs):
    return step_pod_operator_class()(arguments=arguments, **pod_settings(task_id, runtime), **kwargs)


def pod_settings(task_id: str, runtime: Runtime) -> dict:
    """Every step pod's settings but its arguments."""
    from kubernetes.client import models as k8s

    return dict(
        task_id=task_id,
        name=f"rollout-{task_id.replace('_', '-')}",
        namespace=runtime.namespace,
        image=runtime.image,
        cmds=["embedding-rollout"],
        env_vars=[k8s.V1EnvVar(name=k, value=v) for k, v in sorted(runtime.step_env.items())],
        service_account_name=runtime.service_account,
        volumes=[k8s.V1Volume(name=claim, persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=claim))
                 for claim in STEP_VOLUMES],
        volume_mounts=[k8s.V1VolumeMount(name=claim, mount_path=path) for claim, path in STEP_VOLUMES.items()],
        labels={"app.kubernetes.io/name": "embedding-rollout", "app.kubernetes.io/component": "rollout-step"},
        container_resources=k8s.V1ResourceRequirements(requests={"cpu": "500m", "memory": "1Gi"},
                                                       limits={"memory": "4Gi"}),
        get_logs=True,
        durable=True,  # a restarted worker picks the running pod up again (no second pod)
        on_finish_action="delete_succeeded_pod",  # failed pods stay for inspection
    )


def step(task_id: str, arguments: list[str], runtime: Runtime | None = None, **kwargs) -> BaseOperator:
    """A step task in the configured runtime."""
    runtime = runtime or Runtime()
    if runtime.kind == KUBERNETES:
        return pod_operator(task_id, arguments, runtime, **kwargs)
    return LocalStepOperator(task_id=task_id, arguments=arguments, **kwargs)


def mapped_step(task_id: str, argument_lists, runtime: Runtime | None = None, **kwargs):
    """One step task per argument list (Airflow's dynamic task mapping over ``argument_lists``, an
    XCom): the backfill's slices, a pod each in clusters, a process each locally."""
    runtime = runtime or Runtime()
    if runtime.kind == KUBERNETES:
        return step_pod_operator_class().partial(**pod_settings(task_id, runtime), **kwargs).expand(
            arguments=argument_lists)
    return LocalStepOperator.partial(task_id=task_id, **kwargs).expand(arguments=argument_lists)
