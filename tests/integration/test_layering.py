"""The runtime stays lean: what ``vblk serve`` runs (the daemon, the supervisor, the workers)
imports neither the lab (``vblk.lab``: bench, test guest, demo) nor the CLI's or the
benchmarks' third-party libraries, and no runtime module imports ``vblk.lab`` at all."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vblk
import vblk.workers

RUNTIME = "import vblk.daemon, vblk.supervisor, vblk.workers.__main__"
FORBIDDEN = ("vblk.lab", "matplotlib", "typer", "click", "rich", "pydantic")
# Packages that may import vblk.lab: the lab itself, the test helpers and the command line.
MAY_IMPORT_LAB = ("vblk.lab", "vblk.testing", "vblk.cli")


def imported_modules(code: str) -> list[str]:
    """Every module a fresh ``python -I`` imports to run ``code`` (from -X importtime)."""
    r = subprocess.run([sys.executable, "-I", "-X", "importtime", "-c", code],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    names = []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.append(name)
    return names


def _is(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_runtime_imports_no_lab_and_no_cli_libraries():
    names = imported_modules(RUNTIME)
    assert {"vblk.daemon", "vblk.supervisor", "vblk.workers.__main__"} <= set(names), names
    bad = sorted(n for n in names if any(_is(n, f) for f in FORBIDDEN))
    assert bad == [], f"the runtime imports {bad}"


def test_the_check_sees_what_it_looks_for():
    """The same parse finds the lab and typer where they are imported (the check is live)."""
    names = imported_modules("import vblk.lab.workload, typer")
    assert "vblk.lab.workload" in names and "typer" in names


def _runtime_sources() -> dict[str, Path]:
    """module name -> file, for every module of vblk/ and workers/ outside MAY_IMPORT_LAB."""
    roots = {"vblk": Path(vblk.__file__).parent, "vblk.workers": Path(vblk.workers.__file__).parent}
    out = {}
    for package, root in roots.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if not any(_is(name, p) for p in MAY_IMPORT_LAB):
                out[name] = path
    return out


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_runtime_module_imports_the_lab():
    sources = _runtime_sources()
    expected = {"vblk.options", "vblk.daemon", "vblk.supervisor", "vblk.workers.__main__"}
    assert expected <= set(sources)
    offenders = {name: sorted(i for i in _imports(path) if _is(i, "vblk.lab"))
                 for name, path in sources.items()}
    assert {n: i for n, i in offenders.items() if i} == {}
