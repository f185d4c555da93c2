#!/usr/bin/env bash
# A throwaway PostgreSQL server for the distributed-tuning tests (tests/test_tune_distributed.py).
#
#   eval "$(.ci/postgres.sh start)"   # install Debian's postgresql if missing, start a server,
#                                     # print `export QFLASH_GEN_TEST_PG_URL=postgresql://...`
#   .ci/postgres.sh url               # print the URL of the running server
#   .ci/postgres.sh stop              # stop it and delete its data directory
#
# The server runs as the `postgres` user (as the calling user when not root), from a fresh data
# directory under $TMPDIR, listening on 127.0.0.1 only, on a free port; its Unix socket lives in
# that directory (mode 0700), not in /var/run.  A database and a login role `qflash` with a random
# password are created (the server is a test fixture: synchronous_commit=off, since its own
# durability is not under test, and the tuner commits each trial attribute); the URL is written to $QFLASH_PG_STATE/url (default
# ${TMPDIR:-/tmp}/qflash-gen-pg/url) and printed as an export line on stdout.  Logs go to stderr.
# `start` is idempotent: with a server of this script already running it prints its URL again.
set -euo pipefail

STATE="${QFLASH_PG_STATE:-${TMPDIR:-/tmp}/qflash-gen-pg}"
log() { echo "postgres.sh: $*" >&2; }

pg_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; fi
}

install_if_missing() {
    if [ -n "$(pg_bin)" ]; then return; fi
    if [ "$(id -u)" -ne 0 ]; then
        log "PostgreSQL server binaries not found under /usr/lib/postgresql and not root: apt-get install -y postgresql"
        exit 1
    fi
    log "installing Debian's postgresql (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y postgresql >&2
    if [ -z "$(pg_bin)" ]; then log "apt-get installed postgresql but no initdb/pg_ctl is there"; exit 1; fi
}

as_owner() {  # run a command as the server's owner
    if [ "$(id -u)" -eq 0 ]; then
        if command -v runuser >/dev/null; then runuser -u postgres -- "$@"; else su -s /bin/sh postgres -c "$(printf '%q ' "$@")"; fi
    else
        "$@"
    fi
}

running() {
    [ -f "$STATE/datadir" ] && [ -f "$STATE/url" ] || return 1
    as_owner "$(cat "$STATE/bin")/pg_ctl" -D "$(cat "$STATE/datadir")" status >/dev/null 2>&1 || return 1
    # pg_ctl only checks the pid file; a server killed without cleanup (a session's end, kill -9)
    # can leave a live-looking pid, so ask the port too.
    python3 - "$(cat "$STATE/url")" <<'PY' >/dev/null 2>&1
import socket, sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
socket.create_connection((u.hostname, u.port), timeout=2).close()
PY
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    if running; then
        log "already running: $(sed -E 's#//([^:]*):[^@]*@#//\1:***@#' "$STATE/url")"
        echo "export QFLASH_GEN_TEST_PG_URL='$(cat "$STATE/url")'"
        return
    fi
    install_if_missing
    local bin base data sock pw port url ok=""
    bin=$(pg_bin)
    base=$(mktemp -d "${TMPDIR:-/tmp}/qflash-pg.XXXXXX")
    data="$base/data"
    sock="$base/sock"
    mkdir -p "$sock"
    if [ "$(id -u)" -eq 0 ]; then chown -R postgres: "$base"; fi
    chmod 0700 "$base" "$sock"
    as_owner "$bin/initdb" -D "$data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --no-instructions >&2
    for _ in 1 2 3; do  # a free port can be taken between the probe and the start: try another
        port=$(free_port)
        if as_owner "$bin/pg_ctl" -D "$data" -l "$base/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$sock -c max_connections=200 -c synchronous_commit=off" \
            start >&2; then
            ok=1
            break
        fi
        tail -n 5 "$base/server.log" >&2 || true
    done
    if [ -z "$ok" ]; then log "the server did not start; log: $base/server.log"; exit 1; fi
    pw=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
    as_owner psql -X -q -v ON_ERROR_STOP=1 -h "$sock" -p "$port" -U postgres -d postgres \
        -c "CREATE ROLE qflash LOGIN PASSWORD '$pw'" -c "CREATE DATABASE qflash OWNER qflash" >&2
    url="postgresql://qflash:$pw@127.0.0.1:$port/qflash"
    mkdir -p "$STATE"
    chmod 0700 "$STATE"
    echo "$url" >"$STATE/url"
    echo "$data" >"$STATE/datadir"
    echo "$base" >"$STATE/base"
    echo "$bin" >"$STATE/bin"
    echo "export QFLASH_GEN_TEST_PG_URL='$url'" >"$STATE/env"
    log "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port, data $data"
    echo "export QFLASH_GEN_TEST_PG_URL='$url'"
}

stop() {
    if [ ! -f "$STATE/datadir" ]; then log "no server of this script is running (no $STATE/datadir)"; return; fi
    as_owner "$(cat "$STATE/bin")/pg_ctl" -D "$(cat "$STATE/datadir")" -m fast -w stop >&2 || true
    rm -rf "$(cat "$STATE/base")"
    rm -rf "$STATE"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url)
        if running; then cat "$STATE/url"; else log "not running"; exit 1; fi
        ;;
    *)
        echo "usage: $0 start|stop|url" >&2
        exit 2
        ;;
esac
