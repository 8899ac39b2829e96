"""``python -I -m vblk.workers``: one vblk I/O worker, started by the supervisor (never by
hand) with the arguments of ``vblk.ipc.WorkerArgs``."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

from vblk.backing import attach
from vblk.ipc import SlotArea, WorkerArgs
from vblk.logs import configure_logging
from vblk.workers.loop import Worker


def die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the supervisor goes, so no worker is ever orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    try:
        a = WorkerArgs.parse(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"vblk: error: {exc} (workers are started by vblk serve)", file=sys.stderr)
        return 2
    die_with_parent()
    if os.getppid() != a.parent:          # the supervisor died before prctl took effect
        return 1
    # The supervisor decides when workers stop (it drains first): a SIGTERM or SIGINT sent to
    # the whole process group must not kill them under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(a.log_level)
    control = socket.socket(fileno=a.control_fd)
    disks = {disk: attach(desc) for disk, desc in a.disks.items()}
    worker = Worker(a.index, disks, SlotArea(a.slots_fd, a.slot_count), a.submit_fd,
                    a.complete_fd, control)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
