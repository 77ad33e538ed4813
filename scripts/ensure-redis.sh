#!/usr/bin/env bash
# Make sure a Redis answers on $REDIS_HOST:$REDIS_PORT (default 127.0.0.1:6379): if none does, start one,
# installing Debian's redis-server first when it is missing. Used by `make test` and `make demo`.
set -euo pipefail
host=${REDIS_HOST:-127.0.0.1}
port=${REDIS_PORT:-6379}

answers() {
  # PING over bash's /dev/tcp: needs no redis-cli.
  local reply
  exec 3<>"/dev/tcp/$host/$port" 2>/dev/null || return 1
  printf 'PING\r\n' >&3
  reply=$(timeout 2 head -c 7 <&3 || true)
  exec 3<&- 3>&-
  [[ $reply == "+PONG"* ]]
}

if answers; then
  exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing Debian's redis-server" >&2
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq redis-server >/dev/null
fi
echo "starting redis-server on $host:$port" >&2
redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no \
  --dir "${TMPDIR:-/tmp}" --logfile "${TMPDIR:-/tmp}/genloom-redis.log"
for _ in $(seq 1 50); do
  answers && exit 0
  sleep 0.1
done
echo "redis-server did not answer on $host:$port" >&2
exit 1
