#!/bin/sh
# First start of a stack (docker-compose.yaml, or the Job in k8s/bootstrap): model v1 trained into
# the model repository when missing, then deployed, the corpus indexed, and writes and all traffic
# sent to v1, as `embedding-rollout up` does on one machine. Installed in the project image as
# `embedding-rollout-bootstrap`.
#
#   embedding-rollout-bootstrap model    train v1 unless the model repository has it
#   embedding-rollout-bootstrap deploy   create the tokens; deploy v1, index the corpus, dual-write, weights v1=100
#   embedding-rollout-bootstrap all      both, waiting for the generator to serve v1 in between
#
# Idempotent, and harmless once a rollout has happened: `deploy` does nothing when the deployment
# state already has live versions (re-running it must never send traffic back to v1).
set -eu

VERSION=v1
NUMBER=1
DIMS=64
UNTIL=2019-01-01   # v1 knows the corpus up to 2018; a retrained version sees newer data
HOME_DIR="${ER_HOME:-.rollout}"
STATE="${ER_STATE:-$HOME_DIR/state.json}"
MODEL="${ER_MODEL_BASE:-$HOME_DIR/models}/${ER_MODEL_NAME:-embedder}/$NUMBER/saved_model.pb"
WAIT_SECONDS="${BOOTSTRAP_WAIT_SECONDS:-900}"

say() { echo "bootstrap: $*"; }

model() {
  if [ -f "$MODEL" ]; then
    say "model $VERSION already in the repository ($MODEL)"
  else
    say "training $VERSION (dims $DIMS, documents before $UNTIL)"
    embedding-rollout train --version "$VERSION" --dims "$DIMS" --until "$UNTIL"
  fi
}

live() {  # exit 0 when the deployment state has a traffic split
  [ -s "$STATE" ] && python3 -c '
import json, sys
sys.exit(0 if json.load(open(sys.argv[1])).get("weights") else 1)' "$STATE"
}

wait_generator() {
  deadline=$(( $(date +%s) + WAIT_SECONDS ))
  until embedding-rollout --log-level WARNING generator status --version "$VERSION" 2>/dev/null | grep -q "\"$VERSION\": \"AVAILABLE\""; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "the generator did not report $VERSION AVAILABLE within ${WAIT_SECONDS}s" >&2
      exit 1
    fi
    sleep 5
  done
}

deploy() {
  # The app's bearer tokens ($ER_TOKENS, default $ER_HOME/tokens.json, 0600), unless they exist:
  # `docker compose exec app embedding-rollout tokens show writer` prints one.
  embedding-rollout tokens init
  if live; then
    say "$STATE already has live versions: nothing to do"
    return 0
  fi
  embedding-rollout deploy --version "$VERSION" --run-id bootstrap
  embedding-rollout index load --version "$VERSION" --source corpus
  embedding-rollout dual-write --version "$VERSION"
  embedding-rollout state set-weights "$VERSION=100"
  say "$VERSION live with all traffic"
}

case "${1:-all}" in
  model) model ;;
  deploy) deploy ;;
  all) if live; then deploy; else model; wait_generator; deploy; fi ;;
  *) echo "usage: $0 [model|deploy|all]" >&2; exit 2 ;;
esac
