#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the project and its test tools, the
# Elasticsearch test server fetched (started later by scripts/test.sh or scripts/elasticsearch.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip wheel
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
if [ -f scripts/install-tools.sh ]; then bash scripts/install-tools.sh; fi
echo "setup done: activate with '. .venv/bin/activate'"
