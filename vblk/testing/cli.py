"""The vblk command as the tests run it: this checkout's ``python -m vblk.cli``, no stdin,
bounded in time, and the one line every refusal prints."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ERROR = "vblk: error: "


def run_vblk(*args: object, cwd: str | os.PathLike = REPO, env: dict | None = None,
             timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """``vblk ARGS`` (str() of each) with this checkout first on PYTHONPATH; text output."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "vblk.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def error_line(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """Assert ``result`` is a refusal -- exit ``status``, exactly one line on stderr, starting
    ``vblk: error: `` -- and return that line without the prefix."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), result.stderr
    return lines[0][len(ERROR):]
