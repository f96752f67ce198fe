#!/usr/bin/env bash
# Run a local PostgreSQL server (Debian's packages, no Docker) for the tests' Airflow metadata
# databases: Airflow's users run it on PostgreSQL, whose row locks serialize the scheduler, the
# API server and the workers; on SQLite a state written by one can be lost to another.
#
# Usage: scripts/postgres.sh start|stop|status|url
#
#   start   initdb (once) + start in the background on 127.0.0.1, then wait until it answers
#   stop    stop the server started by this script (no-op when not running)
#   status  exit 0 and print "running ..." when it answers, else exit 3
#   url     print the SQLAlchemy URL of the server (each Airflow stack creates its own database)
#
# Environment (all optional):
#   PG_PORT     port (default 5433)
#   PG_WORKDIR  data, socket and log dir (default /tmp/embedding-rollout-pg)
#   PG_USER     the system user that runs the server when invoked as root (default postgres)
#
# Test server only: it trusts every local connection, listens on 127.0.0.1 alone, and does not
# fsync (its databases live as long as a test run).
set -euo pipefail

PG_PORT="${PG_PORT:-5433}"
PG_WORKDIR="${PG_WORKDIR:-/tmp/embedding-rollout-pg}"
PG_USER="${PG_USER:-postgres}"
PG_DATA="${PG_WORKDIR}/data"
PG_LOG="${PG_WORKDIR}/server.log"

log() { echo "[postgres.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

bindir() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/pg_ctl" ]; then echo "$dir"; return; fi
  done
  command -v pg_ctl >/dev/null 2>&1 || die "PostgreSQL is not installed (Debian: apt-get install postgresql)"
  dirname "$(command -v pg_ctl)"
}

# PostgreSQL refuses to run as root.
as_user() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

answers() { "$(bindir)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }

url() { echo "postgresql+psycopg2://postgres@127.0.0.1:${PG_PORT}/postgres"; }

start() {
  if answers; then log "already running on port $PG_PORT"; return; fi
  local bin; bin=$(bindir)
  mkdir -p "$PG_WORKDIR"
  if [ "$(id -u)" -eq 0 ]; then chown "$PG_USER" "$PG_WORKDIR"; fi
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    as_user "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 >"$PG_WORKDIR/initdb.log" 2>&1 \
      || { cat "$PG_WORKDIR/initdb.log" >&2; die "initdb failed"; }
  fi
  # Each Airflow stack holds some 20 connections (scheduler, API server, workers, triggerer).
  as_user "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_WORKDIR -c max_connections=300 -c fsync=off" \
    >/dev/null || { tail -20 "$PG_LOG" >&2; die "the server did not start"; }
  log "running on port $PG_PORT ($PG_DATA)"
}

stop() {
  [ -f "$PG_DATA/postmaster.pid" ] || return 0
  as_user "$(bindir)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if answers; then echo "running on port $PG_PORT"; else exit 3; fi ;;
  url) url ;;
  *) die "usage: $0 start|stop|status|url" ;;
esac
