# Sourced by deploy/check-observability.sh and deploy/check-prometheus-scrape.sh.
# ensure_prometheus: installs Debian's prometheus package (prometheus and promtool) when promtool
# is missing, running `apt-get update` first only if the install cannot find it. Where init
# scripts run, the package would start a Prometheus on :9090 (the gateway's default internal
# port): a policy-rc.d that answers 101 stops that, and is removed again if we made it.

ensure_prometheus() {
  command -v promtool >/dev/null && command -v prometheus >/dev/null && return 0
  printf '%s: installing prometheus and promtool (apt-get install prometheus)\n' "$(basename "$0")" >&2
  local policy=/usr/sbin/policy-rc.d made_policy="" status=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
  fi
  {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  } || status=$?
  if [ -n "$made_policy" ]; then rm -f "$policy"; fi
  return "$status"
}
