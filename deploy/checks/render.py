"""Renders helm/chat-gateway with helm-python-sdk (the Helm v4 SDK, no helm binary) for the
default values and each helm/chat-gateway/ci/*.yaml, after checking the values against
values.schema.json and linting the chart (strict: warnings fail). Also proves the chart's guards
refuse what the binaries would refuse, and that an external identity provider
(auth.externalProvider) reaches the gateway pods: JWKS volume, read-only mount, the three env vars,
and a checksum that rolls the pods when an inline JWKS changes; and that TLS in the gateways
(gateway.tls) does too: the Secret's volume, a read-only directory mount (no subPath, which would
never see a renewed certificate), the env vars, an `https` Service port, probes still plain HTTP
on the internal port. Writes OUT/helm-<case>.yaml.

Usage: render.py OUT_DIR"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import helm_python as helm
import yaml

from common import CHART, report

RELEASE, NAMESPACE = "chat", "chat"
KUBE_VERSION = "v1.37.0"

# Values the chart must refuse, and a word of what each error names.
MUST_FAIL = {
    "JWT secret shorter than 32 bytes": ({"auth": {"jwtSecret": "x" * 31}}, "32"),
    "grace period shorter than the drain": (
        {"gateway": {"terminationGracePeriodSeconds": 32}}, "terminationGracePeriodSeconds"),
    "unknown gateway setting": ({"gateway": {"config": {"gateway_no_such_key": 1}}}, "gateway_no_such_key"),
    "worker setting on the gateway": ({"gateway": {"config": {"worker_batch_size": 1}}}, "worker_batch_size"),
    "listen port out of range": ({"gateway": {"containerPorts": {"http": 70000}}}, "http"),
    "external provider without issuer": (
        {"auth": {"externalProvider": {"enabled": True, "audience": "chat", "existingConfigMap": "jwks"}}}, "issuer"),
    "external provider with a blank audience": (
        {"auth": {"externalProvider": {"enabled": True, "issuer": "https://idp", "audience": " ",
                                       "existingConfigMap": "jwks"}}}, "audience"),
    "external provider with no JWKS": (
        {"auth": {"externalProvider": {"enabled": True, "issuer": "https://idp", "audience": "chat"}}}, "oneOf"),
    "external provider with both JWKS sources": (
        {"auth": {"externalProvider": {"enabled": True, "issuer": "https://idp", "audience": "chat",
                                       "existingConfigMap": "jwks", "jwks": '{"keys": [{"kty": "EC"}]}'}}}, "oneOf"),
    "inline JWKS without keys": (
        {"auth": {"externalProvider": {"enabled": True, "issuer": "https://idp", "audience": "chat",
                                       "jwks": '{"kid": "a"}'}}}, "keys"),
    "gateway TLS without a Secret": ({"gateway": {"tls": {"enabled": True}}}, "secretName"),
    "gateway TLS with a Secret name that is no object name": (
        {"gateway": {"tls": {"enabled": True, "secretName": "Chat_TLS"}}}, "secretName"),
    "gateway TLS with a negative reload interval": (
        {"gateway": {"tls": {"enabled": True, "secretName": "chat-tls", "reloadSecs": -1}}}, "reloadSecs"),
    "gateway TLS behind the chart's Ingress": (
        {"gateway": {"tls": {"enabled": True, "secretName": "chat-tls"}}, "ingress": {"enabled": True}},
        "ingress.enabled"),
}

# auth.externalProvider: where the JWKS file is, and the settings it turns on (gateway only).
JWKS_DIR, JWKS_FILE = "/etc/chat/jwks", "jwks.json"
EXTERNAL_ENV = ("CHAT_JWT_JWKS_PATH", "CHAT_JWT_EXTERNAL_ISSUER", "CHAT_JWT_EXTERNAL_AUDIENCE")

# gateway.tls: where the Secret is mounted, and the settings it turns on (gateway only).
TLS_DIR = "/etc/chat/tls"
TLS_ENV = ("CHAT_GATEWAY_TLS_CERT_PATH", "CHAT_GATEWAY_TLS_KEY_PATH", "CHAT_GATEWAY_TLS_RELOAD_SECS")


def cases() -> dict[str, dict]:
    out = {"default": {}}
    for f in sorted((CHART / "ci").glob("*.yaml")):
        out[f.stem] = yaml.safe_load(f.read_text()) or {}
    return out


def _pod_env(container: dict, configmaps: dict) -> dict[str, object]:
    env: dict[str, object] = {}
    for src in container.get("envFrom", []):
        env.update(configmaps.get(src.get("configMapRef", {}).get("name"), {}))
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", e.get("valueFrom"))
    return env


def _containers(name: str, docs: list[dict]):
    """Every container of every Deployment in a render, with what the checks look at: a label
    for errors, its environment as the pod sees it, its mounts, the pod's volumes and
    annotations."""
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d["kind"] == "ConfigMap"}
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        pod = dep["spec"]["template"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        annotations = pod["metadata"].get("annotations") or {}
        for c in pod["spec"]["containers"]:
            where = f"render {name}: Deployment {dep['metadata']['name']} container {c['name']}"
            mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
            yield dep, c, where, _pod_env(c, configmaps), mounts, volumes, annotations


def check_external_provider(name: str, values: dict, body: str, errors: list[str]) -> None:
    """With auth.externalProvider.enabled, the gateway pods mount the JWKS read-only where
    CHAT_JWT_JWKS_PATH points and get the issuer and audience; an inline JWKS is in the chart's
    ConfigMap with its checksum on the pod template. Without it, no pod has any of that."""
    p = {**yaml.safe_load((CHART / "values.yaml").read_text())["auth"]["externalProvider"],
         **values.get("auth", {}).get("externalProvider", {})}
    docs = [d for d in yaml.safe_load_all(body) if d]
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d["kind"] == "ConfigMap"}
    for dep, c, where, env, mounts, volumes, annotations in _containers(name, docs):
        if c["name"] != "gateway" or not p["enabled"]:
            found = [e for e in EXTERNAL_ENV if e in env] + [f"volume {n}" for n in ("jwks",)
                                                             if n in volumes or n in mounts]
            found += [a for a in ("checksum/jwks",) if a in annotations]
            if found:
                errors.append(f"{where}: external provider off, yet {found}")
            continue
        want_env = {"CHAT_JWT_JWKS_PATH": f"{JWKS_DIR}/{JWKS_FILE}",
                    "CHAT_JWT_EXTERNAL_ISSUER": p["issuer"], "CHAT_JWT_EXTERNAL_AUDIENCE": p["audience"]}
        have_env = {k: env.get(k) for k in want_env}
        if have_env != want_env:
            errors.append(f"{where}: env {have_env} != {want_env}")
        mount = mounts.get("jwks", {})
        if mount.get("mountPath") != JWKS_DIR or mount.get("readOnly") is not True:
            errors.append(f"{where}: volumeMount jwks {mount or 'missing'}, want {JWKS_DIR} read-only")
        cm_name = p["existingConfigMap"] or f"{dep['metadata']['name']}-jwks"
        want_vol = {"name": "jwks", "configMap": {
            "name": cm_name, "items": [{"key": p["configMapKey"], "path": JWKS_FILE}]}}
        if volumes.get("jwks") != want_vol:
            errors.append(f"{where}: volume {volumes.get('jwks')} != {want_vol}")
        if p["existingConfigMap"]:
            if cm_name in configmaps or "checksum/jwks" in annotations:
                errors.append(f"{where}: existingConfigMap {cm_name}, yet the chart renders it or checksum/jwks")
            continue
        text = configmaps.get(cm_name, {}).get(p["configMapKey"])
        if text != p["jwks"]:
            errors.append(f"{where}: ConfigMap {cm_name} key {p['configMapKey']} does not hold the inline JWKS")
        elif annotations.get("checksum/jwks") != hashlib.sha256(text.encode()).hexdigest():
            errors.append(f"{where}: checksum/jwks is not the sha256 of the JWKS (a new key set would not roll the pods)")


def check_gateway_tls(name: str, values: dict, body: str, errors: list[str]) -> None:
    """With gateway.tls.enabled, the gateway pods mount the kubernetes.io/tls Secret read-only as
    a directory (no subPath) where CHAT_GATEWAY_TLS_CERT_PATH and _KEY_PATH point, get
    CHAT_GATEWAY_TLS_RELOAD_SECS only when reloadSecs is set, carry no checksum of it (the gateway
    reloads the files), keep HTTP probes on the internal port, and the public Service port is
    `https` with appProtocol https; there is no Ingress. Without it, none of that."""
    t = {**yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]["tls"],
         **values.get("gateway", {}).get("tls", {})}
    docs = [d for d in yaml.safe_load_all(body) if d]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for _dep, c, where, env, mounts, volumes, annotations in _containers(name, docs):
        if c["name"] != "gateway" or not t["enabled"]:
            found = [e for e in TLS_ENV if e in env] + [f"volume {n}" for n in ("tls",)
                                                       if n in volumes or n in mounts]
            if found:
                errors.append(f"{where}: gateway TLS off, yet {found}")
            continue
        want_env = {"CHAT_GATEWAY_TLS_CERT_PATH": f"{TLS_DIR}/tls.crt",
                    "CHAT_GATEWAY_TLS_KEY_PATH": f"{TLS_DIR}/tls.key",
                    "CHAT_GATEWAY_TLS_RELOAD_SECS": str(t["reloadSecs"]) if t["reloadSecs"] else None}
        have_env = {k: env.get(k) for k in want_env}
        if have_env != want_env:
            errors.append(f"{where}: env {have_env} != {want_env}")
        mount = mounts.get("tls", {})
        if mount.get("mountPath") != TLS_DIR or mount.get("readOnly") is not True or "subPath" in mount:
            errors.append(f"{where}: volumeMount tls {mount or 'missing'}, want {TLS_DIR} read-only, no subPath")
        sub = [m["name"] for m in c.get("volumeMounts", []) if "subPath" in m or "subPathExpr" in m]
        if sub:
            errors.append(f"{where}: subPath mounts {sub} never see updates")
        want_vol = {"name": "tls", "secret": {"secretName": t["secretName"], "items": [
            {"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}}
        if volumes.get("tls") != want_vol:
            errors.append(f"{where}: volume {volumes.get('tls')} != {want_vol}")
        rolls = [a for a in annotations if a.startswith("checksum/") and "tls" in a]
        if rolls:
            errors.append(f"{where}: {rolls}: the gateway reloads the certificate, no rollout wanted")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = (c.get(probe) or {}).get("httpGet", {})
            if get and (get.get("port") != "internal" or get.get("scheme", "HTTP") != "HTTP"):
                errors.append(f"{where}: {probe} {get}: the internal port stays plain HTTP")
    gw = next((d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["name"].endswith("-gateway")), None)
    ports = services.get(gw, {}).get("spec", {}).get("ports", [])
    want_port = ({"name": "https", "appProtocol": "https"} if t["enabled"] else {"name": "http", "appProtocol": None})
    have_port = [{"name": p.get("name"), "appProtocol": p.get("appProtocol")} for p in ports]
    if have_port != [want_port] or any(p.get("targetPort") != "http" for p in ports):
        errors.append(f"render {name}: Service {gw} ports {ports}, want one {want_port} to targetPort http")
    if t["enabled"] and any(d["kind"] == "Ingress" for d in docs):
        errors.append(f"render {name}: gateway TLS with an Ingress (plain HTTP to a TLS port)")


def check_jwks_rolls(chart, values: dict, errors: list[str]) -> None:
    """A different inline JWKS gives a different gateway pod template (a rollout)."""
    other = copy.deepcopy(values)
    p = other["auth"]["externalProvider"]
    p["jwks"] = json.dumps({"keys": json.loads(p["jwks"])["keys"][:1]})
    templates = []
    for v in (values, other):
        text = chart.render(v, name=RELEASE, namespace=NAMESPACE, is_install=True)
        dep = yaml.safe_load(text[f"{chart.name}/templates/gateway-deployment.yaml"])
        templates.append(dep["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/jwks"))
    if None in templates or templates[0] == templates[1]:
        errors.append(f"a new inline JWKS does not change the gateway pod template: checksum/jwks {templates}")


def main() -> int:
    helm.disable_logging()  # lint logs every `fail` it meets; the report below says what matters
    out_dir = Path(sys.argv[1])
    errors: list[str] = []
    external_cases: list[str] = []
    tls_cases: list[str] = []
    with helm.Chart.load(CHART) as chart:
        for name, values in cases().items():
            lint = helm.lint(CHART, values, strict=True, kube_version=KUBE_VERSION, namespace=NAMESPACE)
            for m in lint["messages"]:
                if m["severity"] >= 2:
                    errors.append(f"lint {name}: {m['path']}: {m['error']}")
            errors += [f"lint {name}: {e}" for e in lint["errors"]]
            try:
                chart.validate_schema(values)
                rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            except helm.HelmError as e:
                errors.append(f"render {name}: {e}")
                continue
            docs = [text for path, text in sorted(rendered.items())
                    if not path.endswith("NOTES.txt") and text.strip()]
            if not rendered.get(f"{chart.name}/templates/NOTES.txt", "").strip():
                errors.append(f"render {name}: NOTES.txt is empty")
            body = "\n---\n".join(d.strip("\n").removeprefix("---\n") for d in docs)
            (out_dir / f"helm-{name}.yaml").write_text(f"# helm render: {name}\n---\n{body}\n")
            print(f"  rendered {name}: {sum(1 for d in yaml.safe_load_all(body) if d)} objects")
            check_external_provider(name, values, body, errors)
            ext = values.get("auth", {}).get("externalProvider", {})
            if ext.get("enabled") and ext.get("jwks"):
                check_jwks_rolls(chart, values, errors)
                external_cases.append(f"{name} (inline)")
            elif ext.get("enabled"):
                external_cases.append(f"{name} (existing ConfigMap)")
            check_gateway_tls(name, values, body, errors)
            tls = values.get("gateway", {}).get("tls", {})
            if tls.get("enabled"):
                tls_cases.append(f"{name} (reload {tls['reloadSecs']} s)" if tls.get("reloadSecs")
                                 else f"{name} (default reload)")
        for what, (values, word) in MUST_FAIL.items():
            try:
                chart.validate_schema(values)
                chart.render(values, name=RELEASE, namespace=NAMESPACE)
                errors.append(f"accepted {what}: {values}")
            except helm.HelmError as e:
                if word not in str(e):
                    errors.append(f"refused {what}, but the error does not name {word!r}: {e}")
        if not any("(inline)" in c for c in external_cases) or not any("(existing" in c for c in external_cases):
            errors.append(f"ci/*.yaml must enable auth.externalProvider with an inline JWKS and with an "
                          f"existing ConfigMap; found {external_cases or 'neither'}")
        print(f"  external identity provider: {', '.join(external_cases)}: JWKS volume, read-only mount, env, checksum")
        if not any("(reload " in c for c in tls_cases) or not any("(default" in c for c in tls_cases):
            errors.append(f"ci/*.yaml must enable gateway.tls with and without reloadSecs; "
                          f"found {tls_cases or 'neither'}")
        print(f"  gateway TLS: {', '.join(tls_cases)}: Secret volume, read-only mount without subPath, "
              f"env, https Service port, HTTP probes; absent elsewhere")
        print(f"  {len(cases())} renders (default, ci/*.yaml), lint clean; refused {len(MUST_FAIL)} bad value sets")
    return report("helm", errors)


if __name__ == "__main__":
    sys.exit(main())
