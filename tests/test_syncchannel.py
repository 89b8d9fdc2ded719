"""The sync channel over a simulated lossy link: convergence, restarts, bulk, auth."""

from __future__ import annotations

import hashlib
import random

import pytest

from dataplane.core import syncwire as sw
from dataplane.core.events import FlowUpdate
from dataplane.core.node import ServiceNode
from dataplane.sim.simlink import Faults, SimLink
from dataplane.core.syncchannel import (Acked, Apply, BulkDone, BulkProgress, InSync, PeerRestarted,
                                   Rejected, ResyncFlows, ResyncRequested, State, SyncChannel, SyncConfig, Transmit)

from tests.conftest import pair_map

KEYS = sw.Keyring({1: b"k" * 32}, current=1)


def key(i: int):
    return (1, i, 6, b"\x0a\x01\x00\x0a", 1000 + i % 60000, b"\x0a\x02\x00\x0a", 80)


class RawState:
    """A service whose state is its bytes: the replica is a real
    `ServiceNode`, so `apply_update` decides what is applied, not the harness."""

    name = "raw"
    max_timeout = 60.0

    def process(self, pkt, forward, state, now):
        raise AssertionError("no packets in these tests")

    def encode_state(self, state: bytes) -> bytes:
        return state

    def decode_state(self, data: bytes) -> bytes:
        return bytes(data)


class Side:
    """A channel, the flows this side leads (versions only grow), and the
    node that applies what the peer mirrors."""

    def __init__(self, name, peer, incarnation, config=None, keyring=KEYS):
        self.ch = SyncChannel(name, peer, keyring, incarnation, config)
        self.truth: dict = {}      # flows this side leads: key -> (version, state)
        self.node = ServiceNode(name, pair_map(), RawState())
        self.events: list = []

    @property
    def replica(self) -> dict:
        """Flows mirrored from the peer, as the node holds them: key -> (version, state)."""
        return {e.key: (e.version, e.state) for e in self.node.flows}

    def update(self, i, now, delete=False):
        k = key(i)
        version = self.truth.get(k, (0, b""))[0] + 1
        state = b"" if delete else hashlib.sha256(f"{i}:{version}".encode()).digest()[:12]
        self.truth[k] = (version, None if delete else state)
        self.ch.submit(FlowUpdate(k, version, state, deleted=delete), now)

    def current(self, k):
        version, state = self.truth[k]
        return FlowUpdate(k, version, state or b"", deleted=state is None)

    def handle(self, events, now):
        for ev in events:
            self.events.append(ev)
            if isinstance(ev, Apply):
                self.node.apply_update(ev.update, now)
            elif isinstance(ev, ResyncFlows):
                for k in ev.keys:
                    self.ch.submit(self.current(k), now)
            elif isinstance(ev, (PeerRestarted, ResyncRequested)):
                self.ch.start_bulk([self.current(k) for k in sorted(self.truth)], now)


def live(store):
    return {k: v for k, v in store.items() if v[1] is not None}


class World:
    def __init__(self, seed=1, faults=None, config=None):
        self.link = SimLink(seed, faults)
        self.now = 0.0
        self.a = Side("ba", "bb", 1_000, config)
        self.b = Side("bb", "ba", 2_000, config)
        self.tapped: list[tuple[str, bytes]] = []
        """Every datagram sent, as (to, bytes): what an eavesdropper records."""
        self.cut: set[str] = set()
        """Sides nothing reaches any more."""

    def side(self, name):
        return self.a if name == "ba" else self.b

    def step(self, dt=0.001):
        self.now += dt
        for to, data in self.link.due(self.now):
            s = self.side(to)
            s.handle(self.route(s, s.ch.receive(data, self.now)), self.now)
        for s in (self.a, self.b):
            s.handle(self.route(s, s.ch.tick(self.now)), self.now)

    def route(self, s, events):
        out = []
        for ev in events:
            if isinstance(ev, Transmit):
                self.tapped.append((s.ch.peer, ev.data))
                if s.ch.peer not in self.cut:
                    self.link.send(self.now, s.ch.peer, ev.data)
            else:
                out.append(ev)
        return out

    def run(self, seconds, dt=0.001):
        for _ in range(int(seconds / dt)):
            self.step(dt)

    def converged(self):
        return live(self.b.replica) == live(self.a.truth) and live(self.a.replica) == live(self.b.truth)


@pytest.mark.parametrize("loss", [0.01, 0.10])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_converges_after_faults_stop(loss, seed):
    faults = Faults(loss=loss, duplicate=0.05, corrupt=0.02, jitter=0.004)
    w = World(seed, faults)
    rng = random.Random(seed)
    for _ in range(400):
        for _ in range(5):
            i = rng.randrange(300)
            side = w.a if rng.random() < 0.8 else w.b
            side.update(i, w.now, delete=rng.random() < 0.1)
        w.step()
    w.link.faults = Faults()
    for beats in range(1, 31):        # bounded: at most 30 heartbeat intervals
        w.run(0.010)
        if w.converged():
            break
    assert w.converged(), (len(live(w.b.replica)), len(live(w.a.truth)))
    print(f"\nloss {loss} seed {seed}: converged within {beats} heartbeat intervals; "
          f"{w.a.ch.stats['retransmitted']} retransmitted, rejected {dict(w.b.ch.rejected)}")
    assert w.a.ch.stats["retransmitted"] > 0
    if faults.corrupt:
        assert sum(w.a.ch.rejected.values()) + sum(w.b.ch.rejected.values()) > 0


def test_resend_queue_overflow_is_counted_and_resynced():
    cfg = SyncConfig(resend_queue=64, pending_limit=100)
    w = World(7, Faults(loss=0.5), cfg)
    for i in range(2000):
        w.a.update(i % 500, w.now)
        if i % 10 == 0:
            w.step()
    assert w.a.ch.stats["resend_overflow"] > 0
    w.link.faults = Faults()
    w.run(1.0)
    assert w.converged()
    assert w.a.ch.stats["resync_flows"] > 0
    assert w.a.ch.in_sync(w.now)


def test_secondary_restart_mid_stream_gets_a_bulk():
    w = World(3, Faults(loss=0.02))
    for i in range(500):
        w.a.update(i, w.now)
        w.step()
    w.b = Side("bb", "ba", 5_000)        # restarted: new incarnation, empty
    for i in range(500, 600):
        w.a.update(i, w.now)
        w.step()
    w.link.faults = Faults()
    w.run(0.5)
    assert w.converged()
    assert w.a.ch.stats["peer_restarts"] == 1
    assert any(isinstance(e, BulkDone) for e in w.a.events)
    assert any(isinstance(e, InSync) for e in w.b.events) and w.b.ch.peer_in_sync


def test_primary_restart_keeps_replicas_and_accepts_the_new_stream():
    w = World(4)
    for i in range(100):
        w.a.update(i, w.now)
        w.step()
    w.run(0.05)
    assert live(w.b.replica) == live(w.a.truth)
    old = dict(w.b.replica)
    w.a = Side("ba", "bb", 9_000)        # primary restarted, empty table
    for i in range(100, 150):
        w.a.update(i, w.now)
        w.step()
    w.run(0.1)
    assert w.b.ch.stats["peer_restarts"] == 1
    for k, v in old.items():
        assert w.b.replica[k] == v       # nothing lost on the secondary
    for i in range(100, 150):
        assert w.b.replica[key(i)] == w.a.truth[key(i)]


def test_stale_versions_are_never_applied():
    w = World(5, Faults(duplicate=0.5, jitter=0.01))
    for _ in range(20):
        for i in range(10):
            w.a.update(i, w.now)
        w.step()
    w.link.faults = Faults()
    w.run(0.2)
    assert live(w.b.replica) == live(w.a.truth)
    assert w.b.ch.stats["duplicates"] > 0


def test_a_bulk_snapshot_older_than_live_updates_is_not_applied():
    """The stale versions a channel does deliver: a bulk is paced out from a
    snapshot while live updates of the same flows, submitted after it,
    overtake its records. The replica's `apply_update` must keep the newer."""
    w = World(5)
    w.run(0.02)
    n = 3000
    for i in range(n):
        w.a.truth[key(i)] = (1, b"v1")
    w.a.ch.start_bulk([w.a.current(key(i)) for i in range(n)], w.now)
    for i in range(n):
        w.a.update(i, w.now)
    w.run(0.2)
    assert live(w.b.replica) == live(w.a.truth)
    assert w.b.node.counters["stale_updates"] > 0


def test_bulk_of_100k_flows_with_progress():
    w = World(6)
    n = 100_000
    w.run(0.02)
    assert w.a.ch.state == State.ESTABLISHED
    for i in range(n):
        w.a.truth[key(i)] = (1, i.to_bytes(8, "big"))
    bulk_id = w.a.ch.start_bulk([w.a.current(key(i)) for i in range(n)], w.now)
    t0 = w.now
    while not any(isinstance(e, BulkDone) and e.bulk_id == bulk_id for e in w.a.events) \
            and w.now - t0 < 5:
        w.step()
    progress = [e.sent for e in w.a.events if isinstance(e, BulkProgress) and e.bulk_id == bulk_id]
    assert progress == sorted(progress) and progress[-1] == n
    assert len(w.b.replica) == n and live(w.b.replica) == live(w.a.truth)
    print(f"\nbulk of {n} flows: {w.now - t0:.3f} s simulated at bulk_rate "
          f"{w.a.ch.config.bulk_rate:.0f}/s, {len(progress)} progress events")


def test_forced_resync():
    w = World(8)
    w.run(0.02)
    for i in range(10):
        w.a.update(i, w.now)
    w.run(0.02)
    for e in list(w.b.node.flows):            # pretend the replica was damaged
        w.b.node.flows.delete(e.key)
    w.b.handle(w.route(w.b, w.b.ch.request_resync()), w.now)
    requested = []
    for _ in range(20):
        w.step()
        requested += [e for e in w.a.events if type(e).__name__ == "ResyncRequested"]
        if requested:
            break
    assert requested
    w.a.ch.start_bulk([w.a.current(k) for k in w.a.truth], w.now)
    w.run(0.05)
    assert live(w.b.replica) == live(w.a.truth)


# -- authentication ------------------------------------------------------------------


def good_datagram(counter=5, incarnation=1_000, keyring=KEYS, receiver="bb"):
    """A HELLO of ba to a bb it does not know yet (receiver incarnation 0)."""
    return sw.encode(keyring, sw.node_id("ba"), sw.node_id(receiver), incarnation, 0, counter, 0,
                     [sw.hello(1)])


def reasons(ch, data):
    return [e.reason for e in ch.receive(data, 0.0) if isinstance(e, Rejected)]


@pytest.mark.parametrize("mangle,reason", [
    (lambda d: d[:30], "truncated"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d + b"x", "bad_length"),
    (lambda d: bytes([1]) + d[1:], "bad_version"),           # version 1 had no receiver incarnation
    (lambda d: d[:2] + bytes([9]) + d[3:], "unknown_key"),
    (lambda d: d[:53] + bytes([d[53] ^ 1]) + d[54:], "bad_mac"),
    (lambda d: d[:-16] + bytes(16), "bad_mac"),
])
def test_rejections(mangle, reason):
    ch = SyncChannel("bb", "ba", KEYS, 2_000)
    assert reasons(ch, mangle(good_datagram())) == [reason]
    assert ch.rejected[reason] == 1


def test_forged_wrong_receiver_replay_stale_malformed():
    ch = SyncChannel("bb", "ba", KEYS, 2_000)
    forged = good_datagram(keyring=sw.Keyring({1: b"x" * 32}, 1))
    assert reasons(ch, forged) == ["bad_mac"]
    assert reasons(ch, good_datagram(receiver="bc")) == ["wrong_receiver"]
    d = good_datagram(counter=5)
    assert reasons(ch, d) == []
    assert reasons(ch, d) == ["replay"]
    assert reasons(ch, good_datagram(counter=6, incarnation=999)) == ["stale_incarnation"]
    bad_body = sw.encode(KEYS, sw.node_id("ba"), sw.node_id("bb"), 1_000, 2_000, 7, 1,
                         [sw.Record(sw.RecordType.FLOW_UPSERT, b"\x00\x01")])
    assert reasons(ch, bad_body) == ["malformed"]
    wrong_sender = sw.encode(KEYS, sw.node_id("bc"), sw.node_id("bb"), 1_000, 2_000, 8, 0, [])
    assert reasons(ch, wrong_sender) == ["wrong_sender"]
    unbound = sw.encode(KEYS, sw.node_id("ba"), sw.node_id("bb"), 1_000, 1_999, 9, 0,
                        [sw.Record(sw.RecordType.ACK, sw.u64(1))])
    assert reasons(ch, unbound) == ["wrong_incarnation"]


def test_key_rotation_under_traffic_has_zero_failures():
    ring_a = sw.Keyring({1: b"a" * 32}, 1)
    ring_b = sw.Keyring({1: b"a" * 32}, 1)
    w = World(9)
    w.a.ch.keyring, w.b.ch.keyring = ring_a, ring_b
    for step in range(600):
        w.a.update(step % 50, w.now)
        w.step()
        if step == 100:
            ring_a.add(2, b"b" * 32)
            ring_b.add(2, b"b" * 32)
        if step == 200:
            ring_a.use(2)
        if step == 300:
            ring_b.use(2)
        if step == 400:
            ring_a.retire(1)
            ring_b.retire(1)
    w.run(0.05)
    assert not w.a.ch.rejected and not w.b.ch.rejected
    assert live(w.b.replica) == live(w.a.truth)


def test_replay_window():
    win = sw.ReplayWindow(size=8)
    assert win.check_and_set(10) and not win.check_and_set(10)
    assert win.check_and_set(5) and not win.check_and_set(5)
    assert not win.check_and_set(2)        # fell out of the window
    assert win.check_and_set(100) and win.check_and_set(99) and not win.check_and_set(92)


def test_snapshot_reports_the_observability_fields():
    w = World(10)
    w.a.update(1, w.now)
    w.run(0.05)
    snap = w.a.ch.snapshot(w.now)
    for field in ("in_sync", "resend_queue", "lag_ms", "unsynced_flows", "stats", "rejected"):
        assert field in snap
    assert snap["in_sync"] and snap["stats"]["acked"] >= 1


def test_an_older_update_never_overwrites_a_waiting_newer_one():
    """A bulk snapshot fed late must not replace a live update of the same
    flow that is still waiting to be sent (found under PYTHONHASHSEED=26)."""
    w = World(11)
    w.run(0.02)
    k = key(1)
    w.a.ch.submit(FlowUpdate(k, 4, b"new"), w.now)
    w.a.ch.submit(FlowUpdate(k, 1, b"old"), w.now)
    w.run(0.05)
    assert w.b.replica[k] == (4, b"new")
    assert w.a.ch.stats["stale_submit"] == 1


# -- replays across a restart (issue #14, finding 2) ----------------------------------


def kinds(to, data):
    return [r.type for r in sw.decode(KEYS, data, sw.node_id(to)).records]


def test_a_replayed_hello_does_not_wedge_a_restarted_receiver():
    """bb restarts; a HELLO of ba recorded long ago reaches it first and
    names an old sequence number. bb must still take ba's stream (ba's real
    HELLO resynchronises it) instead of waiting for records never coming."""
    w = World(12)
    for i in range(50):
        w.a.update(i, w.now)
        w.step()
    w.run(0.05)
    hello = next(d for to, d in w.tapped if to == "bb" and kinds(to, d) == [sw.RecordType.HELLO])
    w.b = Side("bb", "ba", 5_000)                       # restarted, empty
    w.b.handle(w.route(w.b, w.b.ch.receive(hello, w.now)), w.now)
    for i in range(50, 60):
        w.a.update(i, w.now)
        w.step()
    w.run(0.2)
    assert w.converged() and w.b.ch.peer_in_sync
    assert w.b.ch.stats["hello_resync"] == 1


def test_a_replayed_ack_from_before_a_restart_is_refused():
    """ba restarts; an ACK bb sent to ba's former self, replayed, must not
    acknowledge what ba's new self sent and bb never got."""
    w = World(13)
    for i in range(20):
        w.a.update(i, w.now)
        w.step()
    w.run(0.05)
    ack = [d for to, d in w.tapped if to == "ba" and sw.RecordType.ACK in kinds(to, d)][-1]
    w.a = Side("ba", "bb", 9_000)                       # restarted
    w.run(0.03)
    assert w.a.ch.state == State.ESTABLISHED
    w.cut.add("bb")                                     # from now on nothing reaches bb
    for i in range(100, 110):
        w.a.update(i, w.now)
    w.route(w.a, w.a.ch.flush(w.now))
    queued = w.a.ch.snapshot(w.now)["resend_queue"]
    assert queued >= 10
    w.a.handle(w.route(w.a, w.a.ch.receive(ack, w.now)), w.now)
    assert w.a.ch.snapshot(w.now)["resend_queue"] == queued
    assert not w.a.ch.in_sync(w.now + 0.1)          # unacked past two RTOs
    assert w.a.ch.rejected["wrong_incarnation"] == 1


# -- amplification (issue #14, finding 8) ----------------------------------------------


def nack_everything(w, counter, spans=87):
    """A NACK bb could send (it holds the key): the whole sequence space, over and over."""
    return sw.encode(KEYS, sw.node_id("bb"), sw.node_id("ba"), 2_000, 1_000, counter, 0,
                     [sw.ranges(sw.RecordType.NACK, [(0, 2**64 - 1)] * spans)])


def retransmitted(w, data):
    """Records ba sends again for one datagram, and the bytes."""
    before = w.a.ch.stats["retransmitted"]
    out = [e for e in w.a.ch.receive(data, w.now) if isinstance(e, Transmit)]
    return w.a.ch.stats["retransmitted"] - before, sum(len(e.data) for e in out)


def test_repeated_nacks_are_not_answered_in_full_each_time():
    w = World(14)
    w.run(0.02)
    w.cut.add("bb")                                     # nothing is acked from here on
    for i in range(500):
        w.a.update(i, w.now)
    w.route(w.a, w.a.ch.flush(w.now))
    first, _ = retransmitted(w, nack_everything(w, 10**6))
    assert first == 500                                 # once: everything outstanding
    again = [retransmitted(w, nack_everything(w, 10**6 + n))[0] for n in range(1, 10)]
    assert again == [0] * 9                             # the same ranges at once: nothing twice
    assert w.a.ch.stats["retransmit_held_off"] == 9 * 500


def test_retransmission_is_rate_limited():
    """NACKs spaced past the hold-off still get no more than the token bucket."""
    cfg = SyncConfig(resend_queue=8192)
    w = World(15, config=cfg)
    w.run(0.02)
    w.cut.add("bb")
    for i in range(4000):
        w.a.update(i, w.now)
    w.route(w.a, w.a.ch.flush(w.now))
    sent = sent_bytes = received_bytes = 0
    for n in range(100):                                # 100 NACKs over 0.5 s
        w.now += 0.005
        data = nack_everything(w, 10**6 + n)
        got, nbytes = retransmitted(w, data)
        sent += got
        sent_bytes += nbytes
        received_bytes += len(data)
    limit = cfg.retransmit_rate * 0.5 + cfg.retransmit_burst * 4
    assert sent <= limit and w.a.ch.stats["retransmit_limited"] > 0
    print(f"\n100 NACKs of {received_bytes // 100} bytes: {sent} records ({sent_bytes} bytes) sent again, "
          f"{sent_bytes / received_bytes:.1f}x the bytes received")


def test_a_datagram_under_a_retired_key_is_refused_and_counted():
    """After a rotation's retire phase, what the peer signed with the old
    key (a late or recorded datagram) is refused as `unknown_key` and counted
    on the channel, and the channel carries on under the new key."""
    ring_a = sw.Keyring({1: b"a" * 32}, 1)
    ring_b = sw.Keyring({1: b"a" * 32}, 1)
    w = World(12)
    w.a.ch.keyring, w.b.ch.keyring = ring_a, ring_b
    w.a.update(1, w.now)
    w.run(0.05)
    late = [data for to, data in w.tapped if to == "bb"][-1]
    for ring in (ring_a, ring_b):
        ring.add(2, b"b" * 32)
    for ring in (ring_a, ring_b):
        ring.use(2)
    for ring in (ring_a, ring_b):
        ring.retire(1)
    assert reasons(w.b.ch, late) == ["unknown_key"]
    assert w.b.ch.rejected["unknown_key"] == 1
    w.a.update(2, w.now)
    w.run(0.05)
    assert live(w.b.replica) == live(w.a.truth) and w.b.ch.rejected == {"unknown_key": 1}


def test_flows_remembered_for_a_silent_peer_are_bounded():
    """Towards a peer that never answers, updates past `pending_limit` were
    remembered as keys without bound (860k after 1M flows). Past
    `resync_limit` the channel forgets them and marks the peer as needing a
    full bulk (counted); once the peer answers, it gets one and converges."""
    cfg = SyncConfig(resend_queue=64, pending_limit=100, resync_limit=500)
    w = World(4, config=cfg)
    w.cut.add("bb")
    for i in range(5000):
        w.a.update(i, w.now)
        if i % 50 == 0:
            w.step()
    assert len(w.a.ch._resync_keys) <= 500
    assert w.a.ch.needs_bulk and w.a.ch.stats["resync_overflow_bulk"] == 1
    assert not w.a.ch.in_sync(w.now)
    w.cut.clear()
    w.run(1.0)
    assert w.converged() and not w.a.ch.needs_bulk


def test_an_update_is_encoded_when_flushed_so_a_coalesced_one_costs_nothing(monkeypatch):
    """The pending set holds updates, not records: of two updates of one
    flow before a flush only the newer is ever encoded, and it is the one
    the peer applies."""
    w = World(12)
    w.run(0.02)
    encoded = []
    real = sw.flow_record
    monkeypatch.setattr(sw, "flow_record", lambda u: encoded.append(u.version) or real(u))
    w.a.update(1, w.now)
    w.a.update(1, w.now)
    assert encoded == [] and w.a.ch.stats["coalesced"] == 1
    w.run(0.05)
    assert encoded == [2]
    assert w.b.replica[key(1)] == w.a.truth[key(1)]


# -- one channel pair, datagrams handed over by hand (exact clocks, no link) ---------------


def deliver(to, events, now, drop=()):
    """Hand `to` the datagrams among `events` (but those at the indexes in
    `drop`); return everything it answers."""
    out = []
    datagrams = [e.data for e in events if isinstance(e, Transmit)]
    for i, data in enumerate(datagrams):
        if i not in drop:
            out += to.receive(data, now)
    return out


def settle(a, b, events, now):
    """Play `events` of `a` to `b`, their answers back, and so on until
    neither has anything more to send; return the other events of each."""
    seen = {a: [], b: []}
    src, dst = a, b
    while any(isinstance(e, Transmit) for e in events):
        seen[src] += [e for e in events if not isinstance(e, Transmit)]
        events = deliver(dst, events, now)
        src, dst = dst, src
    seen[src] += events
    return seen[a], seen[b]


def pair(config=None, now=1.0):
    """Two established channels, ba (incarnation 1000) and bb (2000)."""
    a = SyncChannel("ba", "bb", KEYS, 1_000, config)
    b = SyncChannel("bb", "ba", KEYS, 2_000, config)
    settle(a, b, a.tick(now), now)
    assert a.state == b.state == State.ESTABLISHED
    return a, b


def upd(i, version=1, state=b"s"):
    return FlowUpdate(key(i), version, state)


def records(to, events):
    """The records of the datagrams among `events`, as (type, value)."""
    return [(r.type, r.value) for e in events if isinstance(e, Transmit)
            for r in sw.decode(KEYS, e.data, sw.node_id(to)).records]


def test_a_new_channel_has_sent_and_heard_nothing():
    ch = SyncChannel("ba", "bb", KEYS, 1_000)
    assert ch.snapshot(0.0) == {
        "peer": "bb", "state": "hello_sent", "in_sync": False, "peer_in_sync": False,
        "synced_epoch": 0, "next_seq": 1, "acked_upto": 1, "resend_queue": 0, "pending": 0,
        "lag_ms": 0.0, "unsynced_flows": 0, "needs_bulk": False, "bulks": [], "stats": {},
        "rejected": {}}


def test_snapshot_of_records_in_flight_and_a_running_bulk():
    """Every field of the status query, on a channel with one record sent and
    unacknowledged, one bulk started, and the lag read to the microsecond."""
    a, b = pair(now=1.0)
    a.submit(upd(1), 1.0)
    a.flush(1.0)                                  # sent, never delivered: unacked
    a.start_bulk([upd(2)], 1.0, epoch=7)          # BULK_BEGIN pending
    snap = a.snapshot(1.0123456)
    stats = snap.pop("stats")
    assert snap == {
        "peer": "bb", "state": "established", "in_sync": False, "peer_in_sync": False,
        "synced_epoch": 0, "next_seq": 2, "acked_upto": 1, "resend_queue": 1, "pending": 1,
        "lag_ms": 12.346, "unsynced_flows": 1, "needs_bulk": False,
        "bulks": [{"id": 1, "sent": 0, "total": 1}], "rejected": {}}
    assert stats["records_sent"] == 1 and stats["bulk_started"] == 1


def test_the_receiver_of_a_whole_bulk_reports_its_epoch():
    a, b = pair(now=1.0)
    a.start_bulk([upd(1), upd(2)], 1.0, epoch=7)
    _, got = settle(a, b, a.tick(1.1), 1.1)      # one tick feeds the bulk whole
    _, got2 = settle(a, b, a.tick(1.2), 1.2)
    got += got2
    assert [e for e in got if isinstance(e, InSync)] == [InSync(1, 2, 7)]
    snap = b.snapshot(1.2)
    assert snap["peer_in_sync"] is True and snap["synced_epoch"] == 7
    assert b.stats["bulk_begin_received"] == 1 and b.stats["records_received"] == 4


def test_in_sync_needs_an_established_channel_with_nothing_outstanding():
    """The sender's in-sync view is false while flows wait to be resent
    (`resync_keys`), a full bulk is owed (`needs_bulk`) or runs, and once the
    oldest unacknowledged record is two RTOs old (exactly: not less than)."""
    cfg = SyncConfig(rto=0.25, pending_limit=1, resync_limit=1)
    a, b = pair(cfg, now=1.0)
    assert a.in_sync(1.0)
    a.submit(upd(1), 1.0)
    assert a.in_sync(1.0)
    a.submit(upd(2), 1.0)                          # past pending_limit: remembered
    assert a._resync_keys and not a.needs_bulk and not a.in_sync(1.0)
    a.submit(upd(3), 1.0)                          # past resync_limit: a bulk is owed
    assert a.needs_bulk and not a._resync_keys and not a.in_sync(1.0)

    a, b = pair(SyncConfig(rto=0.25), now=1.0)
    a.start_bulk([], 1.0)
    assert not a.in_sync(1.0)

    a, b = pair(SyncConfig(rto=0.25), now=1.0)
    a.submit(upd(1), 1.0)
    a.flush(1.0)
    assert a.in_sync(1.0 + 0.4999)
    assert not a.in_sync(1.0 + 0.5)               # lag == 2 RTOs


def test_nack_names_exactly_the_gaps_and_each_is_counted():
    """The receiver NACKs the sequence numbers missing between what it
    expects and the highest it holds, nothing below or held."""
    a, b = pair(now=1.0)
    sent = []
    for i in range(1, 6):
        a.submit(upd(i), 1.0)
        sent += a.flush(1.0)                       # one datagram per record
    deliver(b, sent, 1.0, drop={3})                # seq 4 lost
    nacks = [v for t, v in records("ba", b.tick(1.1)) if t == sw.RecordType.NACK]
    assert [sw.read_ranges(v) for v in nacks] == [[(4, 4)]]
    b.tick(1.2)
    assert b.stats["nacks_sent"] == 2


def test_a_hello_beyond_our_expectation_keeps_the_records_buffered_from_it():
    """A known peer's HELLO naming a sequence number past what we expect
    moves our expectation there; records already buffered at and after it
    are delivered at once, not dropped (and every such HELLO is counted)."""
    a, b = pair(now=1.0)
    sent = []
    for i in range(1, 4):
        a.submit(upd(i), 1.0)
        sent += a.flush(1.0)
    deliver(b, sent, 1.0, drop={0, 1})             # only seq 3 arrives: buffered
    assert b.expected == 1
    hello = sw.encode(KEYS, sw.node_id("ba"), sw.node_id("bb"), 1_000, 2_000, 10**6, 0,
                      [sw.hello(3, answer_me=False)])
    got = b.receive(hello, 1.0)
    assert [e.update.key for e in got if isinstance(e, Apply)] == [key(3)]
    assert b.expected == 4 and b.stats["hello_resync"] == 1
    hello = sw.encode(KEYS, sw.node_id("ba"), sw.node_id("bb"), 1_000, 2_000, 10**6 + 1, 0,
                      [sw.hello(9, answer_me=False)])
    b.receive(hello, 1.0)
    assert b.expected == 9 and b.stats["hello_resync"] == 2


def test_a_resync_request_is_one_empty_resync_record():
    ch = SyncChannel("bb", "ba", KEYS, 2_000)
    assert records("ba", ch.request_resync()) == [(sw.RecordType.RESYNC, b"")]


def sent_seqs(to, events):
    """The sequence numbers of the reliable records among `events`."""
    out = []
    for e in events:
        if isinstance(e, Transmit):
            dg = sw.decode(KEYS, e.data, sw.node_id(to))
            out += [dg.seq + i for i, r in enumerate(r for r in dg.records if r.type in sw.RELIABLE)]
    return out


def outstanding(n, config=None):
    """An established ba that sent records 1..n to bb, none acknowledged."""
    a, b = pair(config, now=1.0)
    for i in range(1, n + 1):
        a.submit(upd(i), 1.0)
    assert sent_seqs("bb", a.flush(1.0)) == list(range(1, n + 1))
    return a, b


_counter = iter(range(10**6, 10**7))


def from_bb(*recs):
    """A datagram bb could send to ba (it holds the key), with a fresh counter."""
    return sw.encode(KEYS, sw.node_id("bb"), sw.node_id("ba"), 2_000, 1_000, next(_counter), 0, list(recs))


def nack(*spans):
    return from_bb(sw.ranges(sw.RecordType.NACK, list(spans)))


@pytest.mark.parametrize("spans,resent", [
    ([(3, 3)], [3]),                       # one record
    ([(1, 1)], [1]),                       # the oldest outstanding
    ([(5, 5)], [5]),                       # the newest sent
    ([(0, 2), (4, 9)], [1, 2, 4, 5]),      # clamped to what is outstanding
    ([(2, 3), (3, 4), (2, 2)], [2, 3, 4]),  # overlaps: each once
    ([(4, 2), (7, 9)], []),                # inverted, or past what was sent
])
def test_a_nack_resends_exactly_the_outstanding_records_it_names(spans, resent):
    a, b = outstanding(5)
    assert sent_seqs("bb", a.receive(nack(*spans), 1.0)) == resent


def test_a_nack_resends_at_most_four_bursts_and_counts_every_nack():
    """However much a NACK names, at most `retransmit_burst * 4` records are
    taken from it, which a full token bucket sends without being limited."""
    a, b = outstanding(20, SyncConfig(retransmit_burst=4))
    assert sent_seqs("bb", a.receive(nack((1, 20)), 1.0)) == list(range(1, 17))
    assert a.stats["retransmit_limited"] == 0
    a.receive(nack((1, 20)), 1.0)
    assert a.stats["nacks_received"] == 2


def test_retransmission_tokens_refill_at_the_retransmit_rate():
    cfg = SyncConfig(retransmit_burst=4, retransmit_rate=100.0)
    a, b = outstanding(20, cfg)
    assert len(sent_seqs("bb", a.receive(nack((1, 16)), 1.0))) == 16    # the bucket is empty
    assert len(sent_seqs("bb", a.receive(nack((17, 20)), 1.0))) == 0
    assert a.stats["retransmit_limited"] == 1
    assert sent_seqs("bb", a.receive(nack((17, 20)), 1.03)) == [17, 18, 19]   # 3 tokens in 30 ms
    assert a.stats["retransmit_limited"] == 2                                  # 20 was not


def test_one_whole_retransmission_token_sends_one_record():
    cfg = SyncConfig(retransmit_burst=4, retransmit_rate=4.0)
    a, b = outstanding(20, cfg)
    assert len(sent_seqs("bb", a.receive(nack((1, 16)), 1.0))) == 16
    assert sent_seqs("bb", a.receive(nack((17, 20)), 1.25)) == [17]           # exactly 1 token


def test_each_rto_without_progress_resends_again():
    """The RTO resends the oldest records again each time it expires: a
    record resent by the last RTO is not held off."""
    a, b = outstanding(1, SyncConfig(rto=0.25))
    assert sent_seqs("bb", a.tick(1.25)) == [1]
    assert sent_seqs("bb", a.tick(1.5)) == [1]
    assert a.stats["timeouts"] == 2 and a.stats["retransmitted"] == 2


def one_by_one(a, n, now=1.0):
    """Records 1..n of `a`, one datagram each."""
    sent = []
    for i in range(1, n + 1):
        a.submit(upd(i), now)
        sent += a.flush(now)
    return sent


def test_a_nack_names_the_gaps_as_ranges():
    a, b = pair(now=1.0)
    sent = one_by_one(a, 11)
    deliver(b, sent, 1.0, drop={1, 2, 3, 6, 8, 9})       # seqs 2-4, 7, 9-10 lost
    nacks = [sw.read_ranges(v) for t, v in records("ba", b.tick(1.1)) if t == sw.RecordType.NACK]
    assert nacks == [[(2, 4), (7, 7), (9, 10)]]


def test_a_nack_names_at_most_64_ranges():
    a, b = pair(now=1.0)
    sent = one_by_one(a, 131)
    deliver(b, sent, 1.0, drop=set(range(1, 131, 2)))    # every even seq lost: 65 gaps
    nacks = [sw.read_ranges(v) for t, v in records("ba", b.tick(1.1)) if t == sw.RecordType.NACK]
    assert nacks == [[(s, s) for s in range(2, 130, 2)]]


def test_records_released_from_the_reorder_buffer_count_towards_the_next_ack():
    """`ack_every` counts every record delivered, in order or drained from the
    reorder buffer: three drained and one more make the fourth's ACK."""
    a, b = pair(SyncConfig(ack_every=4), now=1.0)
    sent = one_by_one(a, 4)
    datagrams = [e for e in sent if isinstance(e, Transmit)]
    acks = []
    for d in (datagrams[1], datagrams[2], datagrams[0], datagrams[3]):
        acks.append([t for t, _ in records("ba", b.receive(d.data, 1.0)) if t == sw.RecordType.ACK])
    assert acks == [[], [], [], [sw.RecordType.ACK]]


def test_a_record_resent_exactly_the_holdoff_ago_is_resent_on_a_nack():
    a, b = outstanding(2, SyncConfig(retransmit_holdoff=0.25))
    assert sent_seqs("bb", a.receive(nack((1, 2)), 1.0)) == [1, 2]
    assert sent_seqs("bb", a.receive(nack((1, 2)), 1.125)) == []      # in flight: held off
    assert sent_seqs("bb", a.receive(nack((1, 2)), 1.25)) == [1, 2]
    assert a.stats["retransmit_held_off"] == 2


def grew(ch, before):
    """The counters of `ch` that grew since `before`, by how much."""
    return dict(ch.stats - before)


def test_the_sender_counts_what_it_coalesced_refused_sent_and_had_acknowledged():
    from collections import Counter
    a, b = pair(now=1.0)
    before = Counter(a.stats)
    for v in (1, 2, 3):
        a.submit(upd(1, version=v), 1.0)           # two replaced while waiting
    a.submit(upd(1, version=1), 1.0)               # older than the one waiting
    a.submit(upd(1, version=2), 1.0)
    a.submit(upd(2), 1.0)
    sent = a.flush(1.0)
    assert grew(a, before) == {"coalesced": 2, "stale_submit": 2, "records_sent": 2,
                               "datagrams_sent": 1, "bytes_sent": len(sent[0].data)}
    before = Counter(a.stats)
    deliver(a, deliver(b, sent, 1.0) + b.tick(1.1), 1.1)     # b's ACK at its ack_delay
    assert grew(a, before) == {"acked": 2, "datagrams_received": 1}
    assert a.acked_upto == 3 and a.snapshot(1.1)["resend_queue"] == 0


def test_the_receiver_counts_duplicates_reordering_and_records_beyond_its_buffer():
    from collections import Counter
    a, b = pair(SyncConfig(reorder_buffer=4), now=1.0)
    sent = [e for e in one_by_one(a, 8) if isinstance(e, Transmit)]
    before = Counter(b.stats)
    again = a.tick(1.0 + a.config.rto)             # the RTO resends 1..8 in one datagram
    for d in (sent[0], sent[2], sent[3], sent[4], sent[5], sent[7]):
        b.receive(d.data, 1.0)                     # 1; 3, 4, 5 reordered; 6 and 8 past 2 + 4
    assert grew(b, before) == {"datagrams_received": 6, "records_received": 1, "reordered": 3,
                               "beyond_buffer": 2}
    before = Counter(b.stats)
    got = deliver(b, again, 1.1)                   # and a heartbeat; 1 and 3, 4, 5 are duplicates now
    assert grew(b, before) == {"datagrams_received": 2, "duplicates": 4, "records_received": 7}
    assert b.expected == 9
    assert [e.update.key for e in got if isinstance(e, Apply)] == [key(i) for i in (2, 3, 4, 5, 6, 7, 8)]


def test_a_restarted_peer_drops_everything_outstanding_for_its_former_self():
    """A larger incarnation from a known peer: what was unacked or pending for
    its former self is dropped and counted, its running bulk ends, and what
    we knew of its sync state is forgotten; it is told apart from a first
    contact."""
    from collections import Counter
    a, b = pair(now=1.0)
    b.start_bulk([], 1.0, epoch=5)                        # a learns it is in sync with bb
    settle(b, a, b.tick(1.1), 1.1)
    settle(b, a, b.tick(1.2), 1.2)
    assert a.peer_in_sync and a.synced_epoch == 5
    for i in (1, 2):
        a.submit(upd(i), 1.2)
    a.flush(1.2)                                          # two unacked
    a.submit(upd(3), 1.2)
    bulk_id = a.start_bulk([upd(4)], 1.2)                 # two pending: 3 and BULK_BEGIN
    before = Counter(a.stats)
    b2 = SyncChannel("bb", "ba", KEYS, 3_000)
    got = deliver(a, b2.tick(1.3), 1.3)
    assert PeerRestarted(first_contact=False) in got
    assert grew(a, before) == {"peer_restarts": 1, "dropped_on_peer_restart": 4, "datagrams_received": 1,
                               "datagrams_sent": 1, "bytes_sent": grew(a, before)["bytes_sent"]}
    snap = a.snapshot(1.3)
    assert (snap["resend_queue"], snap["pending"], snap["bulks"], snap["acked_upto"], snap["next_seq"],
            snap["peer_in_sync"], snap["synced_epoch"]) == (0, 0, [], 3, 3, False, 0)
    assert a.settled(key(1)) and a.settled(key(3)) and not a.bulk_running(bulk_id)
    assert a.peer_incarnation == 3_000 and a.expected == 1
    assert snap["needs_bulk"] is False                     # PeerRestarted brings the bulk
    settle(a, b2, got, 1.3)
    assert a.state == State.ESTABLISHED
    a.submit(upd(9), 1.3)
    assert sent_seqs("bb", a.flush_due(1.31)) == [3]       # batched from a clean start
    b3 = SyncChannel("bb", "ba", KEYS, 4_000)
    deliver(a, b3.tick(1.4), 1.4)
    assert a.stats["peer_restarts"] == 2 and a.stats["peer_contacts"] == 1
    assert a.stats["dropped_on_peer_restart"] == 5


def progress(events):
    return [e for e in events if isinstance(e, BulkProgress)]


def test_a_bulk_is_paced_at_bulk_rate_and_ends_once_fed_whole():
    a, b = pair(SyncConfig(bulk_rate=100.0), now=1.0)
    bid = a.start_bulk([upd(i) for i in range(1, 11)], 1.0)
    assert progress(a.tick(1.05)) == [BulkProgress(bid, 5, 10)]      # 50 ms at 100 flows/s
    assert progress(a.tick(1.1)) == [BulkProgress(bid, 10, 10)]
    last = a.tick(1.15)
    assert progress(last) == []                                       # fed: BULK_END sent
    assert [t for t, _ in records("bb", last) if t in sw.RELIABLE][-1] == sw.RecordType.BULK_END


def test_a_bulk_takes_at_most_16_batches_of_credit_and_half_the_resend_queue():
    a, b = pair(SyncConfig(bulk_rate=1e6, batch_records=1), now=1.0)
    bid = a.start_bulk([upd(i) for i in range(1, 41)], 1.0)
    assert progress(a.tick(1.1)) == [BulkProgress(bid, 16, 40)]      # credit capped at 16

    a, b = pair(SyncConfig(bulk_rate=1e6, resend_queue=16), now=1.0)
    bid = a.start_bulk([upd(i) for i in range(1, 21)], 1.0)
    assert progress(a.tick(1.1)) == [BulkProgress(bid, 7, 20)]       # 8 in flight: BEGIN and 7
    assert progress(a.tick(1.1)) == []                               # nothing more until acked
    a.receive(from_bb(sw.Record(sw.RecordType.ACK, sw.u64(9))), 1.1)
    assert progress(a.tick(1.1)) == [BulkProgress(bid, 15, 20)]


def test_flush_due_sends_a_full_batch_at_once_and_a_partial_one_after_the_batch_delay():
    a, b = pair(SyncConfig(batch_records=4, batch_delay=0.25), now=1.0)
    for i in (1, 2, 3):
        a.submit(upd(i), 1.0)
    assert a.flush_due(1.0) == [] and a.flush_due(1.125) == []
    assert sent_seqs("bb", a.flush_due(1.25)) == [1, 2, 3]           # exactly the batch delay
    for i in (4, 5, 6, 7):
        a.submit(upd(i), 1.5)
    assert sent_seqs("bb", a.flush_due(1.5)) == [4, 5, 6, 7]         # exactly a batch


def test_records_fill_a_datagram_to_exactly_its_size_limit_and_no_further():
    body = sw.MAX_DATAGRAM - sw.HEADER_LEN - sw.TAG_LEN
    base = len(sw.flow_record(upd(0, state=b"")).value)

    def sized(i, rsize):
        """An update whose record takes `rsize` bytes of body (3 of record header)."""
        return upd(i, state=b"x" * (rsize - 3 - base))

    for second, split in ((body - body // 2, [[1, 2], [3]]), (body - body // 2 + 1, [[1], [2, 3]])):
        a, b = pair(now=1.0)
        for i, rsize in ((1, body // 2), (2, second), (3, 100)):
            a.submit(sized(i, rsize), 1.0)
        sent = [e for e in a.flush(1.0) if isinstance(e, Transmit)]
        assert [sent_seqs("bb", [e]) for e in sent] == split
        assert max(len(e.data) for e in sent) <= sw.MAX_DATAGRAM


def hellos(to, events):
    return [sw.read_hello(v) for t, v in records(to, events) if t == sw.RecordType.HELLO]


def test_a_hello_is_repeated_every_heartbeat_until_established():
    a = SyncChannel("ba", "bb", KEYS, 1_000, SyncConfig(heartbeat=0.25))
    assert hellos("bb", a.tick(1.0)) == [(1, True)]
    assert hellos("bb", a.tick(1.125)) == []
    assert hellos("bb", a.tick(1.25)) == [(1, True)]             # exactly a heartbeat later
    a, b = pair(SyncConfig(heartbeat=0.25), now=1.0)
    assert hellos("bb", a.tick(2.0)) == []


def test_a_hello_names_the_first_record_still_unacknowledged():
    """A known peer's HELLO that does not name our incarnation (it lost us)
    is answered with our HELLO naming the first record we still hold for it,
    asking for an answer since we are no longer established."""
    a, b = outstanding(3)
    a.receive(from_bb(sw.Record(sw.RecordType.ACK, sw.u64(2))), 1.0)
    unbound = sw.encode(KEYS, sw.node_id("bb"), sw.node_id("ba"), 2_000, 0, next(_counter), 0,
                        [sw.hello(1)])
    got = a.receive(unbound, 1.0)
    assert hellos("bb", got) == [(2, True)] and a.state == State.KNOWN


def test_updates_submitted_before_first_contact_are_sent_once_established():
    """The first HELLO of a peer is a first contact, not a restart: nothing
    submitted before it is dropped."""
    a = SyncChannel("ba", "bb", KEYS, 1_000)
    b = SyncChannel("bb", "ba", KEYS, 2_000)
    a.submit(upd(1), 1.0)
    seen_a, seen_b = settle(a, b, a.tick(1.0), 1.0)
    assert PeerRestarted(first_contact=True) in seen_a and PeerRestarted(first_contact=True) in seen_b
    assert a.stats["peer_contacts"] == 1 and "peer_restarts" not in a.stats
    assert [e.update.key for e in seen_b if isinstance(e, Apply)] == [key(1)]


def ack(upto):
    return from_bb(sw.Record(sw.RecordType.ACK, sw.u64(upto)))


def test_an_ack_releases_exactly_the_records_below_it():
    """An ACK is clamped to what was sent, an old one does nothing, a flow is
    settled only once its latest record is acknowledged, and a bulk is done
    once its BULK_END is."""
    a, b = pair(now=1.0)
    a.submit(upd(1, version=1), 1.0)
    a.flush(1.0)                                   # seq 1
    a.submit(upd(1, version=2), 1.0)
    a.flush(1.0)                                   # seq 2
    assert [e for e in a.receive(ack(2), 1.0) if not isinstance(e, Transmit)] == [Acked(2)]
    assert not a.settled(key(1)) and a.snapshot(1.0)["resend_queue"] == 1
    assert a.receive(ack(2), 1.0) == [] and a.receive(ack(1), 1.0) == []
    assert [e for e in a.receive(ack(100), 1.0) if not isinstance(e, Transmit)] == [Acked(3)]
    assert a.settled(key(1)) and a.acked_upto == 3 and a.stats["acked"] == 2

    bid = a.start_bulk([], 1.0)
    a.tick(1.1)
    a.flush(1.1)                                   # BULK_BEGIN 3, BULK_END 4
    assert a.bulk_running(bid)
    assert a.receive(ack(4), 1.1) == [Acked(4)] and a.bulk_running(bid)
    assert a.receive(ack(5), 1.1) == [Acked(5), BulkDone(bid, 0)] and not a.bulk_running(bid)
    assert a.stats["bulk_done"] == 1
    bid = a.start_bulk([], 1.1)
    a.tick(1.2)
    a.flush(1.2)                                   # BULK_BEGIN 5, BULK_END 6
    assert a.receive(ack(7), 1.2) == [Acked(7), BulkDone(bid, 0)] and a.stats["bulk_done"] == 2


def test_the_synced_epoch_is_the_highest_of_the_bulks_completed():
    a, b = pair(now=1.0)
    a.start_bulk([upd(1)], 1.0, epoch=7)
    a.start_bulk([upd(2)], 1.0, epoch=5)
    got = []
    for now in (1.1, 1.2, 1.3):
        got += settle(a, b, a.tick(now), now)[1]
    assert [e for e in got if isinstance(e, InSync)] == [InSync(1, 1, 7), InSync(2, 1, 5)]
    assert b.synced_epoch == 7 and b.peer_in_sync
    assert b.stats["bulk_begin_received"] == 2 and b.stats["records_received"] == 6


def bound_hello(base, answer_me):
    """A HELLO of an established bb that knows ba's incarnation."""
    return sw.encode(KEYS, sw.node_id("bb"), sw.node_id("ba"), 2_000, 1_000, next(_counter), 0,
                     [sw.hello(base, answer_me=answer_me)])


def test_a_known_peers_hello_is_answered_only_when_it_asks():
    a, b = pair(now=1.0)
    assert hellos("bb", a.receive(bound_hello(1, answer_me=False), 1.0)) == []
    assert hellos("bb", a.receive(bound_hello(1, answer_me=True), 1.0)) == [(1, False)]
    assert a.state == State.ESTABLISHED and "hello_resync" not in a.stats     # base == expected


def test_every_resync_request_is_counted_and_reported():
    a, b = pair(now=1.0)
    for n in (1, 2):
        got = deliver(a, b.request_resync(), 1.0)
        assert got == [ResyncRequested()] and a.stats["resync_requests"] == n


def test_a_new_incarnation_speaking_without_a_hello_is_answered_with_ours():
    """A datagram of a larger incarnation that carries no HELLO cannot be
    taken (we do not know where its stream starts): it is counted and
    answered with our HELLO, and the peer is still its former self."""
    a, b = pair(now=1.0)
    for n in (1, 2):
        dg = sw.encode(KEYS, sw.node_id("bb"), sw.node_id("ba"), 5_000, 1_000, next(_counter), 0,
                       [sw.Record(sw.RecordType.ACK, sw.u64(1))])
        got = a.receive(dg, 1.5)
        assert len(hellos("bb", got)) == 1 and a.stats["unknown_incarnation"] == n
    assert a.peer_incarnation == 2_000 and a.last_heard == 1.0


def test_a_bad_record_is_refused_after_the_good_ones_before_it():
    a, b = pair(now=1.0)
    good = sw.flow_record(upd(1))
    dg = sw.encode(KEYS, sw.node_id("ba"), sw.node_id("bb"), 1_000, 2_000, next(_counter), 1,
                   [good, sw.Record(sw.RecordType.NACK, b"\x00" * 5)])
    got = b.receive(dg, 1.5)
    assert [type(e) for e in got] == [Apply, Rejected] and got[1].reason == "malformed"
    assert b.rejected["malformed"] == 1 and b.last_heard == 1.5 and b.expected == 2


def test_updates_past_the_pending_limit_are_remembered_then_given_up_for_a_bulk():
    a, b = pair(SyncConfig(pending_limit=1, resync_limit=2), now=1.0)
    a.submit(upd(1, version=2), 1.0)
    a.submit(upd(1, version=2), 1.0)                  # the same version again: stale
    assert a.stats["stale_submit"] == 1 and "coalesced" not in a.stats
    for i in (2, 2, 3):
        a.submit(upd(i), 1.0)                         # remembered (2 once)
    assert a._resync_keys == {key(2), key(3)} and not a.settled(key(2)) and a.settled(key(4))
    a.submit(upd(4), 1.0)                             # past resync_limit: a bulk instead
    a.submit(upd(5), 1.0)
    assert a.needs_bulk and not a._resync_keys
    assert (a.stats["resend_overflow"], a.stats["resync_overflow_bulk"]) == (5, 1)
    assert ResyncRequested() in a.tick(1.1) and not a.needs_bulk
    for i in (6, 7, 8, 9):                            # the tick sent 1: 6 waits, 7 and 8 remembered
        a.submit(upd(i), 1.1)
    assert a.needs_bulk and a.stats["resync_overflow_bulk"] == 2


def kinds_of(to, events):
    return [t for t, _ in records(to, events)]


def test_acks_and_nacks_wait_their_intervals_heartbeats_carry_the_clock_and_an_ack():
    cfg = SyncConfig(ack_delay=0.25, nack_interval=0.25, heartbeat=0.25)
    a, b = pair(cfg, now=1.0)
    sent = one_by_one(a, 4)
    A, N, H = sw.RecordType.ACK, sw.RecordType.NACK, sw.RecordType.HEARTBEAT
    deliver(b, sent, 1.0, drop={1})                      # 1 delivered, 3 and 4 wait for 2
    assert kinds_of("ba", b.tick(1.0)) == [A, N, H]      # one ACK, not a second for the heartbeat
    assert kinds_of("ba", b.tick(1.125)) == []
    deliver(b, sent[1:2], 1.125)                         # 2 arrives: 2, 3, 4 unacked
    assert records("ba", b.tick(1.25)) == [(A, sw.u64(5)), (H, sw.u64(1_250_000))]
    deliver(b, one_by_one(a, 1)[-1:], 1.25)
    assert kinds_of("ba", b.tick(1.375)) == []           # ACK and heartbeat both wait
    a.submit(upd(9), 1.375)
    assert kinds_of("ba", b.tick(1.5)) == [A, H]


def test_heartbeats_start_once_the_peer_is_known():
    a = SyncChannel("ba", "bb", KEYS, 1_000, SyncConfig(heartbeat=0.25))
    assert kinds_of("bb", a.tick(1.0)) == [sw.RecordType.HELLO]
    a, b = pair(SyncConfig(heartbeat=0.25), now=1.0)
    assert records("bb", a.tick(1.0)) == [(sw.RecordType.HEARTBEAT, sw.u64(1_000_000)),
                                          (sw.RecordType.ACK, sw.u64(1))]


def test_an_rto_resends_one_burst_of_the_oldest_records():
    a, b = outstanding(10, SyncConfig(rto=0.25, retransmit_burst=4))
    assert sent_seqs("bb", a.tick(1.125)) == []
    assert sent_seqs("bb", a.tick(1.25)) == [1, 2, 3, 4]


def test_remembered_flows_are_handed_back_as_the_pending_set_has_room():
    a, b = pair(SyncConfig(pending_limit=2), now=1.0)
    for i in range(1, 6):
        a.submit(upd(i), 1.0)                             # 1, 2 wait; 3, 4, 5 remembered
    early = a.tick(1.0) + a.tick(1.1)                 # the second sends 1 and 2, after
    assert not [e for e in early if isinstance(e, ResyncFlows)]     # no room before
    handed = [e.keys for e in a.tick(1.2) if isinstance(e, ResyncFlows)]
    assert len(handed) == 1 and len(handed[0]) == 2 and a.stats["resync_flows"] == 2
    handed += [e.keys for e in a.tick(1.3) if isinstance(e, ResyncFlows)]
    assert set().union(*handed) == {key(3), key(4), key(5)} and a.stats["resync_flows"] == 3


def test_the_first_tick_of_an_established_channel_counts_one_heartbeat_of_bulk_credit():
    a, b = pair(SyncConfig(bulk_rate=400.0, heartbeat=0.25), now=1.0)
    bid = b.start_bulk([upd(i) for i in range(1, 301)], 1.0)        # b has never ticked
    assert progress(b.tick(1.0)) == [BulkProgress(bid, 100, 300)]
    assert progress(b.tick(0.5)) == []                               # the clock went back
    assert progress(b.tick(0.75)) == [BulkProgress(bid, 200, 300)]  # from 0.5, not from 1.0


def test_a_full_resend_queue_holds_the_rest_until_acknowledged():
    a, b = pair(SyncConfig(resend_queue=2), now=1.0)
    for i in (1, 2, 3):
        a.submit(upd(i), 1.0)
    assert sent_seqs("bb", a.flush(1.0)) == [1, 2]
    assert a.flush(1.0) == [] and a.flush(1.0) == [] and a.stats["window_full"] == 2
    assert a.snapshot(1.0)["pending"] == 1
    a.receive(ack(2), 1.0)
    assert sent_seqs("bb", a.flush(1.0)) == [3]


def test_a_bulk_fed_whole_does_not_hold_up_the_one_behind_it():
    a, b = pair(SyncConfig(bulk_rate=100.0), now=1.0)
    small = a.start_bulk([upd(1)], 1.0)
    big = a.start_bulk([upd(i) for i in range(2, 12)], 1.0)
    assert progress(a.tick(1.05)) == [BulkProgress(small, 1, 1), BulkProgress(big, 5, 10)]
    assert progress(a.tick(1.1)) == [BulkProgress(big, 10, 10)]


def test_bulks_share_the_ticks_each_sending_a_flow_per_whole_credit():
    """At 2 flows/s and a tick every 250 ms each bulk gains half a flow of
    credit per tick: it sends one every other tick, and one bulk waiting for
    credit does not stop the next from sending."""
    a, b = pair(SyncConfig(bulk_rate=2.0), now=1.0)
    first = a.start_bulk([upd(i) for i in (1, 2, 3)], 1.0)
    assert progress(a.tick(1.25)) == []
    second = a.start_bulk([upd(i) for i in (4, 5, 6)], 1.25)
    assert progress(a.tick(1.5)) == [BulkProgress(first, 1, 3)]
    assert progress(a.tick(1.75)) == [BulkProgress(second, 1, 3)]


def test_flows_fed_by_a_bulk_go_out_after_the_batch_delay():
    a, b = pair(SyncConfig(bulk_rate=20.0, rto=10.0), now=1.0)
    a.start_bulk([upd(i) for i in range(1, 16)], 1.0)
    assert sent_seqs("bb", a.tick(1.25)) == list(range(1, 7))       # BULK_BEGIN and 5 flows
    assert sent_seqs("bb", a.tick(1.5)) == []                       # 5 more, just fed
    assert sent_seqs("bb", a.tick(1.75)) == list(range(7, 18))      # those, 5 more and BULK_END


def test_the_end_of_a_bulk_goes_out_after_the_batch_delay_even_with_nothing_else_pending():
    a, b = pair(SyncConfig(rto=10.0), now=1.0)
    a.start_bulk([], 1.0)
    assert sent_seqs("bb", a.flush(1.0)) == [1]                     # BULK_BEGIN (the ordered policy)
    assert sent_seqs("bb", a.tick(1.25)) == []                      # BULK_END queued
    assert sent_seqs("bb", a.tick(1.5)) == [2]
