"""The sans-I/O forwarding core of each node: ingress, service instance, egress.

Each node takes bytes (plus the name of the node they came from and the
time) and returns events (`dataplane.core.events`); it keeps a flow table, a
current service map and counters. The lab's forwarder processes and the
in-process simulation are thin shells around these classes.

Path of a stream (chain [A, B], services at index positions)::

    client -> ingress --si=2--> A --si=1--> B --si=0--> egress -> server
    client <- ingress <-si=0--- A <-si=1--- B <-si=2--- egress <- server
                              (reverse flag set, chain walked backwards)

Next hops are chosen flow table first, map on a miss: the first packet of a
stream pins the next hop of each direction. A pin to an instance the map
says is dead is replaced by the map's current primary (the former
secondary) and that packet carries the REROUTED flag; a pin is never
followed to a dead instance. A reply goes back to the instance its flow came
from (`prev_hop`), so both directions cross the same instances.

After the service ran, a change worth mirroring bumps the flow's version and
emits a `Mirror` to the bucket's secondary (the first other candidate).

The exact-match cache (the idea of Open vSwitch's EMC) serves the common
packet without building a header, an `Inner` or a flow key: once a packet of
a flow went through the full path, its first 20 header bytes plus the inner
addresses and ports (IPv4 without options, TCP or UDP) map to the flow's
entry, its next hop and the ready output header. A hit is used only while
nothing it depends on moved: the same map (the cache is emptied on a map
change), the same entry version (every pin or mirrored change bumps it), no
removal from the flow table, the same upstream node, the same protocol, not
a fragment, the whole IP packet present with a transport header the parser
would accept, and the service's own `fast` check on the raw bytes. Anything
else takes the full path, which gives the same result;
`tests/test_fastpath.py` holds both paths to that, with packets that only
one of these checks refuses.

A deleted flow stays deleted: a replica keeps a *tombstone* (the version of
the delete) for every flow whose delete it applied, for the service's
longest timeout (`expire` forgets older ones), and refuses an older upsert
of that flow (a bulk snapshot or a retransmission trailing the delete) as
stale; a primary keeps one for the flows it expired, and a new flow under
the same key starts its versions after it, so its updates are never
mistaken for stale ones. There are never more tombstones than the flow
table's capacity (the oldest go first, counted as `tombstones_dropped`).

The edges classify only whole datagrams: they reassemble their hosts' IPv4
fragments first (`dataplane.core.defrag`) and re-fragment to the host MTU
on delivery. An ICMP error is carried as part of the flow it quotes
(`related_key`, conntrack's RELATED): it takes that flow's code and pins
where the flow is held, and is dropped (`icmp_unrelated`) where it is not;
it never creates or changes flow state.

IPv6 takes the same path as IPv4 (the header's next protocol says which;
a header that names the other version is dropped, `next_proto_mismatch`),
with three differences at the edges: a host's neighbour discovery, MLD and
link-local packets are the link's own business and never enter a chain
(`link_local`); IPv6 fragments are dropped (`frag_unsupported`); and an
IPv6 packet too big for the host link is not fragmented but answered with
an ICMPv6 Packet Too Big, sent back through the chain as an error of its
flow (`too_big`), so its sender's path MTU discovery works.

A service that rewrites packets (the NAT, `dataplane.core.services.nat`)
offers `rewrite`, called on every packet it forwards (such a service never
takes the exact-match cache), and `translated(state)`, the tuple its flow's
packets carry on the server side: replies arrive with that tuple, not the
one the flow key was made from, so the node indexes its flows (led and
replicas) by it and finds a reply's flow through the index.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from dataplane.core import header as wire
from dataplane.core.affinity import AffinityHasher, flow_endpoints
from dataplane.core.classifier import Classifier
from dataplane.core.defrag import Defrag, fragment
from dataplane.core.events import Deliver, Drop, Event, FlowUpdate, Mirror, Send, TookOver
from dataplane.core.flowtable import FlowEntry, FlowKey, FlowTable
from dataplane.core.header import Flags, HeaderError
from dataplane.core.packet import TCP, TCP_ACK, TCP_SYN, UDP, Inner, PacketError, link_local, parse, too_big
from dataplane.core.servicemap import ServiceMap, listed
from dataplane.core.services import Action, Service

_OAM, _REROUTED, _REVERSE = int(Flags.OAM), int(Flags.REROUTED), int(Flags.REVERSE)
"""Plain ints: IntFlag arithmetic costs about a microsecond per operation."""
NEEDS_CSUM = 1
"""virtio_net_hdr flag VIRTIO_NET_HDR_F_NEEDS_CSUM: the transport checksum is left to the receiver."""
INGRESS, EGRESS = "ingress", "egress"
"""Pseudo-service names of the chain's ends in the service map."""
EDGE_TIMEOUT = 600.0
LOST_MEMORY = 1 << 16
"""How many lost flows are remembered so each is counted once."""
SYNC_GRACE = 0.1
"""How long a new secondary may still lack its bucket's state: the bulk its
primary starts at the map change has landed by then. A secondary younger
than this that is promoted by a second failure holds no state it can be
sure of (the two deaths of a double failure are often published as two
epochs, a few milliseconds apart)."""
FAST_ENTRIES = 1 << 16
"""Exact-match cache size (per direction of a flow): the hot flows. Bounded
so it adds at most ~16 MB beside a flow table of a million entries."""
_FAST_PROTOS = (TCP, UDP)
EMBRYONIC_PER_TENANT = 1 << 16
"""Default cap on one tenant's embryonic flows per instance (topology
`[limits] embryonic_per_tenant`): a flood from one tenant is refused
(`embryonic_limit`) before it fills the table for the others."""
HOST_MTU = 1500
"""MTU of the edges' host links: what a reassembled datagram is fragmented to."""
NEXT_PROTO = {4: int(wire.NextProto.IPV4), 6: int(wire.NextProto.IPV6)}
"""The header's next protocol for an inner packet of each IP version."""


def flow_key(chain: int, code: int, inner: Inner) -> tuple[FlowKey, bool]:
    """The flow table key of a packet and whether it travels low -> high."""
    (lo_ip, lo_port), (hi_ip, hi_port), up = flow_endpoints(inner)
    return (chain, code, inner.proto, lo_ip, lo_port, hi_ip, hi_port), up


def related_key(chain: int, code: int, error: Inner) -> FlowKey | None:
    """The flow table key of the flow an ICMP error quotes, or None when the
    error cannot be about it: an error goes back to the sender of the packet
    it quotes, so its destination must be the quoted source (conntrack's
    RELATED, with the address check that keeps a third party from aiming
    errors at someone else's flow by quoting it)."""
    quoted = error.icmp_error
    if quoted is None or error.dst != quoted.src:
        return None
    return flow_key(chain, code, quoted)[0]


class Node:
    """What every node has: a name, a map, a flow table and counters."""

    def __init__(self, name: str, smap: ServiceMap, capacity: int = 1 << 20) -> None:
        self.name = name
        self.map = smap
        self.flows = FlowTable(capacity)
        self.counters: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()

    def update_map(self, smap: ServiceMap, now: float) -> bool:
        """Install a newer map; an older or equal epoch is ignored (counted)."""
        if smap.epoch <= self.map.epoch:
            self.counters["stale_map"] += 1
            return False
        self.map = smap
        self.counters["map_updates"] += 1
        return True

    def _drop(self, reason: str, events: list[Event] | None = None) -> list[Event]:
        self.drops[reason] += 1
        return [*(events or []), Drop(reason)]

    def _next_hop(self, service: str, code: int, pinned: str | None) -> tuple[str | None, bool]:
        """(hop, rerouted): the pin if alive, else the map's primary."""
        if pinned is not None and self.map.is_alive(pinned):
            return pinned, False
        hop = self.map.primary(service, code)
        if pinned is not None and hop is not None:
            self.counters["rerouted"] += 1
            return hop, True
        return hop, False

    def _parse(self, data: bytes | memoryview, offset: int = 0) -> Inner | Drop:
        """The inner packet, or the counted Drop that refuses it."""
        try:
            return parse(data, offset)
        except PacketError as exc:
            return self._drop(exc.reason)[0]

    def _decode(self, data: bytes) -> wire.Header | Drop:
        """The affinity header, or the counted Drop that refuses it."""
        try:
            h = wire.decode(data)
        except HeaderError as exc:
            return self._drop(exc.reason)[0]
        if h.epoch < self.map.epoch:
            self.counters["older_epoch"] += 1
        return h


class ServiceNode(Node):
    """An instance of one service in the chain."""

    def __init__(self, name: str, smap: ServiceMap, service: Service, capacity: int = 1 << 20,
                 mirroring: bool = True, exact_match: bool = True,
                 embryonic_per_tenant: int = EMBRYONIC_PER_TENANT) -> None:
        super().__init__(name, smap, capacity)
        svc = smap.service_of(name)
        if svc is None:
            raise ValueError(f"instance {name!r} is not in the service map")
        if embryonic_per_tenant < 1:
            raise ValueError("embryonic_per_tenant must be at least 1")
        self.service_name = svc
        self.service = service
        self.mirroring = mirroring
        self.embryonic_per_tenant = embryonic_per_tenant
        self._established = getattr(service, "established", None)
        """The service's own test of a flow's eviction class; without it a
        flow is established once a packet came back from the responder."""
        self._moved = getattr(service, "moved", None)
        """The service's hook for a flow of its own that comes back REROUTED."""
        self._lost: OrderedDict[FlowKey, None] = OrderedDict()
        self._orphans: set[int] = set()
        """Buckets this instance leads whose state died with their holders
        (`_orphaned`): a flow of theirs that finds no state here is lost."""
        self._secondary_since: list[tuple[float, int]] = []
        """(when, buckets): the buckets this instance was made the secondary
        of by each map of the last SYNC_GRACE (their primary's bulk may not
        have landed yet), as bit sets (`BucketTable.where`)."""
        self._early: OrderedDict[FlowKey, tuple[int, int, bool]] = OrderedDict()
        """Packets without state sent under a map this node does not hold
        yet: key -> (its epoch, code, reverse), judged when that map comes."""
        self._tombstones: dict[FlowKey, tuple[int, float]] = {}
        """Deleted flows: key -> (version of the delete, when), oldest first."""
        self.flows.on_evict = self._evicted
        self._rewrite = getattr(service, "rewrite", None)
        self._translated = getattr(service, "translated", None)
        self._by_translated: dict[tuple, FlowKey] | None = None
        """A translating service's flows by the tuple their replies carry."""
        if self._translated is not None:
            self._by_translated = {}
            members = list(smap.services[svc])
            service.attach(members.index(name), len(members), self._taken)
        self._fast_check = getattr(service, "fast", None) if exact_match and self._rewrite is None else None
        self._fast: OrderedDict[bytes, tuple] = OrderedDict()
        """header[0:20] + inner addresses and ports -> (entry, version,
        generation, src, proto, forward, hop, output header)."""

    def update_map(self, smap: ServiceMap, now: float) -> bool:
        """Install a newer map and promote the replicas of buckets it makes
        this instance lead: their state is already here (no commit step).
        Buckets it now leads whose state died with their holders are
        remembered as orphaned (`_orphaned`)."""
        old = self.map
        if not super().update_map(smap, now):
            return False
        self._orphaned(old, smap, now)
        self._judge_early(smap.epoch)
        self._fast.clear()
        # the buckets led here, read off the table at once: a primary
        # lookup per replica cost 2.5 ms for 2,500 replicas
        n = smap.buckets
        led = smap.table(self.service_name).where(0, {self.name}).to_bytes(n, "little")
        for e in self.flows:
            if e.replica and led[e.key[1] % n]:
                e.replica, e.promoted = False, True
                self.flows.replicas -= 1
                self.counters["promoted"] += 1
        return True

    def from_fabric(self, data: bytes, src: str | None, now: float) -> list[Event]:
        """An encapsulated packet from upstream (or downstream, for replies)."""
        exact = data[:20] + data[32:44] if len(data) >= 44 and data[20] == 0x45 else None
        if exact is not None:
            hit = self._fast.get(exact)
            if hit is not None:
                events = self._fast_path(hit, data, src, now)
                if events is not None:
                    return events
        h = self._decode(data)
        if isinstance(h, Drop):
            return [h]
        if h.flags & _OAM:
            self.counters["oam"] += 1
            return []
        if h.ttl == 1:
            return self._drop("ttl_expired")  # it would leave with TTL 0
        chain = self.map.chains.get(h.chain)
        if chain is None:
            return self._drop("unknown_chain")
        n = len(chain.services)
        if not 1 <= h.index <= n:
            return self._drop("bad_index")
        reverse = bool(h.flags & _REVERSE)
        pos = h.index - 1 if reverse else n - h.index
        if chain.services[pos] != self.service_name:
            return self._drop("wrong_service")
        inner = self._parse(data, h.length)
        if isinstance(inner, Drop):
            return [inner]
        if NEXT_PROTO[inner.family] != h.next_proto:
            return self._drop("next_proto_mismatch")
        if h.length > 20:
            inner.csum_partial = _checksum_left(data[20:h.length])
        if inner.icmp_error is not None:
            return self._related(h, chain.services, pos, reverse, inner, data, now)
        key, _ = flow_key(h.chain, h.code, inner)
        if reverse and self._by_translated is not None:
            key = self._by_translated.get(key[2:], key)
        entry = self.flows.lookup(key, now)
        events: list[Event] = []
        if entry is not None and (entry.replica or entry.promoted):
            self.flows.replicas -= entry.replica
            entry.replica = entry.promoted = False
            self.counters["took_over"] += 1
            events.append(TookOver(key))
        elif entry is not None and h.flags & _REROUTED and self._moved is not None:
            entry.state = self._moved(entry.state)
            self.counters["came_back"] += 1
        verdict, state = self.service.process(inner, not reverse, entry.state if entry else None, now)
        if entry is None and (verdict.reason == "misdelivery" or _mid_stream(inner, reverse)):
            if h.epoch > self.map.epoch:
                self._hold_early(key, h.epoch, h.code, reverse)
            else:
                self._count_lost(key, h.code, reverse)
        if verdict.action == Action.REPLY:
            return self._reply(h, n, pos, reverse, src, verdict.reason, verdict.reply)
        if entry is None and state is not None:
            born = self._is_established(state, reverse)
            if not born and self.flows.embryonic_of(h.client) >= self.embryonic_per_tenant:
                return self._drop("embryonic_limit", events)
            entry = self.flows.insert(key, now, state, h.client, born)
            buried = self._tombstones.pop(key, None)
            if buried is not None:
                entry.version = buried[0]  # its first update must beat the delete
            if self._translated is not None:
                self._index(entry)
        if entry is None:
            return self._drop(verdict.reason or "no_state", events)
        entry.state = state
        if not entry.established and self._is_established(state, reverse):
            self.flows.establish(entry)
        entry.packets += 1
        entry.rev_packets += reverse
        entry.bytes += inner.length
        if verdict.timeout is not None:
            entry.timeout = verdict.timeout
        changed = verdict.mirror
        if not reverse and src is not None and entry.prev_hop != src:
            entry.prev_hop, changed = src, True
        hop = rerouted = None
        if verdict.action == Action.FORWARD:
            hop, rerouted, pin_changed = self._route(chain.services, pos, reverse, h.code, entry)
            changed = changed or pin_changed
        if changed:
            events.extend(self._mirror(h.code, entry))
        if verdict.action == Action.DROP:
            return self._drop(verdict.reason, events)
        if hop is None:
            return self._drop("no_instance", events)
        flags = (h.flags & ~_REROUTED) | (_REROUTED if rerouted else 0)
        head = wire.pack(h.chain, h.index - 1, h.code, h.client, self.map.epoch, flags,
                         h.ttl - 1, h.next_proto, words=h.length >> 2)
        if self._rewrite is not None:
            events.append(Send(hop, head + data[20:h.length]
                               + self._rewrite(entry.state, not reverse, data[h.length:])))
            self.counters["forwarded"] += 1
            return events
        events.append(Send(hop, head + data[20:]))  # options travel on
        self.counters["forwarded"] += 1
        if (exact is not None and not rerouted and h.length == 20 and inner.l4 == 40
                and inner.proto in _FAST_PROTOS and not inner.fragment and h.epoch >= self.map.epoch
                and self._fast_check is not None):
            self._remember(exact, entry, src, inner.proto, not reverse, hop, head)
        return events

    def _is_established(self, state: object, reverse: bool) -> bool:
        """The eviction class of a flow after a packet: the service's verdict
        if it has one (the firewall: TCP past the handshake, a reply seen),
        else whether this packet came back from the responder."""
        return self._established(state) if self._established is not None else reverse

    def _related(self, h: wire.Header, services: list[str], pos: int, reverse: bool,
                 inner: Inner, data: bytes, now: float) -> list[Event]:
        """An ICMP error about a flow (frag-needed, port unreachable, ...)
        follows that flow's pins with its code, if this instance holds the
        flow and the service lets it pass (it sees the error with the quoted
        flow's state). It never creates, changes or mirrors flow state and
        does not refresh the flow's idle timer: errors cannot keep a flow
        alive or move its pins."""
        key = related_key(h.chain, h.code, inner)
        if key is not None and reverse and self._by_translated is not None:
            key = self._by_translated.get(key[2:], key)
        entry = self.flows.get(key) if key is not None else None
        verdict, _ = self.service.process(inner, not reverse, entry.state if entry else None, now)
        if entry is None or verdict.action != Action.FORWARD:
            return self._drop(verdict.reason or "icmp_unrelated")
        if reverse:
            target, pinned = (INGRESS if pos == 0 else services[pos - 1]), entry.prev_hop
        else:
            target, pinned = (EGRESS if pos == len(services) - 1 else services[pos + 1]), entry.fwd_hop
        hop, rerouted = self._next_hop(target, h.code, pinned)
        if hop is None:
            return self._drop("no_instance")
        flags = (h.flags & ~_REROUTED) | (_REROUTED if rerouted else 0)
        head = wire.pack(h.chain, h.index - 1, h.code, h.client, self.map.epoch, flags,
                         h.ttl - 1, h.next_proto, words=h.length >> 2)
        self.counters["icmp_related"] += 1
        self.counters["forwarded"] += 1
        return [Send(hop, head + data[20:])]

    def _remember(self, exact: bytes, entry: FlowEntry, src: str | None, proto: int,
                  forward: bool, hop: str, head: bytes) -> None:
        """Cache a packet's way through the full path for the next ones."""
        if len(self._fast) >= FAST_ENTRIES:
            self._fast.popitem(last=False)
        self._fast[exact] = (entry, entry.version, self.flows.generation, src, proto, forward, hop, head)

    def _fast_path(self, hit: tuple, data: bytes, src: str | None, now: float) -> list[Event] | None:
        """Forward a cache hit, or None when anything it depends on moved."""
        entry, version, generation, cached_src, proto, forward, hop, head = hit
        if (src != cached_src or entry.version != version or self.flows.generation != generation
                or data[29] != proto or data[26] & 0x3F or data[27]):
            return None
        end = 20 + ((data[22] << 8) | data[23])
        if end > len(data) or end < 44:
            return None
        if proto == TCP and (end < 60 or not 20 <= (data[52] >> 4) * 4 <= end - 40):
            return None  # what the parser refuses as truncated or a bad TCP header
        if not self._fast_check(entry.state, forward, data, proto, 40, end):
            return None
        self.flows.seen(entry, now)
        entry.packets += 1
        entry.rev_packets += not forward
        entry.bytes += end - 20
        self.counters["forwarded"] += 1
        self.counters["fast_path"] += 1
        return [Send(hop, head + data[20:])]

    def _reply(self, h: wire.Header, n: int, pos: int, reverse: bool, src: str | None,
               reason: str, reply: bytes) -> list[Event]:
        """Answer a packet in its sender's place: the reply travels back the
        way the packet came, in the opposite direction."""
        self.drops[reason] += 1
        if src is None:
            return [Drop(reason)]
        index, flags = (n - pos - 1, 0) if reverse else (pos, _REVERSE)
        self.counters["replied"] += 1
        hdr = wire.pack(h.chain, index, h.code, h.client, self.map.epoch, flags,
                        next_proto=h.next_proto)  # the reply is of the packet's IP version
        return [Drop(reason), Send(src, hdr + reply)]

    def _index(self, entry: FlowEntry) -> None:
        """Find a translated flow's replies by the tuple they carry."""
        assert self._by_translated is not None and self._translated is not None
        if len(self._by_translated) > 2 * len(self.flows) + 1024:
            self._by_translated = {t: k for t, k in self._by_translated.items() if self._holds(t, k)}
        self._by_translated[self._translated(entry.state)] = entry.key

    def _holds(self, t: tuple, key: FlowKey) -> bool:
        assert self._translated is not None
        e = self.flows.get(key)
        return e is not None and e.state is not None and self._translated(e.state) == t

    def _taken(self, t: tuple) -> bool:
        """Does a flow this instance holds (primary or replica) carry the
        translated tuple `t`? Removed flows leave stale index entries,
        dropped here and when the index grows past twice the table."""
        assert self._by_translated is not None
        key = self._by_translated.get(t)
        if key is None:
            return False
        if self._holds(t, key):
            return True
        del self._by_translated[t]
        return False

    def _count_lost(self, key: FlowKey, code: int, reverse: bool) -> None:
        """A packet that no flow starts with (`_mid_stream`, or what the
        service calls `misdelivery`) found no state here. In an orphaned
        bucket (`_orphaned`) its flow's state died with both its holders:
        the flow is lost, counted once. Elsewhere only the packet is counted
        (`state_missing`): a single failure leaves the state with the
        secondary, and a packet that finds none there belongs to a flow
        still opening, to one in the async policy's window or to one that
        expired. A packet that may open a flow is not counted: its flow's
        first packet may have died in flight with the instance, and it
        carries on here. Behind a translating service (a NAT) only forward
        packets count a lost flow: a reply to a lost mapping carries a tuple
        that cannot be traced back to the flow's key, and would count the
        flow a second time."""
        if self.map.bucket(code) not in self._orphans:
            self.counters["state_missing"] += 1
            return
        if reverse and self._translated is not None:
            return
        if key not in self._lost:
            self._lost[key] = None
            self.counters["flows_lost"] += 1
            if len(self._lost) > LOST_MEMORY:
                self._lost.popitem(last=False)

    def _hold_early(self, key: FlowKey, epoch: int, code: int, reverse: bool) -> None:
        """A packet without state was sent under a newer map than this
        node's: the upstream node rerouted it here on the map that may
        orphan its bucket, and the map is still on its way. Its flow is
        judged when the map comes (an inspection instance starts the flow
        over meanwhile, so its later packets would find state)."""
        self._early[key] = (epoch, code, reverse)
        if len(self._early) > LOST_MEMORY:
            self._early.popitem(last=False)

    def _judge_early(self, epoch: int) -> None:
        """Count the flows of the packets that came ahead of this map (or an
        older one) if it orphaned their bucket; keep those sent under a newer."""
        for key, (sent, code, reverse) in list(self._early.items()):
            if sent <= epoch:
                del self._early[key]
                self._count_lost(key, code, reverse)

    def _orphaned(self, old: ServiceMap, new: ServiceMap, now: float) -> None:
        """Remember the buckets `new` makes this instance lead whose state
        is nowhere: their primary in `old` died and so did their secondary,
        or the secondary held nothing (no mirroring, or it is this instance,
        made secondary too recently to have the primary's bulk). A bucket
        stays orphaned while this instance leads it: flows pinned to its
        dead holders may come back long after.

        It runs in every map install, on the failover's critical path, so
        the buckets are picked by sets (`BucketTable.where`) rather than
        visited one by one: walking every bucket of both tables took 1.6 ms
        at 4,096 buckets and 26 ms at 65,536 (one B instance of the default
        lab dying, prepared tables); the sets take 0.3 and 1.8 ms. Young
        secondaries are kept as sets for the same reason: one of three
        dying makes this instance the secondary of a third of the buckets,
        and listing them into a dict took 9 ms at 65,536."""
        svc, me = self.service_name, self.name
        if old.table_inputs(svc) == new.table_inputs(svc):
            return  # no role moved
        t0, t1 = old.table(svc), new.table(svc)
        n = len(t0.ranks[0])
        if len(t1.ranks[0]) != n:
            raise ValueError(f"bucket count changed from {n} to {len(t1.ranks[0])}")
        horizon = now - SYNC_GRACE
        since = [(t, bs) for t, bs in self._secondary_since if t > horizon]
        mine = {me}
        led0, led1 = t0.where(0, mine), t1.where(0, mine)
        seconded0 = t0.where(1, mine)
        # led now, led before by an instance `new` has dead (never this one)
        dead = {i for i in t0.names if not new.is_alive(i)}
        taken = led1 & t0.where(0, dead) & ~led0
        if self.mirroring:
            # ... and its secondary died too, or there was none, or it was
            # this one, made secondary too recently to hold the state
            young = 0
            for _, bs in since:
                young |= bs
            taken &= t0.where(1, dead | {None}) | (seconded0 & young)
        orphans = set(listed(taken, n))
        # a bucket stays orphaned while this instance leads it
        still = (led0 & led1).to_bytes(n, "little")
        orphans.update(b for b in self._orphans if still[b])
        # made secondary here, holding no role there before
        fresh = t1.where(1, mine) & ~led1 & ~led0 & ~seconded0
        since.append((now, fresh))
        self._orphans, self._secondary_since = orphans, since

    def _route(self, services: list[str], pos: int, reverse: bool, code: int,
               entry: FlowEntry) -> tuple[str | None, bool, bool]:
        """Next hop for the packet; (hop, rerouted, pin changed)."""
        if reverse:
            target = INGRESS if pos == 0 else services[pos - 1]
            hop, rerouted = self._next_hop(target, code, entry.prev_hop)
            changed = hop != entry.prev_hop
            entry.prev_hop = hop
        else:
            target = EGRESS if pos == len(services) - 1 else services[pos + 1]
            hop, rerouted = self._next_hop(target, code, entry.fwd_hop)
            changed = hop != entry.fwd_hop
            entry.fwd_hop = hop
        return hop, rerouted, changed

    def _mirror(self, code: int, entry: FlowEntry) -> list[Event]:
        entry.version += 1
        if not self.mirroring:
            return []
        peer = self.map.secondary(self.service_name, code, exclude=self.name)
        if peer is None:
            self.counters["no_secondary"] += 1
            return []
        self.counters["mirrored"] += 1
        return [Mirror(peer, self.update_of(entry))]

    def update_of(self, entry: FlowEntry, deleted: bool = False) -> FlowUpdate:
        """The mirror form of an entry (also used by bulk sync)."""
        return FlowUpdate(entry.key, entry.version,
                          b"" if deleted else self.service.encode_state(entry.state),
                          deleted, entry.fwd_hop, entry.prev_hop, entry.timeout)

    def apply_update(self, update: FlowUpdate, now: float) -> bool:
        """Apply a mirrored update if newer than what this node holds, or
        than the delete it last applied to that flow (its tombstone)."""
        entry = self.flows.get(update.key)
        held = entry.version if entry is not None else self._tombstones.get(update.key, (None,))[0]
        if held is not None and held >= update.version:
            self.counters["stale_updates"] += 1
            return False
        if update.deleted:
            if entry is not None:
                self.flows.delete(update.key, "deleted_by_peer")
            self._bury(update.key, update.version, now)
            return True
        self._tombstones.pop(update.key, None)
        try:
            state = self.service.decode_state(update.state)
        except ValueError:
            self.drops["bad_state"] += 1
            return False
        # a replica's class comes from its state; without the service's test
        # it counts as established (no reply flag is mirrored), so mirrored
        # floods never push out the replicas of live connections
        established = self._established(state) if self._established is not None else True
        if entry is None:
            entry = self.flows.insert(update.key, now, state, established=established)  # last seen now
            entry.replica = True
            self.flows.replicas += 1
        else:
            self.flows.touch(update.key, now)
            if established and not entry.established:
                self.flows.establish(entry)
        entry.state = state
        entry.version = update.version
        entry.fwd_hop, entry.prev_hop = update.fwd_hop, update.prev_hop
        entry.timeout = update.timeout
        if self._translated is not None:
            self._index(entry)
        self.counters["updates_applied"] += 1
        return True

    def expire(self, now: float) -> list[Event]:
        """Idle expiry; deletes of flows this node leads are mirrored (and
        remembered); tombstones older than the longest timeout go."""
        events: list[Event] = []
        for e in self.flows.expire(now, self.service.max_timeout):
            if not e.replica and self.mirroring:
                peer = self.map.secondary(self.service_name, e.key[1], exclude=self.name)
                if peer is not None:
                    e.version += 1
                    self._bury(e.key, e.version, now)
                    events.append(Mirror(peer, self.update_of(e, deleted=True)))
        self._forget_tombstones(now)
        return events

    def _evicted(self, entry: FlowEntry, now: float) -> None:
        """A flow this node led was evicted for room: remember its version
        (a tombstone, no delete mirrored: the replica may still serve it
        after a failover), so the flow's next entry here starts past it and
        its replica takes the new entry's updates."""
        if not entry.replica:
            self._bury(entry.key, entry.version, now)

    def _bury(self, key: FlowKey, version: int, now: float) -> None:
        """Remember a flow's delete; past the table's capacity the oldest
        tombstone goes first (counted)."""
        self._tombstones.pop(key, None)
        self._tombstones[key] = (version, now)
        if len(self._tombstones) > self.flows.capacity:
            self._tombstones.pop(next(iter(self._tombstones)))
            self.counters["tombstones_dropped"] += 1

    def _forget_tombstones(self, now: float) -> None:
        """Drop tombstones older than the service's longest timeout: by then
        no update from before the delete can still be on its way."""
        horizon = now - self.service.max_timeout
        while self._tombstones:
            key, (_, when) = next(iter(self._tombstones.items()))
            if when > horizon:
                break
            del self._tombstones[key]


class EdgeNode(Node):
    """What the ingress and the egress share: they face hosts, so they
    reassemble the hosts' fragments before classifying (`defrag`) and
    deliver to a host link of `host_mtu` bytes."""

    def __init__(self, name: str, smap: ServiceMap, capacity: int = 1 << 20,
                 host_mtu: int = HOST_MTU) -> None:
        super().__init__(name, smap, capacity)
        self.defrag = Defrag(self.drops)
        self.host_mtu = host_mtu

    def _whole(self, data: bytes, inner: Inner, now: float) -> tuple[bytes, Inner] | list[Event]:
        """A host's fragment: the whole datagram and its parse once this
        fragment completed it, else the events for a held ([]) or dropped
        fragment. Edges classify only whole datagrams (see `defrag`)."""
        if inner.family != 4:
            return self._drop("frag_unsupported")
        try:
            whole = self.defrag.push(data[:inner.length], now)
        except PacketError as exc:
            return self._drop(exc.reason)
        if whole is None:
            self.counters["frag_held"] += 1
            return []
        self.counters["reassembled"] += 1
        parsed = self._parse(whole)
        return [parsed] if isinstance(parsed, Drop) else (whole, parsed)

    def _local(self, data: bytes) -> list[Event] | None:
        """The drop of a host's packet that is its link's own business
        (`packet.link_local`: neighbour discovery, MLD, link-local
        addresses), which the shell leaves to the kernel and must never
        reach a chain; None for any other packet."""
        return self._drop("link_local") if link_local(data) else None

    def _back(self, data: bytes, now: float) -> list[Event]:
        """Send a packet from this edge's host side into the chain (the
        ingress's `from_client`, the egress's `from_server`)."""
        raise NotImplementedError

    def _deliver(self, inner: bytes, options: bytes, now: float) -> list[Event]:
        """Deliver an inner packet to a host, re-fragmented to the host link's
        MTU when an edge reassembled it bigger than that (a super-frame with
        its GSO option is the host kernel's business, never fragmented). An
        IPv6 packet too big for the link is not fragmented (no router
        fragments IPv6): it is dropped (`too_big`) and answered with an
        ICMPv6 Packet Too Big, which goes back through the chain as an error
        of the packet's flow, as a router on the path would send it."""
        if len(inner) <= self.host_mtu or options:
            self.counters["delivered"] += 1
            return [Deliver(inner, options)]
        if inner[0] >> 4 == 6:
            return self._drop("too_big", self._back(too_big(inner, self.host_mtu), now))
        self.counters["delivered"] += 1
        pieces = fragment(inner, self.host_mtu)
        self.counters["refragmented"] += len(pieces) > 1
        return [Deliver(p) for p in pieces]


class IngressNode(EdgeNode):
    """Classifies client packets, adds the header, sends to the chain's first
    instance; strips the header of replies and delivers them to the client."""

    def __init__(self, name: str, smap: ServiceMap, hasher: AffinityHasher,
                 udp_port: int = wire.UDP_PORT, capacity: int = 1 << 20,
                 host_mtu: int = HOST_MTU) -> None:
        super().__init__(name, smap, capacity, host_mtu)
        self.classifier = Classifier(smap, hasher)
        self.udp_port = udp_port

    def update_map(self, smap: ServiceMap, now: float) -> bool:
        if super().update_map(smap, now):
            self.classifier.map = smap
            return True
        return False

    def from_client(self, data: bytes, now: float, options: bytes = b"") -> list[Event]:
        """A packet from a client; `options` (whole words) go into the header."""
        inner = self._parse(data)
        if isinstance(inner, Drop):
            return [inner]
        if inner.family == 6 and (local := self._local(data)) is not None:
            return local
        if inner.fragment:
            whole = self._whole(data, inner, now)
            if isinstance(whole, list):
                return whole
            data, inner = whole
        if inner.proto == UDP and self.udp_port in (inner.dport, inner.sport):
            return self._drop("steering_attempt")
        if inner.icmp_error is not None:
            key = related_key(0, 0, inner)
            entry = self.flows.get(key) if key is not None else None
            # only the flow's own tenant may speak about it: no client can aim
            # errors at another tenant's connections by quoting them
            if entry is None or self.classifier.tenant_of(inner.src) != entry.state[0]:
                return self._drop("icmp_unrelated")
            self.counters["icmp_related"] += 1
        else:
            key, _ = flow_key(0, 0, inner)
            entry = self.flows.lookup(key, now)
        if entry is None:
            try:
                c = self.classifier.classify(inner)
            except PacketError as exc:
                return self._drop(exc.reason)
            entry = self.flows.insert(key, now, (c.client, c.chain.id, c.code))
            entry.timeout = EDGE_TIMEOUT
        client, chain_id, code = entry.state
        chain = self.map.chains.get(chain_id)
        if chain is None:
            return self._drop("unknown_chain")
        hop, rerouted = self._next_hop(chain.services[0], code, entry.fwd_hop)
        if hop is None:
            return self._drop("no_instance")
        entry.fwd_hop = hop
        entry.packets += 1
        n = len(chain.services)
        hdr = wire.pack(chain_id, n, code, client, self.map.epoch, _REROUTED if rerouted else 0,
                        next_proto=NEXT_PROTO[inner.family], words=5 + (len(options) >> 2))
        self.counters["encapsulated"] += 1
        return [Send(hop, hdr + options + data[:inner.length])]

    def from_fabric(self, data: bytes, src: str | None, now: float) -> list[Event]:
        h = self._decode(data)
        if isinstance(h, Drop):
            return [h]
        if not h.flags & _REVERSE or h.index != 0:
            return self._drop("bad_index")
        return self._deliver(data[h.length:], data[20:h.length], now)

    def _back(self, data: bytes, now: float) -> list[Event]:
        return self.from_client(data, now)


class EgressNode(EdgeNode):
    """Strips the header and delivers to the server; classifies replies from
    the server by the flow it recorded and sends them back up the chain."""

    def from_fabric(self, data: bytes, src: str | None, now: float) -> list[Event]:
        h = self._decode(data)
        if isinstance(h, Drop):
            return [h]
        if h.flags & _REVERSE or h.index != 0:
            return self._drop("bad_index")
        inner = self._parse(data, h.length)
        if isinstance(inner, Drop):
            return [inner]
        if NEXT_PROTO[inner.family] != h.next_proto:
            return self._drop("next_proto_mismatch")
        if inner.icmp_error is None:  # an error about a flow records no flow of its own
            key, _ = flow_key(0, 0, inner)
            entry = self.flows.lookup(key, now)
            if entry is None:
                entry = self.flows.insert(key, now)
                entry.timeout = EDGE_TIMEOUT
            entry.state = (h.client, h.chain, h.code)
            if src is not None:
                entry.prev_hop = src
            entry.packets += 1
        return self._deliver(data[h.length:], data[20:h.length], now)

    def from_server(self, data: bytes, now: float, options: bytes = b"") -> list[Event]:
        """A reply from a server; `options` (whole words) go into the header."""
        inner = self._parse(data)
        if isinstance(inner, Drop):
            return [inner]
        if inner.family == 6 and (local := self._local(data)) is not None:
            return local
        if inner.fragment:
            whole = self._whole(data, inner, now)
            if isinstance(whole, list):
                return whole
            data, inner = whole
        if inner.icmp_error is not None:
            key = related_key(0, 0, inner)
            entry = self.flows.get(key) if key is not None else None
            if entry is None:
                return self._drop("icmp_unrelated")
            self.counters["icmp_related"] += 1
        else:
            key, _ = flow_key(0, 0, inner)
            entry = self.flows.lookup(key, now)
            if entry is None:
                return self._drop("no_flow_return")
            if not entry.established:  # the server answered: a flood of new flows cannot push it out
                self.flows.establish(entry)
        client, chain_id, code = entry.state
        chain = self.map.chains.get(chain_id)
        if chain is None:
            return self._drop("unknown_chain")
        hop, rerouted = self._next_hop(chain.services[-1], code, entry.prev_hop)
        if hop is None:
            return self._drop("no_instance")
        entry.prev_hop = hop
        flags = _REVERSE | (_REROUTED if rerouted else 0)
        hdr = wire.pack(chain_id, len(chain.services), code, client, self.map.epoch, flags,
                        next_proto=NEXT_PROTO[inner.family], words=5 + (len(options) >> 2))
        self.counters["encapsulated"] += 1
        return [Send(hop, hdr + options + data[:inner.length])]

    def _back(self, data: bytes, now: float) -> list[Event]:
        return self.from_server(data, now)


def _mid_stream(inner: Inner, reverse: bool) -> bool:
    """A packet no flow starts with: a reply, or TCP other than a bare SYN."""
    return reverse or (inner.proto == TCP and inner.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN)


def _checksum_left(options: bytes) -> bool:
    """Whether the header's GSO option says the host left the inner
    packet's transport checksum unfilled (offload), so a service must not
    verify it. Malformed options say nothing: the checksum is verified."""
    try:
        gso = wire.read_gso(options)
    except HeaderError:
        return False
    return gso is not None and bool(gso[0] & NEEDS_CSUM)
