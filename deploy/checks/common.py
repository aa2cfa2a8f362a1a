"""Shared helpers of the deploy/check-deploy.sh checks: repository paths, YAML loading, and
what the binaries read (settings, env names, default ports), parsed from their config.rs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "chat-gateway"

# Env vars the binaries read besides their CHAT_* settings: the tracing filter
# (chat-core/src/telemetry.rs). HOSTNAME is only a fallback for the node id and consumer name,
# which the manifests set explicitly.
EXTRA_ENV = {"RUST_LOG"}

BINARIES = {
    # binary: (config.rs, struct name)
    "gateway": (REPO / "gateway/src/config.rs", "GatewayConfig"),
    "persistence-worker": (REPO / "persistence-worker/src/config.rs", "WorkerConfig"),
}


def _struct_body(path: Path, struct: str) -> str:
    text = path.read_text()
    m = re.search(r"pub struct " + struct + r"\s*\{(.*?)\n\}", text, re.S)
    if not m:
        raise SystemExit(f"{path}: struct {struct} not found")
    return m.group(1)


def config_fields(binary: str) -> list[str]:
    """The setting keys of one binary: the fields of its config struct."""
    path, struct = BINARIES[binary]
    return re.findall(r"^\s*pub (\w+):", _struct_body(path, struct), re.M)


def env_names(binary: str) -> set[str]:
    """Env vars the binary reads: `CHAT_` + each key in upper case, as chat-core/src/settings.rs
    loads them (config::Environment::with_prefix("CHAT").prefix_separator("_"), keys lowercased),
    plus EXTRA_ENV."""
    return {"CHAT_" + f.upper() for f in config_fields(binary)} | EXTRA_ENV


def default_value(binary: str, field: str) -> str:
    """A string default from the binary's `impl Default`, e.g. "0.0.0.0:8080"."""
    path, struct = BINARIES[binary]
    text = path.read_text()
    m = re.search(r"impl Default for " + struct + r".*?\n\}", text, re.S)
    if not m:
        raise SystemExit(f"{path}: impl Default for {struct} not found")
    v = re.search(r"\b" + field + r':\s*"([^"]*)"', m.group(0))
    if not v:
        raise SystemExit(f"{path}: no string default for {field}")
    return v.group(1)


def listen_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# The listen settings of each binary and the port name the manifests give them.
LISTEN_SETTINGS = {
    "gateway": {"http": "gateway_listen", "internal": "gateway_internal_listen"},
    "persistence-worker": {"internal": "worker_internal_listen"},
}


def default_ports(binary: str) -> dict[str, int]:
    return {name: listen_port(default_value(binary, key)) for name, key in LISTEN_SETTINGS[binary].items()}


# The admin server's routes (chat-core/src/admin.rs).
PROBE_PATHS = {"/healthz", "/readyz"}


def admin_routes() -> set[str]:
    text = (REPO / "chat-core/src/admin.rs").read_text()
    return set(re.findall(r'\.route\("(/[a-z]+)"', text))


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def report(name: str, errors: list[str]) -> int:
    """Prints the errors (if any) under the check's name; returns the exit code."""
    for e in errors:
        print(f"  {name}: {e}", file=sys.stderr)
    return 1 if errors else 0
