#!/usr/bin/env bash
# Starts a throwaway Redis server on 127.0.0.1 for the shared-limits tests, or stops it.
#   eval "$(scripts/test-redis.sh start)"   # prints `export FLASHSERVE_TEST_REDIS_URL=...`
#   scripts/test-redis.sh stop
# Installs Debian's redis-server package when it is missing. Fails loudly if the server cannot start.
set -euo pipefail

PORT="${FLASHSERVE_TEST_REDIS_PORT:-63799}"
DIR="${FLASHSERVE_TEST_REDIS_DIR:-/tmp/flashserve-test-redis}"

redis_bin() {
  if ! command -v redis-server >/dev/null; then
    echo "installing redis-server from Debian's packages" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >&2
  fi
  command -v redis-server
}

stop_server() {
  if [ -f "$DIR/redis.pid" ]; then
    local pid
    pid=$(cat "$DIR/redis.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$DIR"
}

case "${1:-}" in
  start)
    BIN=$(redis_bin)
    stop_server
    mkdir -p "$DIR"
    # No persistence: a test server's data lives and dies with it.
    "$BIN" --port "$PORT" --bind 127.0.0.1 --daemonize yes --pidfile "$DIR/redis.pid" --dir "$DIR" \
      --logfile "$DIR/redis.log" --save "" --appendonly no >&2
    for _ in $(seq 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$PORT" && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null
      then
        echo "export FLASHSERVE_TEST_REDIS_URL=redis://127.0.0.1:$PORT/0"
        exit 0
      fi
      sleep 0.1
    done
    echo "redis-server did not answer on port $PORT; its log:" >&2
    cat "$DIR/redis.log" >&2 || true
    exit 1
    ;;
  stop)
    stop_server
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
