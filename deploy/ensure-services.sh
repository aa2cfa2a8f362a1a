#!/usr/bin/env bash
# Makes sure Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432) are running.
# Uses them if they already answer; otherwise installs them with apt-get (when missing) and
# starts them without systemd. Idempotent. Needs root only when it has to install or start.
# CHAT_LOCAL_REDIS_PORT / CHAT_LOCAL_PG_PORT move the ports, to check this script on spare ports;
# run-local.sh and test.sh use the defaults.
set -euo pipefail

REDIS_PORT=${CHAT_LOCAL_REDIS_PORT:-6379}
PG_PORT=${CHAT_LOCAL_PG_PORT:-5432}
log() { printf 'ensure-services: %s\n' "$*" >&2; }

apt_install() {
  if [ -z "${APT_UPDATED:-}" ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # description, command...
  local what=$1; shift
  for _ in $(seq 1 60); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "$what did not come up"; return 1
}

# Speaks RESP over bash's /dev/tcp, so it needs no redis-cli.
redis_up() {
  local reply
  exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" || return 1
  printf 'PING\r\n' >&3
  IFS= read -r -t 2 reply <&3 || true
  exec 3<&- 3>&-
  [[ "$reply" == "+PONG"* ]]
}

if redis_up 2>/dev/null; then
  log "redis: already running on 127.0.0.1:$REDIS_PORT"
else
  if ! command -v redis-server >/dev/null 2>&1; then
    log "redis: installing redis-server"
    apt_install redis-server
  fi
fi
# The package's own start (where an init system ran it) counts too.
if ! redis_up 2>/dev/null; then
  mkdir -p /var/tmp/chat-redis
  log "redis: starting on 127.0.0.1:$REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /var/tmp/chat-redis --logfile "/var/tmp/chat-redis/redis-$REDIS_PORT.log"
  wait_for redis redis_up
fi

# The scripts need the client tools even when the servers run elsewhere.
if ! command -v psql >/dev/null 2>&1 || ! command -v pg_isready >/dev/null 2>&1; then
  log "postgres: installing postgresql-client"
  apt_install postgresql-client
fi

pg_up() { pg_isready -h 127.0.0.1 -p "$PG_PORT" -q; }

if pg_up; then
  log "postgres: already running on 127.0.0.1:$PG_PORT"
else
  installed_now=""
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    log "postgres: installing postgresql"
    apt_install postgresql postgresql-client
    installed_now=1
  fi
  version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  if [ "$PG_PORT" = 5432 ] && command -v pg_ctlcluster >/dev/null 2>&1 && [ -d "/etc/postgresql/$version/main" ]; then
    log "postgres: starting cluster $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  else
    # No Debian cluster (or another port): run our own data directory as the postgres user.
    data="/var/tmp/chat-pg-$PG_PORT"
    log "postgres: starting our own cluster in $data on port $PG_PORT"
    if [ ! -s "$data/PG_VERSION" ]; then
      mkdir -p "$data" && chown postgres:postgres "$data"
      su postgres -c "/usr/lib/postgresql/$version/bin/initdb -D $data -A trust -U postgres" >/dev/null
      installed_now=1
    fi
    su postgres -c "/usr/lib/postgresql/$version/bin/pg_ctl -D $data -l $data/server.log -o '-p $PG_PORT -k /tmp' start" >/dev/null
  fi
  wait_for postgres pg_up
  if [ -n "$installed_now" ]; then
    # Our own fresh instance: give the postgres role the password the project's URLs use.
    su postgres -c "psql -q -h 127.0.0.1 -p $PG_PORT -c \"ALTER ROLE postgres PASSWORD 'postgres'\"" 2>/dev/null \
      || su postgres -c "psql -q -p $PG_PORT -c \"ALTER ROLE postgres PASSWORD 'postgres'\""
  fi
fi
