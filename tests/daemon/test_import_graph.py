"""linkd has no import circle (issue 12): module A importing B (at module level,
directly or through a chain) while B imports A is a refactoring hazard and was
how recovery.py, inbound.py and outbound.py used to hang together."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "linkd"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of linkd imported at module level (not inside functions: those are
    deliberate late imports, and `if TYPE_CHECKING:` blocks are skipped)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target in known:
                    found.add(target)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in known:
                        found.add(sub)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body + getattr(node, "orelse", []) +
                      [s for h in getattr(node, "handlers", []) for s in h.body])
    visit(tree.body)
    # Importing a.b.c first imports the packages a.b and a (their __init__): an edge to
    # each, unless it is one of the importer's own packages (already importing).
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    for target in list(found):
        parts = target.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in known and parent not in ancestors:
                found.add(parent)
    found.discard(name)
    return found


def test_linkd_has_no_import_circle():
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(paths)
    graph = {name: imports_of(path, name, known) for name, path in paths.items()}
    # a package's __init__ re-exporting its own submodules is not a circle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            circle = walk(name)
            assert circle is None, " -> ".join(circle)
