"""The lean process ``vblk serve`` becomes once its options are checked.

``vblk serve`` parses and checks everything with the CLI (typer, which brings pydantic and
rich: ~10 MiB of heap a long-running disk server has no use for), then ``exec_serve`` replaces
the process image with ``python -I -m vblk.daemon`` (isolated: see vblk.interpreter), which
imports only what serving needs. The
PID stays the same (systemd's MainPID, sd_notify, LISTEN_PID and the workers' parent all
hold), the directory the command's vblk came from and the checked ``ServeConfig`` travel
(a line, then a pickle) in a memfd whose number is in one
environment variable (the new image reads and closes it and drops the variable; the
command line keeps ``vblk serve``'s arguments, for ``ps``, and they are not read again),
and a listening fd (``--fd`` or socket activation) is kept open across the
exec and made close-on-exec again afterwards.
"""
from __future__ import annotations

import fcntl
import os
import pickle
import sys

from vblk.errors import EXIT_FAILED, EXIT_USAGE
from vblk.interpreter import origin, python_command, same_origin

CONFIG_ENV = "VBLK_SERVE_CONFIG_FD"


def exec_serve(config) -> None:
    """Become ``python -m vblk.daemon`` serving ``config`` (a checked ServeConfig); never
    returns."""
    blob = os.memfd_create("vblk-serve-config", 0)       # no MFD_CLOEXEC: it must survive exec
    os.set_inheritable(blob, True)
    os.write(blob, origin().encode() + b"\n" + pickle.dumps(config))
    os.lseek(blob, 0, os.SEEK_SET)
    env = dict(os.environ)
    env[CONFIG_ENV] = str(blob)
    if config.listen_fd is not None:
        flags = fcntl.fcntl(config.listen_fd, fcntl.F_GETFD)
        fcntl.fcntl(config.listen_fd, fcntl.F_SETFD, flags & ~fcntl.FD_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    # The arguments after the module are only for ps/top: which disk, which socket.
    os.execve(sys.executable, python_command("vblk.daemon", *sys.argv[1:]), env)


def main() -> int:
    from vblk.errors import ConfigError
    from vblk.logs import configure_logging
    fd = os.environ.pop(CONFIG_ENV, None)
    if fd is None:
        print("vblk: error: python -m vblk.daemon is started by `vblk serve`, not by hand",
              file=sys.stderr)
        return EXIT_USAGE
    with os.fdopen(int(fd), "rb") as f:
        mismatch = same_origin(f.readline().rstrip(b"\n").decode())
        if mismatch is not None:
            print(f"vblk: error: {mismatch}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        config = pickle.load(f)
    if config.listen_fd is not None:
        flags = fcntl.fcntl(config.listen_fd, fcntl.F_GETFD)
        fcntl.fcntl(config.listen_fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    configure_logging(config.log_level)
    from vblk.supervisor.pool import WorkerStartError
    from vblk.supervisor.serve import serve
    try:
        return serve(config) or 0
    except ConfigError as e:            # e.g. the lock was taken between the check and now
        print(f"vblk: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except WorkerStartError as e:       # before anything listened
        print(f"vblk: error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
