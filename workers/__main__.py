"""``python -m vblk.workers``: one vblk I/O worker, started by the supervisor (never by hand)."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from vblk.logs import configure_logging
from vblk.slots import SlotArea
from vblk.workers.worker import Worker, die_with_parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vblk.workers")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--backing-fd", type=int, required=True)
    p.add_argument("--slots-fd", type=int, required=True)
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--submit-fd", type=int, required=True)
    p.add_argument("--complete-fd", type=int, required=True)
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--window", default=None, metavar="START:END",
                   help="bytes of the backing store discard / write-zeroes may touch")
    a = p.parse_args(argv)
    die_with_parent()
    if os.getppid() != a.parent:          # the supervisor died before prctl took effect
        return 1
    # The supervisor decides when workers stop (it drains first): a SIGTERM or SIGINT sent to
    # the whole process group must not kill them under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(a.log_level)
    control = socket.socket(fileno=a.control_fd)
    window = tuple(int(x) for x in a.window.split(":")) if a.window else None
    worker = Worker(a.index, a.backing_fd, SlotArea(a.slots_fd, a.slots), a.submit_fd,
                    a.complete_fd, control, window)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
