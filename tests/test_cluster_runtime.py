"""The kubernetes runtime's tasks in Airflow's namespace: they cannot mount the state volume, so they
read and change the deployment through the app's operator API, and the traffic split changes in
Istio and in the app make-before-break."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import requests

from conftest import OPERATE
from embedding_rollout import steps
from embedding_rollout_airflow.hooks.deployment import AppDeploymentHook, DeploymentStateError
from embedding_rollout_airflow.hooks.routing import IstioVirtualServiceHook, MeshRouterHook, weights_of
from rollout_harness import LocalDeployment
from test_istio_weights import NAME, NAMESPACE
from test_istio_weights import api as istio  # noqa: F401 (a fixture: the gateway VirtualService, v1 at 100)


@pytest.fixture
def dual_writing(tmp_path, model_repo, monkeypatch):
    deployment = LocalDeployment(tmp_path / "home", model_repo, monkeypatch)
    steps.deploy_version(deployment.settings, "v2", run_id="run-1")
    steps.start_dual_write(deployment.settings, "v2")
    yield deployment
    deployment.stop()


@pytest.fixture
def deployment(dual_writing):
    """v2 backfilled and verified: it may take traffic."""
    steps.backfill(dual_writing.settings, "v2", "v1")
    assert steps.verify(dual_writing.settings, "v2", "v1").complete
    return dual_writing


def served_version(app_url: str, header: str) -> str:
    reply = requests.post(f"{app_url}/search", json={"query": "asyncio", "k": 1}, headers={"x-model-version": header})
    assert reply.status_code == 200, reply.text
    return reply.json()["model_version"]


def test_weights_change_in_the_app_before_istio_routes_to_a_version_and_after_it_stops(deployment, istio):  # noqa: F811
    app = AppDeploymentHook(deployment.app.url)
    mesh = IstioVirtualServiceHook(NAME, NAMESPACE, api_client=istio.cluster.admin)
    seen = []  # (Istio's weights, the app's live versions) around each Istio change
    real_set = mesh.set_weights

    def watched_set(weights, precondition=None):
        seen.append((weights_of(istio.get(NAMESPACE, NAME)), set(app.state().live_versions)))
        confirmed = real_set(weights, precondition)
        seen.append((weights_of(istio.get(NAMESPACE, NAME)), set(app.state().live_versions)))
        return confirmed

    mesh.set_weights = watched_set
    router = MeshRouterHook(mesh, app)
    # Before: Istio would send v2's header, but the app does not serve v2 yet.
    assert served_version(deployment.app.url, "v2") == "v1"

    assert router.set_weights({"v1": 90, "v2": 10}) == {"v1": 90, "v2": 10}
    assert app.state().weights == {"v1": 90, "v2": 10} == deployment.state.read().weights
    assert served_version(deployment.app.url, "v2") == "v2"

    assert router.set_weights({"v2": 100}) == {"v2": 100}
    assert app.state().weights == {"v2": 100} and weights_of(istio.get(NAMESPACE, NAME)) == {"v2": 100}
    for routed, live in seen:  # every version Istio routed to was live in the app at that moment
        assert set(routed) <= live, (routed, live)
    assert served_version(deployment.app.url, "v1") == "v2"  # v1 is no longer live: assigned by weight


def test_after_an_abort_a_rollout_task_changes_neither_the_app_nor_istio(deployment, istio):  # noqa: F811
    """The rollback owns the traffic once the rollout is aborted: a ramp step still running is
    refused by the app (409), and a step whose app check passed is stopped right before its Istio
    patch, when the state is checked again."""
    from embedding_rollout_airflow.hooks.routing import WeightsRefused
    app = AppDeploymentHook(deployment.app.url)
    mesh = IstioVirtualServiceHook(NAME, NAMESPACE, api_client=istio.cluster.admin)
    router = MeshRouterHook(mesh, app)
    app.change_rollout("begin", "run-1", rollout={"new": "v2", "current": "v1", "plan": [50, 100]})
    app.change_rollout("start_step", "run-1", step=0)
    assert router.set_weights({"v1": 50, "v2": 50}, run_id="run-1", step=0) == {"v1": 50, "v2": 50}
    app.change_rollout("abort", "run-1", reason="analysis failed")
    with pytest.raises(WeightsRefused, match="409.*Aborted - analysis failed"):
        router.set_weights({"v1": 0, "v2": 100}, run_id="run-1", step=0)
    assert weights_of(istio.get(NAMESPACE, NAME)) == {"v1": 50, "v2": 50} == app.state().weights

    def abort_meanwhile(weights, run_id=None, step=None):  # the rollback begins between the two checks
        confirmed = AppDeploymentHook.set_weights(app, weights, run_id, step)
        deployment.state.update(lambda s: dataclasses.replace(s, rollout=dataclasses.replace(
            s.rollout, phase="Aborted")) if s.rollout.phase == "Progressing" else s)
        return confirmed

    def progressing_again(s):  # as if the abort had not happened yet
        live = {**s.versions, "v2": dataclasses.replace(s.versions["v2"], phase="live")}
        return dataclasses.replace(s, versions=live, rollout=dataclasses.replace(s.rollout, phase="Progressing"))

    deployment.state.update(progressing_again)
    app.set_weights = abort_meanwhile
    with pytest.raises(WeightsRefused, match="Aborted"):
        router.set_weights({"v1": 25, "v2": 75}, run_id="run-1", step=0)
    assert weights_of(istio.get(NAMESPACE, NAME)) == {"v1": 50, "v2": 50}  # Istio never got the late change
    assert router.set_weights({"v1": 100}) == {"v1": 100}  # the rollback's own change goes through


def test_the_operator_api_refuses_bad_weights_and_changes_nothing(deployment):
    url, before = deployment.app.url, deployment.state.read()
    for weights, status in [({"v1": 90, "v2": 20}, 400), ({"v9": 100}, 409), ({"x1": 100}, 400), ({}, 400)]:
        reply = requests.put(f"{url}/deployment/weights", headers=OPERATE, json={"weights": weights})
        assert reply.status_code == status, (weights, reply.text)
        assert reply.json()["detail"]
    assert deployment.state.read() == before
    with pytest.raises(DeploymentStateError, match="409.*v9"):
        AppDeploymentHook(url).set_weights({"v9": 100})


def test_backfill_sensor_in_the_cluster_reads_the_recorded_verification_from_the_app(dual_writing, monkeypatch,
                                                                                      tmp_path):
    deployment = dual_writing
    from embedding_rollout.store import open_store
    from embedding_rollout_airflow.sensors.backfill import BackfillCompleteSensor
    settings = deployment.settings
    sensor = BackfillCompleteSensor(task_id="wait_backfill_complete", version="v2", source="v1")

    def poke() -> bool:
        """In the worker: no state volume (ER_HOME elsewhere, no state file), and no store either:
        the sensor reads the verification the step recorded, through the app."""
        with monkeypatch.context() as worker:
            worker.setenv("ER_LANCE_URI", str(tmp_path / "no-store-here"))
            worker.setenv("ER_HOME", str(tmp_path / "worker"))
            worker.setenv("ER_AIRFLOW_RUNTIME", "kubernetes")
            return sensor.poke({})

    assert poke() is False  # dual-writing, not backfilled yet

    steps.backfill(settings, "v2", "v1")
    checkpoint = requests.get(f"{deployment.app.url}/deployment/backfills/v2", headers=OPERATE, params={"source": "v1"}).json()
    assert checkpoint["done"] and checkpoint["loaded"] == open_store(settings).count("docs-v1")
    assert poke() is False  # backfilled, but nothing verified it yet
    assert steps.verify(settings, "v2", "v1").complete
    assert poke() is True
    verification = requests.get(f"{deployment.app.url}/deployment", headers=OPERATE).json()["versions"]["v2"]["verification"]
    assert verification["complete"] and verification["checked"] == checkpoint["loaded"]

    store = open_store(settings)
    # An update that reached v1 only (as if dual-write had been bypassed): v2 is behind, and a
    # verification without a repair pass records that and takes v2 back to backfilled.
    document = next(iter(store.scan("docs-v1")))
    store.upsert("docs-v1", dataclasses.replace(document, seq=document.seq + 1,
                                                        vector=np.ones(32, dtype=np.float32) / np.sqrt(32)))
    report = steps.verify(settings, "v2", "v1", passes=1)
    assert (report.complete, report.behind) == (False, 1)
    assert poke() is False
    assert steps.state_file(settings).read().phase("v2") == "backfilled"
    assert steps.verify(settings, "v2", "v1").complete  # the next verification repairs, then passes
    assert poke() is True
    assert requests.get(f"{deployment.app.url}/deployment/backfills/v7", headers=OPERATE, params={"source": "v1"}).status_code == 404


def test_the_conf_is_checked_through_the_app_where_the_worker_sees_no_volume(deployment, tmp_path):
    from embedding_rollout_airflow.conf import InvalidConf, resolve_conf
    app = AppDeploymentHook(deployment.app.url)
    base = {"new_version": "v2", "current_version": None, "model_artifact": None, "step_percent": 50,
            "weights": None, "max_error_rate": 0.05, "max_p99_ratio": 2.0, "min_requests": 20}
    conf = resolve_conf(base, app)
    assert conf["current_version"] == "v1" and conf["plan"] == [50, 100]
    assert conf["model_artifact"] == str(deployment.settings.model_dir / "2")
    models = app.models()
    assert [m["version"] for m in models] == ["v1", "v2"] and [m["dims"] for m in models] == [32, 48]
    assert models[1]["evaluation"]["recall@10"] > 0
    with pytest.raises(InvalidConf, match="404.*model artifact for v3 not found"):
        resolve_conf({**base, "new_version": "v3"}, app)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(InvalidConf, match="400.*not on a shared volume"):
        resolve_conf({**base, "model_artifact": str(outside)}, app)
    reply = requests.get(f"{deployment.app.url}/deployment/models/v2", headers=OPERATE,
                         params={"artifact": str(deployment.settings.model_dir / "2")})
    assert reply.status_code == 200 and reply.json()["dims"] == 48


def test_a_version_at_0_percent_has_no_route_in_istio(deployment, istio):  # noqa: F811
    """The ramp's last step puts the old version at 0 %: the app keeps it live (the rollback window),
    Istio keeps no destination of it, so its removal leaves nothing behind in the routes."""
    app = AppDeploymentHook(deployment.app.url)
    router = MeshRouterHook(IstioVirtualServiceHook(NAME, NAMESPACE, api_client=istio.cluster.admin), app)
    assert router.set_weights({"v1": 90, "v2": 10}) == {"v1": 90, "v2": 10}
    assert router.set_weights({"v1": 0, "v2": 100}) == {"v1": 0, "v2": 100} == app.state().weights
    assert weights_of(istio.get(NAMESPACE, NAME)) == {"v2": 100}
    assert router.set_weights({"v1": 100, "v2": 0}) == {"v1": 100, "v2": 0}  # a rollback routes v1 again
    assert weights_of(istio.get(NAMESPACE, NAME)) == {"v1": 100}


def test_a_destination_left_for_a_removed_version_does_not_block_the_next_rollout(deployment, istio,  # noqa: F811
                                                                                 monkeypatch):
    """Istio still routes 0 % to v1 (as an older release left it), but v1 has been removed: the
    next weight change drops that destination instead of asking the app to keep v1 live (409)."""
    from test_istio_weights import gateway_virtual_service
    app = AppDeploymentHook(deployment.app.url)
    router = MeshRouterHook(IstioVirtualServiceHook(NAME, NAMESPACE, api_client=istio.cluster.admin), app)
    router.set_weights({"v1": 0, "v2": 100})
    deployment.state.update(lambda s: s.with_stable("v2"))
    monkeypatch.setenv("ER_DRAIN_SECONDS", "0")
    steps.remove_version(deployment.settings, "v1")
    assert "v1" not in app.state().versions
    istio.put(gateway_virtual_service({"v1": 0, "v2": 100}))
    assert router.set_weights({"v2": 100}) == {"v2": 100}
    assert weights_of(istio.get(NAMESPACE, NAME)) == {"v2": 100}


def test_a_candidate_that_stops_being_ready_gets_no_more_traffic_from_istio_or_the_app(deployment, istio):  # noqa: F811
    """v2 takes 10 %, then its generator goes away (its pods crash): the app stays ready and reports
    v2 not ready; the next ramp step is refused by the app, which the router asks first, so
    Istio's VirtualService is never patched towards v2; the rollback to v1 goes through."""
    from embedding_rollout_airflow.hooks.routing import WeightsRefused
    app = AppDeploymentHook(deployment.app.url)
    router = MeshRouterHook(IstioVirtualServiceHook(NAME, NAMESPACE, api_client=istio.cluster.admin), app)
    assert router.set_weights({"v1": 90, "v2": 10}) == {"v1": 90, "v2": 10}
    deployment.model_server.manager.serve([1])  # v2 unloaded: its generator no longer answers for it
    ready = requests.get(f"{deployment.app.url}/readyz")
    assert ready.status_code == 200 and ready.json()["versions"]["v2"]["ready"] is False, ready.text
    mark = istio.cluster.audit_mark()
    with pytest.raises(WeightsRefused, match="v2 is not ready"):
        router.set_weights({"v1": 50, "v2": 50})
    assert weights_of(istio.get(NAMESPACE, NAME)) == {"v1": 90, "v2": 10} and app.state().weights == {"v1": 90, "v2": 10}
    assert istio.patches_since(mark) == []
    assert router.set_weights({"v1": 100}) == {"v1": 100}
    assert weights_of(istio.get(NAMESPACE, NAME)) == {"v1": 100}
