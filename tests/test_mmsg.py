"""Batched UDP receive/send on loopback."""

from __future__ import annotations

import socket
import time

from dataplane.mmsg import BatchReceiver, BatchSender


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
    assert all(src == "127.0.0.1" for _, src in got)
    assert recv.recv() == []                      # nothing waiting: no block
