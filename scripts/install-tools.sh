#!/usr/bin/env bash
# Tools the tests need, installed idempotently:
#   - kustomize, built from its Go module into a cache dir (the tests find it there, or through
#     $KUSTOMIZE or PATH);
#   - nginx with the njs module (Debian packages), to run the Compose gateway's configuration.
#   - prometheus (Debian package), the analysis metrics source the tests run against real apps.
#   - postgresql (Debian package), the tests' Airflow metadata database (scripts/postgres.sh).
# Prints where the tools are. Set KUSTOMIZE_VERSION or ER_TOOLS_DIR to change the defaults.
set -euo pipefail

KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.7.1}"
TOOLS_DIR="${ER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/embedding-rollout/bin}"
mkdir -p "$TOOLS_DIR"

# -- kustomize ----------------------------------------------------------------------------------
kustomize="$TOOLS_DIR/kustomize"
if [ -x "$kustomize" ] && "$kustomize" version 2>/dev/null | grep -qx "$KUSTOMIZE_VERSION"; then
  echo "kustomize $KUSTOMIZE_VERSION already in $TOOLS_DIR"
else
  if ! command -v go >/dev/null 2>&1; then
    echo "install-tools: kustomize needs Go to build it (go install); install Go first" >&2
    exit 1
  fi
  echo "building kustomize $KUSTOMIZE_VERSION (go install; a few minutes the first time)"
  GOBIN="$TOOLS_DIR" GOFLAGS=-mod=mod go install "sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}"
fi
"$kustomize" version >/dev/null

# -- nginx + njs --------------------------------------------------------------------------------
NJS_MODULE=/usr/lib/nginx/modules/ngx_http_js_module.so
if command -v nginx >/dev/null 2>&1 && [ -f "$NJS_MODULE" ]; then
  echo "nginx with njs already installed"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing nginx and its njs module (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nginx libnginx-mod-http-js >/dev/null
else
  echo "install-tools: please install nginx with the njs module (Debian: apt-get install nginx libnginx-mod-http-js)" >&2
  exit 1
fi

# A Debian package, unless the command after its name finds it: installed with apt as root, else asked for.
apt_package() {
  local package=$1; shift
  if "$@" >/dev/null 2>&1; then
    echo "$package already installed"
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $package (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$package" >/dev/null
  else
    echo "install-tools: please install $package (Debian: apt-get install $package)" >&2
    exit 1
  fi
}

# Prometheus: the cluster's source of the rollout analysis's metrics; the tests scrape real app
# servers with it (only the binary is used, its service is not started).
apt_package prometheus command -v prometheus
# PostgreSQL: the metadata database of the tests' Airflow stacks (scripts/postgres.sh runs it;
# its own service is not started).
apt_package postgresql sh -c 'ls /usr/lib/postgresql/*/bin/pg_ctl'

echo "kustomize: $kustomize"
echo "nginx: $(command -v nginx || echo /usr/sbin/nginx) (njs: $NJS_MODULE)"
echo "prometheus: $(command -v prometheus)"
echo "postgresql: $(ls -d /usr/lib/postgresql/*/bin | tail -1)"
