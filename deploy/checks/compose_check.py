"""Checks deploy/compose as text (no Docker engine in CI): pinned images, Redis with AOF and
noeviction, two gateways and a worker built from our Dockerfiles, env names the binaries read,
published ports equal to the public listen port (internal ports unpublished), stop grace longer
than the gateway's drain, Prometheus scraping every gateway and worker on the internal port with
the job names the alerts use, and every mounted file present (alert rules, dashboard).

Usage: compose_check.py"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from common import REPO, default_ports, env_names, report
from dockerfile_lint import PINNED

COMPOSE = REPO / "deploy/compose/docker-compose.yml"
BINARY_OF = {"deploy/docker/gateway.Dockerfile": "gateway", "deploy/docker/worker.Dockerfile": "persistence-worker"}
JOB_OF = {"gateway": "chat-gateway", "persistence-worker": "chat-worker"}


def seconds(v: str) -> int:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(v))
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0) if m else 0


def main() -> int:
    errors: list[str] = []
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    by_binary: dict[str, list[str]] = {"gateway": [], "persistence-worker": []}
    for name, s in services.items():
        where = f"compose service {name}"
        image = s.get("image", "")
        if not PINNED.match(image):
            errors.append(f"{where}: image {image!r} is not pinned to a version")
        for vol in s.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                if not (COMPOSE.parent / src).exists():
                    errors.append(f"{where}: mounted {src} does not exist")
        binary = BINARY_OF.get(s.get("build", {}).get("dockerfile", ""))
        if not binary:
            continue
        by_binary[binary].append(name)
        env = s.get("environment", {})
        for k in sorted(set(env) - env_names(binary)):
            errors.append(f"{where}: env {k} is not read by {binary}")
        ports = default_ports(binary)
        for p in s.get("ports", []):
            target = int(str(p).rsplit(":", 1)[1])
            if target != ports.get("http"):
                errors.append(f"{where}: publishes {target}, not the public port {ports.get('http')}")
            if not str(p).startswith("127.0.0.1:"):
                errors.append(f"{where}: port {p} is published on every interface")
        if not s.get("read_only") or "ALL" not in s.get("cap_drop", []):
            errors.append(f"{where}: needs read_only and cap_drop ALL")
        if binary == "gateway":
            grace = 20 + 2
            if "CHAT_GATEWAY_SHUTDOWN_GRACE_SECS" in env:
                grace = int(env["CHAT_GATEWAY_SHUTDOWN_GRACE_SECS"]) + 2
            if seconds(s.get("stop_grace_period", "10s")) <= grace:
                errors.append(f"{where}: stop_grace_period must exceed the drain ({grace} s)")
            if not re.fullmatch(r"\$\{CHAT_JWT_SECRET:\?.+\}", str(env.get("CHAT_JWT_SECRET", ""))):
                errors.append(f"{where}: CHAT_JWT_SECRET must be required from the environment")
    if len(by_binary["gateway"]) != 2 or len(by_binary["persistence-worker"]) != 1:
        errors.append(f"compose: want two gateways and one worker, have {by_binary}")
    redis = " ".join(services.get("redis", {}).get("command", []))
    if "--appendonly yes" not in redis or "--maxmemory-policy noeviction" not in redis:
        errors.append("compose service redis: needs --appendonly yes and --maxmemory-policy noeviction")
    # Prometheus: every gateway and worker scraped on its internal port under the alerts' job names.
    prom = yaml.safe_load((REPO / "deploy/compose/prometheus.yml").read_text())
    jobs = {j["job_name"]: [t for sc in j.get("static_configs", []) for t in sc["targets"]]
            for j in prom["scrape_configs"]}
    for binary, names in by_binary.items():
        want = {f"{n}:{default_ports(binary)['internal']}" for n in names}
        have = set(jobs.get(JOB_OF[binary], []))
        if want != have:
            errors.append(f"prometheus.yml: job {JOB_OF[binary]} scrapes {sorted(have)}, want {sorted(want)}")
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("."))
    for rule_file in prom.get("rule_files", []):
        if rule_file not in mounts.values():
            errors.append(f"prometheus.yml: rule file {rule_file} is not mounted")
    if "../prometheus/rules/chat-alerts.yaml" not in mounts:
        errors.append("compose service prometheus: does not mount deploy/prometheus/rules/chat-alerts.yaml")
    gmounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    provider = yaml.safe_load((REPO / "deploy/compose/grafana/provisioning/dashboards/chat.yml").read_text())
    if gmounts.get("../grafana/dashboards") != provider["providers"][0]["options"]["path"]:
        errors.append("compose service grafana: deploy/grafana/dashboards is not mounted where the provider reads")
    print(f"  {len(services)} services, prometheus.yml and the Grafana provisioning")
    return report("compose", errors)


if __name__ == "__main__":
    sys.exit(main())
