"""The model repository as TF Serving lays it out: ``<base>/<model_name>/<n>/saved_model.pb``, each
version with the metadata written at training time (``assets.extra/training.json``,
``evaluation.json``). No TensorFlow needed to read it."""
from __future__ import annotations

import json
from pathlib import Path

from ..domain.versions import parse_version, version_label


REFUSED = "refused.json"


class ModelNotFound(LookupError):
    pass


def available_versions(model_dir: Path) -> list[int]:
    """Integer version folders holding a SavedModel, as TF Serving discovers them."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / "saved_model.pb").exists())


def _extra(version_dir: Path, name: str) -> dict | None:
    path = version_dir / "assets.extra" / name
    return json.loads(path.read_text()) if path.exists() else None


def read_evaluation(version_dir: Path) -> dict | None:
    return _extra(version_dir, "evaluation.json")


def mark_refused(model_dir: Path, version: str, reason: str, at: float) -> dict:
    """Record that a trained candidate was refused (kept for inspection, never deployed, its version
    number never reused)."""
    folder = model_dir / str(parse_version(version))
    if not (folder / "saved_model.pb").exists():
        raise ModelNotFound(f"model artifact for {version} not found: {folder} has no saved_model.pb")
    record = {"reason": reason, "at": at}
    (folder / "assets.extra").mkdir(exist_ok=True)
    (folder / "assets.extra" / REFUSED).write_text(json.dumps(record, indent=2))
    return record


def read_dims(version_dir: Path) -> int:
    """The embedding size recorded with the SavedModel at training time."""
    path = version_dir / "assets.extra" / "training.json"
    if not path.exists():
        raise FileNotFoundError(f"no trained model at {version_dir}: {path.name} is missing")
    return int(json.loads(path.read_text())["config"]["dims"])


def describe(version: str, folder: Path) -> dict | None:
    """A SavedModel folder's summary, or None when it holds no SavedModel."""
    if not (folder / "saved_model.pb").exists():
        return None
    try:
        dims = read_dims(folder)
    except FileNotFoundError:
        dims = None
    return {"version": version, "path": str(folder), "dims": dims, "evaluation": read_evaluation(folder),
            "refused": _extra(folder, REFUSED)}


def catalogue(model_dir: Path) -> list[dict]:
    """Every version in the repository, oldest first."""
    return [describe(version_label(n), model_dir / str(n)) for n in available_versions(model_dir)]


def find(model_dir: Path, version: str, artifact: str | Path | None = None) -> dict:
    """The version's SavedModel: at ``artifact``, else in the repository."""
    folder = Path(artifact) if artifact else model_dir / str(parse_version(version))
    model = describe(version, folder)
    if model is None:
        raise ModelNotFound(f"model artifact for {version} not found: {folder} has no saved_model.pb")
    return model
