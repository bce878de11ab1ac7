#!/usr/bin/env bash
# A throwaway PostgreSQL server for the search tests (shared Optuna studies).
#
#   scripts/pg-test-server.sh start PORT   -> prints "<database URL> <cluster dir>" on stdout
#   scripts/pg-test-server.sh stop DIR     -> stops the cluster and deletes DIR
#
# Installs Debian's `postgresql` with apt-get when no /usr/lib/postgresql/*/bin exists (needs root, as
# in CI). The cluster lives in a fresh temporary directory, listens on 127.0.0.1:PORT only, trusts local
# connections (a test database, never data worth a password) and runs with fsync off. initdb refuses to
# run as root, so as root the server runs as the `postgres` user.
# Exit code 3: PostgreSQL is not installed and cannot be installed here (the tests skip with this reason).
set -euo pipefail

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

ensure_installed() {
  if [ -n "$(pg_bin)" ]; then return 0; fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)" >&2; exit 3
  fi
  if ! command -v apt-get >/dev/null; then
    echo "PostgreSQL is not installed and there is no apt-get to install it" >&2; exit 3
  fi
  echo "installing postgresql with apt-get ..." >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >&2; then
    echo "apt-get install postgresql failed" >&2; exit 3
  fi
  if [ -z "$(pg_bin)" ]; then echo "postgresql installed but no /usr/lib/postgresql/*/bin found" >&2; exit 3; fi
}

# Run a server binary: as `postgres` when we are root (initdb/postgres refuse root).
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

start() {
  local port=$1
  ensure_installed
  local bin dir
  bin=$(pg_bin)
  dir=$(mktemp -d /tmp/hm3-pg-XXXXXX)
  chmod 755 "$dir"
  if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir" 2>/dev/null || { id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres; chown postgres "$dir"; }; fi
  as_owner "$bin/initdb" -D "$dir/data" -U hm3 --auth=trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 || {
    cat "$dir/initdb.log" >&2; exit 1; }
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=50" \
    >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
  as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U hm3 hm3
  echo "postgresql+psycopg2://hm3@127.0.0.1:$port/hm3 $dir"
}

stop() {
  local dir=$1
  case "$dir" in /tmp/hm3-pg-*) ;; *) echo "refusing to stop/delete $dir (not a cluster made by this script)" >&2; exit 2;; esac
  if [ -d "$dir/data" ]; then as_owner "$(pg_bin)/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true; fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) start "${2:?usage: $0 start PORT}" ;;
  stop) stop "${2:?usage: $0 stop DIR}" ;;
  *) echo "usage: $0 start PORT | stop DIR" >&2; exit 2 ;;
esac
