"""Checks deploy/docker/*.Dockerfile as text with hadolint-style rules (no Docker engine runs
in CI): every base image pinned to a version tag (DL3006/DL3007, never `latest`), COPY not ADD
(DL3020), exec-form ENTRYPOINT/CMD (DL3025), pipefail before pipes (DL4006), a numeric non-root
USER in the runtime stage (DL3002), a HEALTHCHECK that GETs /healthz on the internal port, EXPOSEd
ports equal to the binary's default listen ports (config.rs), `cargo build --locked`, and a
dependency layer that copies every workspace member's Cargo.toml before the sources.

Usage: dockerfile_lint.py"""

from __future__ import annotations

import json
import re
import sys
import tomllib

from common import REPO, default_ports, report

IMAGES = {"gateway.Dockerfile": "gateway", "worker.Dockerfile": "persistence-worker"}
HEALTHCHECK_ARG = {"gateway": "gateway", "persistence-worker": "worker"}
PINNED = re.compile(r"^[\w./-]+:(?!latest\b)[\w.-]*\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$|^[\w./-]+@sha256:[0-9a-f]{64}$")


def instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def check(name: str, binary: str, errors: list[str]) -> None:
    path = REPO / "deploy/docker" / name
    text = path.read_text()
    ins = instructions(text)
    where = f"deploy/docker/{name}"
    if re.search(r"\blatest\b", text):
        errors.append(f"{where}: mentions `latest`")
    stages: list[str] = []
    final_start = 0
    for i, (op, rest) in enumerate(ins):
        if op == "FROM":
            parts = rest.split()
            image = [p for p in parts if not p.startswith("--")][0]
            if image not in stages and not PINNED.match(image):
                errors.append(f"{where}: FROM {image} is not pinned to a version tag or digest (DL3006/DL3007)")
            if len(parts) >= 3 and parts[-2].upper() == "AS":
                stages.append(parts[-1])
            final_start = i
        if op == "ADD":
            errors.append(f"{where}: ADD {rest}: use COPY (DL3020)")
        if op in ("ENTRYPOINT", "CMD") and not rest.startswith("["):
            errors.append(f"{where}: {op} in shell form (DL3025)")
        if op == "RUN" and "|" in rest.replace("||", "") and "pipefail" not in text:
            errors.append(f"{where}: RUN with a pipe and no `SHELL [..., \"-o\", \"pipefail\", ...]` (DL4006)")
        if op == "RUN" and "cargo build" in rest and "--locked" not in rest:
            errors.append(f"{where}: cargo build without --locked")
    final = ins[final_start:]
    users = [rest for op, rest in final if op == "USER"]
    if not users:
        errors.append(f"{where}: the runtime stage sets no USER (DL3002)")
    elif not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        errors.append(f"{where}: USER {users[-1]} is not a numeric non-root uid")
    hc = [rest for op, rest in final if op == "HEALTHCHECK"]
    if not hc:
        errors.append(f"{where}: no HEALTHCHECK in the runtime stage")
    else:
        cmd = hc[-1].split("CMD", 1)[-1].strip()
        try:
            argv = json.loads(cmd)
        except ValueError:
            argv = []
            errors.append(f"{where}: HEALTHCHECK CMD is not in exec form")
        if argv and argv[-1] != HEALTHCHECK_ARG[binary]:
            errors.append(f"{where}: HEALTHCHECK checks {argv[-1]}, not {HEALTHCHECK_ARG[binary]}")
    exposed = {int(p.split("/")[0]) for op, rest in final if op == "EXPOSE" for p in rest.split()}
    wanted = set(default_ports(binary).values())
    if exposed != wanted:
        errors.append(f"{where}: EXPOSE {sorted(exposed)} != default listen ports {sorted(wanted)} of {binary}")
    entry = [rest for op, rest in final if op == "ENTRYPOINT"]
    if not entry or not json.loads(entry[-1])[0].endswith("/" + binary):
        errors.append(f"{where}: ENTRYPOINT does not run {binary}")
    # The dependency layer: every member's manifest is copied before any source directory.
    members = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["members"]
    copies = [rest for op, rest in ins if op == "COPY"]
    first_src = next((i for i, c in enumerate(copies) if not c.split()[0].endswith(("Cargo.toml", "Cargo.lock"))
                      and not c.startswith("--from")), len(copies))
    manifests = {c.split()[0] for c in copies[:first_src]}
    for m in members + ["Cargo.lock"]:
        want = m if m == "Cargo.lock" else f"{m}/Cargo.toml"
        if want not in manifests and not (m == "Cargo.lock" and any("Cargo.lock" in c for c in copies[:first_src])):
            errors.append(f"{where}: {want} is not copied before the sources (dependency layer)")


def check_healthcheck_script(errors: list[str]) -> None:
    script = (REPO / "deploy/docker/healthcheck.sh").read_text()
    if "GET /healthz" not in script:
        errors.append("deploy/docker/healthcheck.sh: does not GET /healthz")
    for binary, arg in HEALTHCHECK_ARG.items():
        port = default_ports(binary)["internal"]
        if not re.search(rf"{arg}\) listen=\$\{{CHAT_\w+_INTERNAL_LISTEN:-0\.0\.0\.0:{port}\}}", script):
            errors.append(f"deploy/docker/healthcheck.sh: {arg} does not default to the internal port {port}")


def check_dockerignore(errors: list[str]) -> None:
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    if "**" not in lines and "target" not in lines and "/target" not in lines:
        errors.append(".dockerignore: target/ is not excluded")
    if "**" in lines:
        # Everything is ignored but what is re-included: each workspace member must be.
        members = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["members"]
        for m in members:
            if f"!{m}/" not in lines and f"!{m}" not in lines:
                errors.append(f".dockerignore: workspace member {m}/ is not re-included (!{m}/)")


def main() -> int:
    errors: list[str] = []
    for name, binary in IMAGES.items():
        check(name, binary, errors)
    check_healthcheck_script(errors)
    check_dockerignore(errors)
    print(f"  {len(IMAGES)} Dockerfiles, the health check script and .dockerignore")
    return report("dockerfiles", errors)


if __name__ == "__main__":
    sys.exit(main())
