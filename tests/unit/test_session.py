"""The vhost-user session as a state machine: messages in, replies and host calls out."""
import os

import pytest

from vblk.device import BlkDevice, Geometry
from vblk.vhost_user import messages as m
from vblk.vhost_user.messages import FrontendReq as R
from vblk.vhost_user.session import DropConnection, Session


class RecordingHost:
    def __init__(self):
        self.calls = []
        self.last_avail = 7

    def set_memory(self, slots):
        self.calls.append(("memory", [s.region for s in slots]))

    def start_queue(self, vring, features):
        self.calls.append(("start", vring.index, vring.num, vring.base))

    def stop_queue(self, index):
        self.calls.append(("stop", index))
        return self.last_avail

    def set_call(self, index, fd):
        self.calls.append(("call", index, fd is not None))

    def get_inflight(self, num_queues, queue_size):
        fd = os.memfd_create("inflight", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4096)
        self.calls.append(("get_inflight", num_queues, queue_size))
        return fd, 4096

    def set_inflight(self, fd, size, offset, num_queues, queue_size):
        self.calls.append(("set_inflight", fd is not None, size, num_queues, queue_size))

    def set_log(self, fd, size, offset):
        self.calls.append(("log", fd is not None, size, offset))

    def set_logging(self, on):
        self.calls.append(("logging", on))


def new_session():
    dev = BlkDevice(Geometry(1 << 30, serial=b"S" * 20), writeback=False)
    host = RecordingHost()
    return Session(dev, host), host


def send(session, req, payload=b"", fds=(), need_reply=False):
    flags = m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0)
    reply = session.handle(m.Header(req, flags, len(payload)), payload, list(fds))
    return _body(req, reply)


def refused(session, req, payload=b"", fds=(), need_reply=False):
    """Send a message vblk must refuse: the connection is dropped, with a nack if asked."""
    flags = m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0)
    with pytest.raises(DropConnection) as info:
        session.handle(m.Header(req, flags, len(payload)), payload, list(fds))
    return _body(req, info.value.reply)


def _body(req, reply):
    if reply is None:
        return None
    header = m.Header.unpack(reply[:12])
    assert header.flags == m.REPLY_FLAGS and header.request == req
    assert header.size == len(reply) - 12
    return reply[12:]


def eventfd():
    return os.eventfd(0, os.EFD_CLOEXEC)


def memfd(size=1 << 20):
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_features_offer_protocol_bit_and_version_1():
    s, _ = new_session()
    feats = m.U64.unpack(send(s, R.GET_FEATURES))[0]
    assert feats & (1 << 30) and feats & (1 << 32)
    proto = m.U64.unpack(send(s, R.GET_PROTOCOL_FEATURES))[0]
    assert proto & m.ProtocolFeature.CONFIG.mask
    assert proto & m.ProtocolFeature.REPLY_ACK.mask
    assert proto & m.ProtocolFeature.MQ.mask
    assert proto & m.ProtocolFeature.INFLIGHT_SHMFD.mask
    assert proto & m.ProtocolFeature.BACKEND_REQ.mask          # for resize notifications
    assert send(s, R.GET_QUEUE_NUM) == m.U64.pack(1)


def test_get_config_answers_exactly_the_size_asked():
    s, _ = new_session()
    for size in (36, 57, 60, 100):
        body = send(s, R.GET_CONFIG, m.ConfigMsg(0, size, 0, bytes(size)).pack())
        msg = m.ConfigMsg.unpack(body)
        assert msg.size == size and len(msg.data) == size
        assert int.from_bytes(msg.data[:8], "little") == (1 << 30) // 512


def test_set_config_switches_writeback_and_acks():
    s, _ = new_session()
    assert send(s, R.SET_CONFIG, m.ConfigMsg(32, 1, 0, b"\x01").pack(), need_reply=True) == m.U64.pack(0)
    assert s.device.writeback
    assert refused(s, R.SET_CONFIG, m.ConfigMsg(0, 8, 0, bytes(8)).pack(), need_reply=True) == m.U64.pack(1)


@pytest.mark.parametrize("req,payload,need_reply", [
    (99, b"", True),
    (99, b"", False),
    (R.SET_VRING_NUM, b"\x00" * 3, True),
    (R.SET_VRING_NUM, m.VringState(5, 64).pack(), True),
    (R.SET_VRING_NUM, m.VringState(0, 100).pack(), True),
    (R.SET_FEATURES, m.U64.pack(1 << 63), True),
    (R.SET_VRING_CALL, m.U64.pack(0x200), True),
])
def test_bad_messages_are_refused_with_a_nack_and_drop_the_frontend(req, payload, need_reply):
    s, _ = new_session()
    assert refused(s, req, payload, need_reply=need_reply) == (m.U64.pack(1) if need_reply else None)


def test_a_bad_message_with_a_reply_body_drops_without_a_nack():
    s, _ = new_session()
    assert refused(s, R.GET_VRING_BASE, b"\x01") is None
    assert refused(s, R.GET_CONFIG, m.CONFIG_HEAD.pack(0, 1000, 0)) is None


def test_fds_that_a_message_does_not_keep_are_closed():
    s, _ = new_session()
    before = open_fds()
    send(s, R.GET_FEATURES, fds=[eventfd(), eventfd()])
    refused(s, R.SET_VRING_KICK, m.U64.pack(0), fds=[eventfd(), eventfd()])    # two fds
    refused(s, R.SET_VRING_CALL, m.U64.pack(0x100), fds=[eventfd()])         # NOFD, yet an fd
    refused(s, R.SET_MEM_TABLE, m.pack_mem_table([m.MemRegion(0, 4096, 0, 0)]), fds=[memfd(), memfd()])
    assert open_fds() == before


def test_ring_starts_after_kick_and_stops_with_get_vring_base():
    s, host = new_session()
    send(s, R.SET_FEATURES, m.U64.pack(s.device.features))
    send(s, R.SET_MEM_TABLE, m.pack_mem_table([m.MemRegion(0, 1 << 20, 0x10000000, 0)]),
         fds=[memfd()], need_reply=True)
    send(s, R.SET_VRING_NUM, m.VringState(0, 64).pack())
    send(s, R.SET_VRING_BASE, m.VringState(0, 3).pack())
    send(s, R.SET_VRING_ADDR, m.VringAddr(0, 0, 0x10000000, 0x10002000, 0x10001000, 0).pack())
    send(s, R.SET_VRING_CALL, m.U64.pack(0), fds=[eventfd()])
    assert not any(c[0] == "start" for c in host.calls)
    send(s, R.SET_VRING_KICK, m.U64.pack(0), fds=[eventfd()])
    assert ("start", 0, 64, 3) in host.calls
    send(s, R.SET_VRING_ENABLE, m.VringState(0, 1).pack(), need_reply=True)
    assert sum(c[0] == "start" for c in host.calls) == 1
    body = send(s, R.GET_VRING_BASE, m.VringState(0, 0).pack())
    assert m.VringState.unpack(body) == m.VringState(0, 7)
    assert ("stop", 0) in host.calls
    s.close()


def test_enable_zero_keeps_a_ring_from_starting():
    s, host = new_session()
    send(s, R.SET_MEM_TABLE, m.pack_mem_table([m.MemRegion(0, 1 << 20, 0x10000000, 0)]), fds=[memfd()])
    send(s, R.SET_VRING_NUM, m.VringState(0, 64).pack())
    send(s, R.SET_VRING_ADDR, m.VringAddr(0, 0, 0x10000000, 0x10002000, 0x10001000, 0).pack())
    send(s, R.SET_VRING_ENABLE, m.VringState(0, 0).pack())
    send(s, R.SET_VRING_KICK, m.U64.pack(0), fds=[eventfd()])
    assert not any(c[0] == "start" for c in host.calls)
    send(s, R.SET_VRING_ENABLE, m.VringState(0, 1).pack())
    assert any(c[0] == "start" for c in host.calls)
    s.close()


def test_memory_regions_add_and_remove():
    s, host = new_session()
    r1 = m.MemRegion(0, 1 << 20, 0x10000000, 0)
    r2 = m.MemRegion(1 << 20, 1 << 20, 0x20000000, 0)
    assert send(s, R.GET_MAX_MEM_SLOTS) == m.U64.pack(m.MAX_MEM_SLOTS)
    assert send(s, R.ADD_MEM_REG, m.pack_single_region(r1), fds=[memfd()], need_reply=True) == m.U64.pack(0)
    assert send(s, R.ADD_MEM_REG, m.pack_single_region(r2), fds=[memfd()], need_reply=True) == m.U64.pack(0)
    assert host.calls[-1] == ("memory", [r1, r2])
    overlapping = m.MemRegion(0x1000, 4096, 0x30000000, 0)
    host.set_memory = lambda slots: __import__("vblk.memory").memory.check_table([x.region for x in slots])
    assert refused(s, R.ADD_MEM_REG, m.pack_single_region(overlapping), fds=[memfd()],
                   need_reply=True) == m.U64.pack(1)
    assert len(s.memory) == 2
    assert send(s, R.REM_MEM_REG, m.pack_single_region(r1), need_reply=True) == m.U64.pack(0)
    assert [x.region for x in s.memory] == [r2]
    s.close()
    assert s.memory == []


def test_inflight_fd_is_created_handed_over_and_taken_back():
    s, host = new_session()
    body = send(s, R.GET_INFLIGHT_FD, m.Inflight(0, 0, 1, 128).pack())
    reply = m.Inflight.unpack(body)
    assert (reply.mmap_size, reply.num_queues, reply.queue_size) == (4096, 1, 128)
    [fd] = s.take_reply_fds()
    assert send(s, R.SET_INFLIGHT_FD, reply.pack(), fds=[fd], need_reply=True) == m.U64.pack(0)
    assert ("set_inflight", True, 4096, 1, 128) in host.calls
    bad = m.Inflight(4096, 0, 2, 128).pack()          # more queues than the device has
    assert refused(s, R.SET_INFLIGHT_FD, bad, fds=[memfd()], need_reply=True) == m.U64.pack(1)
    assert refused(s, R.GET_INFLIGHT_FD, m.Inflight(0, 0, 1, 100).pack()) is None
    s.close()


# -- the backend channel (BACKEND_REQ, SET_BACKEND_REQ_FD, CONFIG_CHANGE_MSG) ---------------

def negotiated(protocol):
    s, host = new_session()
    send(s, R.SET_PROTOCOL_FEATURES, m.U64.pack(protocol))
    return s


def socket_end():
    import socket
    a, b = socket.socketpair()
    return a, b.detach()


def test_backend_req_fd_is_kept_and_acked_once_negotiated():
    s = negotiated(m.ProtocolFeature.BACKEND_REQ.mask | m.ProtocolFeature.REPLY_ACK.mask)
    ours, theirs = socket_end()
    assert send(s, R.SET_BACKEND_REQ_FD, b"", [theirs], need_reply=True) == m.U64.pack(0)
    assert s.backend_req_fd == theirs
    fd, message = s.config_change()
    assert fd == theirs
    os.write(fd, message)
    assert ours.recv(64) == message
    ours.close()
    s.close()


def test_backend_req_fd_is_refused_without_the_feature_and_the_fd_closed():
    s = negotiated(m.ProtocolFeature.REPLY_ACK.mask)
    before = open_fds()
    ours, theirs = socket_end()
    assert refused(s, R.SET_BACKEND_REQ_FD, b"", [theirs], need_reply=True) == m.U64.pack(1)
    assert s.backend_req_fd is None and s.config_change() is None
    with pytest.raises(OSError):
        os.fstat(theirs)                       # the session closed it
    ours.close()
    assert open_fds() == before


def test_backend_req_fd_without_an_fd_is_refused():
    s = negotiated(m.ProtocolFeature.BACKEND_REQ.mask)
    refused(s, R.SET_BACKEND_REQ_FD, b"")
    assert s.backend_req_fd is None


def test_a_new_backend_req_fd_closes_the_old_one_and_close_closes_the_last():
    s = negotiated(m.ProtocolFeature.BACKEND_REQ.mask)
    before = open_fds()
    ours1, first = socket_end()
    ours2, second = socket_end()
    send(s, R.SET_BACKEND_REQ_FD, b"", [first])
    send(s, R.SET_BACKEND_REQ_FD, b"", [second])
    assert s.backend_req_fd == second
    assert ours1.recv(1) == b""                # the old end was closed: its peer sees EOF
    s.close()
    assert s.backend_req_fd is None
    assert ours2.recv(1) == b""
    ours1.close()
    ours2.close()
    assert open_fds() == before


def test_no_config_change_without_a_channel():
    s = negotiated(m.ProtocolFeature.BACKEND_REQ.mask)
    assert s.config_change() is None           # negotiated, but no fd handed over yet


def test_config_change_message_is_a_bare_header_without_need_reply():
    raw = m.encode_config_change()
    assert raw == bytes.fromhex("020000000100000000000000")
    header = m.Header.unpack(raw)
    assert header.request == m.BackendReq.CONFIG_CHANGE_MSG == 2
    assert header.flags == m.VERSION and not header.need_reply
    assert header.size == 0


def test_get_config_follows_a_device_resize():
    s, _ = new_session()
    s.device.resize(1 << 20)
    body = send(s, R.GET_CONFIG, m.ConfigMsg(0, 57, 0, bytes(57)).pack())
    assert int.from_bytes(m.ConfigMsg.unpack(body).data[:8], "little") == (1 << 20) // 512
