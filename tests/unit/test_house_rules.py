"""The house's size rules, checked over the source with ``ast``: no runtime class over 400
lines, no function over 100, except those named here with the reason they stay long."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The runtime: what ``vblk serve`` and the operator commands run. Tooling (benchmarks, the
# test guest, the demo) and the test tools in vblk/testing are not held to it.
TOOLING = {"lab", "testing", "bench.py", "guestbench.py", "scaling.py", "lab.py", "__pycache__"}
RUNTIME = [p for d in ("vblk", "cli", "workers") for p in (REPO / d).iterdir()
           if p.name not in TOOLING and (p.is_dir() or p.suffix == ".py")]
MAX_CLASS = 400
MAX_FUNCTION = 100
LONG_ON_PURPOSE: dict[str, str] = {
    # "module:qualname": "why it stays long",
}


def sizes():
    for root in RUNTIME:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            tree = ast.parse(path.read_text(), str(path))
            module = path.relative_to(REPO).as_posix()
            stack = [(tree, "")]
            while stack:
                node, prefix = stack.pop()
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        name = f"{prefix}{child.name}"
                        kind = "class" if isinstance(child, ast.ClassDef) else "function"
                        yield module, name, kind, child.end_lineno - child.lineno + 1
                        stack.append((child, name + "."))


def test_no_runtime_class_or_function_is_too_long():
    found = list(sizes())
    assert len(found) > 300                      # the walk really saw the runtime
    too_long = [f"{m}:{n} ({kind}, {lines} lines)" for m, n, kind, lines in found
                if lines > (MAX_CLASS if kind == "class" else MAX_FUNCTION)
                and f"{m}:{n}" not in LONG_ON_PURPOSE]
    assert too_long == []
