"""Renders helm/chat-gateway with helm-python-sdk (the Helm v4 SDK, no helm binary) for the
default values and each helm/chat-gateway/ci/*.yaml, after checking the values against
values.schema.json and linting the chart (strict: warnings fail). Also proves the chart's guards
refuse what the binaries would refuse. Writes OUT/helm-<case>.yaml.

Usage: render.py OUT_DIR"""

from __future__ import annotations

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
}


def cases() -> dict[str, dict]:
    out = {"default": {}}
    for f in sorted((CHART / "ci").glob("*.yaml")):
        out[f.stem] = yaml.safe_load(f.read_text()) or {}
    return out


def main() -> int:
    helm.disable_logging()  # lint logs every `fail` it meets; the report below says what matters
    out_dir = Path(sys.argv[1])
    errors: list[str] = []
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
        for what, (values, word) in MUST_FAIL.items():
            try:
                chart.validate_schema(values)
                chart.render(values, name=RELEASE, namespace=NAMESPACE)
                errors.append(f"accepted {what}: {values}")
            except helm.HelmError as e:
                if word not in str(e):
                    errors.append(f"refused {what}, but the error does not name {word!r}: {e}")
        print(f"  {len(cases())} renders (default, ci/*.yaml), lint clean; refused {len(MUST_FAIL)} bad value sets")
    return report("helm", errors)


if __name__ == "__main__":
    sys.exit(main())
