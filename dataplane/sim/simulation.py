"""Claim 1 in one process: a TCP stream survives the death of its primary.

A deterministic scenario with a simulated clock and an in-memory fabric:

    client -> ingress -> AA (service A) -> BA (B, primary) | BB (B, secondary) -> egress -> server

BA mirrors its flow state to BB after processing (through an in-memory
channel standing in for the state-sync channel). Mid-stream, BA dies; the
controller publishes a map in which BA holds no role and gives it to every
live node. AA, about to send the next packet of the stream, finds its pin
dead, takes the map's primary for the code (BB, the former secondary) and
sets the REROUTED flag; BB carries on with the mirrored state and the
stream completes in both directions. With mirroring off, BB has never seen
the stream and its firewall drops the next packet as misdelivery.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from dataplane.core import header as wire
from dataplane.core.affinity import AffinityHasher
from dataplane.core.events import Deliver, Drop, Event, Mirror, Send, TookOver
from dataplane.core.node import EGRESS, INGRESS, EgressNode, IngressNode, Node, ServiceNode
from dataplane.core.servicemap import Chain, InstanceState, ServiceMap, Tenant
from dataplane.core.services import create

CLIENT, SERVER = "10.1.0.10", "10.2.0.10"
SECRET = b"claim-1-simulation"


class SimClock:
    """Time that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class Timeline:
    """What happened when, in simulated seconds."""

    events: list[tuple[float, str]] = field(default_factory=list)

    def add(self, t: float, what: str) -> None:
        self.events.append((t, what))


class Fabric:
    """Delivers node events in memory; dead nodes swallow what is sent to them."""

    def __init__(self, nodes: dict[str, Node], clock: SimClock, sync: bool,
                 timeline: Timeline) -> None:
        self.nodes = nodes
        self.clock = clock
        self.sync = sync
        self.dead: set[str] = set()
        self.timeline = timeline
        self.to_client: list[bytes] = []
        self.to_server: list[bytes] = []
        self.counters: Counter[str] = Counter()
        self.hops: list[tuple[str, str, wire.Header]] = []

    def run(self, source: str, events: list[Event]) -> None:
        queue = [(source, e) for e in events]
        while queue:
            src, ev = queue.pop(0)
            if isinstance(ev, Send):
                self.hops.append((src, ev.to, wire.decode(ev.data)))
                if ev.to in self.dead:
                    self.counters["sent_to_dead"] += 1
                    continue
                node = self.nodes[ev.to]
                queue.extend((ev.to, e) for e in node.from_fabric(ev.data, src, self.clock.now))
            elif isinstance(ev, Deliver):
                (self.to_client if src == INGRESS else self.to_server).append(ev.data)
            elif isinstance(ev, Mirror):
                if self.sync and ev.to not in self.dead:
                    self.nodes[ev.to].apply_update(ev.update, self.clock.now)
                    self.counters["mirrored"] += 1
            elif isinstance(ev, TookOver):
                self.timeline.add(self.clock.now, f"{src} serves the stream with mirrored state")
            elif isinstance(ev, Drop):
                self.counters[f"drop:{src}:{ev.reason}"] += 1


def claim1_map() -> ServiceMap:
    """ingress -> A (aa) -> B (ba, bb) -> egress for tenant 1."""
    m = ServiceMap(buckets=4096)
    m.add_service(INGRESS, [INGRESS])
    m.add_service("A", ["aa"])
    m.add_service("B", ["ba", "bb"])
    m.add_service(EGRESS, [EGRESS])
    m.add_tenant(Tenant(1, "tenant-1", ["10.1.0.0/16"]))
    m.add_chain(Chain(1, 1, ["A", "B"]))
    return m


@dataclass
class Claim1Result:
    sync: bool
    sport: int
    code: int
    primary: str
    secondary: str
    sent_bytes: int
    server_bytes: int
    client_acked: int
    handshake_closed: bool
    rerouted_seen: bool
    fabric: dict[str, int]
    drops: dict[str, dict[str, int]]
    timeline: list[tuple[float, str]]

    @property
    def survived(self) -> bool:
        return self.server_bytes == self.sent_bytes and self.handshake_closed


def run_claim1(sync: bool = True, segments: int = 20, fail_after: int = 8,
               segment_size: int = 1000) -> Claim1Result:
    """Run the scenario; `fail_after` data segments go through BA before it dies."""
    clock, timeline = SimClock(), Timeline()
    smap = claim1_map()
    hasher = AffinityHasher(SECRET)
    sport = next(p for p in range(40000, 41000)
                 if smap.primary("B", hasher.code_of(1, CLIENT, p, SERVER, 80, 6)) == "ba")
    code = hasher.code_of(1, CLIENT, sport, SERVER, 80, 6)
    nodes: dict[str, Node] = {
        INGRESS: IngressNode(INGRESS, smap, hasher),
        "aa": ServiceNode("aa", smap, create("inspection")),
        "ba": ServiceNode("ba", smap, create("firewall")),
        "bb": ServiceNode("bb", smap, create("firewall")),
        EGRESS: EgressNode(EGRESS, smap),
    }
    fabric = Fabric(nodes, clock, sync, timeline)
    cseq, sseq = 1000, 5000

    def client(flags: str, payload: bytes = b"") -> None:
        nonlocal cseq
        pkt = IP(src=CLIENT, dst=SERVER) / TCP(sport=sport, dport=80, flags=flags, seq=cseq,
                                               ack=sseq) / Raw(payload)
        cseq += len(payload) + (1 if "S" in flags or "F" in flags else 0)
        clock.advance(0.001)
        fabric.run(INGRESS, nodes[INGRESS].from_client(bytes(pkt), clock.now))

    def server(flags: str) -> None:
        nonlocal sseq
        pkt = IP(src=SERVER, dst=CLIENT) / TCP(sport=80, dport=sport, flags=flags, seq=sseq,
                                               ack=cseq)
        sseq += 1 if "S" in flags or "F" in flags else 0
        clock.advance(0.001)
        fabric.run(EGRESS, nodes[EGRESS].from_server(bytes(pkt), clock.now))

    timeline.add(clock.now, f"stream code 0x{code:08x}: B primary ba, secondary bb")
    client("S")
    server("SA")
    client("A")
    for i in range(segments):
        if i == fail_after:
            clock.advance(0.050)
            fabric.dead.add("ba")
            timeline.add(clock.now, "ba dies")
            new = smap.copy()
            new.set_state("ba", InstanceState.DEAD)
            clock.advance(0.005)
            for name, node in nodes.items():
                if name not in fabric.dead:
                    node.update_map(new, clock.now)
            timeline.add(clock.now, f"controller publishes epoch {new.epoch}: ba holds no role")
        client("PA", bytes([65 + i % 26]) * segment_size)
        server("A")
    client("FA")
    server("FA")
    client("A")
    server_bytes = sum(len(_tcp_payload(p)) for p in fabric.to_server)
    acks = [IP(p)[TCP].ack for p in fabric.to_client]
    closed = bool(fabric.to_client) and "F" in str(IP(fabric.to_client[-1])[TCP].flags) and \
        len(fabric.to_server) == segments + 4
    return Claim1Result(
        sync=sync, sport=sport, code=code, primary="ba", secondary="bb",
        sent_bytes=segments * segment_size, server_bytes=server_bytes,
        client_acked=(max(acks) - 1001) if acks else 0,
        handshake_closed=closed,
        rerouted_seen=any(dst == "bb" and h.flags & wire.Flags.REROUTED for _, dst, h in fabric.hops),
        fabric=dict(fabric.counters),
        drops={n: dict(node.drops) for n, node in nodes.items() if node.drops},
        timeline=timeline.events)


def _tcp_payload(pkt: bytes) -> bytes:
    return bytes(IP(pkt)[TCP].payload)
