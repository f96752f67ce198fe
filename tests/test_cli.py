"""The `embedding-rollout` command: --help everywhere, and bad input refused with a message."""
from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from embedding_rollout.cli import main
from conftest import serving, verified


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize("path", list(all_commands(main)), ids=" ".join)
def test_every_command_has_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_the_expected_commands_exist():
    names = {" ".join(p) for p in all_commands(main)}
    assert {"train", "serve", "app", "up", "demo", "deploy", "dual-write", "index load", "index verify",
            "index repair", "index plan", "index finish", "state set-weights", "promote", "remove", "generator load", "rollout abort",
            "rollout finish", "refuse"} <= names


@pytest.mark.parametrize("args,message", [
    (["deploy", "--version", "2"], "invalid model version"),
    (["train", "--version", "v0"], "invalid model version"),
    (["train", "--version", "v2", "--dims", "3"], "3 is not in the range"),
])
def test_bad_arguments_are_refused(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output


def test_set_weights_refuses_bad_weights_and_changes_nothing(tmp_path, monkeypatch):
    from embedding_rollout.domain.state import StateFile, VersionSpec
    monkeypatch.setenv("ER_HOME", str(tmp_path))
    state = StateFile(tmp_path / "state.json")
    state.update(lambda s: serving(s, VersionSpec("v1", 8, "docs-v1")))
    before = state.path.read_bytes()
    for weights in (["v1=90", "v2=20"], ["v1=ninety"], ["v1=100", "v7=0"]):
        result = CliRunner().invoke(main, ["state", "set-weights", *weights])
        assert result.exit_code == 1 and "invalid weights" in result.output, result.output
    assert state.path.read_bytes() == before
    ok = CliRunner().invoke(main, ["state", "set-weights", "v1=100"])
    assert ok.exit_code == 0


def test_generator_commands_load_report_and_unload_versions(model_repo, monkeypatch):
    """Against a running model server; ``status --version`` asks as a mesh would route it."""
    import json

    from embedding_rollout.generator.models import ModelManager
    from embedding_rollout.generator.server import ModelServer
    manager = ModelManager("embedder", model_repo)
    manager.serve([1])
    server = ModelServer(manager, rest_port=0, grpc_port=0).start()
    monkeypatch.setenv("ER_GENERATOR_GRPC", f"127.0.0.1:{server.grpc_port}")
    monkeypatch.setenv("ER_MODEL_BASE", str(model_repo.parent))

    def run(*args) -> str:
        result = CliRunner().invoke(main, ["generator", *args])
        assert result.exit_code == 0, result.output
        return result.output

    try:
        assert json.loads(run("status", "--version", "v2")) == {"v2": "NOT_FOUND"}
        assert "v2 AVAILABLE" in run("load", "--version", "v2")
        assert json.loads(run("status", "--version", "v2")) == {"v2": "AVAILABLE"}
        run("unload", "--version", "v1")
        assert json.loads(run("status")) == {"v1": "END", "v2": "AVAILABLE"}  # as TF Serving reports it
    finally:
        server.stop()


def test_state_and_rollout_show_without_a_sub_command(tmp_path, monkeypatch):
    from embedding_rollout.domain.state import StateFile, VersionSpec
    monkeypatch.setenv("ER_HOME", str(tmp_path))
    state = StateFile(tmp_path / "state.json")
    state.update(lambda s: serving(s, VersionSpec("v1", 8, "docs-v1")))
    state.update(lambda s: s.with_version(VersionSpec("v2", 8, "docs-v2")).with_write_target("v2"))
    shown = CliRunner().invoke(main, ["state"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["weights"] == {"v1": 100}, shown.output
    assert "v1: stable (100 %, written to)\nv2: dual-writing (no traffic, written to)" in shown.stderr
    assert "no rollout has begun" in CliRunner().invoke(main, ["rollout"]).output
    state.update(lambda s: s.change_rollout("begin", "run-7", 1.0, rollout={"new": "v2", "current": "v1",
                                                                            "plan": [100], "owner": "ramped"}))
    described = CliRunner().invoke(main, ["rollout"]).output
    assert "rollout of v2 over v1 by ramped run-7 (step 1 of 1): Progressing" in described
    aborted = CliRunner().invoke(main, ["rollout", "abort", "--run-id", "run-7", "--reason", "by hand"])
    assert aborted.exit_code == 0 and "Aborted - by hand" in aborted.output
    refused = CliRunner().invoke(main, ["rollout", "abort", "--run-id", "run-8"])
    assert refused.exit_code == 1 and "run run-8 does not hold the deployment" in refused.output


def test_tombstones_cannot_be_purged_while_another_version_is_deployed(tmp_path, monkeypatch):
    from embedding_rollout.domain.state import StateFile, VersionSpec
    from embedding_rollout.store.base import StoredDocument
    from embedding_rollout.store.lance import LanceStore
    monkeypatch.setenv("ER_HOME", str(tmp_path))
    store = LanceStore(str(tmp_path / "lancedb"))
    for version in ("v1", "v2"):
        store.create_index(f"docs-{version}", 8, {"model_version": version})
        store.delete(f"docs-{version}", "gone", 5)
    state = StateFile(tmp_path / "state.json")
    state.update(lambda s: verified(serving(s, VersionSpec("v1", 8, "docs-v1")), VersionSpec("v2", 8, "docs-v2")))
    refused = CliRunner().invoke(main, ["index", "purge-tombstones", "--version", "v1"])
    assert refused.exit_code == 1 and "while v2 is deployed" in refused.output, refused.output
    assert store.get_many("docs-v1", ["gone"])["gone"].deleted  # the tombstone is still there
    state.update(lambda s: s.without_version("v2"))
    purged = CliRunner().invoke(main, ["index", "purge-tombstones", "--version", "v1"])
    assert purged.exit_code == 0 and purged.output.strip() == "1", purged.output
    assert LanceStore(str(tmp_path / "lancedb")).get_many("docs-v1", ["gone"]) == {}


def test_a_step_out_of_lifecycle_order_is_refused_before_it_changes_anything(tmp_path, monkeypatch):
    from embedding_rollout.domain.state import StateFile, VersionSpec
    monkeypatch.setenv("ER_HOME", str(tmp_path))
    state = StateFile(tmp_path / "state.json")
    state.update(lambda s: serving(s, VersionSpec("v1", 8, "docs-v1")).with_version(VersionSpec("v2", 8, "docs-v2")))
    before = state.path.read_bytes()
    load = CliRunner().invoke(main, ["index", "load", "--version", "v2", "--source", "v1"])
    assert load.exit_code == 1 and ("v2 cannot be backfilled: it is deployed; start the dual-write first"
                                    in load.output), load.output
    weights = CliRunner().invoke(main, ["state", "set-weights", "v1=90", "v2=10"])
    assert weights.exit_code == 1 and "v2 cannot take traffic: it is deployed" in weights.output, weights.output
    promote = CliRunner().invoke(main, ["promote", "--version", "v2"])
    assert promote.exit_code == 1 and "v2 cannot become stable: it is deployed" in promote.output, promote.output
    assert state.path.read_bytes() == before and not (tmp_path / "checkpoints").exists()
