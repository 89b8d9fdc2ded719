"""Seeded traffic through the simulated mesh, and hosts that check what arrives.

Clients (behind the ingress) open TCP connections (handshake, data both
ways, FIN exchange), UDP exchanges and ICMP echo sequences to servers
(behind the egress). Every connection runs lock-step: the client sends one
packet, the server answers it, and only then the next packet leaves; an
unanswered packet is sent again after `RTO` (as TCP and a UDP application
retry), up to `TRIES` times, after which the connection has *failed*. The
sequence numbers and payloads are exact, so an endpoint can tell each
packet it receives: one for an address and port it has no connection on, or
whose payload names another connection, is a *misdelivery*. Packets are
built with `struct` (Scapy would make a run ten times slower), with
their TCP and UDP checksums (the IP header's is left zero: nothing checks it).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from dataplane.sim.clock import Clock

TCP, UDP, ICMP = 6, 17, 1
SYN, FIN, PSH, ACK = 0x02, 0x01, 0x08, 0x10
RTO = 0.200
TRIES = 12
"""How many times a packet is sent before its connection gives up (2.4 s)."""
CLIENTS = [f"10.1.0.{10 + i}" for i in range(8)]
SERVERS = [f"10.2.0.{10 + i}" for i in range(3)]
INGRESS_EDGE, EGRESS_EDGE = "ingress", "egress"
SendToEdge = Callable[[str, bytes], None]
"""send(edge node, inner packet): a host hands a packet to its edge node."""

_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ICMP = struct.Struct("!BBHHH")


def _ip(src: bytes, dst: bytes, proto: int, l4: bytes) -> bytes:
    """An IPv4 packet around `l4`, its TCP or UDP checksum filled in (the
    inspection service drops segments a host would discard for theirs)."""
    if proto in (TCP, UDP):
        at = 16 if proto == TCP else 6
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
        total = int.from_bytes(pseudo + l4 + b"\0" * (len(l4) & 1), "big") % 0xFFFF
        csum = (0xFFFF - total) % 0xFFFF or (0xFFFF if proto == UDP else 0)
        l4 = l4[:at] + csum.to_bytes(2, "big") + l4[at + 2:]
    return _IP.pack(0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, src, dst) + l4


def _aton(a: str) -> bytes:
    return bytes(int(x) for x in a.split("."))


class Outcome(str, Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Conn:
    """One client-server conversation and where it stands."""

    id: int
    proto: int
    client: str
    cport: int
    server: str
    sport: int
    exchanges: int
    started: float
    step: int = 0
    """Index of the client packet waiting for its answer."""
    tries: int = 0
    outcome: Outcome = Outcome.RUNNING
    ended: float = -1.0
    cseq: int = 0
    sseq: int = 0
    sent: int = 0
    """Client payload bytes the server acknowledged."""
    got: int = 0
    """Server payload bytes the client received."""
    handshake: bool = False
    """The client has heard the server (a SYN-ACK, for TCP)."""
    log: list[str] = field(default_factory=list)


@dataclass
class ServerSide:
    """What a server holds of a connection: the next byte it expects, and
    the last answer it gave (sent again to a retransmission)."""

    expect: int
    sent: int = 0
    last_step: int = -1
    last_answer: bytes = b""


class Workload:
    """Opens connections at random and plays both of their ends."""

    def __init__(self, clock: Clock, rng: random.Random, send: SendToEdge,
                 rate: float = 25.0) -> None:
        self.clock, self.rng, self.send = clock, rng, send
        self.rate = rate
        self.conns: list[Conn] = []
        self.by_client: dict[tuple[int, bytes, int], Conn] = {}
        self.by_server: dict[tuple[int, bytes, int, bytes, int], Conn] = {}
        self.server_side: dict[int, ServerSide] = {}
        self.misdelivered: list[tuple[float, str, str]] = []
        self.running = False
        self._ports: set[tuple[str, int]] = set()

    # -- arrivals -----------------------------------------------------------------

    def start(self) -> None:
        """Open connections at random (Poisson, `rate` a second) until `stop`."""
        self.running = True
        self.clock.after(self.rng.expovariate(self.rate), self._arrival)

    def stop(self) -> None:
        self.running = False

    def _arrival(self) -> None:
        if not self.running:
            return
        self.open()
        self.clock.after(self.rng.expovariate(self.rate), self._arrival)

    def open(self, proto: int | None = None) -> Conn:
        rng = self.rng
        proto = proto or rng.choice((TCP, TCP, TCP, UDP, ICMP))
        client = rng.choice(CLIENTS)
        while True:
            cport = rng.randrange(1024, 65000)
            if (client, cport) not in self._ports and cport != 6886:
                break
        self._ports.add((client, cport))
        sport = 0 if proto == ICMP else rng.choice((80, 443, 53, 5001))
        n = rng.randint(3, 40) if proto == TCP else rng.randint(2, 15)
        c = Conn(len(self.conns), proto, client, cport, rng.choice(SERVERS), sport, n, self.clock.now,
                 cseq=rng.getrandbits(32), sseq=rng.getrandbits(32))
        self.conns.append(c)
        cip, sip = _aton(c.client), _aton(c.server)
        self.by_client[(proto, cip, cport)] = c
        self.by_server[(proto, cip, cport, sip, sport)] = c
        self._transmit(c)
        return c

    def flow_of(self, inner: bytes) -> int | None:
        """The connection an inner packet belongs to (either direction)."""
        if len(inner) < 28:
            return None
        proto, src, dst = inner[9], inner[12:16], inner[16:20]
        a, b = struct.unpack_from("!HH", inner, 20)
        if proto == ICMP:
            a = b = struct.unpack_from("!H", inner, 24)[0]
            c = self.by_client.get((proto, src, a)) or self.by_client.get((proto, dst, a))
        else:
            c = self.by_client.get((proto, src, a)) or self.by_client.get((proto, dst, b))
        return c.id if c is not None else None

    # -- the client side -----------------------------------------------------------

    def _packet(self, c: Conn) -> bytes:
        """The client's packet for step `c.step` (the same bytes on every try)."""
        cip, sip = _aton(c.client), _aton(c.server)
        if c.proto == ICMP:
            payload = f"q{c.id}:{c.step}".encode()
            return _ip(cip, sip, ICMP, _ICMP.pack(8, 0, 0, c.cport, c.step) + payload)
        if c.proto == UDP:
            payload = f"u{c.id}:{c.step}".encode()
            return _ip(cip, sip, UDP, _UDP.pack(c.cport, c.sport, 8 + len(payload), 0) + payload)
        if c.step == 0:
            return self._tcp(cip, sip, c.cport, c.sport, c.cseq, 0, SYN, b"")
        seq = (c.cseq + 1 + c.sent) % (1 << 32)
        ack = (c.sseq + 1 + c.got) % (1 << 32)
        if c.step > c.exchanges:
            return self._tcp(cip, sip, c.cport, c.sport, seq, ack, FIN | ACK, b"")
        return self._tcp(cip, sip, c.cport, c.sport, seq, ack, PSH | ACK, self._data(c))

    def _data(self, c: Conn) -> bytes:
        size = 16 + (c.id * 7919 + c.step * 104729) % 600
        return f"c{c.id}:{c.step}:".encode().ljust(size, b".")

    @staticmethod
    def _tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
             payload: bytes) -> bytes:
        return _ip(src, dst, TCP, _TCP.pack(sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload)

    def _transmit(self, c: Conn) -> None:
        if c.outcome != Outcome.RUNNING:
            return
        if c.tries >= TRIES:
            c.outcome, c.ended = Outcome.FAILED, self.clock.now
            c.log.append(f"{self.clock.now:.3f} gave up at step {c.step}")
            return
        c.tries += 1
        step = c.step
        self.send(INGRESS_EDGE, self._packet(c))
        self.clock.after(RTO, lambda: self._timeout(c, step))

    def _timeout(self, c: Conn, step: int) -> None:
        if c.step == step and c.outcome == Outcome.RUNNING:
            self._transmit(c)

    def _advance(self, c: Conn) -> None:
        """The answer to the current step arrived: the next one, after a pause."""
        c.step += 1
        c.tries = 0
        last = c.exchanges + (2 if c.proto == TCP else 0)
        if c.step >= last:
            if c.proto == TCP:  # the last ACK of the FIN exchange: nothing answers it
                cip, sip = _aton(c.client), _aton(c.server)
                self.send(INGRESS_EDGE, self._tcp(cip, sip, c.cport, c.sport,
                                                  (c.cseq + 2 + c.sent) % (1 << 32),
                                                  (c.sseq + 2 + c.got) % (1 << 32), ACK, b""))
            c.outcome, c.ended = Outcome.DONE, self.clock.now
            return
        step = c.step
        self.clock.after(self.rng.uniform(0.002, 0.030), lambda: self._next(c, step))

    def _next(self, c: Conn, step: int) -> None:
        if c.step == step:
            self._transmit(c)

    # -- delivery ------------------------------------------------------------------

    def on_host(self, edge: str, inner: bytes) -> None:
        """A packet reached a host: a server behind the egress, a client behind the ingress."""
        if edge == EGRESS_EDGE:
            self._at_server(inner)
        else:
            self._at_client(inner)

    def _misdelivery(self, where: str, why: str) -> None:
        self.misdelivered.append((self.clock.now, where, why))

    def _at_server(self, p: bytes) -> None:
        proto, src, dst = p[9], p[12:16], p[16:20]
        sport, dport = struct.unpack_from("!HH", p, 20)
        if proto == ICMP:
            sport, dport = struct.unpack_from("!H", p, 24)[0], 0
        c = self.by_server.get((proto, src, sport, dst, dport))
        if c is None:
            self._misdelivery("server", f"no connection for {proto} {src.hex()}:{sport}->{dst.hex()}:{dport}")
            return
        s = self.server_side.get(c.id)
        if proto == ICMP or proto == UDP:
            body = p[28:]
            tag, _, step = body[1:].decode(errors="replace").partition(":")
            if body[:1] != (b"q" if proto == ICMP else b"u") or tag != str(c.id):
                self._misdelivery("server", f"conn {c.id} got {body[:20]!r}")
                return
            reply = f"r{c.id}:{step}".encode()
            sip, cip = dst, src
            if proto == ICMP:
                out = _ip(sip, cip, ICMP, _ICMP.pack(0, 0, 0, c.cport, int(step)) + reply)
            else:
                out = _ip(sip, cip, UDP, _UDP.pack(c.sport, c.cport, 8 + len(reply), 0) + reply)
            self.send(EGRESS_EDGE, out)
            return
        seq, ack, _off, flags = struct.unpack_from("!IIBB", p, 24)
        payload = p[40:]
        if flags & SYN:
            if s is None:
                s = self.server_side[c.id] = ServerSide(expect=(seq + 1) % (1 << 32))
            self.send(EGRESS_EDGE, self._tcp(dst, src, c.sport, c.cport, c.sseq, s.expect, SYN | ACK, b""))
            return
        if s is None:
            self._misdelivery("server", f"conn {c.id}: data before a SYN")
            return
        if payload and not payload.startswith(f"c{c.id}:".encode()):
            self._misdelivery("server", f"conn {c.id} got {payload[:20]!r}")
            return
        if seq != s.expect:
            if s.last_answer and (s.expect - seq) % (1 << 32) < (1 << 31):
                self.send(EGRESS_EDGE, s.last_answer)  # a retransmission: answer again
            return
        if not payload and not flags & FIN:
            return  # the final ACK
        s.expect = (seq + len(payload) + (1 if flags & FIN else 0)) % (1 << 32)
        sseq = (c.sseq + 1 + s.sent) % (1 << 32)
        if flags & FIN:
            answer = self._tcp(dst, src, c.sport, c.cport, sseq, s.expect, FIN | ACK, b"")
        else:
            data = f"s{c.id}:".encode().ljust(8 + (len(payload) * 3) % 200, b"-")
            s.sent += len(data)
            answer = self._tcp(dst, src, c.sport, c.cport, sseq, s.expect, PSH | ACK, data)
        s.last_answer = answer
        self.send(EGRESS_EDGE, answer)

    def _at_client(self, p: bytes) -> None:
        proto, dst = p[9], p[16:20]
        if proto == ICMP:
            port = struct.unpack_from("!H", p, 24)[0]
        else:
            port = struct.unpack_from("!H", p, 22)[0]
        c = self.by_client.get((proto, dst, port))
        if c is None:
            self._misdelivery("client", f"no connection for {proto} {dst.hex()}:{port}")
            return
        if p[12:16] != _aton(c.server):
            self._misdelivery("client", f"conn {c.id}: answer from another server")
            return
        if c.outcome != Outcome.RUNNING:
            return
        if proto in (ICMP, UDP):
            body = p[28:].decode(errors="replace")
            tag, _, step = body[1:].partition(":")
            if not body.startswith("r") or tag != str(c.id):
                self._misdelivery("client", f"conn {c.id} got {body[:20]!r}")
                return
            if step == str(c.step):
                c.handshake = True
                self._advance(c)
            return
        seq, ack, _off, flags = struct.unpack_from("!IIBB", p, 24)
        payload = p[40:]
        if payload and not payload.startswith(f"s{c.id}:".encode()):
            self._misdelivery("client", f"conn {c.id} got {payload[:20]!r}")
            return
        if c.step == 0:
            if flags & SYN and ack == (c.cseq + 1) % (1 << 32):
                c.handshake = True
                self._advance(c)
            return
        sent = len(self._data(c)) if c.step <= c.exchanges else 1
        if ack != (c.cseq + 1 + c.sent + sent) % (1 << 32) or seq != (c.sseq + 1 + c.got) % (1 << 32):
            return  # an answer to an earlier step, sent again
        if c.step <= c.exchanges:
            c.sent += sent
            c.got += len(payload)
        self._advance(c)
