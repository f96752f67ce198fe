#!/usr/bin/env bash
# Run the whole test suite against the real parts: starts the Elasticsearch test server when none
# answers at ER_TEST_ES_URL, PostgreSQL (scripts/postgres.sh: the Airflow stacks' metadata
# databases) and the Kubernetes control plane (scripts/kube-test-cluster.sh) when none answers,
# stops what it started afterwards, and runs pytest with any arguments. The run has
# a directory of its own (the app's token file, pytest's temporary files, the output); afterwards
# every log in it is searched for the run's tokens (scripts/no_tokens_in_logs.py), and it is
# removed when the run passed.
set -euo pipefail
cd "$(dirname "$0")/.."
export ES_PORT=${ES_PORT:-9200}
export ER_TEST_ES_URL=${ER_TEST_ES_URL:-http://127.0.0.1:${ES_PORT}}
started_es=""
if ! curl -fsS "${ER_TEST_ES_URL}/_cluster/health" >/dev/null 2>&1; then
  bash scripts/elasticsearch.sh start
  started_es=1
fi
started_pg=""
if ! bash scripts/postgres.sh status >/dev/null 2>&1; then
  bash scripts/postgres.sh start
  started_pg=1
fi
# The Airflow stacks' metadata databases: one per stack, on this server (tests/airflow_harness.py).
export ER_TEST_AIRFLOW_DB=${ER_TEST_AIRFLOW_DB:-$(bash scripts/postgres.sh url)}
started_kube=""
if ! bash scripts/kube-test-cluster.sh status >/dev/null 2>&1; then
  bash scripts/kube-test-cluster.sh start
  started_kube=1
fi
eval "$(bash scripts/kube-test-cluster.sh env)"
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/embedding-rollout-tests.XXXXXX")
export ER_TOKENS="$run_dir/tokens.json"
cleanup() {
  if [ -n "$started_es" ]; then bash scripts/elasticsearch.sh stop || true; fi
  if [ -n "$started_kube" ]; then bash scripts/kube-test-cluster.sh stop || true; fi
  if [ -n "$started_pg" ]; then bash scripts/postgres.sh stop || true; fi
}
trap cleanup EXIT
# Two workers on two cores: the longest tests (the Airflow end-to-end ones, the rollouts against
# the Kubernetes control plane) mostly wait on a scheduler, so their chains run side by side with
# the rest in between (tests/conftest.py keeps the tests of one shared live system on one worker,
# in order). Three workers overloaded two cores: Airflow's API server timed out. ER_TEST_WORKERS=0: serial.
status=0
.venv/bin/python -m pytest -n "${ER_TEST_WORKERS:-2}" --basetemp "$run_dir/pytest" "$@" 2>&1 \
  | tee "$run_dir/pytest-output.log" || status=$?  # pytest's status (pipefail)
# The component logs of the Elasticsearch, PostgreSQL and Kubernetes servers count as the run's too.
if ! .venv/bin/python scripts/no_tokens_in_logs.py "$ER_TOKENS" "$run_dir" "${ES_WORKDIR:-/tmp/embedding-rollout-es}" \
    "${KUBE_WORKDIR:-/tmp/embedding-rollout-kube}" "${PG_WORKDIR:-/tmp/embedding-rollout-pg}"; then
  status=1
fi
if [ "$status" -eq 0 ]; then rm -rf "$run_dir"; else echo "the run's files are kept in $run_dir" >&2; fi
exit "$status"
