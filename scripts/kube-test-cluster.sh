#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1 for the cluster tests: etcd, kube-apiserver
# (RBAC + audit log) and kube-controller-manager, built from the Go module proxy at pinned
# versions and cached, with Istio's CRDs installed. No kubelet and no container runtime exist
# here: the tests' stand-in kubelet (tests/kube_cluster.py) marks pods Ready through pods/status.
#
# Usage: scripts/kube-test-cluster.sh build|start|stop|status|env|logs
#
#   build    build the three binaries once (cached under $ER_CACHE/kube-<version>)
#   start    build if needed, start all three, wait for /readyz, install the CRDs and the
#            test namespace's basics; prints nothing but progress on stderr
#   stop     stop what `start` started (no-op when not running)
#   status   exit 0 when the API server answers /readyz, else 3
#   env      print the variables the tests read (ER_TEST_KUBE_URL, ..._TOKEN, ..._CA, ..._AUDIT)
#   logs     tail the three logs
#
# Environment (all optional):
#   KUBE_VERSION   Kubernetes version (default v1.35.4); staging modules follow as v0.<minor>.<patch>
#   ETCD_VERSION   etcd version (default v3.6.5, the one Kubernetes 1.35 pins)
#   KUBE_PORT      kube-apiserver secure port (default 6443); etcd uses KUBE_PORT+10 and +11
#   KUBE_WORKDIR   certs, data, logs, pids (default /tmp/embedding-rollout-kube)
#   ER_CACHE       binary cache (default $HOME/.cache/embedding-rollout)
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.5}"
KUBE_PORT="${KUBE_PORT:-6443}"
ETCD_PORT=$((KUBE_PORT + 10))
ETCD_PEER_PORT=$((KUBE_PORT + 11))
KCM_PORT=$((KUBE_PORT + 12))
KUBE_WORKDIR="${KUBE_WORKDIR:-/tmp/embedding-rollout-kube}"
ER_CACHE="${ER_CACHE:-${HOME:-/root}/.cache/embedding-rollout}"
BIN_DIR="${ER_CACHE}/kube-${KUBE_VERSION}-etcd-${ETCD_VERSION}"
# Go's own caches live under ~/.cache too, so a clean checkout reuses downloads and objects.
export GOMODCACHE="${GOMODCACHE:-${ER_CACHE}/go/mod}"
export GOCACHE="${GOCACHE:-${HOME:-/root}/.cache/go-build}"
export GOFLAGS="${GOFLAGS:--buildvcs=false}" CGO_ENABLED=0
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CRDS="${ROOT}/k8s/crds/istio-crds.yaml"
ADMIN_TOKEN_FILE="${KUBE_WORKDIR}/admin.token"
URL="https://127.0.0.1:${KUBE_PORT}"

log() { echo "[kube-test-cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- build --------------------------------------------------------------------------------
# `go install k8s.io/kubernetes/cmd/...@vX` is refused (its go.mod replaces its staging
# modules with local paths), so a small wrapper module pins each staging module instead.
build_kubernetes() {
  local mod="${BIN_DIR}.src/kubernetes" staging_version
  staging_version="v0.${KUBE_VERSION#v1.}"
  mkdir -p "$mod"
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@${KUBE_VERSION}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "module embedding-rollout/kube-build"
    echo "go 1.25.0"
    echo "require k8s.io/kubernetes ${KUBE_VERSION}"
    grep -E '^\s+k8s.io/[a-z0-9-]+ => \./staging/' "$gomod" |
      awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } >"${mod}/go.mod"
  cat >"${mod}/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
EOF
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true
   cd "$mod" && go get "k8s.io/kubernetes@${KUBE_VERSION}" >/dev/null
   cd "$mod" && go mod tidy)
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${KUBE_VERSION}"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
  ldflags+=" -X k8s.io/component-base/version.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2)"
  for cmd in kube-apiserver kube-controller-manager; do
    log "building ${cmd} ${KUBE_VERSION} (minutes when cold)"
    (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "${BIN_DIR}.tmp/${cmd}" "k8s.io/kubernetes/cmd/${cmd}")
  done
}

build_etcd() {
  local mod="${BIN_DIR}.src/etcd"
  mkdir -p "$mod"
  cat >"${mod}/go.mod" <<EOF
module embedding-rollout/etcd-build
go 1.25.0
require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}
EOF
  cat >"${mod}/tools.go" <<'EOF'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
EOF
  (cd "$mod" && go mod tidy)
  log "building etcd ${ETCD_VERSION}"
  (cd "$mod" && go build -trimpath -ldflags "-s -w" -o "${BIN_DIR}.tmp/etcd" go.etcd.io/etcd/server/v3)
}

build() {
  if [ -x "${BIN_DIR}/kube-apiserver" ] && [ -x "${BIN_DIR}/kube-controller-manager" ] && [ -x "${BIN_DIR}/etcd" ]; then
    return 0
  fi
  command -v go >/dev/null || die "Go is needed to build the control plane"
  rm -rf "${BIN_DIR}.tmp"; mkdir -p "${BIN_DIR}.tmp"
  build_etcd
  build_kubernetes
  rm -rf "$BIN_DIR"; mv "${BIN_DIR}.tmp" "$BIN_DIR"
  log "binaries in ${BIN_DIR}"
}

# --- run ----------------------------------------------------------------------------------
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

ready() {
  [ -f "$ADMIN_TOKEN_FILE" ] &&
    curl -fsS --max-time 2 --cacert "${KUBE_WORKDIR}/pki/ca.crt" \
      -H "Authorization: Bearer $(cat "$ADMIN_TOKEN_FILE")" "${URL}/readyz" >/dev/null 2>&1
}

make_pki() {
  local pki="${KUBE_WORKDIR}/pki"
  [ -f "${pki}/serving.crt" ] && return 0
  mkdir -p "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=embedding-rollout-test-ca" \
    -keyout "${pki}/ca.key" -out "${pki}/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "${pki}/serving.key" -out "${pki}/serving.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' >"${pki}/san.ext"
  openssl x509 -req -in "${pki}/serving.csr" -CA "${pki}/ca.crt" -CAkey "${pki}/ca.key" \
    -CAcreateserial -days 3650 -extfile "${pki}/san.ext" -out "${pki}/serving.crt" 2>/dev/null
  openssl genrsa -out "${pki}/sa.key" 2048 2>/dev/null
  openssl rsa -in "${pki}/sa.key" -pubout -out "${pki}/sa.pub" 2>/dev/null
}

write_kubeconfig() {
  local token; token="$(cat "$ADMIN_TOKEN_FILE")"
  cat >"${KUBE_WORKDIR}/admin.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "${URL}", certificate-authority: "${KUBE_WORKDIR}/pki/ca.crt"}
users:
- name: admin
  user: {token: "${token}"}
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
EOF
  chmod 600 "${KUBE_WORKDIR}/admin.kubeconfig"
}

start() {
  if ready; then log "already running at ${URL}"; return 0; fi
  build
  mkdir -p "${KUBE_WORKDIR}/logs"
  make_pki
  if [ ! -f "$ADMIN_TOKEN_FILE" ]; then
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ADMIN_TOKEN_FILE")
  fi
  # The admin is the only static identity; every other identity is a ServiceAccount.
  printf '%s,test-admin,test-admin,system:masters\n' "$(cat "$ADMIN_TOKEN_FILE")" >"${KUBE_WORKDIR}/tokens.csv"
  chmod 600 "${KUBE_WORKDIR}/tokens.csv"
  # Metadata of every request: who, which verb, which resource. The RBAC test reads it.
  cat >"${KUBE_WORKDIR}/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
EOF
  if ! pid_alive "${KUBE_WORKDIR}/etcd.pid"; then
    rm -rf "${KUBE_WORKDIR}/etcd-data"
    "${BIN_DIR}/etcd" --data-dir "${KUBE_WORKDIR}/etcd-data" --unsafe-no-fsync \
      --listen-client-urls "http://127.0.0.1:${ETCD_PORT}" --advertise-client-urls "http://127.0.0.1:${ETCD_PORT}" \
      --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
      --initial-cluster "default=http://127.0.0.1:${ETCD_PEER_PORT}" --log-level warn \
      >"${KUBE_WORKDIR}/logs/etcd.log" 2>&1 &
    echo $! >"${KUBE_WORKDIR}/etcd.pid"
  fi
  : >"${KUBE_WORKDIR}/logs/audit.log"
  "${BIN_DIR}/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:${ETCD_PORT}" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "${KUBE_PORT}" \
    --tls-cert-file "${KUBE_WORKDIR}/pki/serving.crt" --tls-private-key-file "${KUBE_WORKDIR}/pki/serving.key" \
    --cert-dir "${KUBE_WORKDIR}/pki" --client-ca-file "${KUBE_WORKDIR}/pki/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "${KUBE_WORKDIR}/pki/sa.pub" \
    --service-account-signing-key-file "${KUBE_WORKDIR}/pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --authorization-mode Node,RBAC --token-auth-file "${KUBE_WORKDIR}/tokens.csv" \
    --allow-privileged=true \
    --endpoint-reconciler-type none \
    --audit-policy-file "${KUBE_WORKDIR}/audit-policy.yaml" --audit-log-path "${KUBE_WORKDIR}/logs/audit.log" \
    --audit-log-format json --audit-log-mode blocking \
    >"${KUBE_WORKDIR}/logs/kube-apiserver.log" 2>&1 &
  echo $! >"${KUBE_WORKDIR}/kube-apiserver.pid"
  write_kubeconfig
  local deadline=$((SECONDS + 120))
  until ready; do
    pid_alive "${KUBE_WORKDIR}/kube-apiserver.pid" || { tail -20 "${KUBE_WORKDIR}/logs/kube-apiserver.log" >&2; die "kube-apiserver exited"; }
    [ $SECONDS -lt $deadline ] || die "kube-apiserver not ready after 120 s"
    sleep 0.5
  done
  # No kubelets exist, so the node-lifecycle controller would only taint the stand-in node.
  "${BIN_DIR}/kube-controller-manager" \
    --kubeconfig "${KUBE_WORKDIR}/admin.kubeconfig" \
    --authentication-kubeconfig "${KUBE_WORKDIR}/admin.kubeconfig" \
    --authorization-kubeconfig "${KUBE_WORKDIR}/admin.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "${KCM_PORT}" \
    --service-account-private-key-file "${KUBE_WORKDIR}/pki/sa.key" \
    --root-ca-file "${KUBE_WORKDIR}/pki/ca.crt" \
    --use-service-account-credentials=false \
    --controllers '*,-nodelifecycle,-nodeipam,-cloud-node-lifecycle,-service,-route' \
    --leader-elect=false \
    >"${KUBE_WORKDIR}/logs/kube-controller-manager.log" 2>&1 &
  echo $! >"${KUBE_WORKDIR}/kube-controller-manager.pid"
  kubectl --kubeconfig "${KUBE_WORKDIR}/admin.kubeconfig" apply --server-side -f "$CRDS" >/dev/null
  # `kubectl wait` fails outright on a CRD whose status has no conditions yet: poll instead.
  local crds_deadline=$((SECONDS + 60))
  until kubectl --kubeconfig "${KUBE_WORKDIR}/admin.kubeconfig" wait --for condition=established --timeout=10s \
      crd/virtualservices.networking.istio.io crd/destinationrules.networking.istio.io >/dev/null 2>&1; do
    [ $SECONDS -lt $crds_deadline ] || die "Istio's CRDs not established after 60 s"
    sleep 0.5
  done
  log "ready at ${URL} (kubeconfig ${KUBE_WORKDIR}/admin.kubeconfig)"
}

stop() {
  for name in kube-controller-manager kube-apiserver etcd; do
    local pidfile="${KUBE_WORKDIR}/${name}.pid"
    if pid_alive "$pidfile"; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      for _ in $(seq 1 50); do pid_alive "$pidfile" || break; sleep 0.1; done
      pid_alive "$pidfile" && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

print_env() {
  echo "export ER_TEST_KUBE_URL=${URL}"
  echo "export ER_TEST_KUBE_CA=${KUBE_WORKDIR}/pki/ca.crt"
  echo "export ER_TEST_KUBE_TOKEN_FILE=${ADMIN_TOKEN_FILE}"
  echo "export ER_TEST_KUBE_AUDIT_LOG=${KUBE_WORKDIR}/logs/audit.log"
  echo "export ER_TEST_KUBECONFIG=${KUBE_WORKDIR}/admin.kubeconfig"
}

case "${1:-}" in
  build) build ;;
  start) start ;;
  stop) stop ;;
  status) if ready; then echo "running at ${URL}"; else exit 3; fi ;;
  env) print_env ;;
  logs) tail -n 30 "${KUBE_WORKDIR}"/logs/*.log ;;
  *) echo "usage: $0 build|start|stop|status|env|logs" >&2; exit 2 ;;
esac
