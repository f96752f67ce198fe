#!/usr/bin/env bash
# Run the whole test suite against the real parts: starts the Elasticsearch test server when none
# answers at ER_TEST_ES_URL (and stops it again afterwards), then runs pytest with any arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
export ES_PORT=${ES_PORT:-9200}
export ER_TEST_ES_URL=${ER_TEST_ES_URL:-http://127.0.0.1:${ES_PORT}}
started_es=""
if ! curl -fsS "${ER_TEST_ES_URL}/_cluster/health" >/dev/null 2>&1; then
  bash scripts/elasticsearch.sh start
  started_es=1
fi
cleanup() { if [ -n "$started_es" ]; then bash scripts/elasticsearch.sh stop || true; fi; }
trap cleanup EXIT
.venv/bin/python -m pytest "$@"
