"""The deployment steps as idempotent functions; the CLI and the Airflow tasks call these.

1. ``deploy_version``: generator serving the version, its index created, the version registered.
2. ``start_dual_write``: the version becomes a write target of every streaming update.
3. ``backfill`` then ``verify``: every historical document re-embedded into the new index, then
   checked both ways and the result recorded with the version.
4. ``set_weights`` / ``promote``: the traffic split; the stable version.
5. ``remove_version``: out of routing and write targets, drained, then generator and index.

Each step moves the version along its lifecycle (``domain.lifecycle``), which refuses a step whose
precondition is missing before the step changes anything.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from .config import Settings
from .domain import lifecycle
from .domain.rollout import ABORTED, PROMOTED, RolloutError
from .domain.state import DeploymentState, VersionSpec
from .domain.traffic import validate_weights
from .domain.versions import parse_version
from .model.repository import read_dims
from .statestore import checkpoint_path, checkpoint_slot, forget_checkpoints, open_state  # noqa: F401 (checkpoint_path: the local runtime's file)
from .store import open_store

# The generator and indexing modules import TensorFlow (through the TF Serving protos): imported
# where needed, so that light steps (dual-write, weights, promote) start in a fraction of a second.

log = logging.getLogger(__name__)


def model_dims(settings: Settings, version: str) -> int:
    """The embedding size recorded with the SavedModel at training time."""
    folder = settings.model_dir / str(parse_version(version))
    try:
        return read_dims(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"no trained model for {version}: {folder} is missing or incomplete") from None


def state_file(settings: Settings):
    """The deployment state: the file under ER_HOME, or the ConfigMap (``ER_STATE_BACKEND``)."""
    return open_state(settings)


def version_spec(settings: Settings, version: str, run_id: str = "") -> VersionSpec:
    return VersionSpec(name=version, dims=model_dims(settings, version), index=settings.index_name(version),
                       model_name=settings.model_name, generator_grpc=settings.generator_grpc,
                       generator_rest=settings.generator_rest, run_id=run_id)


def admin(settings: Settings):
    from .generator.fleet import model_server_admin
    return model_server_admin(settings)


def generators(settings: Settings):
    from .generator.fleet import generator_fleet
    return generator_fleet(settings)


def install_artifact(settings: Settings, version: str, artifact: Path) -> Path:
    """Copy a SavedModel folder into the model repository as ``version`` (atomically; once)."""
    target = settings.model_dir / str(parse_version(version))
    if target.exists() or artifact.resolve() == target.resolve():
        return target
    if not (artifact / "saved_model.pb").exists():
        raise FileNotFoundError(f"{artifact} is not a SavedModel folder (no saved_model.pb)")
    staging = settings.model_dir / f".{target.name}-incoming"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(artifact, staging)
    os.replace(staging, target)
    return target


def deploy_version(settings: Settings, version: str, run_id: str = "", artifact: Path | None = None) -> DeploymentState:
    """Step 1: generator AVAILABLE, index created with an explicit mapping, version registered."""
    if artifact is not None:
        install_artifact(settings, version, artifact)
    spec = version_spec(settings, version, run_id)
    generators(settings).deploy(version)
    created = open_store(settings).create_index(
        spec.index, spec.dims, {"model_version": version, "run_id": run_id, "model_name": spec.model_name,
                                "expected_documents": str(expected_documents(settings))})
    log.info("index %s %s (dims %d)", spec.index, "created" if created else "already exists", spec.dims)
    current = state_file(settings).read().versions.get(version)
    if current is not None and current.dims != spec.dims:
        raise ValueError(f"{version} is deployed with dims {current.dims}; the model has {spec.dims}")
    return state_file(settings).update(lambda s: s if current else s.with_version(spec))


def expected_documents(settings: Settings) -> int:
    """What a new version's index will hold: the stable version's documents, or the corpus's."""
    stable = state_file(settings).read().stable
    if stable:
        return open_store(settings).count(state_file(settings).read().spec(stable).index)
    from .corpus import load_documents
    return sum(1 for _ in load_documents())


def start_dual_write(settings: Settings, version: str) -> DeploymentState:
    """Step 2: every streaming update after this point is also written to ``version``."""
    return state_file(settings).update(lambda s: s.with_write_target(version))


def _source(settings: Settings, source: str, state: DeploymentState | None = None, id_range=None):
    """Documents to index, as a keyset source (``after`` -> documents above it in id order) and
    their count: ``corpus`` (the snapshot), or a version whose index is the source (its
    tombstones included: the new index must block old writes exactly as the source does).
    ``id_range``: only that slice of it."""
    from .domain.slices import IdRange
    from .pipeline.indexing import corpus_source
    start, upto = (id_range or IdRange()).after, (id_range or IdRange()).upto
    if source == "corpus":
        return (lambda after: corpus_source(after if after is not None else start, upto=upto)), None
    store = open_store(settings)
    index = (state or state_file(settings).read()).spec(source).index
    return ((lambda after: store.scan(index, include_deleted=True, after=after if after is not None else start,
                                      upto=upto)),
            (lambda: store.count(index)))


GENERATOR_BATCH = 256  # texts per generator request; a bulk write's batch is embedded in these


def _embedder(settings: Settings, spec: VersionSpec, batch_size: int):
    from .generator.client import GeneratorTarget, generator_client
    target = GeneratorTarget(spec.name, spec.generator_grpc, spec.generator_rest, spec.model_name)
    return generator_client(target, protocol=settings.generator_protocol, timeout=max(settings.generator_timeout, 30.0),
                            batch_size=min(batch_size, GENERATOR_BATCH)).embed


def backfill(settings: Settings, version: str, source: str, checkpoint: Path | None = None,
             batch_size: int | None = None, slice_number: int | None = None):
    """Step 3: embed every source document with ``version``'s generator into its index. What the
    live writes missed meanwhile is left to the verification (``verify``), which compares the
    whole index once and repairs between its passes. ``slice_number``: only that slice of the plan
    (``plan_backfill``), with its own checkpoint; once every slice is done, ``finish_backfill``
    ends the load. ``batch_size``: documents per bulk write (default: the store's ``BULK_BATCH``)."""
    from .pipeline.indexing import load_index
    state = state_file(settings).read()
    spec = state.spec(version)
    lifecycle.backfilled(version, spec.phase)  # refused before any work when the version may not be loaded
    plan = id_range = None
    if slice_number is not None:
        plan = backfill_plan(settings, version, source)
        id_range = plan.range(slice_number)
        checkpoint = checkpoint or checkpoint_slot(settings, version, source, part=slice_part(slice_number, plan))
    checkpoint = checkpoint or checkpoint_slot(settings, version, source)
    documents, count = _source(settings, source, state, id_range)
    label = f"backfill {version} from {source}" + (f", slice {slice_number} of {plan.slices} "
                                                   f"{id_range.describe()}" if plan else "")
    store = open_store(settings)
    batch_size = batch_size or store.BULK_BATCH
    loaded = load_index(documents, store, spec.index, _embedder(settings, spec, batch_size),
                        total=None if plan or not count else count(), batch_size=batch_size,
                        checkpoint_path=checkpoint, label=label, id_range=id_range, end_load=plan is None)
    if plan is None:
        state_file(settings).update(lambda s: s.with_backfill(version))
    return loaded


def finish_backfill(settings: Settings, version: str, source: str) -> dict:
    """Step 3, once every slice of the plan is loaded: end the bulk load (Elasticsearch gets its
    serving settings back; LanceDB folds its fragments, indexes its columns and builds the vector
    index) and record the version as backfilled. A step of its own rather than the last slice's
    epilogue: the slices then hold only their share of the load in memory, and a failed finish is
    retried without reloading a slice. Idempotent."""
    state = state_file(settings).read()
    spec = state.spec(version)
    lifecycle.backfilled(version, spec.phase)
    plan = backfill_plan(settings, version, source)
    missing = _slices_not_done(settings, plan, spec.index)
    if missing:
        raise RuntimeError(f"the backfill of {version} from {source} is not loaded yet: slice(s) "
                           f"{', '.join(map(str, missing))} of {plan.slices} not done (`index load --slice N`)")
    started = time.monotonic()
    open_store(settings).end_bulk_load(spec.index)
    state_file(settings).update(lambda s: s.with_backfill(version))
    return {"version": version, "source": source, "slices": plan.slices, "seconds": round(time.monotonic() - started, 1)}


def slice_part(slice_number: int, plan) -> str:
    return f"slice-{slice_number}-of-{plan.slices}"


def _slices_not_done(settings: Settings, plan, index: str) -> list[int]:
    from .pipeline.indexing import Checkpoint
    return [k for k in range(1, plan.slices + 1)
            if not Checkpoint.load(checkpoint_slot(settings, plan.version, plan.source, part=slice_part(k, plan)),
                                   index, plan.range(k)).done]


def plan_backfill(settings: Settings, version: str, source: str, slices: int | None = None):
    """Split the backfill of ``version`` from ``source`` into ``slices`` id ranges (default: from
    the source's size) and keep the plan with its checkpoints. A plan already there with that
    many slices is kept: slices running or resumed on it must see the same ranges."""
    from .domain.slices import BackfillPlan, check_slices, default_slices, split_points
    slot = checkpoint_slot(settings, version, source, part="plan")
    existing = _read_plan(slot)
    if existing and (slices is None or existing.slices == slices):
        return existing
    state = state_file(settings).read()
    lifecycle.backfilled(version, state.spec(version).phase)  # the plan is for a load the version may take
    ids, documents = _source_ids(settings, source, state)
    slices = default_slices(documents) if slices is None else check_slices(slices)
    plan = BackfillPlan(version, source, slices, tuple(split_points(ids, slices)), documents)
    slot.write(json.dumps(plan.to_json()), final=True)
    log.info("backfill of %s from %s in %d slices, split at %s", version, source, slices, list(plan.points))
    return plan


def backfill_plan(settings: Settings, version: str, source: str):
    plan = _read_plan(checkpoint_slot(settings, version, source, part="plan"))
    if plan is None:
        raise RuntimeError(f"no plan for the backfill of {version} from {source}: run "
                           f"`embedding-rollout index plan --version {version} --source {source}` first")
    return plan


def _read_plan(slot):
    from .domain.slices import BackfillPlan
    text = slot.read()
    return BackfillPlan.from_json(json.loads(text)) if text else None


def _source_ids(settings: Settings, source: str, state: DeploymentState) -> tuple[list[str], int]:
    """A sorted sample of the source's ids (plenty for the quantiles of 16 slices), and its size."""
    if source == "corpus":
        from .corpus import load_documents
        ids = sorted(d.id for d in load_documents())
        return ids, len(ids)
    store, index = open_store(settings), state.spec(source).index
    return store.sample_ids(index, 5_000), store.count(index)


def repair(settings: Settings, version: str, source: str, batch_size: int = 256, ids: list[str] | None = None):
    """Write into ``version``'s index every document (and delete) of ``source``'s that it lacks or
    holds at an older version: the writes it missed as a candidate write target. ``ids``: only
    those (what a verification found), read by id instead of a scan of the whole source."""
    from .pipeline.indexing import batched, repair_index
    state = state_file(settings).read()
    spec, store, source_index = state.spec(version), open_store(settings), state.spec(source).index
    if ids is None:
        documents = store.scan(source_index, include_deleted=True)
    else:
        documents = (doc for chunk in batched(sorted(ids), batch_size)
                     for _, doc in sorted(store.get_many(source_index, chunk).items()))
    return repair_index(documents, store, spec.index, _embedder(settings, spec, batch_size), batch_size)


def verify_backfill(settings: Settings, version: str, source: str, state: DeploymentState | None = None):
    """Every source document and tombstone is in ``version``'s index at its latest version (or
    newer), and, when the source is a version, nothing live in the index is absent from it.

    ``state`` is the deployment state where the caller cannot read the state file (a cluster's
    Airflow worker gets it from the app)."""
    from .pipeline.indexing import verify_index
    state = state or state_file(settings).read()
    documents, _ = _source(settings, source, state)
    target = open_store(settings).scan(state.spec(version).index, include_deleted=True)
    return verify_index(documents(None), target, both_ways=source != "corpus")


def verify(settings: Settings, version: str, source: str, passes: int = 5):
    """Verify ``version``'s index against ``source`` and record the result with the version (a
    passed verification lets it take traffic). Against a version, what a write in flight left
    behind is repaired between passes (by id, what the pass found); against the corpus one pass
    decides."""
    repaired = 0
    for attempt in range(1, (passes if source != "corpus" else 1) + 1):
        report = verify_backfill(settings, version, source)
        if report.complete:
            break
        log.warning("pass %d: %s lacks %d, is behind on %d documents of %s, has %d extra and %d "
                    "duplicated (%s)", attempt, version, report.missing, report.behind, source, report.extra,
                    report.duplicated, report.examples[:5])
        if source != "corpus" and attempt < passes:
            repaired += repair(settings, version, source, ids=report.repair_ids()).repaired
    record = {"source": source, "complete": report.complete, "at": time.time(), "passes": attempt,
              "repaired": repaired, **report.figures, "examples": report.examples[:5]}
    state_file(settings).update(lambda s: s.with_verification(version, record))
    return report


def set_weights(settings: Settings, weights: dict[str, int]) -> DeploymentState:
    """Step 4: the traffic split; the listed versions are the live ones."""
    weights = validate_weights(weights)
    return state_file(settings).update(lambda s: s.with_weights(weights))


def promote(settings: Settings, version: str, passes: int = 5, run_id: str | None = None) -> DeploymentState:
    """Make ``version`` the stable one (after it took all the traffic), once its index holds every
    write the stable version took: verified, repairing what a pass finds (a write in flight may
    need another pass). With ``run_id``, as that run's rollout's ``promote`` transition."""
    state = state_file(settings).read()
    stable = state.stable
    lifecycle.make_stable(version, state.phase(version), state.weights.get(version))  # refused before any work
    if stable and stable != version and {stable, version} <= set(state.write_targets):
        report = verify(settings, version, stable, passes)
        if not report.complete:
            raise RuntimeError(f"{version} does not hold every write of {stable} after {passes} repair passes "
                               f"(e.g. {report.examples[:5]}): not promoted")
    if run_id is None:
        return state_file(settings).update(lambda s: s.with_stable(version))
    return change_rollout(settings, "promote", run_id)


def change_rollout(settings: Settings, transition: str, run_id: str, **arguments) -> DeploymentState:
    """A transition of the rollout that ``run_id`` holds (``DeploymentState.change_rollout``)."""
    now = time.time()
    return state_file(settings).update(lambda s: s.change_rollout(transition, run_id, now, **arguments))


def finish_rollout(settings: Settings, run_id: str) -> DeploymentState:
    """The end of a concluded rollout: remove the version it leaves behind (the old one after a
    promotion, the new one after an abort, whose traffic the rollback already took away), then
    release the deployment. Idempotent: a finished rollout, or another run's, is left alone."""
    state = state_file(settings).read()
    rollout = state.rollout
    if rollout is None or rollout.run_id != run_id or not rollout.active:
        log.info("nothing to finish for run %s: %s", run_id, rollout.describe() if rollout else "no rollout")
        return state
    if rollout.phase not in (PROMOTED, ABORTED):
        raise RolloutError(f"{rollout.describe()}: promote or abort it before finishing")
    leftover = rollout.current if rollout.phase == PROMOTED else rollout.new
    remove_version(settings, leftover)
    finished = change_rollout(settings, "finish", run_id)
    log.info("%s", finished.rollout.describe())
    return finished


def purge_tombstones(settings: Settings, version: str) -> int:
    """Delete ``version``'s tombstones, only while it is the one version deployed."""
    state = state_file(settings).read()
    state.check_purge(version)
    return open_store(settings).purge_tombstones(state.spec(version).index)


def remove_version(settings: Settings, version: str, drain_seconds: float | None = None) -> DeploymentState:
    """Step 5: the version leaves routing and the write targets (retired); requests already on
    their way finish within the drain period; then the generator and the index go, and the state
    forgets the version. Idempotent: a run killed half-way is finished by the next one."""
    state = state_file(settings).read()
    spec = state.versions.get(version)
    if spec is not None:
        state_file(settings).update(lambda s: s.retiring(version) if version in s.versions else s)
        drain(settings, version, drain_seconds)  # again on a rerun: the first run may have died draining
    generators(settings).remove(version)
    if open_store(settings).drop_index(settings.index_name(version) if spec is None else spec.index):
        log.info("dropped the index of %s", version)
    forget_checkpoints(settings, version)
    return state_file(settings).update(lambda s: s.without_version(version) if version in s.versions else s)


def drain(settings: Settings, version: str, seconds: float | None = None) -> None:
    """Wait out the requests that read the state before ``version`` left it: none of them runs
    longer than a generator call plus a store call, each bounded by its timeout."""
    seconds = settings.drain_seconds if seconds is None else seconds
    if seconds > 0:
        log.info("draining %s for %.1f s: requests in flight finish before its index and generator go",
                 version, seconds)
        time.sleep(seconds)


def bootstrap(settings: Settings, version: str, run_id: str = "bootstrap") -> DeploymentState:
    """A first version from the corpus: deployed, written to, loaded, verified, then all the
    traffic and stable (each step through its lifecycle transition; idempotent)."""
    deploy_version(settings, version, run_id=run_id)
    start_dual_write(settings, version)
    if state_file(settings).read().phase(version) not in (lifecycle.VERIFIED, *lifecycle.ROUTABLE):
        backfill(settings, version, "corpus")
        report = verify(settings, version, "corpus")
        if not report.complete:
            raise RuntimeError(f"{version}'s index does not hold the corpus: {report.examples[:5]}")
    set_weights(settings, {version: 100})
    return state_file(settings).update(lambda s: s.with_stable(version))
