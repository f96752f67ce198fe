"""``embedding-rollout``: train, serve, run the app, bring the local stack up, run deployment steps."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .config import Settings  # noqa: E402
from .domain.slices import DOCS_PER_SLICE, MAX_SLICES  # noqa: E402
from .domain.traffic import InvalidWeights  # noqa: E402
from .domain.versions import InvalidVersion, parse_version  # noqa: E402

log = logging.getLogger("embedding_rollout")


def _version(ctx, param, value):
    if value is None:
        return None
    try:
        parse_version(value)
    except InvalidVersion as exc:
        raise click.BadParameter(str(exc)) from exc
    return value


VERSION = click.option("--version", "version", required=True, callback=_version,
                       help="Model version label, e.g. v2 (TF Serving version 2).")


def _print(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


class Commands(click.Group):
    """A step the deployment's lifecycle or rollout refuses ends with its reason, not a traceback."""

    def invoke(self, ctx):
        from .domain.rollout import RolloutError
        from .domain.state import StateError
        try:
            return super().invoke(ctx)
        except (StateError, RolloutError) as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
@click.pass_context
def main(ctx, log_level):
    """Roll out new embedding-model versions with zero downtime.

    Settings come from ER_* environment variables (ER_HOME, ER_STORE=lance|elasticsearch,
    ER_ES_URL, ER_GENERATOR_GRPC, ER_GENERATOR_REST, ...); see the README.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("werkzeug", "elastic_transport.transport", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = Settings()


# -- models ----------------------------------------------------------------------------------
@main.command()
@VERSION
@click.option("--until", default=None, help="Train on documents dated before this day (YYYY-MM-DD); default: all.")
@click.option("--since", default=None, help="Train on documents dated on or after this day (YYYY-MM-DD).")
@click.option("--dims", default=64, show_default=True, type=click.IntRange(8, 1024), help="Embedding size.")
@click.option("--epochs", default=4, show_default=True, type=click.IntRange(1, 100))
@click.pass_obj
def train(settings: Settings, version, until, since, dims, epochs):
    """Train a version, export it as a SavedModel into the model repository, evaluate recall@10."""
    from .model.trainer import TrainConfig
    from .model.training import train_version
    result = train_version(settings.model_dir, parse_version(version), TrainConfig(dims=dims, epochs=epochs),
                           until or None, since or None)
    _print(result)


@main.command()
@VERSION
@click.pass_obj
def evaluate(settings: Settings, version):
    """Recompute a trained version's offline recall@10 on the query set."""
    from .corpus import load_documents, load_queries
    from .model.evaluation import evaluate as run
    from .model.training import saved_model_embedder
    embed = saved_model_embedder(settings.model_dir / str(parse_version(version)))
    _print(run(embed, list(load_documents()), load_queries()))


@main.command()
@click.option("--versions", default=None, help="Comma-separated integer versions to serve (default: the latest).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--rest-port", default=8501, show_default=True, type=int)
@click.option("--grpc-port", default=8500, show_default=True, type=int)
@click.pass_obj
def serve(settings: Settings, versions, host, rest_port, grpc_port):
    """Run the model server (TF Serving's REST and gRPC APIs) over the model repository."""
    from .generator.server import serve_forever
    numbers = [int(v) for v in versions.split(",")] if versions else None
    serve_forever(settings.model_dir, numbers, host, rest_port, grpc_port)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--apis", default=None, help="Which APIs to serve: public, operator or both (default: "
                                          "ER_APP_APIS, else both); probes and /metrics always.")
@click.pass_obj
def app(settings: Settings, host, port, apis):
    """Run the search application (Flask + Connexion under uvicorn)."""
    import dataclasses

    import uvicorn
    from serving_app import create_app
    if apis:
        settings = dataclasses.replace(settings, apis=apis)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int, help="The app's port.")
@click.option("--rest-port", default=8501, show_default=True, type=int)
@click.option("--grpc-port", default=8500, show_default=True, type=int)
@click.pass_obj
def up(settings: Settings, host, port, rest_port, grpc_port):
    """Run the local stack: model server and app, training v1 and indexing the corpus when absent."""
    from .local_stack import LocalStack
    stack = LocalStack(settings, host=host, app_port=port, rest_port=rest_port, grpc_port=grpc_port)
    stack.start()
    click.echo(f"app on {stack.app_url} (Swagger UI: {stack.app_url}/ui/), model server REST "
               f"{stack.rest_url} gRPC {stack.grpc_address}; Ctrl-C stops")
    click.echo(f"tokens {'created in' if stack.tokens_created else 'in'} {settings.tokens_path} (mode 0600); "
               "one for a call: embedding-rollout tokens show writer|operator|feedback|search")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        stack.stop()


@main.command()
@click.option("--step-percent", default=25, show_default=True, type=click.IntRange(1, 100))
@click.option("--interval", default=15, show_default=True, type=click.IntRange(0, 3600),
              help="Seconds between ramp steps.")
@click.option("--port", default=8080, show_default=True, type=int,
              help="The app's port; the model server takes the next two (REST, gRPC).")
@click.option("--airflow-port", default=8088, show_default=True, type=int, help="Airflow's UI and REST API.")
@click.option("--fast", is_flag=True, help="Run the DAG in this process with dag.test() (no scheduler, no UI).")
@click.option("--keep-running", is_flag=True, help="Keep the app and Airflow up afterwards, until Ctrl-C.")
@click.option("--verbose", is_flag=True, help="Show Airflow's task logs (with --fast).")
@click.pass_obj
def demo(settings: Settings, step_percent, interval, port, airflow_port, fast, keep_running, verbose):
    """The main job: a local zero-downtime rollout of the next version through Airflow's scheduler,
    with live traffic; prints the Airflow UI's address and login to watch it."""
    from .demo import run_demo
    sys.exit(0 if run_demo(settings, step_percent, interval, port, airflow_port, verbose, fast, keep_running) else 1)


# -- corpus ----------------------------------------------------------------------------------
@main.group()
def corpus():
    """The corpus the backfills read (ER_CORPUS, default data/corpus.jsonl.gz)."""


@corpus.command("synth")
@click.option("--documents", required=True, type=click.IntRange(1, 2_000_000_000), help="How many documents.")
@click.option("--seed", default=0, show_default=True, type=int, help="The same seed gives the same corpus.")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write (gzipped JSON lines when it ends in .gz); then set ER_CORPUS to it.")
def corpus_synth(documents, seed, output):
    """Write a corpus of DOCUMENTS derived from the real one: the real documents first, then seeded
    variations of them (same categories, nearby dates, the corpus's own sentences)."""
    from .corpus import synthesize, write_corpus
    written = write_corpus(synthesize(documents, seed), output)
    click.echo(f"{written} documents in {output} (seed {seed}); use it with ER_CORPUS={output}")


# -- tokens ----------------------------------------------------------------------------------
@main.group()
def tokens():
    """The app's static bearer tokens (ER_TOKENS, default $ER_HOME/tokens.json, mode 0600)."""


@tokens.command("init")
@click.pass_obj
def tokens_init(settings: Settings):
    """Create the token file with one token per kind of caller, unless it exists."""
    from .auth import ensure_tokens_file
    created = ensure_tokens_file(settings.tokens_path)
    click.echo(f"{'created' if created else 'kept'} {settings.tokens_path}")


@tokens.command("show")
@click.argument("name")
@click.pass_obj
def tokens_show(settings: Settings, name):
    """Print NAME's token (for a curl: -H "Authorization: Bearer $(embedding-rollout tokens show writer)")."""
    from .auth import InvalidTokenFile, token_for
    try:
        click.echo(token_for(settings.tokens_path, name))
    except InvalidTokenFile as exc:
        raise click.ClickException(str(exc)) from exc


@tokens.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(["search", "documents:write", "feedback:write", "rollout:operate"]))
@click.pass_obj
def tokens_create(settings: Settings, name, scopes):
    """Create NAME's token, or replace it (the old one stops working at once); prints the token."""
    from .auth import InvalidTokenFile, add_token
    try:
        click.echo(add_token(settings.tokens_path, name, scopes))
    except InvalidTokenFile as exc:
        raise click.ClickException(str(exc)) from exc


# -- generator -------------------------------------------------------------------------------
@main.group()
def generator():
    """Load, unload and inspect versions on the running model server."""


@generator.command("status")
@click.option("--version", "version", default=None, callback=_version,
              help="Only this version, asked with its x-model-version header (what a mesh routes on).")
@click.pass_obj
def generator_status(settings: Settings, version):
    """Every version's TF Serving state (or one version's)."""
    from .steps import admin
    if version:
        _print({version: admin(settings).status(parse_version(version)) or "NOT_FOUND"})
    else:
        _print({f"v{n}": state for n, state in admin(settings).statuses().items()})


@generator.command("load")
@VERSION
@click.pass_obj
def generator_load(settings: Settings, version):
    """Serve one more version (keeps the others) and wait until it is AVAILABLE."""
    from .steps import admin
    admin(settings).load(parse_version(version))
    click.echo(f"{version} AVAILABLE")


@generator.command("unload")
@VERSION
@click.pass_obj
def generator_unload(settings: Settings, version):
    """Stop serving one version (keeps the others)."""
    from .steps import admin
    admin(settings).unload(parse_version(version))
    click.echo(f"{version} unloaded")


# -- deployment steps ------------------------------------------------------------------------
@main.command()
@VERSION
@click.option("--run-id", default="", help="The run that deploys it (recorded in the index _meta).")
@click.option("--artifact", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A SavedModel folder to install as this version (default: already in the repository).")
@click.pass_obj
def deploy(settings: Settings, version, run_id, artifact):
    """Step 1: serve the version's generator, create its index, register it (idempotent)."""
    from .steps import deploy_version
    _print(deploy_version(settings, version, run_id, artifact).to_json())


@main.command("dual-write")
@VERSION
@click.pass_obj
def dual_write(settings: Settings, version):
    """Step 2: make the version a write target of every streaming update (idempotent)."""
    from .steps import start_dual_write
    _print(start_dual_write(settings, version).to_json())


@main.group()
def index():
    """Index commands: create, plan, load (backfill), finish, verify, repair, count, drop, purge-tombstones."""


@index.command("create")
@VERSION
@click.pass_obj
def index_create(settings: Settings, version):
    """Create the version's index for its model's dimensions (idempotent)."""
    from .steps import model_dims
    from .store import open_store
    created = open_store(settings).create_index(settings.index_name(version), model_dims(settings, version),
                                                {"model_version": version, "model_name": settings.model_name})
    click.echo(f"{settings.index_name(version)} {'created' if created else 'already exists'}")


@index.command("load")
@VERSION
@click.option("--source", default="corpus", show_default=True,
              help="'corpus' (the snapshot) or a deployed version whose index to re-embed, e.g. v1.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint file to resume from (default: $ER_HOME/checkpoints/<version>-from-<source>.json).")
@click.option("--batch-size", default=None, type=click.IntRange(1, 16384),
              help="Documents per bulk write and checkpoint (default: the store's, LanceDB 4096, Elasticsearch 500); "
                   "embedded in generator calls of up to 256 while the one before is written.")
@click.option("--slice", "slice_number", type=click.IntRange(1, MAX_SLICES), default=None,
              help="Load only this slice of the plan (`index plan`), with its own checkpoint; run one per slice, "
                   "in parallel.")
@click.pass_obj
def index_load(settings: Settings, version, source, checkpoint, batch_size, slice_number):
    """Step 3: embed every source document with the version's generator into its index (resumable)."""
    from .steps import backfill
    result = backfill(settings, version, source, checkpoint, batch_size, slice_number)
    _print(vars(result))


@index.command("finish")
@VERSION
@click.option("--source", default="corpus", show_default=True,
              help="The source of the plan whose slices were loaded: 'corpus' or a deployed version, e.g. v1.")
@click.pass_obj
def index_finish(settings: Settings, version, source):
    """Step 3: end a sliced backfill once every slice is loaded (the store's upkeep, e.g. LanceDB's
    vector index) and record the version as backfilled (idempotent)."""
    from .steps import finish_backfill
    try:
        _print(finish_backfill(settings, version, source))
    except RuntimeError as exc:  # no plan, or a slice not loaded yet
        raise click.ClickException(str(exc)) from exc


@index.command("plan")
@VERSION
@click.option("--source", default="corpus", show_default=True,
              help="'corpus' or the deployed version whose index the backfill reads, e.g. v1.")
@click.option("--slices", type=click.IntRange(1, MAX_SLICES), default=None,
              help=f"How many slices (default: one per {DOCS_PER_SLICE:,} source documents).")
@click.pass_obj
def index_plan(settings: Settings, version, source, slices):
    """Split a backfill into id-range slices for `index load --slice N` (kept; idempotent)."""
    from .steps import plan_backfill
    plan = plan_backfill(settings, version, source, slices)
    _print({**plan.to_json(), "ranges": [plan.range(k).describe() for k in range(1, plan.slices + 1)]})


@index.command("repair")
@VERSION
@click.option("--source", required=True, help="The deployed version whose index holds the writes, e.g. v1.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1, 4096))
@click.pass_obj
def index_repair(settings: Settings, version, source, batch_size):
    """Bring the version's index up to date with the source's: the writes it missed as a candidate."""
    from .steps import repair
    _print(vars(repair(settings, version, source, batch_size)))


@index.command("verify")
@VERSION
@click.option("--source", default="corpus", show_default=True)
@click.pass_obj
def index_verify(settings: Settings, version, source):
    """Check the version's index against the source both ways (tombstones too), repairing between
    passes, and record the result with the version: a passed verification lets it take traffic.
    Exit 1 if it is not complete."""
    from .steps import verify
    report = verify(settings, version, source)
    _print({**vars(report), "complete": report.complete})
    sys.exit(0 if report.complete else 1)


@index.command("count")
@VERSION
@click.pass_obj
def index_count(settings: Settings, version):
    """Live documents in the version's index."""
    from .store import open_store
    click.echo(open_store(settings).count(settings.index_name(version)))


@index.command("drop")
@VERSION
@click.pass_obj
def index_drop(settings: Settings, version):
    """Delete the version's index (refused while the version is deployed: use `remove`)."""
    from .steps import state_file
    from .store import open_store
    if version in state_file(settings).read().versions:
        raise click.ClickException(f"{version} is deployed; remove it with `embedding-rollout remove`")
    dropped = open_store(settings).drop_index(settings.index_name(version))
    click.echo(f"{settings.index_name(version)} {'dropped' if dropped else 'did not exist'}")


@index.command("purge-tombstones")
@VERSION
@click.pass_obj
def index_purge(settings: Settings, version):
    """Delete the versioned delete markers (refused while another version is deployed)."""
    from .domain.state import StateError
    from .steps import purge_tombstones
    try:
        click.echo(purge_tombstones(settings, version))
    except StateError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group(invoke_without_command=True)
@click.pass_context
def state(ctx):
    """Show (with no sub-command) or change the deployment state: live versions, weights, write
    targets, and the latest rollout's progress."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(state_show)


@state.command("show")
@click.pass_obj
def state_show(settings: Settings):
    """Each version's phase, then the deployment state as JSON."""
    from .steps import state_file
    current = state_file(settings).read()
    for name, spec in sorted(current.versions.items(), key=lambda item: item[1].number):
        where = [f"{current.weights[name]} %" if name in current.weights else "no traffic",
                 "written to" if name in current.write_targets else "not written to"]
        click.echo(f"{name}: {spec.phase} ({', '.join(where)})", err=True)
    _print(current.to_json())


@state.command("set-weights")
@click.argument("weights", nargs=-1, required=True)
@click.pass_obj
def state_set_weights(settings: Settings, weights):
    """Set the traffic split, e.g. `set-weights v1=90 v2=10` (integers summing to 100)."""
    from .steps import set_weights
    try:
        parsed = {k: int(v) for k, v in (w.split("=", 1) for w in weights)}
        _print(set_weights(settings, parsed).to_json())
    except (ValueError, InvalidWeights) as exc:
        raise click.ClickException(f"invalid weights {' '.join(weights)}: {exc}") from exc


@main.command()
@VERSION
@click.option("--run-id", default=None, help="The rollout run promoting it (its rollout's promote transition).")
@click.pass_obj
def promote(settings: Settings, version, run_id):
    """Make the version the stable one (fallback and default current version), after repairing its
    index from the stable version's and verifying it."""
    from .steps import promote as run
    _print(run(settings, version, run_id=run_id).to_json())


@main.group(invoke_without_command=True)
@click.pass_context
def rollout(ctx):
    """The latest rollout's progress (with no sub-command), and ending one by hand."""
    if ctx.invoked_subcommand is None:
        from .steps import state_file
        current = state_file(ctx.obj).read().rollout
        click.echo(current.describe() if current else "no rollout has begun on this deployment")
        if current:
            _print(current.to_json())


RUN_ID = click.option("--run-id", required=True, help="The Airflow run that holds the rollout.")


@rollout.command("abort")
@RUN_ID
@click.option("--reason", default="aborted by hand", show_default=True)
@click.pass_obj
def rollout_abort(settings: Settings, run_id, reason):
    """Abort a rollout: its tasks stop changing the weights, and its run rolls back (Argo's abort)."""
    from .domain.rollout import RolloutError
    from .steps import change_rollout
    try:
        click.echo(change_rollout(settings, "abort", run_id, reason=reason).rollout.describe())
    except RolloutError as exc:
        raise click.ClickException(str(exc)) from exc


@rollout.command("finish")
@RUN_ID
@click.pass_obj
def rollout_finish(settings: Settings, run_id):
    """Remove the version a concluded rollout leaves behind and release the deployment (idempotent)."""
    from .steps import finish_rollout
    state = finish_rollout(settings, run_id)
    click.echo(state.rollout.describe() if state.rollout else "no rollout")


@main.command()
@VERSION
@click.option("--reason", required=True, help="Why the candidate is refused (recorded with it).")
@click.pass_obj
def refuse(settings: Settings, version, reason):
    """Mark a trained candidate refused: it stays in the repository for inspection, is never deployed,
    and its version number is not reused."""
    import time

    from .model.repository import mark_refused
    _print({version: mark_refused(settings.model_dir, version, reason, time.time())})


@main.command()
@VERSION
@click.pass_obj
def remove(settings: Settings, version):
    """Step 5: remove a version with no traffic: routes, write target, generator, index."""
    from .steps import remove_version
    _print(remove_version(settings, version).to_json())


if __name__ == "__main__":
    main()
