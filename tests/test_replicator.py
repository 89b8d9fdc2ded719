"""The replicator: sync policies, bulk on restart, forced resync, liveness events."""

from __future__ import annotations

import pytest

from dataplane.core import header as wire
from dataplane.core import syncwire as sw
from dataplane.core.events import FlowUpdate, Mirror, Send
from dataplane.core.liveness import Declared, FailureDetector, Health
from dataplane.core.node import ServiceNode
from dataplane.core.replicator import Policy, Replicator, SyncSend
from dataplane.core.servicemap import Instance, InstanceState, Tenant
from dataplane.core.services import create
from dataplane.core.syncchannel import SyncConfig
from dataplane.sim.simlink import SimLink
from tests.conftest import codes_led_by, tcp
from tests.test_node import lab_map

KEYS = sw.Keyring({1: b"r" * 32}, 1)


class Pair:
    """ba and bb, each a firewall node with a replicator, over a sim link."""

    def __init__(self, policy=Policy.ASYNC, smap=None, config=None, holddown=None):
        self.map = smap or lab_map()
        self.now = 0.0
        self.link = SimLink(1)
        self.reps = {n: Replicator(ServiceNode(n, self.map, create("firewall")), KEYS, 1000 + i, policy, config,
                                   None if holddown is None else FailureDetector(holddown=holddown))
                     for i, n in enumerate(("ba", "bb", "bc"))}
        self.fabric: list[tuple[str, Send]] = []
        self.order: list[str] = []
        self.declared: list[tuple[str, Declared]] = []

    def out(self, src, outs):
        for o in outs:
            if isinstance(o, SyncSend):
                self.order.append("sync")
                self.link.send(self.now, o.peer, o.data)
            elif isinstance(o, Send):
                self.order.append("send")
                self.fabric.append((src, o))
            elif isinstance(o, Declared):
                self.declared.append((src, o))

    def step(self, dt=0.001):
        self.now += dt
        for to, data in self.link.due(self.now):
            if to in self.reps:
                self.out(to, self.reps[to].receive(data, self.now))
        for n, r in self.reps.items():
            self.out(n, r.tick(self.now))

    def run(self, seconds):
        for _ in range(int(seconds / 0.001)):
            self.step()

    def code_led_by(self, name):
        return codes_led_by(self.map, name)[0]

    def packet(self, name, sport, flags="S", seq=1, code=None):
        code = self.code_led_by(name) if code is None else code
        data = wire.pack(1, 1, code, 1, self.map.epoch) + tcp(sport=sport, flags=flags, seq=seq)
        rep = self.reps[name]
        self.out(name, rep.process(rep.node.from_fabric(data, "aa", self.now), self.now))
        return code


def replicas(rep):
    return {e.key: e.version for e in rep.node.flows if e.replica}


def leads(rep):
    return {e.key: e.version for e in rep.node.flows if not e.replica}


def led_by_ba(p: Pair, n: int, first_port: int) -> str:
    """Open n flows led by ba, let them mirror; the secondary of the first."""
    p.run(0.05)
    codes = [p.packet("ba", first_port + i) for i in range(n)]
    p.run(0.05)
    return p.map.secondary("B", codes[0], exclude="ba")


def test_async_mirrors_to_the_secondary():
    p = Pair()
    sec = led_by_ba(p, 50, 40000)
    assert replicas(p.reps[sec]) == {k: v for k, v in leads(p.reps["ba"]).items()
                                     if p.map.secondary("B", k[1], exclude="ba") == sec}
    assert p.reps["ba"].channels[sec].in_sync(p.now)


@pytest.mark.parametrize("policy,first", [(Policy.ASYNC, "send"), (Policy.ORDERED, "sync")])
def test_order_of_update_and_packet(policy, first):
    p = Pair(policy)
    p.run(0.05)
    p.order.clear()
    p.packet("ba", 40001)
    assert p.order[0] == first and "send" in p.order


@pytest.mark.parametrize("policy", [Policy.ORDERED, Policy.ACKED])
def test_a_batch_flushes_once_ahead_of_all_its_packets(policy):
    """Packets received together: their updates leave in one flush (one
    datagram per peer) before any of them; `acked` holds each packet that
    opened a flow on that flow's own acknowledgement."""
    p = Pair(policy)
    p.run(0.05)
    rep = p.reps["ba"]
    code = p.code_led_by("ba")
    events = [rep.node.from_fabric(wire.pack(1, 1, code, 1, p.map.epoch) + tcp(sport=41000 + i), "aa",
                                   p.now) for i in range(3)]
    p.order.clear()
    p.out("ba", rep.process_batch(events, p.now))
    if policy == Policy.ORDERED:
        assert p.order == ["sync", "send", "send", "send"]
        return
    assert p.order == ["sync"] and rep.counters["held"] == 3
    p.run(0.02)
    assert p.order.count("send") == 3 and rep.counters["hold_timeout"] == 0


def test_acked_holds_the_first_packet_until_the_secondary_has_the_state():
    p = Pair(Policy.ACKED)
    p.run(0.05)
    p.fabric.clear()
    code = p.packet("ba", 40002)
    assert p.fabric == [] and p.reps["ba"].counters["held"] == 1
    for _ in range(20):
        p.step()
        if p.fabric:
            break
    assert len(p.fabric) == 1 and p.reps["ba"].counters["hold_timeout"] == 0
    sec = p.map.secondary("B", code, exclude="ba")
    assert len(replicas(p.reps[sec])) == 1
    p.fabric.clear()
    p.packet("ba", 40002, flags="A", seq=2, code=code)   # not a first packet: not held
    assert len(p.fabric) == 1


def test_acked_releases_after_hold_timeout_when_the_secondary_is_silent():
    p = Pair(Policy.ACKED)
    p.run(0.05)
    code = p.code_led_by("ba")
    sec = p.map.secondary("B", code, exclude="ba")
    del p.reps[sec]                                 # the secondary is gone
    p.fabric.clear()
    p.packet("ba", 40003, code=code)
    p.run(0.06)
    assert len(p.fabric) == 1 and p.reps["ba"].counters["hold_timeout"] == 1


def test_off_sends_no_sync():
    p = Pair(Policy.OFF)
    p.packet("ba", 40004)
    assert "sync" not in p.order


def test_restarted_secondary_gets_a_bulk_of_what_it_mirrors():
    p = Pair()
    sec = led_by_ba(p, 30, 41000)
    fresh = Replicator(ServiceNode(sec, p.map, create("firewall")), KEYS, 99_999)
    p.reps[sec] = fresh
    p.run(0.1)
    expected = {k: v for k, v in leads(p.reps["ba"]).items()
                if p.map.secondary("B", k[1], exclude="ba") == sec}
    assert replicas(fresh) == expected and expected
    assert p.reps["ba"].channels[sec].stats["peer_restarts"] == 1


def test_forced_resync_and_liveness_events():
    p = Pair()
    p.run(0.05)
    code = p.packet("ba", 42000)
    p.run(0.02)
    sec = p.map.secondary("B", code, exclude="ba")
    p.reps[sec].node.flows.delete(next(iter(p.reps[sec].node.flows)).key)
    p.reps["ba"].resync(sec, p.now)
    p.run(0.05)
    assert len(replicas(p.reps[sec])) == 1
    p.declared.clear()
    p.reps.pop(sec)
    p.run(0.1)
    seen_by_ba = [(d.peer, d.health) for src, d in p.declared if src == "ba"]
    assert seen_by_ba == [(sec, Health.DEAD)]


@pytest.mark.parametrize("policy", [Policy.ASYNC, Policy.OFF])
def test_secondary_dies_then_the_primary_flows_survive_both(policy):
    """bb (secondary) dies: ba bulk-syncs bc, the new secondary. Then ba dies:
    bc is promoted with that state and serves mid-stream packets. Control:
    with sync off, bc drops them all as misdelivery."""
    from dataplane.core.events import TookOver
    from dataplane.core.servicemap import InstanceState

    p = Pair(policy)
    p.run(0.05)
    codes = [c for c in range(20_000) if p.map.candidates("B", c) == ["ba", "bb"]][:40]
    for i, c in enumerate(codes):
        p.packet("ba", 43000 + i, code=c)
    p.run(0.05)
    synced = policy != Policy.OFF
    assert len(replicas(p.reps["bb"])) == (len(codes) if synced else 0)

    def kill(name):
        p.reps.pop(name)
        new = p.map.copy()
        new.set_state(name, InstanceState.DEAD)
        p.map = new
        return sum(r.update_map(new, p.now) for r in p.reps.values())

    assert kill("bb") == (1 if synced else 0)
    p.run(0.1)
    assert all(p.map.secondary("B", c, exclude="ba") == "bc" for c in codes)
    assert len(replicas(p.reps["bc"])) == (len(codes) if synced else 0)
    kill("ba")
    bc = p.reps["bc"]
    if not synced:
        for i, c in enumerate(codes):
            data = wire.pack(1, 1, c, 1, p.map.epoch) + tcp(sport=43000 + i, flags="A", seq=2)
            bc.node.from_fabric(data, "aa", p.now)
        assert bc.node.drops["misdelivery"] == len(codes)
        return
    assert bc.node.counters["promoted"] == len(codes)
    took = 0
    for i, c in enumerate(codes):
        data = wire.pack(1, 1, c, 1, p.map.epoch) + tcp(sport=43000 + i, flags="A", seq=2)
        events = bc.node.from_fabric(data, "aa", p.now)
        took += sum(isinstance(e, TookOver) for e in events)
        assert any(isinstance(e, Send) for e in events), events
    assert took == len(codes) and bc.node.drops["misdelivery"] == 0


def test_joining_is_in_sync_after_peer_bulks_or_at_once_when_nothing_is_mirrored():
    p = Pair()
    assert not p.reps["ba"].synced_since(1)            # no bulk from bb, bc yet
    p.run(0.05)                                        # first contact: every peer sends a bulk
    assert p.reps["ba"].synced_since(0) and not p.reps["ba"].synced_since(10**6)
    assert Pair(Policy.OFF).reps["ba"].synced_since(10**6)


def test_a_datagram_opens_a_channel_only_once_checked_and_only_for_a_service_peer():
    """Unsigned (or wrongly signed) datagrams must not make channel objects,
    nor may one claiming to come from this instance, another service's
    instance or an unknown node (issue #14, finding 10)."""
    p = Pair()
    rep = p.reps["ba"]
    del rep.channels["bc"]
    forged = sw.Keyring({1: b"x" * 32}, 1)
    for sender in ("ba", "bc", "aa", "ingress", "nobody"):
        data = sw.encode(forged, sw.node_id(sender), sw.node_id("ba"), 5, 0, 1, 0, [sw.hello(1)])
        assert rep.receive(data, 0.0) == []
    assert set(rep.channels) == {"bb"}
    assert rep.counters["unknown_sender"] == 4 and rep.rejected["bad_mac"] == 1
    good = sw.encode(KEYS, sw.node_id("bc"), sw.node_id("ba"), 5, 0, 2, 0, [sw.hello(1)])
    assert any(isinstance(o, SyncSend) for o in rep.receive(good, 0.0))
    assert set(rep.channels) == {"bb", "bc"} and rep.channels["bc"].peer_incarnation == 5


def test_a_datagram_of_resync_requests_starts_one_bulk_not_hundreds():
    """Issue #14, finding 8: a running bulk absorbs further requests (at
    most one more follows it), and the peer still ends up in sync."""
    p = Pair()
    sec = led_by_ba(p, 20, 44000)
    ch = p.reps["ba"].channels[sec]
    started = ch.stats["bulk_started"]
    data = p.reps[sec].channels["ba"]._transmit(0, [sw.Record(sw.RecordType.RESYNC, b"")] * 400).data
    assert len(data) <= sw.MAX_DATAGRAM
    p.out("ba", p.reps["ba"].receive(data, p.now))
    p.run(0.1)
    assert ch.stats["bulk_started"] - started == 2 and p.reps["ba"].counters["bulk_coalesced"] == 399
    expected = {k: v for k, v in leads(p.reps["ba"]).items()
                if p.map.secondary("B", k[1], exclude="ba") == sec}
    assert replicas(p.reps[sec]) == expected and not ch._bulks


def test_a_joiner_that_missed_the_epoch_it_started_joining_in_still_gets_in_sync():
    """Found by the simulator (seed 21, a double failure of ba and bb): ba
    restarts and is made JOINING at epoch E, bb ACTIVE at E+1 a moment
    later; ba's push of E is overtaken, so ba first sees itself joining at
    E+1 and waits for bulks stamped E+1, while every peer bulked it once,
    at E. The controller kept ba JOINING for ever. Every map change while a
    peer is joining now sends it a bulk stamped with the new epoch."""
    p = Pair()
    p.run(0.05)
    joining = p.map.copy()
    joining.set_state("ba", InstanceState.JOINING)
    later = joining.copy()
    later.set_state("bc", InstanceState.DRAINING)     # any other change: a new epoch
    for n in ("bb", "bc"):
        p.reps[n].update_map(joining, p.now)
        p.reps[n].update_map(later, p.now)
    p.reps["ba"].update_map(later, p.now)              # ba never saw `joining`
    p.run(0.1)
    assert p.reps["ba"].synced_since(later.epoch)


def _bulk_begins(p: Pair, src: str, peer: str, sends: list) -> list[tuple[int, int, int]]:
    """(bulk id, flows, epoch) of every BULK_BEGIN `src` sent `peer`."""
    me = sw.node_id(peer)
    return [sw.read_bulk(r.value) for o in sends if isinstance(o, SyncSend) and o.peer == peer
            for r in sw.decode(KEYS, o.data, me).records if r.type == sw.RecordType.BULK_BEGIN]


def test_a_lone_mirror_is_ordered_like_any_packet_s_events():
    """`process` of a packet whose only event is an update (no Send) still
    hands the update to the channel: under `ordered` it leaves at once."""
    p = Pair(Policy.ORDERED)
    p.run(0.05)
    rep = p.reps["ba"]
    code = p.code_led_by("ba")
    sec = p.map.secondary("B", code, exclude="ba")
    key = (1, code, 6, b"\x0a\x01\x00\x0a", 40000, b"\x0a\x02\x00\x0a", 80)
    out = rep.process([Mirror(sec, FlowUpdate(key, 3, b"s"))], p.now)
    assert [type(o) for o in out] == [SyncSend]
    (rec,) = [r for r in sw.decode(KEYS, out[0].data, sw.node_id(sec)).records
              if r.type == sw.RecordType.FLOW_UPSERT]
    assert sw.read_flow(rec).key == key and sw.read_flow(rec).version == 3


def test_forced_resync_is_counted_each_time_and_stamped_with_the_map_epoch():
    p = Pair()
    p.run(0.05)
    code = p.packet("ba", 42000)
    p.run(0.02)
    sec = p.map.secondary("B", code, exclude="ba")
    rep = p.reps["ba"]
    first = rep.resync(sec, p.now)
    second = rep.resync(sec, p.now)
    assert second == first + 1 and rep.counters["forced_resync"] == 2
    sent = []
    for _ in range(20):
        p.now += 0.001
        sent += rep.tick(p.now)
    begins = _bulk_begins(p, "ba", sec, sent)
    assert [(i, epoch) for i, _, epoch in begins] == [(first, p.map.epoch), (second, p.map.epoch)]
    assert all(flows == 1 for _, flows, _ in begins)


def test_snapshot_reports_policy_counters_peers_and_health():
    p = Pair(Policy.ACKED)
    p.run(0.05)
    p.packet("ba", 42000)
    rep = p.reps["ba"]
    rep.rejected["bad_tag"] += 1
    rep.node.counters["stale_updates"] += 4
    snap = rep.snapshot(p.now)
    assert snap["policy"] == "acked" and snap["held"] == 1
    assert snap["counters"] == dict(rep.counters) and snap["counters"]["held"] == 1
    assert snap["rejected"] == {"bad_tag": 1}
    assert snap["stale_updates_ignored"] == 4
    assert list(snap["peers"]) == ["bb", "bc"]
    assert snap["peers"]["bb"] == rep.channels["bb"].snapshot(p.now)
    assert snap["health"] == {"bb": "alive", "bc": "alive"}


def test_a_map_change_bulks_each_led_flow_to_its_own_new_secondary(monkeypatch):
    """Four B instances; ba leads flows of many buckets. When bd dies, each
    flow whose secondary was bd goes, in one bulk per peer, to the secondary
    the new map gives its own code; no other flow moves."""
    from dataplane.core.servicemap import Instance
    from dataplane.core.syncchannel import SyncChannel
    from tests.conftest import pair_map

    m = pair_map()
    for n in ("bc", "bd"):
        m.add_instance("B", Instance(n))
    bulks: dict[str, list] = {}
    real = SyncChannel.start_bulk

    def record(self, updates, now, epoch=0):
        updates = list(updates)
        bulks.setdefault(self.peer, []).append(sorted(u.key[1] for u in updates))
        return real(self, updates, now, epoch)

    monkeypatch.setattr(SyncChannel, "start_bulk", record)
    rep = Replicator(ServiceNode("ba", m, create("firewall")), KEYS, 1000)
    codes = codes_led_by(m, "ba", 60)
    for i, c in enumerate(codes):
        data = wire.pack(1, 1, c, 1, m.epoch) + tcp(sport=40000 + i)
        rep.process(rep.node.from_fabric(data, "aa", 0.0), 0.0)
    new = m.copy()
    new.set_state("bd", InstanceState.DEAD)
    bulks.clear()
    moved = rep.update_map(new, 0.01)
    want: dict[str, list] = {}
    for c in codes:
        if m.secondary("B", c, exclude="ba") == "bd":
            want.setdefault(new.secondary("B", c, exclude="ba"), []).append(c)
    assert len(want) == 2                                   # the moved flows go to bb and to bc
    assert bulks == {peer: [sorted(cs)] for peer, cs in want.items()} and moved == 2
    assert rep.counters["bulk_on_map_change"] == 2


def test_async_leaves_the_update_for_the_batch_and_the_packet_goes_alone():
    """Under `async` the packet's own call returns the packet only: its
    update waits for the batch (64 records or 1 ms), then leaves."""
    p = Pair(Policy.ASYNC)
    p.run(0.05)
    p.order.clear()
    p.packet("ba", 40005)
    assert p.order == ["send"]
    p.step()                                          # 1 ms later: the batch is due
    assert p.order.count("sync") >= 1


def test_a_datagram_of_eight_bytes_from_a_peer_is_refused_by_its_channel_not_as_a_stranger():
    """The sender id sits in bytes 4-8: eight bytes name a peer, whose
    channel refuses the datagram as short; fewer name nobody."""
    p = Pair()
    p.run(0.05)
    rep = p.reps["ba"]
    short = bytes(4) + sw.node_id("bb").to_bytes(4, "big")
    assert rep.receive(short, p.now) == [] and rep.counters["unknown_sender"] == 0
    assert rep.receive(short[:7], p.now) == [] and rep.counters["unknown_sender"] == 1


# -- survivors of the mutation run (tests/MUTANTS.md) -------------------------------------


def _mirror_of(events):
    return next(e for e in events if isinstance(e, Mirror))


def test_flows_past_the_pending_limit_reach_the_secondary_in_their_current_state():
    """A channel whose pending set is full remembers the flows it could not
    queue and hands them back (`ResyncFlows`) once it has room: the
    replicator sends the current state of those it still leads, and counts
    the ones gone meanwhile (`resync_gone`). The config given to the
    replicator is the one its channels use."""
    p = Pair(config=SyncConfig(pending_limit=4))
    p.run(0.05)
    rep = p.reps["ba"]
    code = p.code_led_by("ba")
    sec = p.map.secondary("B", code, exclude="ba")
    for port in range(45000, 45012):
        p.packet("ba", port, code=code)
    ch = rep.channels[sec]
    assert ch.stats["resend_overflow"] == 8            # 4 queued, 8 remembered
    gone = [e.key for e in rep.node.flows][-2:]
    for k in gone:                                      # two of the remembered flows end unmirrored
        rep.node.flows.delete(k)
    p.run(0.1)
    assert rep.counters["resync_gone"] == 2 and ch.stats["resync_flows"] == 8
    assert replicas(p.reps[sec]) == leads(rep) and len(leads(rep)) == 10


def test_under_async_a_batch_returns_its_packets_and_its_updates_wait_for_the_batch_delay():
    p = Pair(Policy.ASYNC)
    p.run(0.05)
    rep = p.reps["ba"]
    code = p.code_led_by("ba")
    events = [rep.node.from_fabric(wire.pack(1, 1, code, 1, p.map.epoch) + tcp(sport=46000 + i), "aa",
                                   p.now) for i in range(3)]
    out = rep.process_batch(events, p.now)
    assert [type(o) for o in out] == [Send, Send, Send]
    later = rep.tick(p.now + 0.002)
    assert any(isinstance(o, SyncSend) for o in later)


def test_under_acked_only_a_packet_that_opens_a_flow_waits_for_its_acknowledgement():
    """In one batch: a new flow's SYN (held), the server's SYN-ACK of a
    flow the secondary already has (an update, not an opening: not held)
    and a retransmitted SYN-ACK (no update at all: not held)."""
    p = Pair(Policy.ACKED)
    p.run(0.05)
    rep = p.reps["ba"]
    code = p.code_led_by("ba")
    p.packet("ba", 47000, code=code)
    p.run(0.02)                                        # 47000 acknowledged and released
    p.fabric.clear()

    def pkt(sport, flags, reply=False):
        head = wire.pack(1, 2 if reply else 1, code, 1, p.map.epoch, wire.Flags.REVERSE if reply else 0)
        inner = (tcp(src="10.2.0.10", dst="10.1.0.10", sport=80, dport=sport, flags=flags, seq=900, ack=2)
                 if reply else tcp(sport=sport, flags=flags, seq=1))
        return rep.node.from_fabric(head + inner, "egress" if reply else "aa", p.now)

    opening = pkt(47001, "S")
    answered = pkt(47000, "SA", reply=True)
    again = pkt(47000, "SA", reply=True)
    assert _mirror_of(opening).update.version == 1 and _mirror_of(answered).update.version > 1
    assert not any(isinstance(e, Mirror) for e in again)
    held = rep.counters["held"]
    out = rep.process_batch([opening, answered, again], p.now)
    sends = [o for o in out if isinstance(o, Send)]
    assert sends == [answered[-1], again[-1]] and rep.counters["held"] == held + 1
    p.out("ba", out)
    p.run(0.02)
    assert rep.counters["hold_timeout"] == 0 and [s for _, s in p.fabric][-1] == opening[-1]


def test_held_packets_are_released_at_their_deadline_exactly_and_each_is_counted():
    p = Pair(Policy.ACKED)
    p.run(0.05)
    rep = p.reps["ba"]
    code = p.code_led_by("ba")
    sec = p.map.secondary("B", code, exclude="ba")
    del p.reps[sec]                                    # the secondary is silent
    events = [rep.node.from_fabric(wire.pack(1, 1, code, 1, p.map.epoch) + tcp(sport=48000 + i), "aa",
                                   p.now) for i in range(2)]
    held_at = p.now
    assert rep.process_batch(events, held_at)[-1:] != [events[-1][-1]] and rep.counters["held"] == 2
    assert not [o for o in rep.tick(held_at + rep.hold_timeout / 2) if isinstance(o, Send)]
    released = [o for o in rep.tick(held_at + rep.hold_timeout) if isinstance(o, Send)]
    assert released == [events[0][-1], events[1][-1]] and rep.counters["hold_timeout"] == 2


def test_a_replica_is_dated_from_the_update_that_made_it_and_expires_idle_like_its_primary():
    p = Pair()
    p.run(0.05)
    code = p.packet("ba", 49000)
    p.run(0.01)
    sec = p.reps[p.map.secondary("B", code, exclude="ba")]
    (e,) = [e for e in sec.node.flows if e.replica]
    assert 0.05 < e.created == e.last_seen <= p.now
    assert e.key in sec.node.flows
    sec.node.expire(e.last_seen + e.timeout + 1)
    assert e.key not in sec.node.flows


def test_a_silent_peer_declared_dead_stays_dead_until_it_is_heard_again():
    """A peer heard steadily for longer than the hold-down, then silent, is
    declared dead once, and not back alive on the next ticks: only a new
    datagram from it counts as being heard."""
    p = Pair(holddown=0.02)
    p.run(0.1)
    p.declared.clear()
    p.reps.pop("bc")
    p.run(0.2)
    assert [(d.peer, d.health) for src, d in p.declared if src == "ba"] == [("bc", Health.DEAD)]


def test_refused_datagrams_are_counted_each_by_the_peer_s_channel_or_for_a_stranger_by_the_replicator():
    p = Pair()
    p.run(0.05)
    rep = p.reps["ba"]
    forged = sw.Keyring({1: b"x" * 32}, 1)

    def from_(sender, counter):
        return sw.encode(forged, sw.node_id(sender), sw.node_id("ba"), 5, 0, counter, 0, [sw.hello(1)])

    for i in range(2):
        assert rep.receive(from_("bb", 100 + i), p.now) == []
    assert rep.channels["bb"].rejected["bad_mac"] == 2 and not rep.rejected
    del rep.channels["bc"]
    for i in range(2):
        assert rep.receive(from_("bc", 100 + i), p.now) == []
    assert rep.rejected["bad_mac"] == 2 and "bc" not in rep.channels


def test_a_map_whose_epoch_is_1_still_names_the_senders_of_datagrams():
    """A map document may start at epoch 1 (the first a store publishes):
    the replicator's cache of sender ids must not take it for known."""
    from dataplane.core.servicemap import ServiceMap

    doc = lab_map().to_dict()
    doc["epoch"] = 1
    smap = ServiceMap.from_dict(doc)
    p = Pair(smap=smap)
    p.run(0.05)
    assert p.reps["ba"].counters["unknown_sender"] == 0
    assert p.reps["ba"].channels["bb"].stats["datagrams_received"] > 0


@pytest.mark.parametrize("trigger", ["operator", "peer_request", "map_change"])
def test_a_bulk_leaves_at_the_first_tick_a_batch_delay_after_it_starts(trigger):
    """However a bulk starts (an operator's resync, the peer's RESYNC, a map
    change that gives flows a new secondary) its first records leave at the
    first tick `batch_delay` or more later, like any other update."""
    p = Pair()
    sec = led_by_ba(p, 3, 50000)
    rep = p.reps["ba"]
    start = p.now + 0.0005
    if trigger == "operator":
        rep.resync(sec, start)
    elif trigger == "peer_request":
        ask = p.reps[sec].channels["ba"]._transmit(0, [sw.Record(sw.RecordType.RESYNC, b"")]).data
        assert not any(isinstance(o, SyncSend) for o in rep.receive(ask, start))
    else:
        other = "bc" if sec == "bb" else "bb"
        new = p.map.copy()
        new.set_state(sec, InstanceState.DEAD)
        assert rep.update_map(new, start) == 1
        sec = other
    sent = rep.tick(start + 2 * rep.config.batch_delay)
    assert [epoch for _, _, epoch in _bulk_begins(p, "ba", sec, sent)] == [rep.node.map.epoch], sent


def test_acked_holds_a_packet_through_the_handshake_while_an_instance_marked_dead_says_hello():
    """The first packet of a flow, sent before the channels are up, waits
    for the secondary's acknowledgement; meanwhile bc, restarted but still
    DEAD in the map (so without a channel), makes contact: its hello opens
    a channel and releases nothing early."""
    smap = lab_map()
    smap.set_state("bc", InstanceState.DEAD)
    p = Pair(Policy.ACKED, smap=smap)
    rep = p.reps["ba"]
    assert set(rep.channels) == {"bb"}
    code = next(c for c in codes_led_by(smap, "ba", 50) if smap.secondary("B", c, exclude="ba") == "bb")
    p.packet("ba", 51000, code=code)
    assert rep.counters["held"] == 1 and not p.fabric
    p.step()
    p.step()                                           # bb's and bc's hellos arrive
    assert "bc" in rep.channels and not p.fabric
    p.run(0.02)
    assert len(p.fabric) == 1 and rep.counters["hold_timeout"] == 0


def test_after_a_scale_out_flows_kept_on_ba_are_mirrored_to_their_secondary_never_to_ba(monkeypatch):
    """bd joins the service and heads buckets where ba still leads flows
    (pinned). Their secondary is now the first candidate other than ba:
    bd where it ranks first. The map change bulks each moved flow there
    (none to ba itself, none for the replica ba holds, which comes first
    in its table); a later map change that moves no secondary bulks
    nothing; a resync of bd sends exactly the flows bd mirrors."""
    from dataplane.core.servicemap import Instance, Tenant
    from dataplane.core.syncchannel import SyncChannel

    m = lab_map()
    bulks: dict[str, list] = {}
    real = SyncChannel.start_bulk

    def record(self, updates, now, epoch=0):
        updates = list(updates)
        bulks.setdefault(self.peer, []).append(sorted(u.key for u in updates))
        return real(self, updates, now, epoch)

    monkeypatch.setattr(SyncChannel, "start_bulk", record)
    rep = Replicator(ServiceNode("ba", m, create("firewall")), KEYS, 1000)
    bb = ServiceNode("bb", m, create("firewall"))
    theirs = next(c for c in codes_led_by(m, "bb", 50) if m.secondary("B", c, exclude="bb") == "ba")
    mirror = _mirror_of(bb.from_fabric(wire.pack(1, 1, theirs, 1, m.epoch) + tcp(sport=39999), "aa", 0.0))
    assert rep.node.apply_update(mirror.update, 0.0)          # ba's first entry: a replica
    for i, c in enumerate(codes_led_by(m, "ba", 80)):
        rep.process(rep.node.from_fabric(wire.pack(1, 1, c, 1, m.epoch) + tcp(sport=40000 + i), "aa", 0.0), 0.0)
    led = [e for e in rep.node.flows if not e.replica]
    new = m.copy()
    new.add_instance("B", Instance("bd"))
    bulks.clear()
    rep.update_map(new, 0.01)
    want: dict[str, list] = {}
    for e in led:
        sec = new.secondary("B", e.key[1], exclude="ba")
        if sec != m.secondary("B", e.key[1], exclude="ba"):
            want.setdefault(sec, []).append(e.key)
    assert any(new.primary("B", k[1]) == "bd" for k in want["bd"])   # bd heads some of ba's flows
    assert bulks == {peer: [sorted(keys)] for peer, keys in want.items()}
    newer = new.copy()
    newer.add_tenant(Tenant(2, "t2", ["10.3.0.0/16"]))      # a new epoch, no instance moved
    bulks.clear()
    assert rep.update_map(newer, 0.02) == 0 and bulks == {}
    rep.resync("bd", 0.03)
    assert bulks == {"bd": [sorted(e.key for e in led if newer.secondary("B", e.key[1], exclude="ba") == "bd")]}

def _bulks_of_map_change(monkeypatch, change, me, per_bucket):
    """The bulks `me` (holding flows it leads and replicas) starts when the
    map changes by `change`, reading secondaries per bucket or per flow."""
    import random

    from dataplane.core import replicator
    from dataplane.core.services.firewall import FlowState, Kind, TcpState
    from dataplane.core.syncchannel import SyncChannel

    monkeypatch.setattr(replicator, "BUCKETS_PER_LOOKUP", 1 << 30 if per_bucket else 0)
    bulks = []
    monkeypatch.setattr(SyncChannel, "start_bulk", lambda ch, updates, now, epoch=0:
                        bulks.append((ch.peer, sorted(u.key for u in updates), epoch)))
    m = lab_map()
    node = ServiceNode(me, m, create("firewall"))
    rep = Replicator(node, KEYS, 1, Policy.ASYNC)
    rnd = random.Random(me)
    for port in range(3000):
        code = rnd.getrandbits(32)
        role = m.candidates("B", code).index(me) if me in m.candidates("B", code) else None
        if role is None:
            continue
        e = node.flows.insert((1, code, 6, b"\x0a\x01\x00\x01", port, b"\x0a\x02\x00\x01", 80), 0.0,
                              FlowState(Kind.TCP, int(TcpState.ESTABLISHED)))
        e.version = 1
        if role:
            e.replica = True
            node.flows.replicas += 1
    new = m.copy()
    change(new)
    bulks.clear()
    rep.update_map(new, 1.0)
    return bulks


MAP_CHANGES = {
    "death": lambda m: m.set_state("ba", InstanceState.DEAD),
    "double": lambda m: (m.set_state("ba", InstanceState.DEAD), m.set_state("bc", InstanceState.DEAD)),
    "joining": lambda m: m.set_state("bc", InstanceState.JOINING),
    "draining": lambda m: m.set_state("bb", InstanceState.DRAINING),
    "scale_out": lambda m: m.add_instance("B", Instance("bd")),
    "no_role_moved": lambda m: m.add_tenant(Tenant(2, "t2", ["10.3.0.0/16"])),
}


@pytest.mark.parametrize("me", ["ba", "bb", "bc"])
@pytest.mark.parametrize("change", MAP_CHANGES)
def test_bulks_on_a_map_change_are_the_same_read_per_bucket(monkeypatch, me, change):
    """With many flows `Replicator.update_map` reads every bucket's
    secondary off the tables at once, with few it asks the maps flow by
    flow: both start the same bulks, to the same peers."""
    per_flow = _bulks_of_map_change(monkeypatch, MAP_CHANGES[change], me, per_bucket=False)
    per_bucket = _bulks_of_map_change(monkeypatch, MAP_CHANGES[change], me, per_bucket=True)
    assert per_bucket == per_flow
    moved = sum(len(keys) for _, keys, _ in per_flow)
    assert moved > 100 if change in ("death", "scale_out") and me != "ba" else True
