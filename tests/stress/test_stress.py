"""Random concurrent workloads against a real backend, every read checked against a model.

Each case is one guest (a BlkClient with its own RAM) on its own backend and image, so
``pytest -n 4`` runs four guests at once. The workload is drawn from the case's seed; a failure
prints it, and ``VBLK_STRESS_SEED=<seed>`` replays that stream. ``VBLK_STRESS_OPS`` sets the
number of operations per case. After the run the whole image is checked on the host as well.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from vblk.testing.frontend import DEFAULT_FEATURES, BlkClient
from vblk.testing.model import DiskModel, Workload, pattern, run_stress, sector_pattern, write_initial_image
from vblk.virtio.constants import SECTOR_SIZE, BlkStatus, BlkType, Feature

MiB = 1 << 20
IMAGE_SECTORS = 64 * MiB // SECTOR_SIZE
DEFAULT_OPS = 40_000               # ~13 s per qsd case with four cases at once on two cores
HOST_CHECK_CHUNK = 2048            # sectors per host read in the final check


@dataclass(frozen=True)
class Case:
    name: str
    seed: int
    qd: int
    indirect_share: float = 0.0
    max_segments: int = 1
    event_idx: bool = True
    split_ram: bool = False        # two memory regions; data buffers straddle the boundary
    mem_slots: bool | None = None  # None: ADD_MEM_REG when offered, False: SET_MEM_TABLE


CASES = [
    Case("qd16", 1001, 16),
    Case("qd16-indirect-split", 2002, 16, indirect_share=0.5, max_segments=4),
    # Direct chains only: qsd 7.2 kills the connection on an indirect table whose buffer spans
    # a region boundary (see test_frontend_qsd.py).
    Case("qd8-two-regions-mem-table", 3003, 8, max_segments=3, split_ram=True, mem_slots=False),
    Case("qd4-no-event-idx", 4004, 4, event_idx=False, indirect_share=0.25, max_segments=2),
]


@pytest.mark.stress
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_random_workload_matches_the_model(backend_server, case: Case, tmp_path: Path):
    seed = int(os.environ.get("VBLK_STRESS_SEED", case.seed))
    ops = int(os.environ.get("VBLK_STRESS_OPS", DEFAULT_OPS))
    salt = (seed * 2654435761) & 0xFFFFFFFF
    image = tmp_path / "stress.img"
    write_initial_image(str(image), IMAGE_SECTORS, salt)
    sock = backend_server(image)
    model = DiskModel(IMAGE_SECTORS, salt)
    workload = Workload(seed, IMAGE_SECTORS, indirect_share=case.indirect_share,
                        max_segments=case.max_segments)
    features = DEFAULT_FEATURES if case.event_idx else DEFAULT_FEATURES & ~Feature.RING_EVENT_IDX.mask
    with BlkClient.connect(sock, ram_mib=32, split_at=[MiB] if case.split_ram else (),
                           mem_slots=case.mem_slots, features=features) as client:
        report = run_stress(client, model, workload, ops, qd=case.qd, seed=seed)
        flushed = client.flush().status
    print(report.summary())
    replay = f"replay: VBLK_STRESS_SEED={seed} VBLK_STRESS_OPS={ops} pytest -k '{case.name}'"
    problems = report.bad_status[:10] + report.mismatches[:10]
    assert not problems, f"{report.summary()}\n{replay}\n" + "\n".join(problems)
    assert flushed == BlkStatus.OK
    host_errors = check_image(image, model)
    assert not host_errors, f"image on the host disagrees ({replay}):\n" + "\n".join(host_errors[:10])


def check_image(image: Path, model: DiskModel) -> list[str]:
    """Every sector of the image file, checked against the (quiet) model."""
    errors: list[str] = []
    with open(image, "rb") as f:
        for sector in range(0, model.nsectors, HOST_CHECK_CHUNK):
            count = min(HOST_CHECK_CHUNK, model.nsectors - sector)
            data = os.pread(f.fileno(), count * SECTOR_SIZE, sector * SECTOR_SIZE)
            errors += model.end_read(model.begin_read(sector, count), data)
    return errors


# -- the model on its own (fast, no backend) ----------------------------------------------------

def test_model_accepts_the_latest_write_and_rejects_stale_or_misplaced_data():
    model = DiskModel(64, salt=7)
    wid, data = model.begin_write(8, 2)
    model.end_write(wid, 8, 2, ok=True)
    assert model.end_read(model.begin_read(8, 2), data) == []
    [stale] = model.end_read(model.begin_read(8, 1), pattern(7, 0, 8, 1))
    assert "holds write 0, expected one of [1]" in stale
    [moved] = model.end_read(model.begin_read(9, 1), data[:512])
    assert "sector 8's data" in moved
    [junk] = model.end_read(model.begin_read(10, 1), b"\1" * 512)
    assert "garbage" in junk
    [salted] = model.end_read(model.begin_read(10, 1), sector_pattern(8, 0, 10))
    assert "garbage" in salted


def test_model_leaves_sectors_with_writes_in_flight_unchecked():
    model = DiskModel(64, salt=7)
    token = model.begin_read(0, 4)
    wid, _ = model.begin_write(2, 1)                 # submitted while the read is in flight
    assert model.end_read(token, b"\0" * 2048) != []  # sectors 0, 1, 3 are still checked
    assert model.unchecked_sectors == 1
    assert model.end_read(model.begin_read(2, 1), b"\0" * 512) == []
    model.end_write(wid, 2, 1, ok=True)
    assert model.end_read(model.begin_read(2, 1), pattern(7, wid, 2, 1)) == []


def test_model_allows_either_of_two_concurrent_writes_then_pins_what_it_saw():
    model = DiskModel(64, salt=7)
    w1, d1 = model.begin_write(0, 1)
    w2, d2 = model.begin_write(0, 1)
    model.end_write(w2, 0, 1, ok=True)
    model.end_write(w1, 0, 1, ok=True)
    assert model.candidates(0) == {w1, w2}
    assert model.end_read(model.begin_read(0, 1), d1) == []
    assert model.candidates(0) == {w1}
    assert model.end_read(model.begin_read(0, 1), d2) != []


def test_model_keeps_the_old_content_possible_after_a_failed_write():
    model = DiskModel(64, salt=7)
    wid, _ = model.begin_write(0, 1)
    model.end_write(wid, 0, 1, ok=False)
    assert model.candidates(0) == {0, wid}


def test_workload_is_reproducible_and_stays_inside_the_disk():
    a = Workload(5, 1000, max_bytes=64 * 1024, indirect_share=0.5, max_segments=4)
    b = Workload(5, 1000, max_bytes=64 * 1024, indirect_share=0.5, max_segments=4)
    ops = [a.next_op() for _ in range(2000)]
    assert ops == [b.next_op() for _ in range(2000)]
    kinds = {op.kind for op in ops}
    assert kinds == {BlkType.IN, BlkType.OUT, BlkType.FLUSH}
    for op in ops:
        if op.kind != BlkType.FLUSH:
            assert 1 <= op.count <= 128 and 0 <= op.sector and op.sector + op.count <= 1000
            assert 1 <= op.segments <= 4
