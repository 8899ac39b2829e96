"""A loop device for a test: the one real block device a test machine can make."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator


@contextlib.contextmanager
def loop_device(path: str | os.PathLike) -> Iterator[str]:
    """Attach ``path`` as a loop device, yield its /dev path, detach it afterwards. Skips the
    test (pytest.skip) where loop devices cannot be made: not root, no losetup (Debian:
    ``mount``), or the kernel refuses."""
    import pytest
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    made = subprocess.run(["losetup", "--find", "--show", os.fspath(path)], capture_output=True,
                          text=True)
    if made.returncode:
        pytest.skip(f"cannot attach a loop device: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
