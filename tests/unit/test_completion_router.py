"""The CompletionRouter: one completion pipe shared by every disk of a supervisor, each slot
handed to its disk's share under the disk's own number."""
from __future__ import annotations

from types import SimpleNamespace

from vblk.supervisor.disks import CompletionRouter, SlotShare


class Pool:
    """What the router and the shares use of a WorkerPool: the slot count, the completion fd
    and ``reap``."""

    def __init__(self, count: int, finished: list[tuple[int, int, int]]) -> None:
        self.slots = SimpleNamespace(count=count)
        self.completion_fd = -1
        self.finished = finished

    def reap(self):
        done, self.finished = self.finished, []
        return done


def test_each_slot_goes_to_its_disk_and_every_disk_is_answered_before_any_refills():
    pool = Pool(12, [(5, 0, 0), (1, 0, 0), (9, 1, 5), (6, 0, 0)])
    router = CompletionRouter(pool)
    calls = []
    shares = [SlotShare(pool, disk, base, 4) for disk, base in ((0, 0), (1, 4), (2, 8))]
    for share in shares:
        router.add(share)
        share.collect = lambda s=share: calls.append(("collect", s.disk, s.reap()))
        share.refill = lambda s=share: calls.append(("refill", s.disk))
    router.on_completions()
    assert calls == [("collect", 1, [(1, 0, 0), (2, 0, 0)]), ("collect", 0, [(1, 0, 0)]),
                     ("collect", 2, [(1, 1, 5)]),
                     ("refill", 1), ("refill", 0), ("refill", 2)]
