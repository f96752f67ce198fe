"""Data-safety soak: the race, step-kill and API-fuzz tests with more seeds and examples than CI runs.

    python -m bench.data_soak [--race-seeds 50] [--kill-seeds 5] [--fuzz-examples 200] [--store lance|elasticsearch]

Runs ``tests/test_write_races.py`` (writers through the app while the backfill is SIGKILLed and
resumed; v1 and v2 equal to the writers' ground truth), ``tests/test_step_kills.py`` (every step
SIGKILLed at a seeded point, then run again) and ``tests/test_api_schemathesis.py`` (0 server
errors) through pytest, on both backends unless ``--store`` picks one. Elasticsearch must answer at
``ER_TEST_ES_URL`` (``scripts/elasticsearch.sh start``). Prints each seed's figures and pytest's summary.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_write_races.py", "tests/test_step_kills.py", "tests/test_api_schemathesis.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--race-seeds", type=int, default=50)
    parser.add_argument("--kill-seeds", type=int, default=5)
    parser.add_argument("--fuzz-examples", type=int, default=200)
    parser.add_argument("--store", choices=["lance", "elasticsearch"], default=None)
    args = parser.parse_args()
    env = {**os.environ, "ER_RACE_SEEDS": str(args.race_seeds), "ER_KILL_SEEDS": str(args.kill_seeds),
           "ER_FUZZ_EXAMPLES": str(args.fuzz_examples)}
    command = [sys.executable, "-m", "pytest", *TESTS, "-q", "-s", "-p", "no:logging", "-p", "no:cacheprovider"]
    if args.store:
        command += ["-k", args.store]
    return subprocess.call(command, cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main())
