"""The exact-match cache must never change what a node does.

Two nodes of the same instance, one with the cache and one without, get the
same random stream of packets and events (handshakes, data in both
directions, window jumps past the sync stride, out-of-window segments, FIN,
RST, new SYNs, UDP both ways, another upstream, older epochs, map changes,
mirrored updates from a peer, idle expiry and LRU eviction from a small
table), and now and then, right behind a packet, a copy the cache must refuse
although its header, addresses and ports match the cached packet's: cut short, its transport header
truncated or with a data offset out of range, an IP fragment (MF set, offset
non-zero), or the other protocol (UDP with a TCP flow's addresses and ports,
and the reverse). After every step their outputs must be equal, and at the
end their counters and flow tables.
"""

from __future__ import annotations

import random
import struct

import pytest

from dataplane.core import header as wire
from dataplane.core.events import Send
from dataplane.core.node import ServiceNode
from dataplane.core.servicemap import InstanceState
from dataplane.core.services import create
from tests.conftest import codes_led_by, pair_map, tcp, udp

CLIENT, SERVER = "10.1.0.10", "10.2.0.10"


class Flow:
    """One scripted stream: ports, protocol, each side's next sequence number."""

    def __init__(self, rng: random.Random, code: int, proto: str, sport: int) -> None:
        self.code, self.proto, self.sport = code, proto, sport
        self.c, self.s = rng.randrange(1 << 32), rng.randrange(1 << 32)
        self.step = 0  # TCP: 0 SYN, 1 SYN/ACK, 2 ACK, 3 established

    def packet(self, rng: random.Random) -> tuple[bytes, bool]:
        """(inner packet, client-to-server?)."""
        if self.proto == "udp":
            fwd = rng.random() < 0.6
            a, b = (CLIENT, SERVER) if fwd else (SERVER, CLIENT)
            pa, pb = (self.sport, 53) if fwd else (53, self.sport)
            return udp(a, b, pa, pb, payload=b"u" * rng.randrange(0, 40)), fwd
        if self.step < 3:
            self.step += 1
            if self.step == 1:
                return self._seg(True, "S", 0), True
            if self.step == 2:
                return self._seg(False, "SA", 0), False
            return self._seg(True, "A", 0), True
        fwd = rng.random() < 0.6
        r = rng.random()
        if r < 0.03:
            self.step = 0
            return self._seg(fwd, rng.choice(["F", "FA", "R", "RA", "S", "SA"]), 0), fwd
        if r < 0.06:  # a jump past the sync stride (the firewall must mirror)
            if fwd:
                self.c = (self.c + 700_000) % (1 << 32)
            else:
                self.s = (self.s + 700_000) % (1 << 32)
        if r < 0.08:  # far outside the window
            return self._seg(fwd, "A", 10, off=1 << 31), fwd
        return self._seg(fwd, rng.choice(["A", "PA"]), rng.choice([0, 1, 100, 1400])), fwd

    def _seg(self, fwd: bool, flags: str, size: int, off: int = 0) -> bytes:
        seq, ack = (self.c, self.s) if fwd else (self.s, self.c)
        a, b = (CLIENT, SERVER) if fwd else (SERVER, CLIENT)
        pa, pb = (self.sport, 80) if fwd else (80, self.sport)
        data = tcp(a, b, pa, pb, flags=flags, seq=(seq + off) % (1 << 32), ack=ack if "A" in flags else 0,
                   payload=b"p" * size)
        used = size + (1 if "S" in flags or "F" in flags else 0)
        if fwd:
            self.c = (self.c + used) % (1 << 32)
        else:
            self.s = (self.s + used) % (1 << 32)
        return data


def mangle(rng: random.Random, data: bytes, flow: Flow, fwd: bool) -> bytes:
    """A copy of the flow's inner packet `data` that the full path must not
    treat as the packet it was: each of the cache's validity checks (length,
    transport header, fragment, protocol) has a case here it alone refuses."""
    pkt = bytearray(data)
    how = rng.choice(["cut", "short", "short_cut", "offset", "mf", "fragment", "protocol"])
    if how == "cut":  # fewer bytes than the IP total length says
        return bytes(pkt[:rng.randrange(21, len(pkt))])
    if how == "short":  # an IP length too short for its headers, the rest padding
        struct.pack_into("!H", pkt, 2, rng.choice([rng.randrange(0, 24), rng.randrange(24, 60)]))
        return bytes(pkt)
    if how == "short_cut":  # the same without the padding: the TCP header itself cut
        total = rng.randrange(24, 40)
        struct.pack_into("!H", pkt, 2, total)
        return bytes(pkt[:total])
    if how == "offset" and flow.proto == "tcp":
        if rng.random() < 0.5:  # a data offset below 5 words
            pkt[32] = (pkt[32] & 0x0F) | (rng.randrange(0, 5) << 4)
            return bytes(pkt)
        seg = rng.randrange(20, 60)  # a data offset past the segment's end
        pkt = (pkt + bytes(60))[:20 + seg]
        struct.pack_into("!H", pkt, 2, 20 + seg)
        pkt[32] = (pkt[32] & 0x0F) | (rng.randrange(seg // 4 + 1, 16) << 4)
        return bytes(pkt)
    if how == "mf":
        pkt[6] |= 0x20
        return bytes(pkt)
    if how == "fragment":  # a later fragment whose first bytes look like ports
        struct.pack_into("!H", pkt, 6, rng.choice([0, 0x2000]) | rng.choice([1, 0xB9, 0x100, 0x1FFF]))
        return bytes(pkt)
    # the other protocol with the flow's addresses and ports
    a, b = (CLIENT, SERVER) if fwd else (SERVER, CLIENT)
    pa, pb = struct.unpack_from("!HH", data, 20)
    if flow.proto == "tcp":
        return udp(a, b, pa, pb, payload=b"x" * rng.randrange(0, 40))
    return tcp(a, b, pa, pb, flags=rng.choice(["A", "PA", "S"]), payload=b"x" * rng.randrange(0, 40))


def _same(a: ServiceNode, b: ServiceNode) -> None:
    counters = dict(a.counters)
    counters.pop("fast_path", None)   # the one counter only the cached node keeps
    assert "fast_path" not in b.counters
    assert counters == dict(b.counters)
    assert dict(a.drops) == dict(b.drops)
    assert dict(a.flows.counters) == dict(b.flows.counters)
    rows = [[(e.key, e.version, a.service.encode_state(e.state) if e.state is not None else b"",
              e.fwd_hop, e.prev_hop, e.packets, e.rev_packets, e.bytes, e.last_seen, e.timeout,
              e.replica, e.promoted) for e in n.flows] for n in (a, b)]
    assert rows[0] == rows[1]


RULES = [{"name": "exfil", "pattern": "SECRET-TOKEN"}]


@pytest.mark.parametrize("kind,options", [("firewall", {}), ("inspection", {"inspect_limit": 3000}),
                                          ("inspection", {"inspect_limit": 3000, "rules": RULES}),
                                          ("passthrough", {})],
                         ids=["firewall", "inspection", "inspection-rules", "passthrough"])
@pytest.mark.parametrize("seed", range(4))
def test_cache_gives_the_same_results_as_the_full_path(kind, options, seed):
    """With rules, a direction past its inspect limit takes the cache while
    the other is still reassembled (its acks still count)."""
    rng = random.Random(seed)
    m = pair_map()
    cached = ServiceNode("ba", m, create(kind, **options), capacity=10)
    full = ServiceNode("ba", m, create(kind, **options), capacity=10, exact_match=False)
    codes = codes_led_by(m, "ba", 11)
    flows = [Flow(rng, codes[i], "udp" if i % 3 == 0 else "tcp", 20000 + i) for i in range(11)]
    weights = [1.0] * 10 + [0.02]  # the eleventh flow evicts one now and then
    now = 0.0
    for _ in range(1500):
        r = rng.random()
        if r < 0.01:  # idle time, then expiry
            now += rng.choice([5.0, 40.0, 700.0])
            assert cached.expire(now) == full.expire(now)
            continue
        if r < 0.02:  # a map change: the secondary dies or comes back
            new = cached.map.copy()
            bb = new.services["B"]["bb"]
            new.set_state("bb", InstanceState.ACTIVE if bb.state == InstanceState.DEAD else InstanceState.DEAD)
            assert cached.update_map(new, now) == full.update_map(new, now)
            continue
        if r < 0.03 and len(full.flows):  # an update mirrored from a peer
            entry = rng.choice(list(full.flows))
            update = full.update_of(entry)
            update.version += rng.choice([0, 1])
            assert cached.apply_update(update, now) == full.apply_update(update, now)
            continue
        now += 0.001
        flow = rng.choices(flows, weights)[0]
        inner, fwd = flow.packet(rng)
        epoch = cached.map.epoch - (1 if rng.random() < 0.05 else 0)
        head = wire.pack(1, 1, flow.code, 1, epoch, 0 if fwd else int(wire.Flags.REVERSE),
                         rng.choice([63, 63, 63, 2]))
        src = ("ingress" if rng.random() < 0.95 else "elsewhere") if fwd else "egress"
        a, b = cached.from_fabric(head + inner, src, now), full.from_fabric(head + inner, src, now)
        assert a == b
        if rng.random() < 0.02:  # right behind it, while its cache entry is fresh
            odd = head + mangle(rng, inner, flow, fwd)
            assert cached.from_fabric(odd, src, now) == full.from_fabric(odd, src, now)
    _same(cached, full)
    print(kind, cached.counters["fast_path"], cached.counters["forwarded"])
    # with rules most packets are reassembled (this stream's jumps are drops), few are cached;
    # the odd packets' own flows (fragments, the other protocol) evict real ones from the
    # small table, and each removal invalidates the cache
    assert cached.counters["fast_path"] > cached.counters["forwarded"] * (0.02 if "rules" in options else 0.2)


def test_cache_hit_rewrites_the_header_only():
    """A hit sends the cached output header and the inner packet untouched,
    to the pinned hop, and counts itself."""
    m = pair_map()
    node = ServiceNode("ba", m, create("firewall"))
    code = codes_led_by(m, "ba")[0]
    pkt = wire.pack(1, 1, code, 1, m.epoch) + udp(payload=b"hello")
    first = node.from_fabric(pkt, "ingress", 0.0)
    second = node.from_fabric(pkt, "ingress", 0.1)
    assert node.counters["fast_path"] == 1
    assert [e for e in first if isinstance(e, Send)] == second
    h = wire.decode(second[0].data)
    assert (h.index, h.ttl, h.epoch, second[0].to) == (0, wire.DEFAULT_TTL - 1, m.epoch, "egress")
    assert second[0].data[20:] == pkt[20:]
