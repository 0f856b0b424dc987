#!/usr/bin/env bash
# Private PostgreSQL and Redis for the scale-out tests (several ota-server
# replicas sharing state), on loopback only, in one directory:
#
#   scripts/services.sh start             start both (idempotent: running → ok)
#   scripts/services.sh stop              stop both (data kept in the dir)
#   scripts/services.sh restart-redis     SHUTDOWN NOSAVE, start again: its data is LOST (on purpose)
#   scripts/services.sh restart-postgres  pg_ctl restart -m fast (committed data survives)
#   scripts/services.sh status            what runs; exit 0 only if both do
#   scripts/services.sh env               the variables the tests read:
#                                          eval "$(scripts/services.sh env)"
#
# Environment: OTA_SERVICES_DIR (default /tmp/ota-services), OTA_PG_PORT
# (default 55432), OTA_REDIS_PORT (default 56379).
#
# PostgreSQL: Debian's server (highest version under /usr/lib/postgresql),
# cluster in $OTA_SERVICES_DIR/pg, listening on 127.0.0.1 only, no Unix
# socket, trust authentication for loopback, superuser "postgres", fsync ON
# (the tests kill things and check durability), max_connections 300. As root
# it runs as the postgres user (runuser), which owns $OTA_SERVICES_DIR/pg.
#
# Redis: 127.0.0.1 only, no persistence (--save '' --appendonly no),
# daemonized, pidfile and log in $OTA_SERVICES_DIR.
#
# The scale-out tests also run nginx themselves (nginx-light); `start` checks
# it is installed so a missing package is reported here, once.
set -euo pipefail

DIR=${OTA_SERVICES_DIR:-/tmp/ota-services}
PG_PORT=${OTA_PG_PORT:-55432}
REDIS_PORT=${OTA_REDIS_PORT:-56379}
PG_DIR=$DIR/pg
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log
REDIS_DIR=$DIR/redis
REDIS_PID=$DIR/redis.pid
REDIS_LOG=$DIR/redis.log
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

die() {
  echo "services.sh: $*" >&2
  exit 1
}

# Runs a PostgreSQL binary as the cluster's owner.
as_pg() {
  if [[ $(id -u) == 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_bin() {
  local v
  v=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
  if [[ -z $v || ! -x /usr/lib/postgresql/$v/bin/pg_ctl || ! -x /usr/lib/postgresql/$v/bin/initdb ]]; then
    die "PostgreSQL server binaries not found under /usr/lib/postgresql/<version>/bin: apt-get install postgresql"
  fi
  echo "/usr/lib/postgresql/$v/bin"
}

need_redis() {
  command -v redis-server >/dev/null || die "redis-server not found: apt-get install redis-server"
  command -v redis-cli >/dev/null || die "redis-cli not found: apt-get install redis-server (it brings redis-tools)"
}

need_nginx() {
  [[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null ||
    die "nginx not found (the scale-out tests run it as their load balancer): apt-get install nginx-light"
}

rcli() {
  timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"
}

pg_running() {
  local bin
  bin=$(pg_bin)
  [[ -f $PG_DATA/PG_VERSION ]] && as_pg "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

pg_ready() {
  local bin
  bin=$(pg_bin)
  "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres
}

# A live process (a zombie waiting for a slow init to reap it is gone).
alive() {
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ $state != Z ]]
}

redis_pid() {
  local pid
  [[ -f $REDIS_PID ]] || return 1
  pid=$(cat "$REDIS_PID" 2>/dev/null) || return 1
  [[ -n $pid ]] && alive "$pid" || return 1
  # A recycled pid is not our Redis.
  grep -q redis-server "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

start_pg() {
  local bin
  bin=$(pg_bin)
  mkdir -p "$DIR"
  if [[ ! -f $PG_DATA/PG_VERSION ]]; then
    echo "services.sh: initdb $PG_DATA"
    rm -rf "$PG_DATA"
    mkdir -p "$PG_DIR"
    if [[ $(id -u) == 0 ]]; then
      id postgres >/dev/null 2>&1 || die "no postgres user: apt-get install postgresql (it creates the user)"
      chown postgres: "$PG_DIR"
      runuser -u postgres -- test -w "$PG_DIR" ||
        die "the postgres user cannot write $PG_DIR (is a parent directory private?): set OTA_SERVICES_DIR elsewhere, e.g. under /tmp"
    fi
    as_pg "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$PG_DIR/initdb.log" 2>&1 ||
      die "initdb failed; see $PG_DIR/initdb.log: $(tail -n 5 "$PG_DIR/initdb.log")"
    as_pg tee "$PG_DATA/pg_hba.conf" >/dev/null <<'EOF'
# ota services: loopback only, trust.
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
EOF
    as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null <<'EOF'

# ota services (scripts/services.sh)
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 300
shared_buffers = 128MB
# Durability is what the tests check: never turn these off here.
fsync = on
synchronous_commit = on
full_page_writes = on
logging_collector = off
log_min_messages = warning
EOF
  fi
  if pg_running; then
    echo "services.sh: PostgreSQL already running (127.0.0.1:$PG_PORT, $PG_DATA)"
  else
    if ! as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -o "-p $PG_PORT" -w -t 60 start >/dev/null; then
      die "PostgreSQL did not start; the end of $PG_LOG:
$(tail -n 15 "$PG_LOG" 2>/dev/null)"
    fi
  fi
  wait_pg
  echo "services.sh: PostgreSQL up on 127.0.0.1:$PG_PORT ($("$bin/postgres" --version))"
}

wait_pg() {
  for _ in $(seq 1 100); do
    pg_ready && return 0
    sleep 0.1
  done
  die "PostgreSQL runs but does not accept connections on 127.0.0.1:$PG_PORT (another cluster's port? see $PG_LOG)"
}

start_redis() {
  need_redis
  mkdir -p "$REDIS_DIR"
  if redis_pid >/dev/null; then
    echo "services.sh: Redis already running (127.0.0.1:$REDIS_PORT, pid $(redis_pid))"
  else
    if rcli ping >/dev/null 2>&1; then
      die "something else answers on 127.0.0.1:$REDIS_PORT (not the Redis of $DIR): set OTA_REDIS_PORT or OTA_SERVICES_DIR"
    fi
    rm -f "$REDIS_PID"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
      --daemonize yes --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" --dir "$REDIS_DIR" \
      --maxclients 10000 ||
      die "redis-server did not start; the end of $REDIS_LOG:
$(tail -n 15 "$REDIS_LOG" 2>/dev/null)"
  fi
  for _ in $(seq 1 100); do
    if [[ $(rcli ping 2>/dev/null) == PONG ]] && redis_pid >/dev/null; then
      echo "services.sh: Redis up on 127.0.0.1:$REDIS_PORT ($(redis-server --version | awk '{print $3}'))"
      return 0
    fi
    sleep 0.1
  done
  die "Redis did not answer PING on 127.0.0.1:$REDIS_PORT; the end of $REDIS_LOG:
$(tail -n 15 "$REDIS_LOG" 2>/dev/null)"
}

stop_redis() {
  local pid
  if ! pid=$(redis_pid); then
    echo "services.sh: Redis not running"
    return 0
  fi
  rcli shutdown nosave >/dev/null 2>&1 || true
  for _ in $(seq 1 200); do
    alive "$pid" || {
      rm -f "$REDIS_PID"
      echo "services.sh: Redis stopped"
      return 0
    }
    sleep 0.05
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$REDIS_PID"
  echo "services.sh: Redis did not stop in 10 s: killed"
}

stop_pg() {
  local bin
  bin=$(pg_bin)
  if pg_running; then
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
    echo "services.sh: PostgreSQL stopped"
  else
    echo "services.sh: PostgreSQL not running"
  fi
}

cmd=${1:-}
case $cmd in
  start)
    pg_bin >/dev/null
    need_redis
    need_nginx
    start_pg
    start_redis
    ;;
  stop)
    stop_redis
    stop_pg
    ;;
  restart-redis)
    redis_pid >/dev/null || die "Redis is not running: scripts/services.sh start"
    stop_redis
    start_redis
    ;;
  restart-postgres)
    pg_running || die "PostgreSQL is not running: scripts/services.sh start"
    as_pg "$(pg_bin)/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -m fast -w -t 60 restart >/dev/null ||
      die "pg_ctl restart failed; the end of $PG_LOG:
$(tail -n 15 "$PG_LOG" 2>/dev/null)"
    wait_pg
    echo "services.sh: PostgreSQL restarted"
    ;;
  status)
    ok=0
    if pg_running && pg_ready; then
      echo "postgres: running on 127.0.0.1:$PG_PORT ($PG_DATA)"
    else
      echo "postgres: not running"
      ok=3
    fi
    if pid=$(redis_pid) && [[ $(rcli ping 2>/dev/null) == PONG ]]; then
      echo "redis:    running on 127.0.0.1:$REDIS_PORT (pid $pid)"
    else
      echo "redis:    not running"
      ok=3
    fi
    exit $ok
    ;;
  env)
    # The script reads the dir and ports again when a test restarts a
    # service, so they are exported too.
    echo "export OTA_TEST_PG_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres OTA_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/ OTA_SERVICES_SCRIPT=$SELF OTA_SERVICES_DIR=$DIR OTA_PG_PORT=$PG_PORT OTA_REDIS_PORT=$REDIS_PORT"
    ;;
  *)
    echo "usage: $0 {start|stop|restart-redis|restart-postgres|status|env}" >&2
    exit 2
    ;;
esac
