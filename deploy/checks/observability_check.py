#!/usr/bin/env python3
"""Checks that the alerting rules, the runbooks and the Grafana dashboard agree with each other
and with the metrics the binaries define.

Run by deploy/check-observability.sh. Prints one line per check and exits 1 if any fails.
`--list-metrics` instead prints the series names the rules and the dashboard need a scrape to
contain (a histogram as its `_bucket` series), one a line; deploy/check-prometheus-scrape.sh
uses it. `--dashboard-rules FILE` writes the dashboard's panel queries, with its variables
filled in, as recording rules to FILE, so that `promtool check rules FILE` parses them.
"""

import json
import re
import sys
from pathlib import Path

try:
    import yaml
except ImportError:  # deploy/check-observability.sh installs it; say so when run alone.
    sys.exit("observability_check: needs PyYAML (python3 -m pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/rules/chat-alerts.yaml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/chat-gateway.json"
RUNBOOKS = ROOT / "docs/runbooks"
METRICS_SOURCES = [ROOT / "gateway/src/metrics.rs", ROOT / "persistence-worker/src/metrics.rs"]
RUNBOOK_URL = "https://github.com/chat-gateway/chat-gateway/blob/main/docs/runbooks/{}.md"
SECTIONS = ["Meaning", "Impact", "Diagnosis", "Mitigation", "Escalation"]
SEVERITIES = {"critical", "warning"}
ALERT_NAME = re.compile(r"^Chat(Gateway|Worker)[A-Z][A-Za-z0-9]*$")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Referenced before the gateway defines them (issue 6); they fail until it does, with this hint.
PLANNED = {"chat_gateway_ready", "chat_gateway_connections_limit", "chat_gateway_rate_limited_total"}

METRIC_LITERAL = re.compile(r'"(chat_(?:gateway|worker)_[a-z0-9_]+)"')
# The call a string literal is the first argument of: `histogram(`, `HistogramOpts::new(`,
# `register_histogram!(`, `counter(`, ...
CALL_BEFORE = re.compile(r"([A-Za-z_][A-Za-z0-9_:]*!?)\s*\(\s*$")
CLOSURE = re.compile(r"let\s+([a-z_][a-z0-9_]*)\s*=\s*\|[^|]*\|[^{;]*\{")
PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
PROMQL_METRIC = re.compile(r"\bchat_[a-z0-9_]*[a-z0-9]\b")  # `chat_gateway_` is a prefix, not a name


def closure_bodies(src):
    """Names of the `let name = |...| { ... }` closures in `src`, with their bodies."""
    for m in CLOSURE.finditer(src):
        depth, i = 1, m.end()
        while i < len(src) and depth:
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            i += 1
        yield m.group(1), src[m.end():i]


def defined_metrics():
    """{name: is_histogram} for every metric name literal in the metrics modules."""
    found = {}
    for path in METRICS_SOURCES:
        src = path.read_text()
        histogram_helpers = {n for n, body in closure_bodies(src) if "Histogram" in body}
        for m in METRIC_LITERAL.finditer(src):
            call = CALL_BEFORE.search(src, 0, m.start())
            fn = call.group(1) if call else ""
            is_hist = "histogram" in fn.lower() or fn.rstrip("!") in histogram_helpers
            found[m.group(1)] = found.get(m.group(1), False) or is_hist
    return found


def promql_metrics(expr, strip_strings=True):
    if strip_strings:
        expr = PROMQL_STRING.sub('""', expr)
    return set(PROMQL_METRIC.findall(expr))


def load_alerts():
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc.get("groups", []) for r in g.get("rules", []) if "alert" in r]


def dashboard_queries(dash):
    """Every PromQL string in the dashboard: panel targets and query variables."""
    out = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    out.append(v)
                elif isinstance(v, dict) and k == "query" and isinstance(v.get("query"), str):
                    out.append(v["query"])
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash.get("panels", []))
    walk(dash.get("templating", {}))
    return out


# Values for the dashboard's variables when its queries are parsed by promtool.
DASHBOARD_VARS = {"$__rate_interval": "5m", "$gateway_job": "chat-gateway",
                  "$worker_job": "chat-worker", "$instance": ".*"}


def dashboard_rules(dash):
    """The panel queries as one group of recording rules, variables filled in."""
    rules = []
    for p in dash.get("panels", []):
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            for var, value in DASHBOARD_VARS.items():
                expr = expr.replace(var, value)
            rules.append({"record": f"dashboard:panel{p.get('id')}:{t.get('refId')}", "expr": expr})
    return {"groups": [{"name": "dashboard-queries", "rules": rules}]}


def resolve(ref, defined, prose=False):
    """None if `ref` names an exported series of a defined metric, else why not. In `prose`
    (the runbooks), a histogram may be named by its own name."""
    if ref in defined:
        bare_histogram = defined[ref] and not prose
        return "is a histogram: use _bucket, _sum or _count" if bare_histogram else None
    for suffix in HISTOGRAM_SUFFIXES:
        base = ref[: -len(suffix)]
        if ref.endswith(suffix) and defined.get(base):
            return None
    why = "is not defined in " + " or ".join(str(p.relative_to(ROOT)) for p in METRICS_SOURCES)
    return why + (" (planned for the gateway in issue 6, not added yet)" if ref in PLANNED else "")


def scrape_name(ref, defined):
    for suffix in HISTOGRAM_SUFFIXES:
        if ref.endswith(suffix) and defined.get(ref[: -len(suffix)]):
            return ref[: -len(suffix)] + "_bucket"
    return ref


class Report:
    def __init__(self):
        self.failed = 0

    def check(self, name, problems):
        problems = sorted(set(problems))
        print(("ok    " if not problems else "FAIL  ") + name)
        for p in problems:
            print("        " + p)
        self.failed += bool(problems)


def main():
    alerts = load_alerts()
    dash = json.loads(DASHBOARD.read_text())
    defined = defined_metrics()
    rule_refs = {m for a in alerts for m in promql_metrics(a.get("expr", ""))}
    dash_refs = {m for q in dashboard_queries(dash) for m in promql_metrics(q)}

    if sys.argv[1:] == ["--list-metrics"]:
        print("\n".join(sorted({scrape_name(m, defined) for m in rule_refs | dash_refs})))
        return 0
    if sys.argv[1:2] == ["--dashboard-rules"] and len(sys.argv) == 3:
        Path(sys.argv[2]).write_text(yaml.safe_dump(dashboard_rules(dash), sort_keys=False))
        return 0
    if sys.argv[1:]:
        sys.exit(__doc__)

    r = Report()
    names = [a["alert"] for a in alerts]
    r.check(f"{len(names)} alerts have unique names with a ChatGateway/ChatWorker prefix",
            [f"{n}: bad name" for n in names if not ALERT_NAME.match(n)]
            + [f"{n}: defined twice" for n in names if names.count(n) > 1])

    problems = []
    for a in alerts:
        n, labels, ann = a["alert"], a.get("labels") or {}, a.get("annotations") or {}
        if labels.get("severity") not in SEVERITIES:
            problems.append(f"{n}: severity {labels.get('severity')!r} is not critical or warning")
        for key in ("summary", "description", "runbook_url"):
            if not str(ann.get(key, "")).strip():
                problems.append(f"{n}: no {key} annotation")
        if ann.get("runbook_url") and ann["runbook_url"] != RUNBOOK_URL.format(n):
            problems.append(f"{n}: runbook_url is not {RUNBOOK_URL.format(n)}")
    r.check("every alert has severity, summary, description and its runbook_url", problems)

    books = {p.stem: p for p in RUNBOOKS.glob("*.md") if p.name != "README.md"}
    r.check("every alert has a runbook and every runbook an alert",
            [f"{n}: no docs/runbooks/{n}.md" for n in names if n not in books]
            + [f"docs/runbooks/{b}.md: no alert named {b}" for b in books if b not in names])

    problems = []
    for b, path in books.items():
        headings = re.findall(r"^##\s+(.+?)\s*$", path.read_text(), re.M)
        problems += [f"{b}.md: no '## {s}' section" for s in SECTIONS if s not in headings]
    r.check(f"every runbook has the sections {', '.join(SECTIONS)}", problems)

    index = (RUNBOOKS / "README.md").read_text() if (RUNBOOKS / "README.md").exists() else ""
    r.check("docs/runbooks/README.md links every runbook",
            [f"README.md: no link to {b}.md" for b in books if f"({b}.md)" not in index]
            + (["docs/runbooks/README.md is missing"] if not index else []))

    def metric_problems(refs, where, prose=False):
        return [f"{m} ({where}) {why}" for m in refs if (why := resolve(m, defined, prose))]

    r.check(f"{len(rule_refs)} metrics in the rules are defined in the metrics modules",
            metric_problems(rule_refs, "rules"))
    r.check(f"{len(dash_refs)} metrics in the dashboard are defined in the metrics modules",
            metric_problems(dash_refs, "dashboard"))
    book_problems = []
    for b, path in books.items():
        book_problems += metric_problems(promql_metrics(path.read_text(), False), f"{b}.md", True)
    r.check("metrics in the runbooks are defined in the metrics modules", book_problems)

    problems = []
    ds_vars = [v for v in dash.get("templating", {}).get("list", [])
               if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    if not ds_vars:
        problems.append("no datasource template variable of type prometheus")
    for p in dash.get("panels", []):
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"panel {p.get('title')!r}: datasource is not ${{datasource}}")
        if not p.get("targets"):
            problems.append(f"panel {p.get('title')!r}: no query")
    r.check("dashboard panels query the ${datasource} variable", problems)

    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
