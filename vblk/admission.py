"""What becomes of one descriptor chain: the general path, as plain functions (no I/O but reads
of guest memory).

``admit_chain`` walks the chain, parses the virtio-blk request, has the device plan it and
translates its buffers into (region, offset, length) pieces for a slot. The supervisor acts
on the answer (completes it at once, serves it from the page cache or hands it to a worker);
the fast path (vblk.virtio.fastpath) must agree with it on every chain it accepts, and its
tests compare the two through this same function.
"""
from __future__ import annotations

from vblk.device import BlkDevice, Completion, IoPlan
from vblk.errors import GuestError
from vblk.ipc import MAX_IOV, Op, Pieces, encode_ranges
from vblk.memory import GuestMemory
from vblk.virtio.blk import BlkRequest, parse_request, read_data_out
from vblk.virtio.constants import BlkStatus, BlkType
from vblk.virtio.ring import SplitRing


def admit_chain(ring: SplitRing, memory: GuestMemory, device: BlkDevice,
                head: int) -> tuple[BlkRequest, Completion | IoPlan, Pieces]:
    """(request, plan, pieces) for the chain at ``head``. The plan is a Completion when the
    request ends without I/O (an error, GET_ID, a flush of a read-only disk, buffers that do
    not translate); pieces are the data buffers of a read or write, the encoded ranges of a
    discard / write-zeroes, [] otherwise. Raises GuestError when the chain has no status byte
    the device can write (nothing can be reported: the chain is returned unanswered)."""
    req = parse_request(ring.walk(head), memory)
    memory.translate(req.status_addr, 1)          # before any I/O is done for it
    try:
        plan = device.plan(req, segment_bytes(req, memory, device))
    except GuestError as exc:
        plan = Completion(BlkStatus.IOERR, reason=str(exc))
    pieces: Pieces = []
    if not isinstance(plan, Completion) and plan.ranges:
        pieces = encode_ranges(plan.ranges)       # discard / write-zeroes: store ranges
    elif not isinstance(plan, Completion):
        try:
            for addr, n in (req.data_in if plan.op == Op.READ else req.data_out):
                pieces.extend(memory.translate(addr, n))
            if len(pieces) > MAX_IOV:
                plan = Completion(BlkStatus.IOERR, reason=f"{len(pieces)} buffers exceed {MAX_IOV}")
        except GuestError as exc:
            plan = Completion(BlkStatus.IOERR, reason=str(exc))
    return req, plan, pieces


def segment_bytes(req: BlkRequest, memory: GuestMemory, device: BlkDevice) -> bytes:
    """The DISCARD / WRITE_ZEROES segments the device wants to see (b"" for other types);
    GuestError if the guest's buffers cannot be read."""
    if req.type != BlkType.DISCARD and req.type != BlkType.WRITE_ZEROES:
        return b""                  # the per-request common case: nothing to read
    want = device.segment_bytes_wanted(req)
    return read_data_out(req, memory, want) if want else b""
