#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests and trials of `attnbench sweep --storage postgresql://...`.
#
#   scripts/pg-throwaway.sh start DIR [PORT]   initdb (trust auth) into DIR/data if missing, then start
#                                              on 127.0.0.1:PORT (default: a free port); prints the URL
#   scripts/pg-throwaway.sh url DIR            prints postgresql+psycopg2://postgres@127.0.0.1:PORT/postgres
#   scripts/pg-throwaway.sh stop DIR           stops the server (DIR is left for you to delete)
#
# Trust authentication on 127.0.0.1 only, fsync off: for throwaway data, never for results you keep.
# initdb and postgres refuse to run as root; as root the server runs as $PG_USER (default
# `postgres`, created as a system user if missing) and DIR is handed to that user, so DIR must be
# reachable by it (a folder under /tmp is; one under /root or /tmp/pytest-of-root is not).
# The server binaries come from PATH or /usr/lib/postgresql/*/bin; exit status 3 when there are none.
set -euo pipefail

usage() { echo "usage: $0 start|stop|url DIR [PORT]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$2
port_arg=${3:-}

find_bin() {
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
        return
    fi
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return; fi
    done
    echo "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin;" \
         "install them, e.g. apt-get install -y postgresql" >&2
    exit 3
}

# Run a command as the unprivileged server user when we are root.
as_user() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "$pg_user" -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 - <<'EOF' 2>/dev/null || echo 55432
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
EOF
}

pg_user=${PG_USER:-postgres}

case "$cmd" in
start)
    bin=$(find_bin)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ "$(id -u)" -eq 0 ]; then
        if ! id -u "$pg_user" >/dev/null 2>&1; then
            useradd --system --no-create-home --shell /usr/sbin/nologin "$pg_user"
        fi
        chown -R "$pg_user" "$dir"
        if ! runuser -u "$pg_user" -- test -w "$dir"; then
            echo "$dir is not reachable by user '$pg_user' (initdb refuses root); use a folder under /tmp" >&2
            exit 2
        fi
    fi
    if [ -f "$dir/data/postmaster.pid" ] && as_user "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        echo "a server is already running in $dir/data" >&2
        exit 1
    fi
    port=${port_arg:-$(free_port)}
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_user "$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    echo "$port" >"$dir/port"
    [ "$(id -u)" -ne 0 ] || chown "$pg_user" "$dir/port"
    # Unix socket in DIR (the packaged default /var/run/postgresql may not exist or be writable).
    as_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    echo "postgresql+psycopg2://postgres@127.0.0.1:$port/postgres"
    ;;
url)
    [ -f "$dir/port" ] || { echo "no server was started in $dir" >&2; exit 1; }
    echo "postgresql+psycopg2://postgres@127.0.0.1:$(cat "$dir/port")/postgres"
    ;;
stop)
    bin=$(find_bin)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_user "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
    fi
    ;;
*)
    usage
    ;;
esac
