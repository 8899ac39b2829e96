"""A bug in a handler costs a frontend its connection, never the supervisor: the shared loop's
guard (vblk.supervisor.loop.run_guarded) and a disk's (DiskLoop, which also keeps the disk's
name on what is logged meanwhile)."""
from __future__ import annotations

import logging

from vblk.supervisor.disks import DiskLoop
from vblk.supervisor.loop import EventLoop, run_guarded


def boom() -> None:
    raise RuntimeError("a bug")


def test_a_raising_handler_drops_the_frontend_and_the_caller_carries_on(caplog):
    dropped = []
    loop = EventLoop(on_error=lambda: dropped.append("loop"))
    try:
        with caplog.at_level(logging.ERROR, logger="vblk.supervisor"):
            loop.call(boom)
        assert dropped == ["loop"]
        assert "event=internal_error action=drop_frontend" in caplog.text
        assert run_guarded(lambda: 7, dropped.clear) == 7 and dropped == ["loop"]

        disk = DiskLoop(loop, "vm1")
        disk.on_error = lambda: dropped.append("vm1")
        assert disk.call(lambda: 5) == 5
        assert disk.call(boom) is None
        assert dropped == ["loop", "vm1"]                 # only the disk's frontend
    finally:
        loop.epoll.close()


def test_an_on_error_that_raises_too_is_logged_and_contained(caplog):
    def worse() -> None:
        raise OSError("already gone")

    with caplog.at_level(logging.ERROR, logger="vblk.supervisor"):
        assert run_guarded(boom, worse) is None
    assert "event=internal_error action=disconnect" in caplog.text
