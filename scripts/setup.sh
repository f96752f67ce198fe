#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the project and its test tools, the
# Elasticsearch test server fetched (started later by scripts/test.sh or scripts/elasticsearch.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=(-m pip install -q --disable-pip-version-check)
# A fresh checkout's .venv links to a virtualenv built once per dependency list and interpreter
# under ~/.cache, so CI on a clean checkout does not install TensorFlow and Airflow again.
if [ ! -e .venv ]; then
  key=$({ cat pyproject.toml; "$PYTHON" -VV; } | sha256sum | cut -c1-16)
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/embedding-rollout/venv-$key"
  if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" "${PIP[@]}" --upgrade pip wheel
    "$venv/bin/python" "${PIP[@]}" -e '.[dev]'
    touch "$venv/.complete"
  fi
  ln -s "$venv" .venv
fi
.venv/bin/python "${PIP[@]}" -e '.[dev]'  # this checkout's code (the dependencies are there already)
if [ -f scripts/install-tools.sh ]; then bash scripts/install-tools.sh; fi
echo "setup done: activate with '. .venv/bin/activate'"
