"""The whole mesh in one process: the real core parts, driven like the shell drives them.

Every node of a topology (`dataplane.lab.topology`) is assembled from the
same core objects the lab's forwarder processes run: an `IngressNode`, a
`ServiceNode` per instance with its `Replicator` (and so its sync channels
and failure detector), an `EgressNode`, each with a `ControlClient` and a
`ResendBuffer`, and the `Controller` with its `FailureDetector` and its map
store. `SimForwarder` and `SimController` are the sim's copies of the event
handling of `dataplane.shells.forwarder.Forwarder` (`_on_fabric`, `_on_sync`,
`_on_control`, `tick`, `_install`, `_declared_dead`, the heartbeat child
with its `HANG_AFTER` cut-off): what differs is only where bytes go (the
simulated `Network` instead of sockets) and where time comes from (the
simulated `Clock`). Keep them in step with the shell: a change there that
is not mirrored here makes the simulator test something else. Left out:
the shell's `_prepare_failures` (it only warms the bucket-table cache), its
metrics, queries and event log.

With `controllers` > 1 the controllers share a `SimStore` (the etcd key, with
its compare-and-swap), each reached over the simulated network; every
forwarder heartbeats to all of them and takes maps from any.

What happens is written to a `History` (who served which flow at which
epoch, the epochs each node installed, every replica update applied, the
faults), which `dataplane.sim.checker` reads.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dataplane.core import header as wire
from dataplane.core.affinity import AffinityHasher
from dataplane.core.control import (ControlClient, Controller, ControlSend, MapPublished, MapReceived,
                                    standing)
from dataplane.core.events import Deliver, FlowUpdate, Persist, Propose, Send
from dataplane.core.liveness import Declared, FailureDetector
from dataplane.core.mapstore import CasResult, Read, Stored
from dataplane.core.node import EgressNode, IngressNode, ServiceNode
from dataplane.core.replicator import Policy, Replicator, SyncSend
from dataplane.core.resend import ResendBuffer
from dataplane.core.servicemap import ServiceMap
from dataplane.core.services import create
from dataplane.core.syncchannel import SyncConfig
from dataplane.lab.topology import DEFAULT_LAB, Timers, Topology, load
from dataplane.sim.clock import Clock
from dataplane.sim.network import CONTROL, FABRIC, SYNC, LinkFaults, Network
from dataplane.sim.store import SimStore

TICK = 0.002
"""A forwarder's tick period (the shell's is 1 ms; 2 ms halves the cost of a
run and stays below every timer the ticks serve)."""
HANG_AFTER = 0.250
"""The heartbeat child stops once the loop has not come round for this long,
as in `dataplane.shells.forwarder`, whose constant is 1 s: a simulated loop
is never starved of CPU (the reason the lab's grew), and the shorter cut-off
lets the simulator's hangs of a few hundred ms exercise hang failovers."""
SYNC_HEARTBEAT = 0.020
EXPIRE_EVERY = 1.0
HOST_DELAY = 0.0001
TIMERS = Timers(heartbeat=0.010, misses=4, holddown=0.200, map_refresh=0.100)
"""The sim's control timers: 40 ms detection, a short hold-down so a run
sees crashed instances rejoin within its fault episodes."""
BUCKETS = 256
"""Bucket tables are built per distinct map (about 0.5 s at the lab's 4096)."""
STORE_DELAY = 0.0005
STORE_JITTER = 0.0005
"""One way between a controller and the shared store: the jitter decides
which of two controllers' transactions lands first."""
STORE_TIMEOUT = 0.020
"""A transaction unanswered for this long has an unknown outcome (the
controller is cut off): the controller proposes again from what it holds."""


def sim_topology(policy: str = "async", path: Path = DEFAULT_LAB) -> Topology:
    """The lab's default topology with the sim's timers, buckets and policy."""
    topo = load(path)
    services = {n: replace(s, options={}) for n, s in topo.services.items()}
    return replace(topo, buckets=BUCKETS, timers=TIMERS, policy=policy, services=services)


@dataclass
class History:
    """What the checker reads: one list per kind of observation."""

    serves: list[tuple[float, str, str, int, int, int, int]] = field(default_factory=list)
    """(t, service, node, incarnation, epoch of the packet's header, affinity code,
    connection id) of every packet an instance forwarded."""
    epochs: list[tuple[float, str, int, int]] = field(default_factory=list)
    """(t, node, incarnation, epoch held after an install; a controller's
    after every map it takes)."""
    applies: list[tuple[float, str, int, Any, int, bool]] = field(default_factory=list)
    """(t, node, incarnation, flow key, version, deleted) of every replica update applied."""
    faults: list[tuple[float, str, str]] = field(default_factory=list)
    notes: list[tuple[float, str, str]] = field(default_factory=list)
    lost_counts: Counter[str] = field(default_factory=Counter)
    """flows_lost of every incarnation that crashed (its counters die with it)."""
    maps: list[tuple[float, str, int, str]] = field(default_factory=list)
    """(t, node, epoch, digest of the whole map) of every map a forwarder
    installed or a controller took: one epoch must never name two maps."""

    def note(self, t: float, node: str, what: str) -> None:
        self.notes.append((t, node, what))

    def took(self, t: float, node: str, smap: ServiceMap) -> None:
        self.maps.append((t, node, smap.epoch, hashlib.sha256(smap.to_json().encode()).hexdigest()[:16]))


class SimForwarder:
    """One forwarder (ingress, egress or instance), as the shell runs it."""

    def __init__(self, mesh: Mesh, name: str, incarnation: int) -> None:
        self.mesh, self.name, self.incarnation = mesh, name, incarnation
        topo = mesh.topo
        self.role = topo.role(name)
        initial = topo.build_map()
        timers = topo.timers
        others = {c: topo.control_keyring(name, c) for c in mesh.controllers_named[1:]}
        self.client = ControlClient(name, topo.controller, initial, topo.control_keyring(name),
                                    incarnation, timers.heartbeat, others=others)
        self.resend = ResendBuffer(timers.heartbeat * (2 * timers.misses + 2))
        self.serving = True
        self.join_epoch: int | None = None
        self.alive = True
        self.hung = False
        self.last_round = mesh.clock.now
        self.inbox: list[tuple[str, str, bytes]] = []
        self._last_expire = mesh.clock.now
        self.rep: Replicator | None = None
        self.node: Any
        if self.role == "instance":
            spec = topo.service_of(name)
            assert spec is not None
            self.node = ServiceNode(name, initial, create(spec.kind, **spec.options),
                                    mirroring=topo.policy != "off")
            self._record_applies()
            self._new_replicator()
        elif self.role == "ingress":
            self.node = IngressNode(name, initial, AffinityHasher(topo.secret))
        else:
            self.node = EgressNode(name, initial)
        mesh.history.epochs.append((mesh.clock.now, name, incarnation, initial.epoch))
        mesh.history.took(mesh.clock.now, name, initial)
        mesh.clock.after(TICK, self._tick)
        mesh.clock.after(timers.heartbeat / 2, self._heartbeat)

    @property
    def map(self) -> ServiceMap:
        return self.node.map

    # -- what the sim adds: recording, crash, hang ------------------------------------

    def _record_applies(self) -> None:
        """Write every replica update the node applies to the history."""
        node, applied = self.node, self.mesh.history.applies
        inner = node.apply_update

        def apply_update(update: FlowUpdate, now: float) -> bool:
            ok = inner(update, now)
            if ok:
                applied.append((now, self.name, self.incarnation, update.key, update.version,
                                update.deleted))
            return ok

        node.apply_update = apply_update

    def crash(self) -> None:
        """The process dies: every timer of this incarnation stops acting."""
        self.alive = False
        self.mesh.history.lost_counts[self.name] += self.node.counters["flows_lost"]

    def hang(self) -> None:
        """The loop stops (SIGSTOP): datagrams wait in the socket buffers."""
        self.hung = True

    def resume(self) -> None:
        self.hung = False
        now = self.mesh.clock.now
        self.last_round = now
        waiting, self.inbox = self.inbox, []
        for src, kind, data in waiting:
            self.receive(src, kind, data)

    # -- input ----------------------------------------------------------------------

    def receive(self, src: str, kind: str, data: bytes) -> None:
        """A datagram arrives (the shell's `_on_fabric`, `_on_sync`, `_on_control`)."""
        if not self.alive:
            return
        if self.hung:
            self.inbox.append((src, kind, data))
            return
        now = self.mesh.clock.now
        self.last_round = now
        if kind == FABRIC:
            if not self.serving:
                self.node.drops["declared_dead"] += 1
                return
            events = self.node.from_fabric(data, src, now)
            if self.role == "instance":
                self.mesh.record_serve(self, data, events)
            self._emit_batch([events], now)
        elif kind == SYNC:
            if self.rep is not None:
                self._out(self._emit_sync(self.rep.receive(data, now)), now)
        elif kind == CONTROL:
            for ev in self.client.receive(data):
                if isinstance(ev, MapReceived):
                    self._install(ev.smap, now)

    def from_host(self, data: bytes) -> None:
        """A packet from a client (ingress) or a server (egress)."""
        if not self.alive:
            return
        if self.hung:
            return  # the hosts' bridge does not queue for a stopped loop in the sim
        now = self.mesh.clock.now
        handler = self.node.from_client if self.role == "ingress" else self.node.from_server
        self._emit_batch([handler(data, now)], now)

    # -- the shell's loop, mirrored -------------------------------------------------

    def _tick(self) -> None:
        if not self.alive:
            return
        mesh = self.mesh
        mesh.clock.after(TICK, self._tick)
        if self.hung:
            return
        now = mesh.clock.now
        self.last_round = now
        self.resend.expire(now)
        if self.rep is not None:
            self.client.in_sync = self.join_epoch is not None and self.rep.synced_since(self.join_epoch)
            self._out(self._emit_sync(self.rep.tick(now)), now)
            if now - self._last_expire >= EXPIRE_EVERY:
                self._last_expire = now
                self._emit_batch([self.node.expire(now)], now)

    def _heartbeat(self) -> None:
        """The heartbeat child: sends while the loop came round within HANG_AFTER."""
        if not self.alive:
            return
        mesh = self.mesh
        mesh.clock.after(self.client.interval / 2, self._heartbeat)
        now = mesh.clock.now
        if self.hung and now - self.last_round > HANG_AFTER:
            return
        for send in self.client.tick(now):
            mesh.net.send(self.name, send.to, CONTROL, send.data)

    def _emit_sync(self, outs: list[Any]) -> list[Any]:
        rest = []
        for o in outs:
            if isinstance(o, SyncSend):
                self.mesh.net.send(self.name, o.peer, SYNC, o.data)
            else:
                rest.append(o)
        return rest

    def _emit_batch(self, batch: list[list[Any]], now: float) -> None:
        if self.rep is not None:
            self._out(self._emit_sync(self.rep.process_batch(batch, now)), now)
        else:
            self._out([ev for events in batch for ev in events], now)

    def _out(self, events: list[Any], now: float) -> None:
        mesh = self.mesh
        for ev in events:
            if isinstance(ev, Send):
                if ev.to not in mesh.topo_nodes:
                    self.node.drops["no_address"] += 1
                    continue
                self.resend.record(now, ev.to, ev.data)
                mesh.net.send(self.name, ev.to, FABRIC, ev.data)
            elif isinstance(ev, Deliver):
                mesh.to_host(self.name, ev.data)
            elif isinstance(ev, Declared):
                mesh.history.note(now, self.name, f"peer {ev.peer} {ev.health.value}")

    def _new_replicator(self) -> None:
        topo = self.mesh.topo
        self.rep = Replicator(self.node, topo.sync_keyring(self.name), self.incarnation,
                              Policy(topo.policy), SyncConfig(heartbeat=SYNC_HEARTBEAT),
                              FailureDetector(SYNC_HEARTBEAT, topo.timers.misses, topo.timers.holddown))

    def _install(self, smap: ServiceMap, now: float) -> None:
        """The shell's `_install`, line for line."""
        me = smap.services.get(smap.service_of(self.name) or "", {}).get(self.name)
        was = self.map.services.get(self.map.service_of(self.name) or "", {}).get(self.name)
        old = self.map
        if self.rep is not None:
            self.rep.update_map(smap, now)
        else:
            self.node.update_map(smap, now)
        self.mesh.history.epochs.append((now, self.name, self.incarnation, self.map.epoch))
        self.mesh.history.took(now, self.name, smap)
        again = self.resend.reroute(old, smap, now) if self.serving else []
        if again:
            self._out(again, now)
        st = standing(me, was, self.serving, self.join_epoch, smap.epoch)
        self.join_epoch = st.join_epoch
        if st.change == "declared_dead":
            self._declared_dead(now)
        elif st.change == "serving_again":
            self.serving = True
            self.client.declared_dead = False
            self.mesh.history.note(now, self.name, "serving again")

    def _declared_dead(self, now: float) -> None:
        """The shell's `_declared_dead`: stop serving, forget every flow, new incarnation."""
        self.serving = False
        self.client.declared_dead = True
        self.node.counters["declared_dead"] += 1
        for e in list(self.node.flows):
            self.node.flows.delete(e.key, "discarded_declared_dead")
        self.incarnation = self.mesh.new_incarnation()
        if self.rep is not None:
            self._new_replicator()
        self.mesh.history.note(now, self.name, "declared dead: stops serving")


class SimController:
    """A controller process: `Controller` on the control socket, its tick, its
    store: the embedded one (the mesh's `store`, kept by `Persist`) when it is
    alone, else the shared `SimStore`, reached over the simulated network: a
    `Propose` is a transaction that lands a delay later and is answered a
    delay after that, and the store's watch brings every write; while the
    controller is cut off (`Network.partition`) requests and answers are lost."""

    def __init__(self, mesh: Mesh, name: str, incarnation: int) -> None:
        self.mesh, self.name, self.incarnation = mesh, name, incarnation
        topo, timers = mesh.topo, mesh.topo.timers
        self.alive = True
        detector = FailureDetector(timers.heartbeat, timers.misses, timers.holddown)
        keys = topo.control_keyring(name, name)
        store = mesh.shared_store
        if store is None:
            self.ctl = Controller(name, topo.build_map(), keys, incarnation, detector,
                                  timers.map_refresh, mesh.clock.now, mesh.store)
        else:
            kept = store.read().stored        # a (re)started controller reads the store first
            self.ctl = Controller(name, topo.build_map(), keys, incarnation, detector, timers.map_refresh,
                                  mesh.clock.now, kept.value if kept else None, shared=True,
                                  revision=kept.revision if kept else 0)
            store.watchers.append(self._watched)
        self._txn = 0
        """Number of the transaction awaiting its answer (0: none)."""
        self._txns = 0
        mesh.history.took(mesh.clock.now, name, self.ctl.map)
        mesh.clock.after(TICK, self._tick)

    @property
    def map(self) -> ServiceMap:
        return self.ctl.map

    def crash(self) -> None:
        self.alive = False
        if self.mesh.shared_store is not None:
            self.mesh.shared_store.watchers.remove(self._watched)

    def receive(self, src: str, kind: str, data: bytes) -> None:
        if self.alive and kind == CONTROL:
            self.out(self.ctl.receive(data, self.mesh.clock.now))

    def operator(self, node: str, action: str) -> None:
        self.out(self.ctl.operator(node, action, self.mesh.clock.now))

    def _tick(self) -> None:
        if not self.alive:
            return
        self.mesh.clock.after(TICK, self._tick)
        self.out(self.ctl.tick(self.mesh.clock.now))

    def out(self, events: list[Any]) -> None:
        mesh = self.mesh
        epoch = self.ctl.map.epoch
        for ev in events:
            if isinstance(ev, ControlSend):
                mesh.net.send(self.name, ev.to, CONTROL, ev.data)
            elif isinstance(ev, Persist):
                mesh.store = ev.data
            elif isinstance(ev, Propose):
                self._propose(ev)
            elif isinstance(ev, MapPublished):
                mesh.history.note(mesh.clock.now, self.name, f"epoch {ev.epoch}: {ev.reason}")
            elif isinstance(ev, Declared):
                mesh.history.note(mesh.clock.now, self.name, f"declared {ev.peer} {ev.health.value}")
        if self.ctl.map.epoch != epoch:
            mesh.history.epochs.append((mesh.clock.now, self.name, self.incarnation, self.ctl.map.epoch))
            mesh.history.took(mesh.clock.now, self.name, self.ctl.map)

    # -- the shared store, over the network ----------------------------------------

    def _reachable(self) -> bool:
        return self.name not in self.mesh.net.isolated

    def _later(self, act: Callable[[], None], to_store: bool = False) -> None:
        """`act` one store delay from now, if this controller is not cut off
        then; what goes to the store lands even if the controller died
        meanwhile, what comes back needs it alive."""
        self.mesh.clock.after(STORE_DELAY + self.mesh.rng.random() * STORE_JITTER,
                              lambda: act() if self._reachable() and (to_store or self.alive) else None)

    def _propose(self, p: Propose) -> None:
        store = self.mesh.shared_store
        assert store is not None
        self._txns += 1
        self._txn = n = self._txns
        if self._reachable():
            self._later(lambda: self._answer(n, store.propose(p.data, p.computed_from)), to_store=True)
        self.mesh.clock.after(STORE_TIMEOUT, lambda: self._timed_out(n))

    def _answer(self, n: int, r: CasResult) -> None:
        """The transaction landed; its answer comes back a delay later."""
        self._later(lambda: self._answered(n, r))

    def _answered(self, n: int, r: CasResult) -> None:
        if n != self._txn:
            return                      # answered by its time-out already
        self._txn = 0
        now = self.mesh.clock.now
        if r.stored is None:
            self.out(self.ctl.on_cas(False, 0, None, now))
        else:
            self.out(self.ctl.on_cas(r.won, r.stored.revision, None if r.won else r.stored.value, now))

    def _timed_out(self, n: int) -> None:
        if n == self._txn and self.alive:
            self._txn = 0
            self.out(self.ctl.on_cas(False, 0, None, self.mesh.clock.now))

    def _watched(self, stored: Stored) -> None:
        """The store's watch: every write reaches this controller a delay
        later, unless it is cut off (then `resync` reads what it missed)."""
        if self._reachable() and self.alive:
            self._later(lambda: self._adopt(stored))

    def _adopt(self, stored: Stored) -> None:
        self.out(self.ctl.adopt(stored.value, stored.revision, self.mesh.clock.now))

    def resync(self) -> None:
        """The network is back: read the key, as `mapstore.Follower` does
        after a broken watch, and adopt it if it is newer."""
        store = self.mesh.shared_store
        assert store is not None
        self._later(lambda: self._read(store.read()), to_store=True)

    def _read(self, read: Read) -> None:
        self._later(lambda: self._adopt(read.stored) if read.stored is not None else None)


HostSink = Callable[[str, bytes], None]
"""on_deliver(edge node, inner packet): what a host receives."""
FlowOf = Callable[[bytes], int | None]
"""The connection id of an inner packet (for the serve records), or None."""


class Mesh:
    """Every node of a topology on one clock and one network."""

    def __init__(self, clock: Clock, rng: random.Random, topo: Topology | None = None,
                 faults: dict[str, LinkFaults] | None = None, controllers: int = 1,
                 compare: bool = True) -> None:
        """`controllers` > 1 share a `SimStore`; `compare=False` makes its
        transactions blind writes (the split-brain control)."""
        self.clock, self.rng = clock, rng
        self.topo = topo or sim_topology()
        self.history = History()
        self.net = Network(clock, rng, self._deliver, faults)
        self.store: bytes | None = None
        """The controller's embedded map store (what its `Persist` events
        keep): survives a controller restart."""
        self._incarnation = 1_000_000
        self.topo_nodes = set(self.topo.forwarders())
        self.on_host: HostSink = lambda edge, data: None
        self.flow_of: FlowOf = lambda inner: None
        self.shared_store = SimStore(compare) if controllers > 1 else None
        self.controllers_named = [self.topo.controller,
                                  *(f"{self.topo.controller}{i}" for i in range(2, controllers + 1))]
        self.controllers = {n: SimController(self, n, self.new_incarnation()) for n in self.controllers_named}
        self._authority: tuple[int, ServiceMap] | None = None
        self.nodes: dict[str, SimForwarder] = {
            n: SimForwarder(self, n, self.new_incarnation())
            for n in self.topo.forwarders() if n != self.topo.controller}
        self.dead: set[str] = set()

    @property
    def controller(self) -> SimController:
        """The first controller (the only one, by default)."""
        return self.controllers[self.topo.controller]

    @property
    def map(self) -> ServiceMap:
        """The authority: the shared store's map (the topology's before the
        first write), or the one controller's."""
        store = self.shared_store
        if store is None:
            return self.controller.map
        revision = store.stored.revision if store.stored is not None else 0
        if self._authority is None or self._authority[0] != revision:
            m = ServiceMap.from_json(store.stored.value) if store.stored is not None else self.topo.build_map()
            self._authority = (revision, m)
        return self._authority[1]

    def operator(self, node: str, action: str) -> None:
        """An operator's action, at the first controller up and connected."""
        ctl = next(c for c in self.controllers.values() if c.alive and c.name not in self.net.isolated)
        ctl.operator(node, action)

    def new_incarnation(self) -> int:
        """Strictly growing, like the shell's start time in microseconds."""
        self._incarnation = max(self._incarnation + 1, int(self.clock.now * 1e6) + 1_000_000)
        return self._incarnation

    # -- wiring ---------------------------------------------------------------------

    def _deliver(self, dst: str, src: str, kind: str, data: bytes) -> None:
        if dst in self.controllers:
            self.controllers[dst].receive(src, kind, data)
        elif dst in self.nodes:
            self.nodes[dst].receive(src, kind, data)

    def from_host(self, edge: str, data: bytes) -> None:
        """A host hands a packet to its edge node (ingress or egress)."""
        self.clock.after(HOST_DELAY, lambda: self.nodes[edge].from_host(data))

    def to_host(self, edge: str, data: bytes) -> None:
        self.clock.after(HOST_DELAY, lambda: self.on_host(edge, data))

    def record_serve(self, fwd: SimForwarder, data: bytes, events: list[Any]) -> None:
        """An instance forwarded a packet: which instance served which flow,
        for the epoch the packet was sent in (its header's)."""
        if not any(isinstance(ev, Send) for ev in events):
            return
        try:
            h = wire.decode(data)
        except wire.HeaderError:
            return
        conn = self.flow_of(data[h.length:])
        if conn is not None:
            self.history.serves.append((self.clock.now, fwd.node.service_name, fwd.name,
                                        fwd.incarnation, h.epoch, h.code, conn))

    # -- faults ---------------------------------------------------------------------

    def crash(self, name: str) -> None:
        if name in self.controllers:
            self.controllers[name].crash()
        else:
            self.nodes[name].crash()
        self.dead.add(name)

    def restart(self, name: str) -> None:
        """A new process of a crashed node: a new incarnation, the topology's map
        (a forwarder) or the store's (the controller)."""
        self.dead.discard(name)
        if name in self.controllers:
            self.controllers[name] = SimController(self, name, self.new_incarnation())
        else:
            self.nodes[name] = SimForwarder(self, name, self.new_incarnation())

    def instances(self, service: str | None = None) -> list[str]:
        return [i for s in self.topo.services.values() if service in (None, s.name) for i in s.members]
