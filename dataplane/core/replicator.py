"""Ties a service node to its sync channels: policy, bulk sync, liveness.

Still without I/O: the forwarder shell hands it the node's events, sync
datagrams and clock ticks, and carries out what it returns (`Send` on the
fabric, `SyncSend` on the sync socket, `Deliver`, `Drop`) in the order given.
That order *is* the sync policy:

========== =================================================================
off        mirrors are discarded (the control runs)
async      the packet goes first; updates follow in the next batch
ordered    updates of this packet are flushed before the packet is released
acked      as ordered, and the packet that opened a flow (version 1) is held
           until the secondary acknowledged its state (pfsync's `defer`);
           after `hold_timeout` it is released anyway and counted
========== =================================================================

It also answers the channel's requests: a peer that (re)started or asked for
a resync gets a bulk of every flow this node leads and that peer mirrors; a
`ResyncFlows` gets the current state of those flows. Full bulks are
coalesced per peer: while one runs, any number of further requests (a
datagram can hold hundreds of RESYNC records) make one more bulk, started
when it ends from the state of that moment (`bulk_coalesced`). Heartbeats heard on the
channels feed a failure detector whose verdicts come out as `Declared`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from dataplane.core import syncwire as sw
from dataplane.core.events import Deliver, Drop, Event, FlowUpdate, Mirror, Send
from dataplane.core.flowtable import FlowKey
from dataplane.core.liveness import Declared, FailureDetector
from dataplane.core.node import ServiceNode
from dataplane.core.servicemap import InstanceState, ServiceMap
from dataplane.core.syncchannel import (Apply, PeerRestarted, ResyncFlows, ResyncRequested, SyncChannel,
                                   SyncConfig, SyncEvent, Transmit)


class Policy(str, Enum):
    OFF = "off"
    ASYNC = "async"
    ORDERED = "ordered"
    ACKED = "acked"


@dataclass(frozen=True, slots=True)
class SyncSend:
    """A sync datagram for peer `peer`."""

    peer: str
    data: bytes


Out = Send | Deliver | Drop | SyncSend | Declared
_PLAIN_TYPES = (Send, Deliver, Drop)
_PLAIN = frozenset(_PLAIN_TYPES)


@dataclass
class _Held:
    deadline: float
    key: FlowKey
    peer: str
    send: Send


BUCKETS_PER_LOOKUP = 32
"""Above one led flow per this many buckets, `update_map` reads every
bucket's secondary off both tables at once (`BucketTable.others`) rather
than asking both maps flow by flow (1.25 us a flow): reading costs 0.14 ms
at 4,096 buckets and 1.4 ms at 65,536, some 1,100 flows' lookups. For
2,500 led flows the lookups took 3.3 ms and take 0.7 ms at 4,096 buckets,
3.0 and 1.9 ms at 65,536 (one B instance of the default lab dying)."""


def _secondaries(old: ServiceMap, new: ServiceMap, service: str, me: str,
                 flows: int) -> Callable[[int], tuple[str | None, bool]]:
    """code -> (its secondary other than `me` in `new`, whether that is not
    its secondary in `old`), for `flows` lookups."""
    t0, t1 = old.table(service), new.table(service)
    names: list[str | None] = [None, *sorted(set(t0.names) | set(t1.names))]
    n = new.buckets
    if flows * BUCKETS_PER_LOOKUP <= n or len(names) > 0xFF or old.buckets != n:
        def lookup(code: int) -> tuple[str | None, bool]:
            sec = new.secondary(service, code, exclude=me)
            return sec, sec != old.secondary(service, code, exclude=me)
        return lookup
    codes = {name: k for k, name in enumerate(names) if name is not None}
    was, now = t0.others(me, codes), t1.others(me, codes)

    def read(code: int) -> tuple[str | None, bool]:
        b = code % n
        return names[now[b]], now[b] != was[b]
    return read


class Replicator:
    """The sync side of one service instance."""

    def __init__(self, node: ServiceNode, keyring: sw.Keyring, incarnation: int,
                 policy: Policy = Policy.ASYNC, config: SyncConfig | None = None,
                 detector: FailureDetector | None = None, hold_timeout: float = 0.050) -> None:
        self.node = node
        self.keyring = keyring
        self.incarnation = incarnation
        self.policy = policy
        self.config = config or SyncConfig()
        self.detector = detector or FailureDetector(interval=self.config.heartbeat)
        self.hold_timeout = hold_timeout
        self.channels: dict[str, SyncChannel] = {}
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        """Refusals of datagrams from a peer that has no channel yet (a
        channel counts its own)."""
        self._held: list[_Held] = []
        self._ids: tuple[int, dict[int, str]] = (-1, {})
        self._heard: dict[str, float] = {}
        self._full_bulks: dict[str, int] = {}
        """Peer -> id of the last full bulk started to it."""
        self._bulk_wanted: set[str] = set()
        """Peers that asked for a full bulk while one was running."""
        self._epoch = -1
        self._open_channels()

    def _open_channels(self) -> None:
        """A channel to every other live instance of the service, so the
        handshake is done before the first update needs it."""
        m = self.node.map
        if m.epoch == self._epoch:
            return
        self._epoch = m.epoch
        for name in m.services[self.node.service_name]:
            if name != self.node.name and m.is_alive(name):
                self.channel(name)

    # -- node side ---------------------------------------------------------------------

    def channel(self, peer: str) -> SyncChannel:
        ch = self.channels.get(peer)
        if ch is None:
            ch = SyncChannel(self.node.name, peer, self.keyring, self.incarnation, self.config)
            self.channels[peer] = ch
        return ch

    def process(self, events: list[Event], now: float) -> list[Out]:
        """Order one packet's events for output according to the policy."""
        if len(events) == 1 and events[0].__class__ in _PLAIN:
            return events  # type: ignore[return-value]  # the common packet: nothing to order
        if self.policy is not Policy.ASYNC:
            return self.process_batch([events], now)
        # async, one packet: process_batch's order (the packet, then whatever
        # batch is due) without its lists of lists; this runs per mirror
        out: list[Out] = []
        mirrored: list[SyncChannel] = []
        for e in events:
            cls = e.__class__
            if cls is Mirror:
                ch = self.channels.get(e.to) or self.channel(e.to)  # type: ignore[union-attr]
                ch.submit(e.update, now)  # type: ignore[union-attr]
                if ch not in mirrored:
                    mirrored.append(ch)
            elif cls in _PLAIN:
                out.append(e)  # type: ignore[arg-type]
        for ch in mirrored:
            due = ch.flush_due(now)
            if due:
                out.extend(self._handle(ch.peer, due, now))
        return out

    def process_batch(self, batch: list[list[Event]], now: float) -> list[Out]:
        """Order the events of packets received together (one list per packet).

        Under `ordered` and `acked` the updates of the whole batch leave in
        one flush ahead of all its packets: the promise (no packet before
        its flow's update) holds at one sync datagram per batch rather than
        one per packet. Under `acked` each packet that opened a flow waits
        for its own flow's acknowledgement."""
        mirrors = [e for evs in batch for e in evs if isinstance(e, Mirror)]
        plain: list[Out] = [e for evs in batch for e in evs if isinstance(e, _PLAIN_TYPES)]
        if self.policy == Policy.OFF or not mirrors:
            return plain
        peers = {}
        for m in mirrors:
            self.channel(m.to).submit(m.update, now)
            peers[m.to] = None
        if self.policy == Policy.ASYNC:
            return plain + self._datagrams_due(peers, now, force=False)
        out = self._datagrams_due(peers, now, force=True)
        if self.policy == Policy.ORDERED:
            return out + plain
        for evs in batch:
            opened = next((m for m in evs if isinstance(m, Mirror) and m.update.version == 1
                           and not m.update.deleted), None)
            for ev in evs:
                if not isinstance(ev, _PLAIN_TYPES):
                    continue
                if (opened is not None and isinstance(ev, Send)
                        and not self.channels[opened.to].settled(opened.update.key)):
                    self._held.append(_Held(now + self.hold_timeout, opened.update.key, opened.to, ev))
                    self.counters["held"] += 1
                    continue
                out.append(ev)
        return out

    def _datagrams_due(self, peers: dict[str, None], now: float, force: bool) -> list[Out]:
        out: list[Out] = []
        for peer in peers:
            ch = self.channels[peer]
            out.extend(self._handle(peer, ch.flush(now) if force else ch.flush_due(now), now))
        return out

    # -- sync side ----------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Out]:
        """A sync datagram from some peer: routed by its sender id.

        Only another instance of this service has a channel, and one is made
        only for a datagram whose tag checked: unsigned datagrams, or ones
        claiming to come from this instance or another service's, cost a
        counted refusal and leave nothing behind."""
        peer = self._peer_of(data)
        if peer is None:
            self.counters["unknown_sender"] += 1
            return []
        ch = self.channels.get(peer)
        if ch is not None:
            return self._handle(peer, ch.receive(data, now), now) + self._release(now)
        try:
            dg = sw.decode(self.keyring, data, sw.node_id(self.node.name))
        except sw.SyncError as exc:
            self.rejected[exc.reason] += 1
            return []
        return self._handle(peer, self.channel(peer).accept(dg, now), now) + self._release(now)

    def tick(self, now: float) -> list[Out]:
        self._open_channels()
        for peer in list(self._bulk_wanted):
            if not self.channels[peer].bulk_running(self._full_bulks[peer]):
                self._bulk_wanted.discard(peer)
                self._full_bulk(peer, now)
        out: list[Out] = []
        for peer, ch in list(self.channels.items()):
            out.extend(self._handle(peer, ch.tick(now), now))
        out.extend(self.detector.tick(now))
        out.extend(self._release(now))
        return out

    def update_map(self, smap: ServiceMap, now: float) -> int:
        """Install a newer map in the node; every flow this node leads whose
        secondary changed (a failure, a rejoin, a scale-out) is bulk-synced
        to its new secondary, promoted replicas included."""
        node = self.node
        old = node.map
        if not node.update_map(smap, now) or self.policy == Policy.OFF:
            return 0
        svc, me = node.service_name, node.name
        # a joining peer gets a bulk on every map change, if only an empty one:
        # its end tells it (and through it the controller) that it is in sync
        # as of this epoch. Not only when it starts joining: a joiner whose
        # push of that epoch was overtaken first sees itself joining at a later
        # one and waits for a bulk stamped with it (found by the simulator)
        moved: dict[str, list[FlowUpdate]] = {
            n: [] for n, i in smap.services[svc].items()
            if n != me and i.state == InstanceState.JOINING}
        secondary = _secondaries(old, smap, svc, me, len(node.flows) - node.flows.replicas)
        for e in node.flows:
            if e.replica:
                continue
            new_sec, changed = secondary(e.key[1])
            if new_sec is not None and (e.promoted or changed):
                moved.setdefault(new_sec, []).append(node.update_of(e))
        self._open_channels()
        for peer, updates in moved.items():
            self.channel(peer).start_bulk(updates, now, smap.epoch)
            self.counters["bulk_on_map_change"] += 1
        return len(moved)

    def resync(self, peer: str, now: float) -> int:
        """Operator-forced full resync of `peer` (a bulk of what it mirrors)."""
        self.counters["forced_resync"] += 1
        return self.channel(peer).start_bulk(self._mirrored_by(peer), now, self.node.map.epoch)

    def synced_since(self, epoch: int) -> bool:
        """True when every live peer of the service completed a bulk to this
        instance stamped `epoch` or later: a joining instance is in sync."""
        if self.policy == Policy.OFF:
            return True  # nothing is mirrored, so there is nothing to wait for
        m = self.node.map
        peers = [n for n in m.services[self.node.service_name]
                 if n != self.node.name and m.is_alive(n)]
        return all(p in self.channels and self.channels[p].synced_epoch >= epoch for p in peers)

    def _peer_of(self, data: bytes) -> str | None:
        """The other instance of this service a datagram claims to come from."""
        if len(data) < 8:
            return None
        m = self.node.map
        epoch, ids = self._ids
        if epoch != m.epoch:
            ids = {sw.node_id(n): n for n in m.services[self.node.service_name] if n != self.node.name}
            self._ids = (m.epoch, ids)
        return ids.get(int.from_bytes(data[4:8], "big"))

    def _handle(self, peer: str, events: list[SyncEvent], now: float) -> list[Out]:
        out: list[Out] = []
        ch = self.channels[peer]
        apply = self.node.apply_update
        for ev in events:
            cls = ev.__class__
            if cls is Apply:
                apply(ev.update, now)  # type: ignore[union-attr]
            elif cls is Transmit:
                out.append(SyncSend(peer, ev.data))  # type: ignore[union-attr]
            elif isinstance(ev, (PeerRestarted, ResyncRequested)) and self.policy != Policy.OFF:
                self._full_bulk(peer, now)
            elif isinstance(ev, ResyncFlows):
                for key in ev.keys:
                    entry = self.node.flows.get(key)
                    if entry is not None and not entry.replica:
                        ch.submit(self.node.update_of(entry), now)
                    else:
                        self.counters["resync_gone"] += 1
        if ch.last_heard > self._heard.get(peer, -1.0):
            self._heard[peer] = ch.last_heard
            out.extend(self.detector.heard(peer, ch.last_heard))
        return out

    def _full_bulk(self, peer: str, now: float) -> None:
        """A bulk of everything `peer` mirrors, unless one is running: then
        one more when it ends."""
        running = self._full_bulks.get(peer)
        if running is not None and self.channels[peer].bulk_running(running):
            self._bulk_wanted.add(peer)
            self.counters["bulk_coalesced"] += 1
            return
        self._full_bulks[peer] = self.channels[peer].start_bulk(self._mirrored_by(peer), now,
                                                                self.node.map.epoch)

    def _mirrored_by(self, peer: str) -> list[FlowUpdate]:
        node = self.node
        return [node.update_of(e) for e in node.flows
                if not e.replica and node.map.secondary(node.service_name, e.key[1],
                                                        exclude=node.name) == peer]

    def _release(self, now: float) -> list[Out]:
        if not self._held:
            return []
        out: list[Out] = []
        keep = []
        for h in self._held:
            ch = self.channels.get(h.peer)
            if ch is not None and ch.settled(h.key):
                out.append(h.send)
            elif now >= h.deadline:
                self.counters["hold_timeout"] += 1
                out.append(h.send)
            else:
                keep.append(h)
        self._held = keep
        return out

    def snapshot(self, now: float) -> dict[str, object]:
        return {"policy": self.policy.value, "held": len(self._held),
                "counters": dict(self.counters), "rejected": dict(self.rejected),
                "stale_updates_ignored": self.node.counters["stale_updates"],
                "peers": {p: ch.snapshot(now) for p, ch in sorted(self.channels.items())},
                "health": {p: self.detector.health(p).value for p in sorted(self.detector.peers)}}
