"""Resend what went to an instance in the moments before it was declared dead.

Between a primary's death and the map that says so (the detection time),
every packet sent to it is lost. A TCP sender then waits for its
retransmission timer (200 ms at least on Linux), so the connection stalls
long after the map has moved the flow. This buffer keeps every packet this
node sent on the fabric for `window` seconds (a little longer than the
detection time); when a new map declares a hop dead, the packets sent to it
within the window are sent again, header rewritten (new epoch, REROUTED), to
the instance the new map makes primary for the same service and code. The
flow's first packet at the promoted instance then arrives right after the
map instead of after a retransmission.

What it costs: one deque append per packet sent, and a few packets that the
dead instance did forward before dying arrive twice (TCP ignores them; a UDP
application sees a duplicate as it would from the network). Hops that die
for other reasons than a map (a partition the map does not reflect) are not
retried: only the map decides who is dead.

`reroute` runs inside the map install, so it never raises: a kept packet it
cannot read again (`bad`) or route (`unroutable`) is counted and left out.
"""

from __future__ import annotations

from collections import deque

from dataplane.core import header as wire
from dataplane.core.events import Send
from dataplane.core.servicemap import MapError, ServiceMap

_REROUTED = int(wire.Flags.REROUTED)


class ResendBuffer:
    """The last `window` seconds of fabric sends of one node."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.sent: deque[tuple[float, str, bytes]] = deque()
        self.resent = 0
        self.unroutable = 0
        self.bad = 0

    def record(self, now: float, hop: str, data: bytes) -> None:
        self.sent.append((now, hop, data))

    def expire(self, now: float) -> None:
        sent, edge = self.sent, now - self.window
        while sent and sent[0][0] < edge:
            sent.popleft()

    def reroute(self, old: ServiceMap, new: ServiceMap, now: float) -> list[Send]:
        """The recent packets to hops alive in `old` and dead in `new`, sent
        again to each packet's new primary. Counted in `resent`; a packet
        whose service has no live instance left counts in `unroutable`, one
        whose header does not decode (TTL 0 included) in `bad`."""
        self.expire(now)
        # each hop asked once, not once per packet (0.6 us a packet)
        dead = {h for h in {h for _, h, _ in self.sent} if old.is_alive(h) and not new.is_alive(h)}
        if not dead:
            return []
        out, keep = [], deque()
        for item in self.sent:
            _, hop, data = item
            if hop not in dead:
                keep.append(item)
                continue
            try:
                h = wire.decode(data)
            except wire.HeaderError:
                self.bad += 1
                continue
            service = old.service_of(hop)
            try:
                target = new.primary(service, h.code) if service is not None else None
            except MapError:  # the service is gone from the new map
                target = None
            if target is None:
                self.unroutable += 1
                continue
            head = wire.pack(h.chain, h.index, h.code, h.client, new.epoch, h.flags | _REROUTED,
                             h.ttl, h.next_proto, words=h.length >> 2)
            out.append(Send(target, head + data[20:]))
        self.sent = keep
        self.resent += len(out)
        return out
