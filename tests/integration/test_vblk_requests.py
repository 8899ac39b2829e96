"""vblk-specific behaviour seen through the Python frontend over a real socket and workers."""
import hashlib
import os

import pytest

from vblk.testing.frontend import BlkClient
from vblk.virtio.constants import BlkStatus, BlkType, Feature

MiB = 1 << 20


def make_image(path, size=8 * MiB, pattern=True):
    with open(path, "wb") as f:
        if pattern:
            for i in range(size // 4096):
                f.write(i.to_bytes(4, "little") * 1024)
        else:
            f.truncate(size)
    return path


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_read_only_disk_refuses_writes_and_is_untouched(tmp_path, vblk_server):
    image = make_image(tmp_path / "ro.img")
    before = digest(image)
    with BlkClient.connect(vblk_server(image, "--ro")) as c:
        assert c.frontend.features & Feature.BLK_RO.mask
        assert c.write(0, b"x" * 512).status == BlkStatus.IOERR
        assert c.write(8, b"y" * 4096).status == BlkStatus.IOERR
        assert c.flush().status == BlkStatus.OK
        assert c.read(8, 4096).data == (1).to_bytes(4, "little") * 1024
    assert digest(image) == before
    assert os.stat(image).st_size == 8 * MiB


def test_nocache_serves_aligned_and_misaligned_guest_buffers(tmp_path, vblk_server):
    image = make_image(tmp_path / "direct.img", pattern=False)
    with BlkClient.connect(vblk_server(image, "--nocache")) as c:
        data = os.urandom(8192)
        assert c.write(16, data).status == BlkStatus.OK
        # a guest buffer at an odd address forces the bounce path under O_DIRECT
        odd = c.allocator.alloc(8192 + 512) + 3
        done = c._run(c.submit(BlkType.IN, 16, nbytes=8192, data_gpa=odd))
        assert done.status == BlkStatus.OK
        assert c.ram.read(odd, 8192) == data
        c.ram.write(odd, data[::-1])
        assert c._run(c.submit(BlkType.OUT, 64, data=data[::-1], data_gpa=odd)).status == BlkStatus.OK
    with open(image, "rb") as f:
        assert f.read()[16 * 512:16 * 512 + 8192] == data
        f.seek(64 * 512)
        assert f.read(8192) == data[::-1]


def test_serial_is_stable_for_an_image_and_can_be_overridden(tmp_path, vblk_server):
    image = make_image(tmp_path / "id.img", pattern=False)
    server = vblk_server(image)
    with BlkClient.connect(server) as c:
        first = c.get_id().data
    server.stop()
    with BlkClient.connect(vblk_server(image, "--workers", "2")) as c:
        assert c.get_id().data == first
    assert len(first) == 20 and first.startswith(b"VBLK-")
    other = make_image(tmp_path / "other.img", pattern=False)
    with BlkClient.connect(vblk_server(other, "--serial", "disk-7")) as c:
        assert c.get_id().data == b"disk-7".ljust(20, b"\0")


def test_range_window_keeps_every_request_inside(tmp_path, vblk_server):
    image = make_image(tmp_path / "win.img", size=4 * MiB)
    before = open(image, "rb").read()
    start, size = MiB, 2 * MiB
    with BlkClient.connect(vblk_server(image, "--range", f"{start}/{size}")) as c:
        assert c.config.capacity == size // 512
        assert c.read(0, 4096).data == before[start:start + 4096]
        assert c.write(size // 512 - 8, b"\xaa" * 4096).status == BlkStatus.OK
        assert c.write(size // 512, b"\xbb" * 512).status == BlkStatus.IOERR
        assert c.write(size // 512 - 1, b"\xbb" * 1024).status == BlkStatus.IOERR
        assert c.read(2 ** 55, 512).status == BlkStatus.IOERR
    after = open(image, "rb").read()
    assert after[:start] == before[:start]
    assert after[start + size:] == before[start + size:]
    assert after[start + size - 4096:start + size] == b"\xaa" * 4096


@pytest.mark.parametrize("queue_size", [1, 2, 256, 1024])
def test_any_power_of_two_queue_size(tmp_path, vblk_server, queue_size):
    image = make_image(tmp_path / "q.img", pattern=False)
    # rings of 1 and 2 entries hold a 3-descriptor request only as an indirect chain
    with BlkClient.connect(vblk_server(image, "--slots", "4"), queue_size=queue_size,
                           ram_mib=64, indirect=queue_size < 4) as c:
        tags = []
        for i in range(min(queue_size, 64)):
            tags.append(c.submit(BlkType.OUT, i * 8, data=bytes([i]) * 4096, publish=False))
        c.publish()
        done = c.wait(len(tags), timeout=20)
        assert sorted(d.tag for d in done) == sorted(tags)
        assert all(d.status == BlkStatus.OK for d in done)
        for i in range(min(queue_size, 64)):
            assert c.read(i * 8, 4096).data == bytes([i]) * 4096
