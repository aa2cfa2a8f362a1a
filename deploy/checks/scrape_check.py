#!/usr/bin/env python3
"""Asks a Prometheus that scrapes one gateway (job chat-gateway) and one worker (job chat-worker)
whether the series the project relies on are there.

Usage: scrape_check.py PROMETHEUS_URL [--traffic]
  --traffic  deploy/checks/ws_traffic.py has run against the gateway: also expect the series
             it creates, and a message that went through to Postgres.
Run by deploy/check-prometheus-scrape.sh. Prints one line per check, exits 1 if any fails.
SCRAPE_STRICT=1 also fails on the labelled counters that have no series until their first event.
"""

import json
import os
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in the work tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
import observability_check as obs  # noqa: E402

WAIT_SECONDS = 45
# Labelled counters with no series until their first event (the prometheus crate exports a
# vector only once one of its children exists). Pre-initialising their label values in the
# metrics modules would let this list go.
EVENT_ONLY = {
    "chat_gateway_redis_errors_total": "a failed Redis operation",
    "chat_worker_errors_total": "a failed Redis or Postgres operation",
    "chat_gateway_rate_limited_total": "a rate-limited request",
}
KEY_SERIES = [
    'up{job="chat-gateway"} == 1',
    'up{job="chat-worker"} == 1',
    'chat_gateway_connections_open{job="chat-gateway"}',
    'chat_gateway_messages_accepted_total{job="chat-gateway"}',
    'chat_gateway_send_latency_seconds_bucket{job="chat-gateway"}',
    'chat_gateway_delivery_latency_seconds_bucket{job="chat-gateway"}',
    'chat_worker_batches_total{job="chat-worker"}',
    'chat_worker_stream_length{job="chat-worker"}',
    'chat_worker_pending_entries{job="chat-worker"}',
    'chat_worker_oldest_pending_age_seconds{job="chat-worker"}',
]
TRAFFIC_SERIES = [
    'chat_gateway_handshakes_total{job="chat-gateway",result="accepted"} > 0',
    'chat_gateway_handshakes_total{job="chat-gateway",result="unauthorized"} > 0',
    'chat_gateway_messages_accepted_total{job="chat-gateway"} > 0',
    'chat_gateway_errors_sent_total{job="chat-gateway"} > 0',
    'chat_gateway_closes_total{job="chat-gateway",reason="client"} > 0',
    'chat_worker_rows_written_total{job="chat-worker"} > 0',
]


def get(base, path, **params):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        doc = json.load(r)
    if doc.get("status") != "success":
        raise RuntimeError(f"{path}: {doc}")
    return doc["data"]


def present(base, expr):
    return bool(get(base, "/api/v1/query", query=expr)["result"])


def wait_for(check):
    """Polls check() (a list of what is still missing) until it is empty or time runs out."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        missing = check()
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1)


def main():
    args = sys.argv[1:]
    if not args or args[0].startswith("-") or set(args[1:]) - {"--traffic"}:
        sys.exit(__doc__)
    base, traffic = args[0].rstrip("/"), "--traffic" in args
    strict = os.environ.get("SCRAPE_STRICT") == "1"
    report = obs.Report()

    # Two successful scrapes of each target (up is 1 on success), so rate() has data.
    scrapes = 'sum_over_time(up{job=~"chat-gateway|chat-worker"}[1m]) >= 2'
    report.check("both targets scraped successfully at least twice", wait_for(
        lambda: [] if len(get(base, "/api/v1/query", query=scrapes)["result"]) >= 2
        else [f"no two scrapes of each target within {WAIT_SECONDS} s: {scrapes}"]))
    if report.failed:
        targets = get(base, "/api/v1/targets")["activeTargets"]
        for t in targets:
            print(f"        {t['labels']['job']} {t['scrapeUrl']}: {t['health']} {t['lastError']}")
        return 1

    wanted = KEY_SERIES + (TRAFFIC_SERIES if traffic else [])
    report.check(f"{len(wanted)} key series present", wait_for(
        lambda: [f"no result for {e}" for e in wanted if not present(base, e)]))

    needed = os.popen(f"{sys.executable} {obs.__file__} --list-metrics").read().split()
    tolerated = set() if strict else set(EVENT_ONLY)

    def unexported():
        names = set(get(base, "/api/v1/label/__name__/values"))
        return [m for m in needed if m not in names and m not in tolerated]

    missing = wait_for(unexported)
    report.check(f"{len(needed)} metrics referenced by the rules and the dashboard are exported",
                 [f"{m} has no series" for m in missing])
    if not strict:
        names = set(get(base, "/api/v1/label/__name__/values"))
        for m in sorted(tolerated & set(needed) - names):
            print(f"skip  {m}: no series until {EVENT_ONLY[m]} (SCRAPE_STRICT=1 fails on it)")

    groups = get(base, "/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"] if r["type"] == "alerting"]
    rule_problems = [f"{r['name']}: {r.get('lastError')}" for r in rules
                     if r.get("health") not in ("ok", "unknown")]
    if not rules:
        rule_problems.append("no alerting rules loaded")
    report.check(f"{len(rules)} alerting rules loaded and evaluated without error", rule_problems)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
