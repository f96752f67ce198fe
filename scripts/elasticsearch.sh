#!/usr/bin/env bash
# Run a local single-node Elasticsearch (no Docker) for development and CI.
#
# Usage: scripts/elasticsearch.sh start|stop|status|wait|restart|clean|url|logs
#
#   start    fetch (cached) + configure + start in the background, then wait for health
#   stop     stop the server started by this script (no-op when not running)
#   status   exit 0 and print "running ..." when the server is up, else exit 3
#   wait     poll /_cluster/health until yellow/green (ES_WAIT_TIMEOUT, default 180s)
#   restart  stop + start
#   clean    stop, then delete the data/logs under ES_WORKDIR (all indices are lost)
#   url      print the base URL (http://127.0.0.1:$ES_PORT)
#   logs     print the tail of the server log
#
# Environment (all optional):
#   ES_VERSION       server version (default 8.19.3; matches the elasticsearch 8.x Python client)
#   ES_PORT          HTTP port (default 9200); transport port is ES_PORT+100
#   ES_WORKDIR       data/logs/config/pid dir (default /tmp/embedding-rollout-es)
#   ER_CACHE         cache for the unzipped distribution (default $HOME/.cache/embedding-rollout)
#   ES_JAVA_HOME     JDK to run it with (default: Java 17 for 8.x, Java 21+ for 9.x, else `java` on PATH)
#   ES_HEAP          heap size for -Xms/-Xmx (default 512m)
#   ES_USER          non-root user that runs the server when invoked as root (default esrun)
#   ES_WAIT_TIMEOUT  seconds `wait`/`start` wait for health (default 180)
#   ES_JAVA_OPTS     extra JVM options (appended after the heap options)
#
# The server is Elasticsearch's own test distribution from Maven Central
# (org.elasticsearch.distribution.integ-test-zip:elasticsearch:<version>:zip): it has no
# bundled JDK, only the core server (dense_vector + kNN live there), HTTP transport,
# x-pack-core/security and apm. Security is disabled; it listens on 127.0.0.1 only.
set -euo pipefail

ES_VERSION="${ES_VERSION:-8.19.3}"
ES_PORT="${ES_PORT:-9200}"
ES_WORKDIR="${ES_WORKDIR:-/tmp/embedding-rollout-es}"
ER_CACHE="${ER_CACHE:-${HOME:-/root}/.cache/embedding-rollout}"
ES_USER="${ES_USER:-esrun}"
ES_HEAP="${ES_HEAP:-512m}"
ES_WAIT_TIMEOUT="${ES_WAIT_TIMEOUT:-180}"

ES_URL="http://127.0.0.1:${ES_PORT}"
ES_HOME="${ES_WORKDIR}/elasticsearch-${ES_VERSION}"   # runnable copy, owned by the run user
ES_CONF="${ES_WORKDIR}/config"
ES_DATA="${ES_WORKDIR}/data"
ES_LOGS="${ES_WORKDIR}/logs"
ES_TMP="${ES_WORKDIR}/tmp"
ES_PIDFILE="${ES_WORKDIR}/elasticsearch.pid"
ES_PORTFILE="${ES_WORKDIR}/elasticsearch.port"
CACHE_HOME="${ER_CACHE}/elasticsearch-${ES_VERSION}"
ARTIFACT="org.elasticsearch.distribution.integ-test-zip:elasticsearch:${ES_VERSION}:zip"

log() { echo "[elasticsearch.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not on PATH"; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a command as the server user (root is refused by Elasticsearch).
as_user() {
  if is_root; then
    runuser -u "$ES_USER" -- "$@"
  else
    "$@"
  fi
}

java_major() { # $1 = java home -> prints major version
  "$1/bin/java" -XshowSettings:properties -version 2>&1 \
    | sed -n 's/^ *java\.specification\.version = \([0-9]*\).*/\1/p' | head -n1
}

pick_java() {
  local es_major want candidates c
  es_major="${ES_VERSION%%.*}"
  if [ "$es_major" -ge 9 ]; then want=21; else want=17; fi
  if [ -n "${ES_JAVA_HOME:-}" ]; then
    [ -x "$ES_JAVA_HOME/bin/java" ] || die "ES_JAVA_HOME=$ES_JAVA_HOME has no bin/java"
    echo "$ES_JAVA_HOME"; return
  fi
  candidates=()
  [ -n "${JAVA_HOME:-}" ] && candidates+=("$JAVA_HOME")
  if command -v java >/dev/null 2>&1; then
    candidates+=("$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")")
  fi
  for c in /usr/lib/jvm/*; do candidates+=("$c"); done
  # First pass: exactly the major this server line is built for; second pass: anything newer.
  local pass m
  for pass in exact newer; do
    for c in "${candidates[@]}"; do
      [ -x "$c/bin/java" ] || continue
      m="$(java_major "$c" || true)"
      [ -n "$m" ] || continue
      if { [ "$pass" = exact ] && [ "$m" -eq "$want" ]; } || { [ "$pass" = newer ] && [ "$m" -ge "$want" ]; }; then
        echo "$c"; return
      fi
    done
  done
  die "no Java >= $want found for Elasticsearch $ES_VERSION (set ES_JAVA_HOME)"
}

ensure_user() {
  is_root || return 0
  if ! id -u "$ES_USER" >/dev/null 2>&1; then
    log "creating system user $ES_USER"
    local group_opt=(--user-group)
    getent group "$ES_USER" >/dev/null 2>&1 && group_opt=(-g "$ES_USER")
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
      "${group_opt[@]}" "$ES_USER"
  fi
}

fetch() {
  [ -x "$CACHE_HOME/bin/elasticsearch" ] && return 0
  need mvn; need unzip
  mkdir -p "$ER_CACHE"
  local stage
  stage="$(mktemp -d "${ER_CACHE}/.fetch.XXXXXX")"
  log "fetching $ARTIFACT (Maven caches it in ~/.m2)"
  # cd into the empty stage dir so mvn never picks up an unrelated pom.xml
  if ! (cd "$stage" && mvn -q -B -Dstyle.color=never dependency:copy \
          -Dartifact="$ARTIFACT" -DoutputDirectory="$stage" >"$stage/mvn.log" 2>&1); then
    cat "$stage/mvn.log" >&2; rm -rf "$stage"; die "mvn could not fetch $ARTIFACT"
  fi
  unzip -q "$stage/elasticsearch-${ES_VERSION}.zip" -d "$stage/x"
  [ -x "$stage/x/elasticsearch-${ES_VERSION}/bin/elasticsearch" ] || { rm -rf "$stage"; die "unexpected zip layout"; }
  rm -rf "$CACHE_HOME"
  mv "$stage/x/elasticsearch-${ES_VERSION}" "$CACHE_HOME"
  rm -rf "$stage"
}

# Copy the distribution + config into ES_WORKDIR, owned by the run user: the cache may live
# under a directory (e.g. /root, mode 700) that the run user cannot read, and Elasticsearch
# writes into its config dir (keystore) at startup.
prepare_workdir() {
  mkdir -p "$ES_WORKDIR"
  chmod 755 "$ES_WORKDIR"
  if [ ! -x "$ES_HOME/bin/elasticsearch" ]; then
    log "installing $ES_VERSION into $ES_HOME"
    rm -rf "$ES_HOME.tmp"
    cp -R "$CACHE_HOME" "$ES_HOME.tmp"
    mv "$ES_HOME.tmp" "$ES_HOME"
  fi
  mkdir -p "$ES_CONF/jvm.options.d" "$ES_DATA" "$ES_LOGS" "$ES_TMP"
  local f
  for f in jvm.options log4j2.properties; do
    cp "$ES_HOME/config/$f" "$ES_CONF/$f"
  done
  # The test distribution writes the GC log to a relative "gc.log"; pin it to the logs dir.
  sed -i -e "s#file=\(logs/\)\{0,1\}gc\.log#file=${ES_LOGS}/gc.log#" \
         -e "s#ErrorFile=\(logs/\)\{0,1\}hs_err#ErrorFile=${ES_LOGS}/hs_err#" "$ES_CONF/jvm.options"
  cat >"$ES_CONF/elasticsearch.yml" <<EOF
# Written by scripts/elasticsearch.sh on each start; edits are overwritten.
cluster.name: embedding-rollout-local
node.name: local-1
discovery.type: single-node
network.host: 127.0.0.1
http.port: ${ES_PORT}
transport.port: $((ES_PORT + 100))
path.data: ${ES_DATA}
path.logs: ${ES_LOGS}
xpack.security.enabled: false
# A nearly-full dev/CI disk must not make indices read-only or block shard allocation.
cluster.routing.allocation.disk.threshold_enabled: false
cluster.routing.allocation.disk.watermark.low: 97%
cluster.routing.allocation.disk.watermark.high: 98%
cluster.routing.allocation.disk.watermark.flood_stage: 99%
# Tests create and drop many indices quickly.
action.destructive_requires_name: false
EOF
  if is_root; then
    chown -R "$ES_USER:" "$ES_WORKDIR"
    as_user test -w "$ES_DATA" -a -r "$ES_HOME/bin/elasticsearch" \
      || die "user $ES_USER cannot reach $ES_WORKDIR (a parent dir is not traversable); pick another ES_WORKDIR"
  fi
}

# True when the pid file names a live Elasticsearch started from this ES_WORKDIR
# (guards against a stale pid file whose pid was reused by another process).
pid_alive() {
  local pid
  [ -f "$ES_PIDFILE" ] || return 1
  pid="$(cat "$ES_PIDFILE" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/cmdline" ]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "-Des.path.home=${ES_WORKDIR}/" || return 1
  fi
}

# True when anything answers HTTP on the port. Note: the test distribution has no
# rest-root module, so `GET /` and `HEAD /` answer 405 there; never use them as a probe.
http_up() {
  local code
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$ES_URL/_cluster/health" 2>/dev/null || true)"
  [ -n "$code" ] && [ "$code" != "000" ]
}

health_ok() {
  local body
  body="$(curl -fsS --max-time 5 "$ES_URL/_cluster/health" 2>/dev/null)" || return 1
  echo "$body" | grep -Eq '"status":"(green|yellow)"'
}

log_tail() {
  local f="$ES_LOGS/embedding-rollout-local.log"
  log "---- last lines of $f ----"
  if [ -f "$f" ]; then tail -n "${1:-60}" "$f" >&2; else log "(no server log)"; fi
}

launcher_tail() {
  log "---- launcher output $ES_LOGS/startup.out ----"
  tail -n 40 "$ES_LOGS/startup.out" >&2 2>/dev/null || true
}

cmd_wait() {
  need curl
  local deadline=$((SECONDS + ES_WAIT_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if health_ok; then
      log "healthy at $ES_URL"
      return 0
    fi
    if [ -f "$ES_PIDFILE" ] && ! pid_alive; then
      log "server process $(cat "$ES_PIDFILE" 2>/dev/null) died"
      log_tail; launcher_tail; return 1
    fi
    sleep 1
  done
  log "timed out after ${ES_WAIT_TIMEOUT}s waiting for $ES_URL/_cluster/health"
  log_tail; return 1
}

cmd_start() {
  need curl
  if pid_alive; then
    local running_port
    running_port="$(cat "$ES_PORTFILE" 2>/dev/null || echo "$ES_PORT")"
    [ "$running_port" = "$ES_PORT" ] \
      || die "a server from $ES_WORKDIR already runs on port $running_port; stop it first or use another ES_WORKDIR"
    log "already running (pid $(cat "$ES_PIDFILE"))"
    cmd_wait; return
  fi
  if http_up; then
    die "something else already answers on $ES_URL; stop it or set ES_PORT"
  fi
  local java_home
  java_home="$(pick_java)"
  ensure_user
  fetch
  prepare_workdir
  rm -f "$ES_PIDFILE"
  echo "$ES_PORT" >"$ES_PORTFILE"
  log "starting Elasticsearch $ES_VERSION on $ES_URL (java: $java_home, heap $ES_HEAP, workdir $ES_WORKDIR)"
  # -d daemonizes (the launcher returns once the node has started), -p writes the pid file.
  # Run from the logs dir so nothing relative lands in the caller's directory.
  if ! (cd "$ES_LOGS" && as_user env \
        ES_JAVA_HOME="$java_home" \
        ES_PATH_CONF="$ES_CONF" \
        ES_TMPDIR="$ES_TMP" \
        ES_JAVA_OPTS="-Xms${ES_HEAP} -Xmx${ES_HEAP} ${ES_JAVA_OPTS:-}" \
        "$ES_HOME/bin/elasticsearch" -d -p "$ES_PIDFILE" \
        </dev/null >"$ES_LOGS/startup.out" 2>&1); then
    log "launcher failed"
    log_tail 30; launcher_tail; return 1
  fi
  cmd_wait
}

cmd_stop() {
  if ! pid_alive; then
    log "not running"
    rm -f "$ES_PIDFILE"
    return 0
  fi
  local pid i
  pid="$(cat "$ES_PIDFILE")"
  log "stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "still alive after 60s, sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 1
  fi
  rm -f "$ES_PIDFILE"
  log "stopped"
}

cmd_status() {
  if pid_alive && health_ok; then
    echo "running pid=$(cat "$ES_PIDFILE") url=$ES_URL version=$ES_VERSION"
  elif pid_alive; then
    echo "starting pid=$(cat "$ES_PIDFILE") url=$ES_URL (not healthy yet)"; return 3
  else
    echo "stopped"; return 3
  fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  wait) cmd_wait ;;
  restart) cmd_stop; cmd_start ;;
  clean) cmd_stop; rm -rf "$ES_DATA" "$ES_LOGS" "$ES_TMP"; log "removed data and logs under $ES_WORKDIR" ;;
  url) echo "$ES_URL" ;;
  logs) log_tail "${2:-100}" ;;
  *) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; [ -n "${1:-}" ] && exit 2 || exit 0 ;;
esac
