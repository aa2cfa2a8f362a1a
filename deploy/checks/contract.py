"""The rendered manifests against what the binaries actually read: every env var name is a
setting of that binary (CHAT_ + a field of its config struct, or RUST_LOG); container ports are
the ports of the listen settings in force (the env value, else the config.rs default); probes hit
admin routes on the internal port (/readyz for readiness, /healthz otherwise); Services,
Ingresses, ServiceMonitors and HPAs point at ports, pods and metrics that exist; the gateway's
grace period covers preStop + gateway_shutdown_grace_secs + 2 s; node id and consumer name come
from the pod name.

Usage: contract.py RENDERED.yaml..."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from common import (BINARIES, LISTEN_SETTINGS, REPO, admin_routes, default_value, env_names,
                    listen_port, load_docs, report)

CONTAINER_BINARY = {"gateway": "gateway", "worker": "persistence-worker"}
POD_NAME_ENV = {"gateway": "CHAT_GATEWAY_NODE_ID", "persistence-worker": "CHAT_WORKER_CONSUMER_NAME"}
METRIC_FILES = [REPO / "gateway/src/metrics.rs", REPO / "persistence-worker/src/metrics.rs"]


def resolved_env(container: dict, configmaps: dict, where: str, errors: list[str]) -> dict[str, object]:
    """Name -> literal value (str), or a dict for valueFrom, for every env var of a container."""
    env: dict[str, object] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            name = src["configMapRef"]["name"]
            if name not in configmaps:
                errors.append(f"{where}: envFrom ConfigMap {name} is not in the render")
                continue
            env.update(configmaps[name])
        else:
            errors.append(f"{where}: envFrom {list(src)} cannot be checked; use env with secretKeyRef")
    for e in container.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else e.get("valueFrom", {})
    return env


def check_file(path: Path, errors: list[str]) -> int:
    docs = load_docs(path)
    routes = admin_routes()
    metrics_src = "".join(p.read_text() for p in METRIC_FILES)
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    pod_ports: list[tuple[dict, dict[str, int]]] = []  # (pod labels, port name -> number)
    checked = 0
    for dep in deployments:
        pod = dep["spec"]["template"]
        for c in pod["spec"]["containers"]:
            where = f"{path.name}: Deployment {dep['metadata']['name']} container {c['name']}"
            binary = CONTAINER_BINARY.get(c["name"])
            if binary is None:
                errors.append(f"{where}: unknown container (expected one of {sorted(CONTAINER_BINARY)})")
                continue
            checked += 1
            env = resolved_env(c, configmaps, where, errors)
            valid = env_names(binary)
            for name in sorted(set(env) - valid):
                errors.append(f"{where}: env {name} is not read by {binary} "
                              f"(not a field of {BINARIES[binary][1]} in {BINARIES[binary][0].relative_to(REPO)})")
            # Ports: the listen setting in force decides the port.
            want: dict[str, int] = {}
            for port_name, key in LISTEN_SETTINGS[binary].items():
                value = env.get("CHAT_" + key.upper(), default_value(binary, key))
                if not isinstance(value, str):
                    errors.append(f"{where}: CHAT_{key.upper()} must be a literal address")
                    continue
                want[port_name] = listen_port(value)
            have = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            if have != want:
                errors.append(f"{where}: container ports {have} != listen settings {want}")
            pod_ports.append((pod["metadata"].get("labels", {}), have))
            # Probes: admin routes on the internal port.
            for probe, path_wanted in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                                       ("startupProbe", None)):
                p = c.get(probe)
                if p is None:
                    errors.append(f"{where}: no {probe}")
                    continue
                get = p.get("httpGet", {})
                if get.get("path") not in routes or get.get("path") == "/metrics":
                    errors.append(f"{where}: {probe} path {get.get('path')} is not /healthz or /readyz")
                if path_wanted and get.get("path") != path_wanted:
                    errors.append(f"{where}: {probe} should GET {path_wanted}, not {get.get('path')}")
                if get.get("port") not in ("internal", want.get("internal")):
                    errors.append(f"{where}: {probe} port {get.get('port')} is not the internal port")
            # Identity from the pod name.
            ident = env.get(POD_NAME_ENV[binary])
            if not (isinstance(ident, dict) and ident.get("fieldRef", {}).get("fieldPath") == "metadata.name"):
                errors.append(f"{where}: {POD_NAME_ENV[binary]} must come from metadata.name")
            # The drain fits in the grace period.
            if binary == "gateway":
                grace = env.get("CHAT_GATEWAY_SHUTDOWN_GRACE_SECS",
                                str(_int_default("gateway", "gateway_shutdown_grace_secs")))
                sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                tgps = pod["spec"].get("terminationGracePeriodSeconds", 30)
                if not tgps > sleep + int(grace) + 2:
                    errors.append(f"{where}: terminationGracePeriodSeconds {tgps} <= preStop {sleep} "
                                  f"+ gateway_shutdown_grace_secs {grace} + 2")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for name, svc in services.items():
        sel = svc["spec"].get("selector", {})
        targets = [ports for labels, ports in pod_ports if sel and sel.items() <= labels.items()]
        if not targets:
            errors.append(f"{path.name}: Service {name} selects no pod in the render")
            continue
        for sp in svc["spec"]["ports"]:
            tp = sp.get("targetPort", sp["port"])
            if not any(tp in ports or tp in ports.values() for ports in targets):
                errors.append(f"{path.name}: Service {name} targetPort {tp} is not a container port")
    for ing in (d for d in docs if d["kind"] == "Ingress"):
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                b = p["backend"]["service"]
                svc = services.get(b["name"])
                names = [sp.get("name") for sp in svc["spec"]["ports"]] if svc else []
                if not svc or b["port"].get("name", b["port"].get("number")) not in names + [
                        sp["port"] for sp in svc["spec"]["ports"]]:
                    errors.append(f"{path.name}: Ingress {ing['metadata']['name']} backend {b} does not exist")
                elif any(sp.get("name") == "internal" and b["port"].get("name") == "internal" for sp in svc["spec"]["ports"]):
                    errors.append(f"{path.name}: Ingress exposes the internal port")
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        for ep in sm["spec"]["endpoints"]:
            if ep.get("path", "/metrics") not in routes:
                errors.append(f"{path.name}: ServiceMonitor path {ep.get('path')} is not an admin route")
            if not any(sp.get("name") == ep["port"] for s in services.values() for sp in s["spec"]["ports"]):
                errors.append(f"{path.name}: ServiceMonitor port {ep['port']} is on no Service")
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]["name"]
        if ref not in {d["metadata"]["name"] for d in deployments}:
            errors.append(f"{path.name}: HPA targets missing Deployment {ref}")
        for m in hpa["spec"]["metrics"]:
            if m["type"] == "Pods" and f'"{m["pods"]["metric"]["name"]}"' not in metrics_src:
                errors.append(f"{path.name}: HPA metric {m['pods']['metric']['name']} is not exported")
    return checked


def _int_default(binary: str, field: str) -> int:
    text = BINARIES[binary][0].read_text()
    m = re.search(r"\b" + field + r":\s*(\d[\d_]*)", text)
    if not m:
        raise SystemExit(f"no integer default for {field}")
    return int(m.group(1).replace("_", ""))


def main() -> int:
    errors: list[str] = []
    total = 0
    for f in sys.argv[1:]:
        total += check_file(Path(f), errors)
    print(f"  {total} containers in {len(sys.argv) - 1} renders checked against "
          f"{', '.join(str(p.relative_to(REPO)) for p, _ in BINARIES.values())}")
    return report("contract", errors)


if __name__ == "__main__":
    sys.exit(main())
