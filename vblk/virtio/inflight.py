"""In-flight request tracking in shared memory, so a restarted backend can finish the job.

Theory of operation
-------------------
With VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD the backend allocates (GET_INFLIGHT_FD) a memfd that
the frontend keeps and hands to every later backend process (SET_INFLIGHT_FD), across a
crash of the backend. Per queue it holds libvhost-user's split-ring layout:

    features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16,
    desc[desc_num]: inflight u8, padding[5], next u16, counter u64      (16 bytes each)

indexed by head descriptor. vblk keeps it like this:

* pop: ``desc[head].counter = n++; desc[head].inflight = 1`` before anything else happens;
* complete (a batch): write the used elements and publish used.idx, then clear the heads'
  inflight bytes, then store ``used_idx``.

So every head the device took from the avail ring is either published in the used ring or
flagged in flight. A backend that died between publishing and clearing leaves
``used_idx`` behind ``used.idx``; the heads in that window are read back from the used ring
itself (they are still there: the window is smaller than the queue) and cleared, which also
covers a crash in the middle of a batch (libvhost-user only clears ``last_batch_head``, which
assumes batches of one). After that, the requests to run again are the flagged heads, oldest
counter first, and the next avail index is ``used.idx`` plus their number.

Re-running a read or a write is harmless; a write that had completed was already durable in
write-through mode, and in write-back mode only a FLUSH promises durability, and a FLUSH in
flight runs again.
"""
from __future__ import annotations

import struct

QUEUE_HEAD = struct.Struct("<QHHHH")        # features, version, desc_num, last_batch_head, used_idx
DESC_STATE = struct.Struct("<B5xHQ")        # inflight, padding, next, counter
ALIGNMENT = 64
VERSION = 1


def queue_region_size(queue_size: int) -> int:
    """Bytes per queue: libvhost-user's ``ALIGN_UP(16 * Q + 2, 64)`` (the header fits the slack)."""
    size = DESC_STATE.size * queue_size + 2
    size = (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    return max(size, QUEUE_HEAD.size + DESC_STATE.size * queue_size)


class InflightQueue:
    """One queue's part of the inflight region (a memoryview the caller keeps alive)."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        self.size = queue_size
        self.counter = 0

    def _desc_off(self, head: int) -> int:
        return QUEUE_HEAD.size + DESC_STATE.size * head

    def recover(self, used_idx: int, used_id_at) -> list[int]:
        """Make the region consistent with the ring; return the heads to run again, oldest first.

        ``used_id_at(i)`` reads the head id of used-ring entry ``i`` (a free-running index).
        A fresh (version 0) region is initialised and nothing is returned.
        """
        _, version, desc_num, _, rec_used = QUEUE_HEAD.unpack_from(self.view, 0)
        if version != VERSION or desc_num != self.size:
            self.view[:QUEUE_HEAD.size + DESC_STATE.size * self.size] = \
                bytes(QUEUE_HEAD.size + DESC_STATE.size * self.size)
            QUEUE_HEAD.pack_into(self.view, 0, 0, VERSION, self.size, 0, used_idx)
            return []
        behind = (used_idx - rec_used) & 0xFFFF
        if behind <= self.size:
            for i in range(rec_used, rec_used + behind):
                head = used_id_at(i & 0xFFFF)
                if head < self.size:
                    self.view[self._desc_off(head)] = 0
        self._set_used_idx(used_idx)
        flagged = []
        for head in range(self.size):
            inflight, _, counter = DESC_STATE.unpack_from(self.view, self._desc_off(head))
            if inflight:
                flagged.append((counter, head))
        flagged.sort()
        self.counter = (flagged[-1][0] + 1) if flagged else 0
        return [head for _, head in flagged]

    def begin(self, head: int) -> None:
        DESC_STATE.pack_into(self.view, self._desc_off(head), 1, 0, self.counter)
        self.counter += 1

    def end(self, head: int) -> None:
        self.view[self._desc_off(head)] = 0

    def _set_used_idx(self, used_idx: int) -> None:
        self.view[14:16] = used_idx.to_bytes(2, "little")

    def published(self, used_idx: int) -> None:
        """Record that used.idx reached ``used_idx`` (after the heads were cleared)."""
        self._set_used_idx(used_idx)
