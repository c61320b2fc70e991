"""linkd.proto must stay sans-IO: no trio, socket, ssl, os, time or logging imports."""

import ast
from pathlib import Path

import linkd.proto

FORBIDDEN = {"trio", "socket", "ssl", "os", "time", "logging", "structlog", "asyncio",
             "select", "selectors", "subprocess", "threading", "pathlib", "io", "random"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names.add("__import__")
    return names


def test_proto_imports_no_io_modules():
    folder = Path(linkd.proto.__file__).parent
    files = sorted(folder.glob("*.py"))
    assert len(files) >= 6
    offenders = {f.name: sorted(imported_modules(f) & (FORBIDDEN | {"__import__"}))
                 for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_purity_check_would_catch_an_offender(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom trio import sleep\n")
    assert imported_modules(bad) & FORBIDDEN == {"os", "trio"}
