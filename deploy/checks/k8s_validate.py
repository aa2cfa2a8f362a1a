"""Validates every rendered object with `kubernetes-validate --strict` (unknown fields fail)
against one current Kubernetes version. Objects of CRD kinds (ServiceMonitor, PrometheusRule
from the Prometheus Operator) are skipped by that validator, which ships only the built-in
schemas: it would only print a warning for them. They get a structural check here instead.
Any other warning (an unknown kind or apiVersion) fails.

Usage: k8s_validate.py OUT_DIR RENDERED.yaml..."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from common import load_docs, report

KUBERNETES_VERSION = "1.37.0"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def main() -> int:
    out_dir = Path(sys.argv[1])
    errors: list[str] = []
    core, crd = [], []
    for f in sys.argv[2:]:
        for d in load_docs(Path(f)):
            (crd if (d.get("apiVersion"), d.get("kind")) in CRD_KINDS else core).append(d)
    core_file = out_dir / "validate-core.yaml"
    core_file.write_text(yaml.safe_dump_all(core, sort_keys=False))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    run = subprocess.run([str(exe), "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(core_file)],
                         capture_output=True, text=True)
    lines = [l for l in (run.stdout + run.stderr).splitlines() if l.strip()]
    errors += lines
    if run.returncode != 0 and not lines:
        errors.append(f"kubernetes-validate exited {run.returncode}")
    for d in crd:
        name = f"{d['kind']}/{d.get('metadata', {}).get('name')}"
        if not d.get("metadata", {}).get("name") or not isinstance(d.get("spec"), dict):
            errors.append(f"{name}: needs metadata.name and spec")
        if d["kind"] == "PrometheusRule":
            for g in d["spec"].get("groups") or [None]:
                if not g or not g.get("name") or not g.get("rules"):
                    errors.append(f"{name}: every group needs a name and rules")
                    continue
                for r in g["rules"]:
                    if not r.get("expr") or not (r.get("alert") or r.get("record")):
                        errors.append(f"{name}: rule {r} needs expr and alert or record")
        if d["kind"] == "ServiceMonitor" and not d["spec"].get("endpoints"):
            errors.append(f"{name}: no endpoints")
    print(f"  {len(core)} objects validated against Kubernetes {KUBERNETES_VERSION} (strict); "
          f"{len(crd)} CRD objects ({', '.join(sorted({k for _, k in CRD_KINDS}))}) checked structurally")
    return report("kubernetes-validate", errors)


if __name__ == "__main__":
    sys.exit(main())
