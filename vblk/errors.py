"""vblk's exceptions, sorted by who broke the rules; each class says what the caller should do.

Every error a caller of vblk's modules is meant to catch derives from ``VblkError``: these
here, and the ones defined beside the code that raises them (``vblk.control.ControlError``,
the test frontend's ``BackendError`` and its kin, ``vblk.testing.driver.DeviceError``,
``vblk.testing.qmp.QmpError``, the lab's ``BenchError`` (a ConfigError), ``GuestBenchError``
(a BackendError) and ``GuestBuildError``). Not in the tree: the vhost-user layer's
``PeerClosed`` and ``DropConnection``, which are how the transport and the session end a
connection, and the test driver's ``RingFull`` / ``OutOfGuestMemory`` (wait, then retry)."""
from __future__ import annotations


class VblkError(Exception):
    """Base class; never raised directly."""


class ConfigError(VblkError):
    """A bad option, image or range given by the operator: refuse to start (exit status 2)."""


class FrontendProtocolError(VblkError):
    """The vhost-user frontend broke the protocol: refuse the message or drop the connection."""


class GuestError(VblkError):
    """The guest broke virtio at ring level (bad index, loop, address outside RAM).

    A chain that cannot be parsed is completed with no status if no status byte can be
    located; a ring whose indices are impossible is stopped.
    """


class RingBroken(GuestError):
    """The ring itself is unusable (e.g. avail.idx ran more than the queue size ahead)."""


class RequestError(VblkError):
    """One request failed; it becomes a status byte and never escapes the event loop."""


class ResizeRefused(VblkError):
    """An operator's resize was refused (bad size, past what the image holds, lock taken);
    nothing was changed."""


# Exit statuses, the same for every vblk command and for ``python -m vblk.daemon``.
EXIT_OK = 0
EXIT_FAILED = 1         # the work failed: a request failed, vblk could not be reached, ...
EXIT_USAGE = 2          # bad usage, option, image or range (ConfigError): click's usage status
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
