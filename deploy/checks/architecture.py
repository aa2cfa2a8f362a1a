"""The architecture, checked: the gateway's modules import each other without a circle, only the
composition root (`node`) wires them and nothing imports it, `Node`'s fields are private, only
the Redis backend's files use the redis crate (and the binaries do not depend on it), and only the
SQL store holds SQL. Also keeps the import table in docs/architecture.md equal to the code.

Usage: architecture.py --check | --write"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GATEWAY = REPO / "gateway/src"
DOC = REPO / "docs/architecture.md"
START, END = "<!-- module-graph:start -->", "<!-- module-graph:end -->"

# Files that may use the redis crate: the Redis backend of each role and its shared connection.
REDIS_FILES = {
    "chat-core/src/redis_conn.rs",
    "chat-core/src/log/redis.rs",
    "chat-core/src/pubsub/redis.rs",
    "chat-core/src/pubsub/redis_cluster.rs",
    "chat-core/src/presence/redis.rs",
    "chat-core/src/counters/redis.rs",
}
SQL_DIR = "chat-core/src/store/"
# Test support, built only with the `testing` feature: it creates each test's database.
SQL_ALSO = {"chat-core/src/testing.rs"}
SQL = re.compile(r'"\s*(SELECT|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX)|ALTER\s+TABLE)\b')
REDIS_USE = re.compile(r"(?<![\w:])redis::")
CRATES = ["chat-protocol", "chat-core", "gateway", "persistence-worker"]


def top_module(path: Path) -> str | None:
    """The gateway's top-level module a source file belongs to (None for lib.rs, main.rs)."""
    rel = path.relative_to(GATEWAY)
    if rel.parts[0] in ("lib.rs", "main.rs"):
        return None
    return rel.parts[0].removesuffix(".rs")


def code_lines(text: str) -> list[str]:
    """Lines outside comments and `#[cfg(test)]` modules (tests may use anything)."""
    out = []
    in_tests = False
    depth = 0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#[cfg(test)]") or stripped.startswith("#[cfg(all(test"):
            in_tests = True
            depth = 0
            continue
        if in_tests:
            opened = depth > 0 or "{" in line
            depth += line.count("{") - line.count("}")
            if depth <= 0 and (not opened or "}" in line):
                in_tests = False
            continue
        if stripped.startswith("//"):
            continue
        out.append(line)
    return out


def gateway_graph() -> dict[str, set[str]]:
    """Top-level module -> the top-level modules it uses (`crate::x`, or `super::x` from a
    nested file)."""
    modules = {p.name.removesuffix(".rs") for p in GATEWAY.iterdir()
               if p.name not in ("lib.rs", "main.rs")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in GATEWAY.rglob("*.rs"):
        mod = top_module(path)
        if mod is None:
            continue
        for line in code_lines(path.read_text()):
            for used in re.findall(r"\bcrate::(\w+)", line):
                if used != mod and used in modules:
                    graph[mod].add(used)
            # `use crate::{a, b::c}`
            for group in re.findall(r"\bcrate::\{([^}]*)\}", line):
                for used in re.findall(r"(?:^|,)\s*(\w+)", group):
                    if used != mod and used in modules:
                        graph[mod].add(used)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def table(graph: dict[str, set[str]]) -> str:
    used_by: dict[str, set[str]] = {m: set() for m in graph}
    for m, uses in graph.items():
        for u in uses:
            used_by[u].add(m)
    rows = ["| module | uses | used by |", "|---|---|---|"]
    # Layers first (what uses the most), leaves last.
    order = sorted(graph, key=lambda m: (-depth(graph, m), m))
    for m in order:
        uses = ", ".join(f"`{u}`" for u in sorted(graph[m])) or "—"
        by = ", ".join(f"`{u}`" for u in sorted(used_by[m])) or "`lib.rs`"
        rows.append(f"| `{m}` | {uses} | {by} |")
    return "\n".join(rows)


def depth(graph: dict[str, set[str]], m: str, seen: frozenset = frozenset()) -> int:
    if m in seen:
        return 0
    return 1 + max((depth(graph, n, seen | {m}) for n in graph[m]), default=0)


def main() -> int:
    write = "--write" in sys.argv
    errors: list[str] = []
    graph = gateway_graph()
    circles = cycles(graph)
    for c in circles:
        errors.append("gateway modules import each other in a circle: " + " -> ".join(c))
    for m, uses in graph.items():
        if "node" in uses:
            errors.append(f"gateway::{m} imports node: only lib.rs may use the composition root")
    node_src = (GATEWAY / "node.rs").read_text()
    node_struct = re.search(r"\nstruct Node \{(.*?)\n\}", node_src, re.S)
    if not node_struct:
        errors.append("gateway/src/node.rs: no `struct Node` (private, at top level)")
    elif re.search(r"^\s*pub[\s(]", node_struct.group(1), re.M):
        errors.append("gateway/src/node.rs: Node has a public field")
    if not re.search(r"^mod node;", (GATEWAY / "lib.rs").read_text(), re.M):
        errors.append("gateway/src/lib.rs: `node` must be a private module")

    redis_users, sql_users = 0, 0
    for crate in CRATES:
        for path in (REPO / crate / "src").rglob("*.rs"):
            rel = str(path.relative_to(REPO))
            lines = code_lines(path.read_text())
            if any(REDIS_USE.search(l) or re.match(r"\s*use redis\b", l) for l in lines):
                redis_users += 1
                if rel not in REDIS_FILES:
                    errors.append(f"{rel} uses the redis crate: only the Redis backend's files may")
            if any(SQL.search(l) for l in lines):
                sql_users += 1
                if not rel.startswith(SQL_DIR) and rel not in SQL_ALSO:
                    errors.append(f"{rel} holds SQL: only {SQL_DIR} may")
    for crate in ("gateway", "persistence-worker"):
        manifest = (REPO / crate / "Cargo.toml").read_text()
        deps = manifest.split("[dependencies]", 1)[1].split("\n[", 1)[0]
        if re.search(r"^(redis|deadpool-redis)\b", deps, re.M):
            errors.append(f"{crate}/Cargo.toml depends on redis: only chat-core's backend may")

    generated = f"{START}\n{table(graph)}\n{END}"
    doc = DOC.read_text()
    current = re.search(re.escape(START) + r".*?" + re.escape(END), doc, re.S)
    if current is None:
        errors.append(f"{DOC.relative_to(REPO)}: no {START} ... {END} block")
    elif current.group(0) != generated:
        if write:
            DOC.write_text(doc.replace(current.group(0), generated))
            print(f"  wrote the module table into {DOC.relative_to(REPO)}")
        else:
            errors.append(f"{DOC.relative_to(REPO)}: the module table differs from the code: "
                          "run deploy/checks/architecture.py --write")
    print(f"  {len(graph)} gateway modules, {len(circles)} import circles; {redis_users} files "
          f"use redis, {sql_users} hold SQL")
    if errors:
        for e in errors:
            print("  FAIL " + e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
