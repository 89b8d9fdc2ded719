"""Source NAT with port allocation, its mappings mirrored like any flow state.

Theory of operation. The first client-to-server packet of a TCP or UDP flow
(IPv4) gets a *mapping*: a public address and port from the pool, chosen by
this instance. Every forward packet leaves with its source rewritten to the
mapping; every reply comes back addressed to the mapping and leaves with its
destination rewritten to the client. Checksums (IPv4 header, TCP, UDP) are
fixed incrementally (RFC 1624) here, in `rewrite`, the only place bytes
change. The mapping is the flow's state: mirrored to the secondary when it
is made, so a promoted secondary translates the connection's packets to the
same public address and port and the server sees nothing happen. With sync
off the secondary has no mapping, makes a new one (a new port, from its own
share of the pool: see below), the server sees packets of a connection it
does not know and answers with a RST: the connection breaks. That is the
control.

Like Linux conntrack with loose TCP tracking, any forward packet but a RST
opens a mapping (not only a SYN): a NAT behind which the state is lost
shows it as a new port, not as silence. A reply with no mapping is a
`misdelivery` (counted once as a lost flow).

How replies find their flow. The ingress computed the affinity code and the
node's flow key on the original tuple, and replies carry the same code; but
the server answers the *translated* tuple. The egress keys its flows by the
packet it delivered (translated), so replies find it; they go back up the
chain by the egress' recorded previous hop (the NAT instance, or after its
failure the map's primary for the code, the secondary that holds the
mirrored mapping). At the NAT instance the node keeps an index from the
translated tuple (`translated(state)`) to the flow's key, for flows it leads
and for replicas, so the reply finds the mapping and is translated back.
Instances before the NAT see original tuples both ways, instances after it
translated tuples both ways: each keys a flow consistently.

Port allocation: who may hand out which (address, port). Two instances of
one NAT service must never hand out the same (address, port) for flows that
are live at the same time, or the server would see two connections as one.
The pool's port range is split into as many contiguous blocks as the service
has members (instances and spares, in topology order); instance *i* allocates
only from block *i*, on every pool address. So two live instances never
collide, without talking to each other. After a failover the promoted
secondary keeps the mappings it inherited (in the dead instance's block) and
allocates new ones from its own block: they cannot collide with inherited
ones. An instance also never allocates a tuple used by any flow it holds,
primary or replica (`in_use`). That covers the dead instance's return: it
rejoins as the secondary of the buckets it will lead, receives the flows of
those buckets by bulk sync (among them the flows it used to lead, whose
mappings are in its block and are still served by the former secondary),
and only then leads and allocates; an allocation in its block skips the
tuples those replicas use. What this does not cover: a flow in the dead
instance's block whose bucket meanwhile moved to a third instance (a
scale-out during the outage); the returning instance holds no replica of it
and may reuse its tuple. Ports are reused per server endpoint, as Linux
masquerading does: one (address, port) may serve connections to different
servers.

The state (20 bytes, versioned): version, protocol, client address and
port, public address and port, server address and port.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dataplane.core.packet import TCP, TCP_RST, UDP, Inner
from dataplane.core.services import FORWARD, Action, Verdict

STATE_VERSION = 1
_STATE = struct.Struct("!BB4sH4sH4sH")
TIMEOUTS = {TCP: 600.0, UDP: 120.0}
RST_TIMEOUT = 10.0
_CSUM = {TCP: 16, UDP: 6}
"""Offset of the checksum in each transport header."""

Translated = tuple[int, bytes, int, bytes, int]
"""(proto, lo_ip, lo_port, hi_ip, hi_port): a flow key without chain and code."""


@dataclass(slots=True)
class Mapping:
    """One flow's translation: client endpoint <-> public endpoint, to a server."""

    proto: int
    client: bytes
    client_port: int
    public: bytes
    public_port: int
    server: bytes
    server_port: int


def endpoints_key(proto: int, a: tuple[bytes, int], b: tuple[bytes, int]) -> Translated:
    """The node's flow key order (`dataplane.core.affinity.flow_endpoints`)."""
    lo, hi = (b, a) if b < a else (a, b)
    return proto, lo[0], lo[1], hi[0], hi[1]


class Nat:
    """Source NAT over a pool of public IPv4 addresses and a port range."""

    name = "nat"
    max_timeout = max(TIMEOUTS.values())

    def __init__(self, pool: list[str] | tuple[str, ...] = (), ports: list[int] | tuple[int, int] = (1024, 65535)) -> None:
        try:
            self.pool = [ipaddress.IPv4Address(a).packed for a in pool]
        except (ValueError, TypeError) as exc:
            raise ValueError(f"nat pool: {exc}") from None
        if not self.pool:
            raise ValueError("nat needs a pool of at least one public IPv4 address")
        if len(set(self.pool)) != len(self.pool):
            raise ValueError("nat pool lists an address twice")
        if (not isinstance(ports, (list, tuple)) or len(ports) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in ports)
                or not 1 <= ports[0] <= ports[1] <= 65535):
            raise ValueError(f"nat ports must be [first, last] within 1-65535, got {ports!r}")
        self.ports = (ports[0], ports[1])
        self.attach(0, 1, lambda t: False)

    def attach(self, index: int, count: int, in_use: Callable[[Translated], bool]) -> None:
        """This instance is `index` of the service's `count` members: its
        block of ports; `in_use` says whether a flow it holds uses a tuple."""
        first, last = self.ports
        size = (last - first + 1) // count
        if size < 1:
            raise ValueError(f"nat ports {first}-{last} cannot be split over {count} instances")
        self.block = (first + index * size, first + (index + 1) * size - 1)
        self.in_use = in_use
        self._cursor = 0

    # -- packets ------------------------------------------------------------------------

    def process(self, pkt: Inner, forward: bool, state: Any, now: float) -> tuple[Verdict, Any]:
        if pkt.family != 4 or pkt.proto not in TIMEOUTS or pkt.fragment:
            return Verdict(Action.DROP, "nat_unsupported"), state
        rst = pkt.proto == TCP and pkt.tcp_flags & TCP_RST
        if not forward:
            st: Mapping | None = state
            if st is None or pkt.dst != st.public or pkt.dport != st.public_port:
                return Verdict(Action.DROP, "misdelivery"), state
            return (Verdict(Action.FORWARD, timeout=RST_TIMEOUT) if rst else FORWARD), st
        if state is not None:
            return (Verdict(Action.FORWARD, timeout=RST_TIMEOUT) if rst else FORWARD), state
        if rst:
            return Verdict(Action.DROP, "misdelivery"), None
        st = self._allocate(pkt)
        if st is None:
            return Verdict(Action.DROP, "nat_exhausted"), None
        return Verdict(Action.FORWARD, mirror=True, timeout=TIMEOUTS[pkt.proto]), st

    def _allocate(self, pkt: Inner) -> Mapping | None:
        first, last = self.block
        size = last - first + 1
        total = size * len(self.pool)
        server = (pkt.dst, pkt.dport)
        for k in range(total):
            j = (self._cursor + k) % total
            public, port = self.pool[j // size], first + j % size
            if not self.in_use(endpoints_key(pkt.proto, (public, port), server)):
                self._cursor = j + 1
                return Mapping(pkt.proto, pkt.src, pkt.sport, public, port, pkt.dst, pkt.dport)
        return None

    def translated(self, st: Mapping) -> Translated:
        """The flow's tuple on the server side: what its replies carry."""
        return endpoints_key(st.proto, (st.public, st.public_port), (st.server, st.server_port))

    def rewrite(self, st: Mapping, forward: bool, packet: bytes) -> bytes:
        """The packet as it leaves: source -> public (forward), destination ->
        client (reverse), checksums adjusted."""
        buf = bytearray(packet)
        l4 = (buf[0] & 0x0F) * 4
        if forward:
            ip_at, port_at = 12, l4
            old, new = (st.client, st.client_port), (st.public, st.public_port)
        else:
            ip_at, port_at = 16, l4 + 2
            old, new = (st.public, st.public_port), (st.client, st.client_port)
        old_bytes = old[0] + old[1].to_bytes(2, "big")
        new_bytes = new[0] + new[1].to_bytes(2, "big")
        buf[ip_at:ip_at + 4] = new[0]
        buf[port_at:port_at + 2] = new_bytes[4:]
        struct.pack_into("!H", buf, 10, adjust(struct.unpack_from("!H", buf, 10)[0], old[0], new[0]))
        at = l4 + _CSUM[st.proto]
        if at + 2 <= len(buf):
            csum = struct.unpack_from("!H", buf, at)[0]
            if st.proto == TCP or csum:  # a UDP checksum of 0 means none
                csum = adjust(csum, old_bytes, new_bytes)
                struct.pack_into("!H", buf, at, 0xFFFF if st.proto == UDP and csum == 0 else csum)
        return bytes(buf)

    # -- state on the wire --------------------------------------------------------------

    def encode_state(self, st: Mapping) -> bytes:
        return _STATE.pack(STATE_VERSION, st.proto, st.client, st.client_port, st.public,
                           st.public_port, st.server, st.server_port)

    def decode_state(self, data: bytes) -> Mapping:
        if len(data) != _STATE.size:
            raise ValueError(f"nat state is {_STATE.size} bytes, got {len(data)}")
        version, proto, client, cport, public, pport, server, sport = _STATE.unpack(data)
        if version != STATE_VERSION:
            raise ValueError(f"nat state version {version}, expected {STATE_VERSION}")
        if proto not in TIMEOUTS:
            raise ValueError(f"nat state of protocol {proto}")
        if public not in self.pool or not self.ports[0] <= pport <= self.ports[1]:
            raise ValueError("nat state maps outside this service's pool")
        return Mapping(proto, client, cport, public, pport, server, sport)


def adjust(csum: int, old: bytes, new: bytes) -> int:
    """An Internet checksum after `old` bytes (even length) became `new`
    (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m'))."""
    s = ~csum & 0xFFFF
    for i in range(0, len(old), 2):
        s += (~((old[i] << 8) | old[i + 1]) & 0xFFFF) + ((new[i] << 8) | new[i + 1])
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
