"""The simulator's hosts build packets a real host would accept."""

from __future__ import annotations

import random

from dataplane.core.packet import parse, transport_checksum_ok
from dataplane.sim.clock import Clock
from dataplane.sim.workload import ICMP, TCP, UDP, Workload


def test_every_packet_a_client_sends_carries_a_right_checksum():
    sent: list[bytes] = []
    w = Workload(Clock(), random.Random(1), lambda edge, data: sent.append(data))
    for proto in (TCP, UDP, ICMP):
        c = w.open(proto)
        c.step = 1  # a data packet, not only the SYN
        sent.append(w._packet(c))
    assert len(sent) == 6
    for data in sent:
        p = parse(data)
        assert transport_checksum_ok(p), p.proto
        assert w.flow_of(data) is not None
