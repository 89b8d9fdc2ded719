"""Batched UDP receive/send on loopback."""

from __future__ import annotations

import socket
import time

from dataplane.shells.mmsg import BatchReceiver, BatchSender


def test_batch_round_trip():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port = rx.getsockname()[1]
    items = [(f"datagram {i}".encode() * (i % 5 + 1), ("127.0.0.1", port)) for i in range(100)]
    assert BatchSender(tx, batch=32).send(items) == 100
    time.sleep(0.05)
    got = []
    recv = BatchReceiver(rx, batch=64)
    while len(got) < 100:
        batch = recv.recv()
        if not batch:
            break
        got.extend(batch)
    assert [d for d, _ in got] == [d for d, _ in items]
    assert all(src == b"\x7f\x00\x00\x01" for _, src in got)
    assert recv.recv() == []                      # nothing waiting: no block


def test_batch_sender_edge_cases():
    """A datagram longer than the slots goes alone; one the kernel refuses
    (too big for UDP; port 0) is skipped, and the rest of the batch still goes."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    dst = rx.getsockname()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    items = [(b"a" * 10, dst), (b"b" * 5000, dst), (b"c" * 70000, dst), (b"x", ("127.0.0.1", 0)),
             (b"d" * 20, dst)]
    assert BatchSender(tx, batch=4, size=4096).send(items) == 3
    rx.settimeout(1.0)
    got = sorted(rx.recv(65535)[:1] for _ in range(3))
    assert got == [b"a", b"b", b"d"]
