#!/bin/bash
# Container HEALTHCHECK for the chat images: GET /healthz on the internal port, with no curl in
# the image (bash's /dev/tcp). Usage: chat-healthcheck gateway|worker
# The port follows CHAT_GATEWAY_INTERNAL_LISTEN / CHAT_WORKER_INTERNAL_LISTEN when they are set,
# as the binaries do; otherwise the defaults from gateway/src/config.rs and
# persistence-worker/src/config.rs (9090, 9091).
set -eu
case "${1:-}" in
  gateway) listen=${CHAT_GATEWAY_INTERNAL_LISTEN:-0.0.0.0:9090} ;;
  worker) listen=${CHAT_WORKER_INTERNAL_LISTEN:-0.0.0.0:9091} ;;
  *) echo "usage: chat-healthcheck gateway|worker" >&2; exit 2 ;;
esac
port=${listen##*:}
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
read -r -t 2 _ status _ <&3
[ "$status" = 200 ]
