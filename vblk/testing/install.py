"""vblk installed as a user's pip would install it, for tests that must not run the checkout:
from a clean copy of the source (so a stale ``build/`` directory cannot leak old modules into
the wheel), with no network and no build isolation (setuptools and wheel come from the test
environment)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def source_copy(dest: Path) -> Path:
    """The files git knows of (tracked, or new and not ignored) copied to ``dest``."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True, timeout=60).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation",
                           "-q"], capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{done.stderr}")


def build_wheel(work: Path) -> Path:
    """A wheel of this checkout, built in ``work``; its path."""
    src = source_copy(work / "src")
    _pip("wheel", "-w", str(work / "dist"), str(src))
    (wheel,) = (work / "dist").glob("vblk-*.whl")
    return wheel


def install_into(site: Path, work: Path) -> None:
    """vblk (not its dependencies) installed into the directory ``site`` from a wheel."""
    os.makedirs(site, exist_ok=True)
    _pip("install", "--target", str(site), str(build_wheel(work)))
