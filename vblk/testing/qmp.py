"""A minimal QMP client for tests: talk to qemu-storage-daemon's (or QEMU's) monitor.

``with Qmp(path) as q: q.execute("block_resize", {"node-name": "disk0", "size": n})``.
Greeting and capability negotiation are done on connect; events that arrive before a
command's answer are kept in ``events``. Every read has a deadline (``timeout``).
"""
from __future__ import annotations

import json
import socket
import time

from vblk.errors import VblkError


class QmpError(VblkError):
    """The monitor answered with an error, or not at all."""


class Qmp:
    def __init__(self, path: str, *, timeout: float = 10.0, attempts: float = 10.0) -> None:
        self.timeout = timeout
        self.events: list[dict] = []
        deadline = time.monotonic() + attempts
        while True:                       # the monitor socket appears a little after start
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        self._buf = b""
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("the monitor closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, arguments: dict | None = None) -> object:
        msg = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            answer = self._read()
            if "event" in answer:
                self.events.append(answer)
                continue
            if "error" in answer:
                raise QmpError(f"{command}: {answer['error'].get('desc', answer['error'])}")
            return answer.get("return")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
