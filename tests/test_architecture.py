"""The import graph between agent/'s packages (and cloud/), read from the source with ast: every
import, lazy ones inside functions included. Each unit may import only the units listed for it,
and the graph has no circle. A change that needs a new edge changes ALLOWED, on purpose."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# unit -> the units it may import. Bottom to top.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "agent": set(),  # agent/__init__.py: __version__
    "contract": {"errors"},  # the wire contract shared with cloud/
    "go2.settings": {"errors", "contract"},  # the [go2] config section's schema
    "config": {"errors", "contract", "go2.settings"},
    "proc": {"errors"},  # what every child process needs
    "engines": {"errors", "contract", "config", "proc"},
    "delivery": {"errors", "contract", "config", "proc"},
    "serving": {"errors", "contract", "engines", "proc"},
    "system": {"errors", "contract", "config", "proc", "engines", "delivery"},
    "coordinator": {
        "agent",
        "errors",
        "contract",
        "config",
        "proc",
        "engines",
        "delivery",
        "serving",
        "system",
        "go2",  # the Go2 sim gate and the when-idle policy, imported where configured
    },
    "client": {"errors", "serving"},  # what a controller imports: the wire format, no daemon
    "go2": {"errors", "contract", "config", "go2.settings", "client", "engines", "system"},
    "cli": {"agent", "errors", "contract", "config", "proc", "system", "coordinator", "go2"},
    "protocol": {"contract"},  # agent.protocol: the contract's public name
    # scripts/jetson-check: the on-device verdict drives every part, as the daemon does
    "jetson_check": {"errors", "contract", "config", "proc", "engines", "serving", "coordinator", "client"},
    "cloud": {"errors", "contract", "config", "delivery", "go2"},
}


def unit(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "cloud":
        return "cloud"
    if len(parts) == 1 or parts[1] == "__version__":
        return "agent"
    if parts[1] == "go2" and len(parts) > 2 and parts[2] == "settings":
        return "go2.settings"
    return "cli" if parts[1] == "__main__" else parts[1]


def imported(path: Path) -> set[str]:
    """Every agent/cloud module `path` imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "agent" else [node.module]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in ("agent", "cloud")}


def graph() -> dict[str, dict[str, set[str]]]:
    """unit -> imported unit -> the files that import it."""
    edges: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in sorted([*ROOT.joinpath("agent").rglob("*.py"), *ROOT.joinpath("cloud").rglob("*.py")]):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        src = unit(module)
        for target in imported(path):
            dst = unit(target)
            if dst != src:
                edges[src][dst].add(str(path.relative_to(ROOT)))
    return edges


def test_every_import_between_packages_is_allowed() -> None:
    edges = graph()
    assert set(edges) <= set(ALLOWED), f"units missing from ALLOWED: {set(edges) - set(ALLOWED)}"
    wrong = [
        f"{src} -> {dst} ({', '.join(sorted(files))})"
        for src, targets in edges.items()
        for dst, files in targets.items()
        if dst not in ALLOWED[src]
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_allowed_graph_has_no_circle() -> None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(ALLOWED.get(node, ())):
            assert state.get(nxt) != "open", f"import circle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in ALLOWED:
        if node not in state:
            visit(node, [])


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The reader finds lazy imports too: a test that cannot fail is a defect."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from agent.coordinator.daemon import Daemon\n    import agent.serving.wire\n")
    assert imported(source) == {"agent.coordinator.daemon", "agent.serving.wire"}
    assert unit("agent.coordinator.daemon") == "coordinator" and "coordinator" not in ALLOWED["serving"]
