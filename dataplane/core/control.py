"""The control channel, without I/O: the controller and its clients.

The controller owns the service map and has its shell keep it (the embedded
map store: a `Persist` event per epoch, before the pushes of that epoch), so
a restarted controller, built from what was kept, resumes at the same epoch
and states. Every forwarder sends it a HEARTBEAT
every interval (and a STATUS saying which epoch it holds); from its first
heartbeat on, the controller's failure detector declares an instance dead
after `misses` silent intervals
and publishes a new epoch in which the dead instance holds no role (its
buckets led by their former secondaries). Every change is pushed at once to
every forwarder, and the current map is re-pushed every `refresh` seconds,
so a lost push or a restarted forwarder catches up without a request.

Several controllers can share one store (`shared=True`), so that none is a
single point of failure. Every forwarder heartbeats to all of them and
installs the newest map whichever pushes it first (`ControlClient`'s
`others`). Each controller detects failures on its own; a change it wants
(an instance dead, back, in sync, an operator's) is a `Change`, and the next
map is `successor(map, changes)`, a deterministic function of the map the
store holds and those changes, so controllers that saw the same failure
compute the same map. It is not published directly but proposed
(`Propose`): a compare-and-swap against the store revision it was computed
from. The winner pushes it; a loser adopts the winner's map (`on_cas`,
`adopt`) and proposes what is still missing from it. A controller pushes
only maps the store holds, so no two maps ever carry one epoch and no
forwarder goes back. A controller proposes deaths only once it has heard
more than half of the serving members for a whole detection timeout: when
most fall silent at once, it is the one cut off, not they (the price: a
failure of more than half of the serving members at once is not acted on).

Messages are sync-wire datagrams (`dataplane.core.syncwire`) with the same HMAC
and a per-sender anti-replay window; the map rides zlib-compressed.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dataplane.core import syncwire as sw
from dataplane.core.events import Persist, Propose
from dataplane.core.liveness import Declared, FailureDetector, Health
from dataplane.core.servicemap import Instance, InstanceState, MapError, ServiceMap, load_json

STATUS_DECLARED_DEAD = 1
STATUS_IN_SYNC = 2
"""Every live peer completed a bulk to the sender as of the epoch it holds."""
MAX_MAP_BYTES = 1 << 20
"""The most a MAP record inflates to (the lab's map is a few KB): zlib can
inflate a datagram a thousandfold, so it is stopped at this size."""


@dataclass(frozen=True, slots=True)
class ControlSend:
    to: str
    data: bytes


@dataclass(frozen=True, slots=True)
class MapPublished:
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class MapReceived:
    smap: ServiceMap


_SERVING = (InstanceState.ACTIVE, InstanceState.JOINING, InstanceState.DRAINING)


@dataclass(frozen=True, slots=True)
class Change:
    """A state a controller wants an instance in, and the states it applies
    to: a change the store's map already made, or overtook (another
    controller's), no longer applies and is dropped, never made twice."""

    state: InstanceState
    applies_to: frozenset[InstanceState]
    reason: str


def died(names: Iterable[str], why: str = "missed heartbeats") -> dict[str, Change]:
    """The changes of a dead set: every serving one of `names` DEAD."""
    return {n: Change(InstanceState.DEAD, frozenset(_SERVING), f"{n} {why}") for n in names}


def successor(prev: ServiceMap, changes: Mapping[str, Change]) -> tuple[ServiceMap, list[Change]] | None:
    """The map after `changes`, computed from `prev` alone: the changes that
    still apply, in name order, each one epoch; with those changes. None
    when none applies. Two controllers that computed from the same map with
    the same changes (the same dead set) propose the very same map, so it
    does not matter which of them wins."""
    new: ServiceMap | None = None
    applied = []
    for name in sorted(changes):
        c = changes[name]
        if prev.instance(name).state not in c.applies_to:
            continue
        if new is None:
            new = prev.copy()
        new.set_state(name, c.state)
        applied.append(c)
    return None if new is None else (new, applied)


class Endpoint:
    """Signs outgoing control datagrams and checks incoming ones.

    Every datagram is bound to its receiver's incarnation as last heard from
    it (`syncwire`), and one bound to another incarnation is refused
    (`wrong_incarnation`): a restarted forwarder does not take a map that was
    recorded for its former self. `hello` names the record types accepted
    from a peer that does not know our incarnation (yet): the forwarder's
    HEARTBEAT at the controller (its first ones, and all of them right after
    a controller restart), nothing at a forwarder, since the controller
    pushes only to members it has heard, bound to the incarnation it heard.
    Other records of such a datagram (a STATUS) are dropped and counted
    (`unbound_records`) until the sender has heard us."""

    def __init__(self, me: str, names: list[str], keyring: sw.Keyring, incarnation: int,
                 hello: frozenset[sw.RecordType] = frozenset()) -> None:
        self.me = me
        self.my_id = sw.node_id(me)
        self.keyring = keyring
        self.incarnation = incarnation
        self.hello = hello
        self.ids = {sw.node_id(n): n for n in names}
        self.incarnations: dict[str, int] = {}
        """Peer -> its incarnation as last heard (what we bind our datagrams to)."""
        self._counter = 0
        self._windows: dict[str, sw.ReplayWindow] = {}
        self.rejected: Counter[str] = Counter()

    def encode(self, to: str, records: list[sw.Record]) -> bytes:
        self._counter += 1
        return sw.encode(self.keyring, self.my_id, sw.node_id(to), self.incarnation,
                         self.incarnations.get(to, 0), self._counter, 0, records)

    def decode(self, data: bytes) -> tuple[str, sw.Datagram] | None:
        try:
            dg = sw.decode(self.keyring, data, self.my_id)
        except sw.SyncError as exc:
            self.rejected[exc.reason] += 1
            return None
        name = self.ids.get(dg.sender)
        if name is None:
            self.rejected["unknown_sender"] += 1
            return None
        inc = self.incarnations.get(name, 0)
        if dg.incarnation < inc:
            self.rejected["stale_incarnation"] += 1
            return None
        if dg.receiver_incarnation != self.incarnation:
            hello = [r for r in dg.records if r.type in self.hello]
            if not hello:
                self.rejected["wrong_incarnation"] += 1
                return None
            self.rejected["unbound_records"] += len(dg.records) - len(hello)
            dg.records = hello
        window = self._windows.get(name) if dg.incarnation == inc else None
        if window is None:
            window = sw.ReplayWindow()
        if not window.check_and_set(dg.counter):
            self.rejected["replay"] += 1
            return None
        self.incarnations[name] = dg.incarnation
        self._windows[name] = window
        return name, dg


def map_record(smap: ServiceMap) -> sw.Record:
    return sw.Record(sw.RecordType.MAP, zlib.compress(smap.to_json().encode()))


class MapTooBig(ValueError):
    """A MAP record that inflates past MAX_MAP_BYTES (or ends early)."""


def read_map_record(value: bytes) -> bytes:
    """The map JSON of a MAP record, inflated at most to MAX_MAP_BYTES;
    raise MapTooBig past that, zlib.error when it is not zlib."""
    d = zlib.decompressobj()
    text = d.decompress(value, MAX_MAP_BYTES)
    if d.unconsumed_tail or not d.eof:
        raise MapTooBig(f"map larger than {MAX_MAP_BYTES} bytes, or truncated")
    return text


class Controller:
    """The embedded map store: detection, map epochs, pushes.

    It does no I/O: every map it publishes comes out as a `Persist` event
    (before the pushes of that map), and the shell keeps it; a restarted
    controller is built with what was kept (`stored`)."""

    def __init__(self, name: str, smap: ServiceMap, keyring: sw.Keyring, incarnation: int,
                 detector: FailureDetector, refresh: float = 0.100, now: float = 0.0,
                 stored: bytes | None = None, shared: bool = False, revision: int = 0,
                 agents: Mapping[str, Iterable[str]] | None = None) -> None:
        """`smap` is the topology's map; `stored`, the store's content when
        there is one, replaces it (raises MapError when it is no valid map).
        `shared`: other controllers write the same store, so every new map
        is proposed by compare-and-swap (`Propose`) instead of kept
        (`Persist`); `revision` is the store revision of `stored` (0: none).
        `agents`: each machine's agent and the nodes whose exits it may
        report (`EXITED`); they get the pushes too, which bind their
        notices to this controller's incarnation."""
        self.agents = {a: frozenset(nodes) for a, nodes in (agents or {}).items()}
        self.joined_at: dict[str, int] = {}
        """JOINING members and the epoch that made them join."""
        self._watch: list[str] = []
        """Serving members of a stored map, watched from the first tick on:
        silence before the shell's loop runs (its set-up can take longer
        than a detector timeout) is not the members' silence."""
        if stored is not None:
            smap = ServiceMap.from_json(stored)
            for n, i in ((n, i) for insts in smap.services.values() for n, i in insts.items()):
                if i.state in _SERVING:
                    self._watch.append(n)
                if i.state == InstanceState.JOINING:
                    # the store keeps no join epoch: the map's is the latest
                    # it can be, and a joiner in sync holds it once pushed
                    self.joined_at[n] = smap.epoch
        self.map = smap
        self.members = [n for insts in smap.services.values() for n in insts]
        self.endpoint = Endpoint(name, [*self.members, *self.agents], keyring, incarnation,
                                 hello=frozenset({sw.RecordType.HEARTBEAT}))
        self.detector = detector
        self.refresh = refresh
        self._last_push = -1.0
        self._dirty = True
        self.held: dict[str, int] = {}
        """Epoch each member last reported holding."""
        self.history: list[tuple[float, int, str]] = []
        self.counters: Counter[str] = Counter()
        self.shared = shared
        self.revision = revision
        """Store revision of `map` (shared): the fencing token of what it holds."""
        self._changes: dict[str, Change] = {}
        """Changes wanted and not yet in the store's map (shared)."""
        self._proposal: tuple[ServiceMap, list[Change]] | None = None
        """The map proposed and not yet answered, with its changes (shared)."""
        self._quorum_since: float | None = None
        """Since when (as of the last tick) it has heard a majority (shared)."""

    def receive(self, data: bytes, now: float) -> list[object]:
        got = self.endpoint.decode(data)
        if got is None:
            return []
        name, dg = got
        out: list[object] = []
        if name in self.agents:   # its heartbeats only make it known (pushes bind to it)
            for rec in dg.records:
                if rec.type == sw.RecordType.EXITED:
                    out.extend(self._exited(name, rec.value, now))
            return out
        for rec in dg.records:
            if rec.type == sw.RecordType.HEARTBEAT:
                out.extend(self._declared(self.detector.heard(name, now), now))
            elif rec.type == sw.RecordType.STATUS and len(rec.value) == 5:
                held = int.from_bytes(rec.value[:4], "big")
                self.held[name] = held
                out.extend(self._maybe_active(name, held, rec.value[4], now))
        return out

    def _maybe_active(self, name: str, held: int, flags: int, now: float) -> list[object]:
        """Make before break: a JOINING instance becomes ACTIVE once it reports
        being in sync with every peer as of the epoch that made it join."""
        if name not in self.joined_at or self.map.instance(name).state != InstanceState.JOINING:
            return []
        if not flags & STATUS_IN_SYNC or held < self.joined_at[name]:
            return []
        if self.shared:
            return self._want(name, Change(InstanceState.ACTIVE, frozenset({InstanceState.JOINING}),
                                           f"{name} in sync: takes its buckets"), now)
        del self.joined_at[name]
        return [*self.set_state(name, InstanceState.ACTIVE, f"{name} in sync: takes its buckets", now),
                *self.push(now)]

    def operator(self, name: str, action: str, now: float) -> list[object]:
        """`scale-out` a SPARE (it joins, then leads) or `drain` an ACTIVE
        instance (no new flows; pinned flows finish there)."""
        try:
            state = self.map.instance(name).state
        except MapError:
            raise ValueError(f"no instance {name!r}") from None
        if action == "scale-out" and state == InstanceState.SPARE:
            if self.shared:
                return self._want(name, Change(InstanceState.JOINING, frozenset({state}),
                                               f"{name} scaled out: joining"), now)
            return [*self._join(name, f"{name} scaled out: joining", now), *self.push(now)]
        if action == "drain" and state == InstanceState.ACTIVE:
            if self.shared:
                return self._want(name, Change(InstanceState.DRAINING, frozenset({state}),
                                               f"{name} draining"), now)
            return [*self.set_state(name, InstanceState.DRAINING, f"{name} draining", now), *self.push(now)]
        raise ValueError(f"cannot {action} {name}: it is {state.value}")

    def _join(self, name: str, reason: str, now: float) -> list[object]:
        out = self.set_state(name, InstanceState.JOINING, reason, now)
        self.joined_at[name] = self.map.epoch
        return out

    def tick(self, now: float) -> list[object]:
        for n in self._watch:
            self.detector.watch(n, now)  # silence from now on counts
        self._watch.clear()
        if self.shared:
            if not self._hears_most(now):
                self._quorum_since = None
            elif self._quorum_since is None:
                self._quorum_since = now
        out: list[object] = self._declared(self.detector.tick(now), now)
        if self.shared:
            out.extend(self._propose(now))   # what waited for an answer, or for a quorum
        if self._dirty or now - self._last_push >= self.refresh:
            out.extend(self.push(now))
        return out

    def push(self, now: float) -> list[ControlSend]:
        self._dirty = False
        self._last_push = now
        rec = map_record(self.map)
        # dead members too: one that was only partitioned must learn it was
        # declared dead (and stop serving) as soon as it is reachable again;
        # not to members never heard: a push is bound to an incarnation heard
        heard = self.endpoint.incarnations
        return [ControlSend(n, self.endpoint.encode(n, [rec])) for n in (*self.members, *self.agents)
                if n in heard]

    def set_state(self, name: str, state: InstanceState, reason: str,
                  now: float) -> list[MapPublished | Persist]:
        """Publish a new epoch with `name` in `state` (operator or detector),
        and the store's new content, to be kept before any push of it."""
        new = self.map.copy()
        new.set_state(name, state)
        self.map = new
        self._dirty = True
        self.history.append((now, new.epoch, reason))
        self.counters["epochs"] += 1
        return [MapPublished(new.epoch, reason), Persist(new.to_json().encode())]

    def _exited(self, agent: str, value: bytes, now: float) -> list[object]:
        """An agent saw a process of its machine exit: the node is dead now,
        not a detection timeout after its last heartbeat (its heartbeats
        may even outlive it by the time the kernel takes to end it). Only
        the nodes of the agent's own machine; a node held dead already (a
        repeated notice, or the detector was first) changes nothing."""
        node = value.decode("ascii", "replace")
        if node not in self.agents[agent]:
            self.counters["exit_refused"] += 1
            return []
        if self.detector.health(node) == Health.DEAD:
            return []
        self.counters["exits_reported"] += 1
        last = self.detector.peers[node].last_heard if node in self.detector.peers else now
        self.detector.declare_dead(node, now)
        return self._declared([Declared(node, Health.DEAD, now, last)], now, "exited (agent)")

    def _declared(self, events: list[Declared], now: float, why: str = "missed heartbeats") -> list[object]:
        out: list[object] = []
        for d in events:
            out.append(d)
            inst = self.map.instance(d.peer)
            if d.health == Health.DEAD and inst.state in _SERVING:
                if self.shared:  # counted once published: it may never be
                    out.extend(self._want(d.peer, died([d.peer], why)[d.peer], now))
                    continue
                self.counters["failovers"] += 1
                out.extend(self.set_state(d.peer, InstanceState.DEAD, f"{d.peer} {why}", now))
                out.extend(self.push(now))
            elif d.health == Health.ALIVE and inst.state == InstanceState.DEAD:
                if self.shared:
                    out.extend(self._want(d.peer, Change(InstanceState.JOINING, frozenset({inst.state}),
                                                         f"{d.peer} is back: joining"), now))
                    continue
                out.extend(self._join(d.peer, f"{d.peer} is back: joining", now))
                out.extend(self.push(now))
        return out

    # -- a shared store ------------------------------------------------------------

    def _want(self, name: str, change: Change, now: float) -> list[object]:
        self._changes[name] = change
        return self._propose(now)

    def _hears_most(self, now: float) -> bool:
        """Hears more than half of the serving members: when most of them
        fall silent at once, this controller is the one cut off, and its
        deaths would kill a working mesh."""
        serving = [n for insts in self.map.services.values() for n, i in insts.items() if i.state in _SERVING]
        heard = sum(not self.detector.silent(n, now) for n in serving)
        return 2 * heard > len(serving)

    def _propose(self, now: float) -> list[object]:
        """Propose the changes still wanted, computed from the store's map;
        one proposal at a time, since the next must be computed from the
        answer. A death not yet published whose instance is heard again is
        dropped (the silence was this controller's); deaths wait until this
        controller has heard a majority for a whole detection timeout: right
        after its cut heals, the members not heard again yet are silent only
        to it, and each is heard within one heartbeat interval."""
        if self._proposal is not None or not self._changes:
            return []
        self._changes = {n: c for n, c in self._changes.items()
                         if self.map.instance(n).state in c.applies_to
                         and not (c.state == InstanceState.DEAD and not self.detector.silent(n, now))}
        steady = self._quorum_since is not None and now - self._quorum_since >= self.detector.timeout
        wanted = self._changes if steady else \
            {n: c for n, c in self._changes.items() if c.state != InstanceState.DEAD}
        got = successor(self.map, wanted)
        if got is None:
            return []
        self._proposal = got
        self.counters["proposals"] += 1
        return [Propose(got[0].to_json().encode(), self.revision)]

    def on_cas(self, won: bool, revision: int, stored: bytes | None, now: float) -> list[object]:
        """The store's answer to the last `Propose`: won (our map is stored
        at `revision`: publish it), or lost (`stored` is the map that won, at
        `revision`: adopt it), or unknown (lost with `stored` None: the store
        could not be asked; the next tick proposes again from what is held,
        and if the write did land after all, that proposal loses to it and
        adopts it). Then propose whatever is still wanted."""
        if self._proposal is None:
            raise ValueError("an answer to no proposal")
        proposed, changes = self._proposal
        self._proposal = None
        if won:
            out = self._published(proposed.epoch, changes, now)
            # the store's watch may have brought it (or a newer map) first
            out += self._take(proposed, revision, now) if revision > self.revision else []
        elif stored is not None:
            self.counters["cas_lost"] += 1
            out = self.adopt(stored, revision, now)
        else:
            self.counters["cas_unknown"] += 1
            return []
        return out + self._propose(now)

    def adopt(self, stored: bytes, revision: int, now: float) -> list[object]:
        """Take the store's map at `revision` (the winner of a race, or one
        seen by following the store) and push it; a revision not newer than
        the one held is refused (the fence: no controller goes back)."""
        if revision <= self.revision:
            return []
        self.counters["adopted"] += 1
        return self._take(ServiceMap.from_json(stored), revision, now)

    def _published(self, epoch: int, changes: list[Change], now: float) -> list[object]:
        """Our proposal won: its changes are published (once, by the winner)."""
        for c in changes:
            self.history.append((now, epoch, c.reason))
            self.counters["epochs"] += 1
            if c.state == InstanceState.DEAD:
                self.counters["failovers"] += 1
        return [MapPublished(epoch, c.reason) for c in changes]

    def _take(self, smap: ServiceMap, revision: int, now: float) -> list[object]:
        """Hold `smap`, the store's at `revision`, and push it. Its joiners
        are watched for being in sync from its epoch on (as after a restart);
        an instance it has dead that this detector still hears is held dead
        here too, so this controller, too, makes it rejoin once back."""
        was = self.map
        self.map, self.revision, self._dirty = smap, revision, True
        joining = {n for insts in smap.services.values() for n, i in insts.items()
                   if i.state == InstanceState.JOINING}
        self.joined_at = {n: self.joined_at.get(n, smap.epoch) for n in joining}
        for insts in smap.services.values():
            for n, i in insts.items():
                if i.state == InstanceState.DEAD and was.instance(n).state != InstanceState.DEAD:
                    self.detector.declare_dead(n, now)
        return list(self.push(now))


@dataclass(frozen=True, slots=True)
class Standing:
    """What a newly installed map means for the instance installing it."""

    join_epoch: int | None
    """The epoch that made it join (kept while JOINING), None once it leads."""
    change: str | None
    """`declared_dead` (stop serving, forget every flow, new incarnation),
    `serving_again`, or None."""


def standing(me: Instance | None, was: Instance | None, serving: bool,
             join_epoch: int | None, epoch: int) -> Standing:
    """The forwarder shell's and the simulator's one rule for a new map: `me`
    is this instance in it (None for an edge or the controller), `was` in the
    map it replaces. A map that declares it dead stops it; so does one that
    has it JOINING while it thought itself leading (the map that declared it
    dead never reached it); any other live state after a stop serves again."""
    if me is None:
        return Standing(join_epoch, None)
    joined = (join_epoch or epoch) if me.state == InstanceState.JOINING else None
    if me.state == InstanceState.DEAD:
        return Standing(joined, "declared_dead" if serving else None)
    if was is not None and me.state == InstanceState.JOINING and \
            was.state in (InstanceState.ACTIVE, InstanceState.DRAINING):
        return Standing(joined, "declared_dead")
    return Standing(joined, None if serving else "serving_again")


def not_ready(confirmed: bool, state: InstanceState | None, serving: bool,
              in_sync: bool) -> list[str]:
    """Why a forwarder is not ready yet; empty when it is.

    Ready means it can carry its share: it holds a map from the controller
    (not only the topology's), and, for an instance (`state` is its state in
    that map), it serves, the map does not count it dead or joining, and its
    replicas are in sync (every live peer's bulk is done). `lab up` and
    `lab restart` wait for this, so a test that follows a restart never meets
    an instance that is still catching up or about to learn it was declared
    dead."""
    why = [] if confirmed else ["no_map"]
    if state is None:
        return why
    if not serving:
        why.append("declared_dead")
    if state in (InstanceState.DEAD, InstanceState.JOINING):
        why.append(state.value)
    if not in_sync:
        why.append("sync_pending")
    return why


class ControlClient:
    """A forwarder's side: heartbeats out, newer maps in.

    With `others` (the other controllers of a shared store, each with this
    forwarder's keyring for it) it heartbeats to every controller, so each
    detects failures itself, and takes a map from whichever pushes it first;
    a map is installed only if its epoch is newer than the one held, so the
    slower controller's push of the same map, or an older one, changes
    nothing."""

    def __init__(self, me: str, controller: str, smap: ServiceMap, keyring: sw.Keyring,
                 incarnation: int, interval: float = 0.010,
                 others: Mapping[str, sw.Keyring] | None = None) -> None:
        self.controller = controller
        self.in_sync = False
        """Set by the shell: the replicator is synced as of the epoch held."""
        self.endpoint = Endpoint(me, [controller], keyring, incarnation)
        self.endpoints = {controller: self.endpoint,
                          **{c: Endpoint(me, [c], k, incarnation) for c, k in (others or {}).items()}}
        """Controller -> the endpoint that signs for it and checks its pushes."""
        self._by_id = {sw.node_id(c): e for c, e in self.endpoints.items()}
        self.epoch = smap.epoch
        self.interval = interval
        self._last = -1.0
        self.declared_dead = False
        self.confirmed = False
        """A controller sent the map held (a newer one, or a re-push of it)."""
        self.counters: Counter[str] = Counter()

    def tick(self, now: float) -> list[ControlSend]:
        if now - self._last < self.interval:
            return []
        self._last = now
        flags = (STATUS_DECLARED_DEAD if self.declared_dead else 0) | \
            (STATUS_IN_SYNC if self.in_sync else 0)
        status = (self.epoch & 0xFFFFFFFF).to_bytes(4, "big") + bytes([flags])
        recs = [sw.Record(sw.RecordType.HEARTBEAT, sw.u64(int(now * 1e6))),
                sw.Record(sw.RecordType.STATUS, status)]
        return [ControlSend(c, e.encode(c, recs)) for c, e in self.endpoints.items()]

    def receive(self, data: bytes) -> list[MapReceived]:
        # the claimed sender only picks the keys: they check the claim
        got = self._by_id.get(sw.sender_of(data) or 0, self.endpoint).decode(data)
        if got is None:
            return []
        out = []
        for rec in got[1].records:
            if rec.type != sw.RecordType.MAP:
                continue
            try:
                doc = load_json(read_map_record(rec.value))
                epoch = doc.get("epoch") if isinstance(doc, dict) else None
                if type(epoch) is int and epoch <= self.epoch:
                    self.confirmed |= epoch == self.epoch
                    continue  # the periodic re-push of a map we hold
                smap = ServiceMap.from_dict(doc)
            except MapTooBig:
                self.counters["map_too_big"] += 1
                continue
            except (zlib.error, MapError):
                self.counters["bad_map"] += 1
                continue
            self.epoch = smap.epoch
            self.confirmed = True
            self.counters["maps"] += 1
            out.append(MapReceived(smap))
        return out

    def exited(self, node: str) -> list[ControlSend]:
        """An agent's notice that `node`'s process exited, to every
        controller this client has heard (a notice is bound to the
        controller's incarnation, so one not heard yet would refuse it: the
        agent holds the notice until then)."""
        rec = [sw.Record(sw.RecordType.EXITED, node.encode("ascii"))]
        return [ControlSend(c, e.encode(c, rec)) for c, e in self.endpoints.items() if c in e.incarnations]
