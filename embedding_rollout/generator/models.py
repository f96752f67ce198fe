"""Loaded SavedModel versions and their TF Serving lifecycle states.

Mirrors TF Serving's model manager for one model: a version goes START → LOADING → AVAILABLE,
and UNLOADING → END when it leaves the served set. Loading a new set is make-before-break: new
versions become AVAILABLE before the removed ones are unloaded, so requests to a version that
stays never fail during a reload.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ..model.repository import available_versions  # noqa: E402,F401 (re-exported: the server's discovery)
from ..model.trainer import INPUT_KEY, OUTPUT_KEY, SIGNATURE  # noqa: E402

log = logging.getLogger(__name__)

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


class ServableNotFound(LookupError):
    pass


class BadRequest(ValueError):
    pass


class InjectedFault(RuntimeError):
    """A failure injected on purpose (testing a rollout's analysis and rollback)."""


@dataclass
class VersionState:
    version: int
    state: str = START
    error: str = ""
    signature: object = field(default=None, repr=False)


class ModelManager:
    """The versions of one model that this server serves."""

    def __init__(self, name: str, base_path: Path):
        self.name = name
        self.base_path = Path(base_path)
        self._versions: dict[int, VersionState] = {}
        self._lock = threading.RLock()
        self._reload_lock = threading.Lock()
        self._faults: dict[int, float] = {}
        self._delays: dict[int, float] = {}
        self._random = random.Random(0)

    # -- lifecycle -----------------------------------------------------------------------------
    def serve(self, versions: list[int]) -> None:
        """Make exactly ``versions`` served: load the new ones, then unload the rest."""
        with self._reload_lock:
            wanted = set(versions)
            for number in sorted(wanted):
                if self.status(number).state != AVAILABLE:
                    self._load(number)
            for number in sorted(set(self._served()) - wanted):
                self._unload(number)

    def _served(self) -> list[int]:
        with self._lock:
            return [n for n, s in self._versions.items() if s.state == AVAILABLE]

    def _load(self, number: int) -> None:
        entry = VersionState(number, LOADING)
        with self._lock:
            self._versions[number] = entry
        path = self.base_path / str(number)
        try:
            loaded = tf.saved_model.load(str(path))
            signature = loaded.signatures[SIGNATURE]
            signature(**{INPUT_KEY: tf.constant(["warm up"])})  # trace before taking traffic
            entry.signature, entry.state = (loaded, signature), AVAILABLE
            log.info("loaded %s version %d from %s", self.name, number, path)
        except Exception as exc:  # a broken version must not take the server down
            entry.state, entry.error = END, f"failed to load {path}: {exc}"
            log.error("%s", entry.error)

    def _unload(self, number: int) -> None:
        with self._lock:
            entry = self._versions[number]
            entry.state = UNLOADING
            entry.signature = None
            entry.state = END
        log.info("unloaded %s version %d", self.name, number)

    def set_fault_rate(self, number: int, rate: float) -> None:
        """Fail this share of predict calls to ``number`` (0 turns injection off)."""
        if not 0.0 <= rate <= 1.0:
            raise BadRequest(f"fault rate must be between 0 and 1, got {rate}")
        self._faults[number] = rate

    def set_delay(self, number: int, seconds: float) -> None:
        """Hold each predict call to ``number`` this long once resolved (a slow request in flight)."""
        self._delays[number] = max(0.0, seconds)

    # -- queries -------------------------------------------------------------------------------
    def status(self, number: int) -> VersionState:
        with self._lock:
            return self._versions.get(number) or VersionState(number, "UNKNOWN")

    def statuses(self, number: int | None = None) -> list[VersionState]:
        with self._lock:
            if number is not None:
                if number not in self._versions:
                    raise ServableNotFound(f"Could not find version {number} of model {self.name}")
                return [self._versions[number]]
            if not self._versions:
                raise ServableNotFound(f"Could not find any versions of model {self.name}")
            return [self._versions[n] for n in sorted(self._versions)]

    def resolve(self, number: int | None) -> tuple[int, object]:
        """The signature of a served version (the latest when ``number`` is None)."""
        with self._lock:
            served = self._served()
            if number is None:
                if not served:
                    raise ServableNotFound(f"Servable not found for request: Latest({self.name})")
                number = max(served)
            entry = self._versions.get(number)
            if entry is None or entry.state != AVAILABLE:
                raise ServableNotFound(f"Servable not found for request: Specific({self.name}, {number})")
            return number, entry.signature[1]

    def predict(self, texts: list[str], number: int | None = None) -> tuple[int, np.ndarray]:
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise BadRequest("input 'text' must be a list of strings")
        number, signature = self.resolve(number)
        if self._random.random() < self._faults.get(number, 0.0):
            raise InjectedFault(f"injected failure in {self.name} version {number}")
        if self._delays.get(number):
            time.sleep(self._delays[number])
        if not texts:
            return number, np.zeros((0, 0), dtype=np.float32)
        out = signature(**{INPUT_KEY: tf.constant(texts, dtype=tf.string)})
        return number, out[OUTPUT_KEY].numpy()

    def signature_def(self, number: int | None = None) -> dict:
        number, signature = self.resolve(number)
        dims = signature.structured_outputs[OUTPUT_KEY].shape[-1]
        return {
            "inputs": {INPUT_KEY: {"dtype": "DT_STRING", "tensor_shape": {"dim": [{"size": "-1"}]}}},
            "outputs": {OUTPUT_KEY: {"dtype": "DT_FLOAT",
                                     "tensor_shape": {"dim": [{"size": "-1"}, {"size": str(dims)}]}}},
            "method_name": "tensorflow/serving/predict",
        }
