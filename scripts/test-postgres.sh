#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server on 127.0.0.1 for the ledger tests, or stops it.
#   eval "$(scripts/test-postgres.sh start)"   # prints `export FLASHSERVE_TEST_DATABASE_URL=...`
#   scripts/test-postgres.sh stop
#   scripts/test-postgres.sh pause    # stop the server but keep its data (a database restart, for fault tests)
#   scripts/test-postgres.sh resume   # start it again on the same data
# Installs Debian's postgresql package when it is missing. Fails loudly if the server cannot start.
set -euo pipefail

PORT="${FLASHSERVE_TEST_PG_PORT:-54329}"
PGDATA="${FLASHSERVE_TEST_PGDATA:-/tmp/flashserve-test-pg}"
DB=flashserve_test

pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$dir" ]; then
    echo "installing PostgreSQL from Debian's packages" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
    dir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  echo "$dir"
}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi
}

case "${1:-}" in
  start)
    BIN=$(pg_bin)
    as_postgres "'$BIN/pg_ctl' -D '$PGDATA' -m immediate stop" >/dev/null 2>&1 || true
    rm -rf "$PGDATA"
    mkdir -p "$PGDATA"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    as_postgres "'$BIN/initdb' -D '$PGDATA' -A trust -U postgres --no-sync" >&2
    as_postgres "'$BIN/pg_ctl' -D '$PGDATA' -l '$PGDATA/server.log' -w -t 60 \
      -o \"-p $PORT -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200\" start" >&2
    as_postgres "'$BIN/createdb' -h 127.0.0.1 -p $PORT -U postgres $DB" >&2
    echo "export FLASHSERVE_TEST_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:$PORT/$DB"
    ;;
  stop)
    BIN=$(pg_bin)
    as_postgres "'$BIN/pg_ctl' -D '$PGDATA' -m fast -w stop" >&2 || true
    rm -rf "$PGDATA"
    ;;
  pause)
    BIN=$(pg_bin)
    as_postgres "'$BIN/pg_ctl' -D '$PGDATA' -m fast -w stop" >&2
    ;;
  resume)
    BIN=$(pg_bin)
    as_postgres "'$BIN/pg_ctl' -D '$PGDATA' -l '$PGDATA/server.log' -w -t 60 \
      -o \"-p $PORT -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200\" start" >&2
    ;;
  *)
    echo "usage: $0 start|stop|pause|resume" >&2
    exit 2
    ;;
esac
