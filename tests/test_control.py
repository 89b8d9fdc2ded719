"""The control channel: maps pushed to forwarders, heartbeats and status back."""

from __future__ import annotations

import pytest

from dataplane.core import syncwire as sw
from dataplane.core.control import (ControlClient, Controller, ControlSend, MapPublished, MapReceived, not_ready,
                                    standing)
from dataplane.core.events import Persist
from dataplane.core.liveness import Declared, FailureDetector
from dataplane.core.servicemap import Instance, InstanceState, ServiceMap
from tests.conftest import pair_map

KEYS = sw.Keyring({1: b"c" * 32}, 1)


def controller(smap=None, keys=KEYS):
    return Controller("ctl", smap or pair_map(), keys, 7_000, FailureDetector(0.005, 4, 1.0))


def pushes(events, to):
    return [e.data for e in events if isinstance(e, ControlSend) and e.to == to]


def test_a_recorded_map_is_refused_by_a_restarted_forwarder():
    """A map that declared ba dead, recorded and replayed to ba after its
    restart, must not make the new ba stop serving; the controller's next
    push, bound to the incarnation it hears from the new ba, installs."""
    ctl = controller()
    old = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    for send in old.tick(0.0):
        ctl.receive(send.data, 0.0)
    ctl.set_state("ba", InstanceState.DEAD, "test", 0.01)
    recorded = pushes(ctl.push(0.01), "ba")[0]
    assert [type(e) for e in old.receive(recorded)] == [MapReceived]      # its own incarnation: taken
    new = ControlClient("ba", "ctl", pair_map(), KEYS, 200)               # ba restarted
    assert new.receive(recorded) == []
    assert new.endpoint.rejected["wrong_incarnation"] == 1
    for send in new.tick(0.02):
        ctl.receive(send.data, 0.02)
    got = new.receive(pushes(ctl.push(0.03), "ba")[0])
    assert [e.smap.epoch for e in got] == [ctl.map.epoch]


def test_a_forwarder_that_has_not_heard_the_controller_is_heard_but_its_status_waits():
    """The heartbeat is the control channel's HELLO: taken from a forwarder
    that does not know the controller's incarnation yet (a new forwarder, or
    any forwarder right after a controller restart); its STATUS, which can
    make a joining instance lead, only once bound to the controller."""
    ctl = controller()
    client = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    for send in client.tick(0.0):
        ctl.receive(send.data, 0.0)
    assert ctl.detector.health("ba").value == "alive" and "ba" not in ctl.held
    assert ctl.endpoint.rejected["unbound_records"] == 1
    client.receive(pushes(ctl.push(0.01), "ba")[0])           # now it knows the controller
    for send in client.tick(0.02):
        ctl.receive(send.data, 0.02)
    assert ctl.held["ba"] == ctl.map.epoch


def test_a_client_is_confirmed_by_a_push_of_the_map_it_holds_or_a_newer_one():
    """Issue #13, defect 4: readiness needs the controller's word. The
    topology's map and the controller's first map have the same epoch, so a
    re-push of the epoch held confirms it as a newer one does."""
    ctl = controller()
    client = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    ctl.receive(client.tick(0.0)[0].data, 0.0)
    assert not client.confirmed
    assert client.receive(pushes(ctl.push(0.01), "ba")[0]) == [] and client.confirmed


@pytest.mark.parametrize("confirmed, state, serving, in_sync, why", [
    (True, None, True, True, []),                                   # an edge holding the map
    (False, None, True, True, ["no_map"]),
    (True, InstanceState.ACTIVE, True, True, []),
    (True, InstanceState.SPARE, True, True, []),
    (True, InstanceState.ACTIVE, True, False, ["sync_pending"]),
    (True, InstanceState.JOINING, True, True, ["joining"]),
    (True, InstanceState.DEAD, False, True, ["declared_dead", "dead"]),
    (True, InstanceState.ACTIVE, False, True, ["declared_dead"]),
])
def test_readiness_is_derived_from_map_state_and_sync(confirmed, state, serving, in_sync, why):
    assert not_ready(confirmed, state, serving, in_sync) == why


def test_a_new_controller_pushes_only_to_members_it_has_heard():
    ctl = controller()
    assert pushes(ctl.push(0.0), "ba") == []
    client = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    ctl.receive(client.tick(0.0)[0].data, 0.0)
    assert [e.to for e in ctl.push(0.01)] == ["ba"]


def test_pairwise_control_keys_carry_heartbeats_and_maps_for_their_pair_only():
    master = b"m" * 32
    members = ["ingress", "ba", "bb", "egress"]
    ctl = controller(keys=sw.Keyring({1: master}, 1, pairwise=True,
                                     senders=[sw.node_id(n) for n in members]))

    def ring(name):
        return sw.Keyring({1: sw.pair_key(master, sw.node_id("ctl"), sw.node_id(name))}, 1,
                          senders=[sw.node_id("ctl")])

    ba, bb = (ControlClient(n, "ctl", ctl.map, ring(n), 100 + i) for i, n in enumerate(("ba", "bb")))
    for client in (ba, bb):
        ctl.receive(client.tick(0.0)[0].data, 0.0)
    ctl.set_state("ba", InstanceState.DRAINING, "test", 0.01)
    out = ctl.push(0.01)
    assert [e.smap.epoch for e in ba.receive(pushes(out, "ba")[0])] == [ctl.map.epoch]
    assert bb.receive(pushes(out, "ba")[0]) == []             # another pair's datagram
    assert bb.endpoint.rejected["bad_mac"] == 1
    spoof = ControlClient("bb", "ctl", ctl.map, ring("ba"), 300)   # ba's key, bb's name
    ctl.receive(spoof.tick(0.0)[0].data, 0.02)
    assert ctl.endpoint.rejected["bad_mac"] == 1


def test_a_zlib_bomb_map_is_refused_without_inflating_it():
    """Issue #14, finding 8: a MAP record inflates at most MAX_MAP_BYTES."""
    import tracemalloc
    import zlib

    ctl = controller()
    client = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    ctl.receive(client.tick(0.0)[0].data, 0.0)
    bomb = zlib.compress(b"[" + b" " * (60 << 20) + b"]", 9)
    data = ctl.endpoint.encode("ba", [sw.Record(sw.RecordType.MAP, bomb)])
    assert len(data) < 65_000                               # one UDP datagram
    tracemalloc.start()
    try:
        assert client.receive(data) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20 and client.counters["map_too_big"] == 1


@pytest.mark.parametrize("text", [
    b'{"epoch": 1e999, "buckets": 64, "replicas": 2, "services": {}}',
    b'{"epoch": 99, "buckets": 1e999, "replicas": 2, "services": {}}',
    b"[" * 50_000 + b"]" * 50_000,
    b'{"epoch": 99, "buckets": 64, "replicas": 2, "services": {"B": [{"name": 5}]}}',
    b'{"epoch": 99, "buckets": 64, "replicas": 2, "services": {}, "tenants": '
    b'[{"id": 1, "name": "t", "prefixes": ["junk"]}]}',
])
def test_a_signed_bad_map_is_a_counted_refusal(text):
    """Issue #14, finding 6: nothing in a MAP record raises out of the client."""
    import zlib

    ctl = controller()
    client = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    ctl.receive(client.tick(0.0)[0].data, 0.0)
    data = ctl.endpoint.encode("ba", [sw.Record(sw.RecordType.MAP, zlib.compress(text))])
    assert client.receive(data) == [] and client.counters["bad_map"] == 1


A, J, D, DR = (InstanceState.ACTIVE, InstanceState.JOINING, InstanceState.DEAD, InstanceState.DRAINING)


@pytest.mark.parametrize("me, was, serving, join_epoch, want", [
    (None, None, True, 4, (4, None)),                          # an edge: nothing to decide
    (A, A, True, None, (None, None)),
    (J, D, True, None, (9, None)),                             # joins at this epoch
    (J, J, True, 7, (7, None)),                                # keeps the epoch it joined at
    (A, J, True, 7, (None, None)),                             # in sync: leads
    (D, A, True, None, (None, "declared_dead")),
    (D, D, False, None, (None, None)),                         # already stopped
    (J, A, True, None, (9, "declared_dead")),                  # the DEAD map never reached it
    (J, DR, True, None, (9, "declared_dead")),
    (J, D, False, None, (9, "serving_again")),
    (A, D, False, None, (None, "serving_again")),
])
def test_what_a_new_map_means_for_the_instance_installing_it(me, was, serving, join_epoch, want):
    """The rule the forwarder shell and the simulator share."""
    got = standing(Instance("ba", state=me) if me else None, Instance("ba", state=was) if was else None,
                   serving, join_epoch, 9)
    assert (got.join_epoch, got.change) == want


def spare_map():
    """pair_map with a third B instance, bc, SPARE (what scale-out takes)."""
    m = pair_map()
    m.add_instance("B", Instance("bc", state=InstanceState.SPARE))
    return m


def exchange(ctl, clients, now):
    """One round: every client heartbeats, the controller pushes, each takes its push."""
    out = []
    for c in clients:
        for send in c.tick(now):
            out += ctl.receive(send.data, now)
    sends = ctl.push(now)
    for c in clients:
        for data in pushes(sends, c.endpoint.me):
            c.receive(data)
    return out


def test_a_controller_restarted_while_an_instance_joins_still_makes_it_lead():
    """Issue #13, defect 3: the epoch an instance joined at was kept only in
    memory, so a controller restarted from its store left it JOINING for
    ever. A restarted controller takes the stored map's epoch as the join
    epoch (the latest it can be) and makes bc lead once it reports in sync."""
    ctl = controller(spare_map())
    clients = [ControlClient(n, "ctl", ctl.map, KEYS, 100 + i) for i, n in enumerate(("ba", "bb", "bc"))]
    exchange(ctl, clients, 0.0)
    kept = [e.data for e in ctl.operator("bc", "scale-out", 0.01) if isinstance(e, Persist)]
    exchange(ctl, clients, 0.02)
    assert clients[2].epoch == ctl.map.epoch and ctl.map.instance("bc").state == InstanceState.JOINING
    again = Controller("ctl", spare_map(), KEYS, 8_000, FailureDetector(0.005, 4, 1.0), now=0.03,
                       stored=kept[-1])
    assert again.map == ctl.map
    clients[2].in_sync = True                                   # its bulks are done
    for t in (0.04, 0.06, 0.08):                                # hello, bound push, bound STATUS
        exchange(again, clients, t)
    assert again.map.instance("bc").state == InstanceState.ACTIVE


def test_a_restarted_controller_does_not_make_a_joiner_lead_on_an_older_status():
    """The restored join epoch is the stored map's: a STATUS saying in sync
    as of an older epoch (sent before the map that made it join) is not enough."""
    m = spare_map()
    m.set_state("bc", InstanceState.JOINING)
    ctl = Controller("ctl", spare_map(), KEYS, 8_000, FailureDetector(0.005, 4, 1.0), stored=m.to_json().encode())
    bc = ControlClient("bc", "ctl", spare_map(), KEYS, 100)     # holds the epoch before
    bc.in_sync = True
    exchange(ctl, [bc], 0.0)
    bc.epoch = ctl.map.epoch - 1                                # the push did not reach it
    exchange(ctl, [bc], 0.02)
    assert ctl.held["bc"] == m.epoch - 1 and ctl.map.instance("bc").state == InstanceState.JOINING


def test_every_published_epoch_is_kept_before_it_is_pushed():
    """Issue #13, defect 7: the controller does no I/O; every epoch it
    publishes (operator, detector, a joiner in sync) comes with a Persist
    of that map, ahead of any push, and a controller built from the last
    one resumes with the same map."""
    ctl = Controller("ctl", spare_map(), KEYS, 7_000, FailureDetector(0.005, 4, 0.05))
    ba, bb, bc = clients = [ControlClient(n, "ctl", ctl.map, KEYS, 100 + i)
                            for i, n in enumerate(("ba", "bb", "bc"))]
    events = exchange(ctl, clients, 0.0)
    events += ctl.operator("bc", "scale-out", 0.01)
    bc.in_sync = True
    events += exchange(ctl, clients, 0.02) + exchange(ctl, clients, 0.04)  # bc leads
    events += ctl.operator("ba", "drain", 0.05)
    for i in range(20):                                      # ba silent: dead; heard again: joins
        t = 0.06 + 0.015 * i
        events += exchange(ctl, clients if i == 0 or i > 5 else [bb, bc], t) + ctl.tick(t)
    reasons = [e.reason for e in events if isinstance(e, MapPublished)]
    assert reasons == ["bc scaled out: joining", "bc in sync: takes its buckets", "ba draining",
                       "ba missed heartbeats", "ba is back: joining"]
    published = [e.epoch for e in events if isinstance(e, MapPublished)]
    kept = [e for e in events if isinstance(e, Persist)]
    assert [ServiceMap.from_json(e.data).epoch for e in kept] == published
    for i, e in enumerate(events):
        if isinstance(e, MapPublished):
            assert isinstance(events[i + 1], Persist)       # before this epoch's pushes
    again = Controller("ctl", spare_map(), KEYS, 8_000, FailureDetector(0.005, 4, 1.0), stored=kept[-1].data)
    assert again.map == ctl.map


def test_a_restored_controller_counts_silence_from_its_first_tick():
    """A controller restarted from its store whose shell took longer to set
    up than a detector timeout declares nobody dead at its first tick: the
    members had no chance to be heard yet. They still are declared dead
    when they stay silent past the timeout after it."""
    m = spare_map()
    ctl = Controller("ctl", spare_map(), KEYS, 8_000, FailureDetector(0.005, 4, 1.0), now=0.0,
                     stored=m.to_json().encode())
    assert not [e for e in ctl.tick(1.0) if isinstance(e, MapPublished)]
    assert ctl.map.epoch == m.epoch
    assert [e for e in ctl.tick(1.1) if isinstance(e, MapPublished)]


def agent_setup(agents=None):
    """A controller with the agent of ba's machine, the agent and ba heard,
    and the agent bound to the controller by a push."""
    ctl = Controller("ctl", pair_map(), KEYS, 7_000, FailureDetector(0.005, 4, 1.0),
                     agents=agents or {"agent": ["ba"]})
    agent = ControlClient("agent", "ctl", ctl.map, KEYS, 300)
    ba = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    for c in (agent, ba):
        for send in c.tick(0.0):
            ctl.receive(send.data, 0.0)
    agent.receive(pushes(ctl.push(0.001), "agent")[0])
    return ctl, agent


def test_an_agents_exit_notice_declares_its_node_dead_at_once():
    """The agent's notice does the detector's work without its timeout:
    the node is dead in the next epoch, named as exited; a repeated notice
    (the agent sends each again) changes nothing, and the detector does not
    declare it again."""
    ctl, agent = agent_setup()
    epoch = ctl.map.epoch
    [notice] = agent.exited("ba")
    out = ctl.receive(notice.data, 0.002)        # well within the 20 ms detection timeout
    assert ctl.map.instance("ba").state == InstanceState.DEAD and ctl.map.epoch == epoch + 1
    assert [e.reason for e in out if isinstance(e, MapPublished)] == ["ba exited (agent)"]
    assert ctl.counters["exits_reported"] == 1 and ctl.counters["failovers"] == 1
    assert ctl.receive(agent.exited("ba")[0].data, 0.003) == []
    ctl.tick(0.1)                                 # ba silent since: not declared a second time
    assert ctl.map.epoch == epoch + 1 and ctl.counters["failovers"] == 1


def test_an_agent_reports_only_its_own_machine_and_is_no_member():
    """An agent may report the nodes of its machine only (a notice about
    another machine's node is refused and counted); its heartbeats make it
    known but never a member the detector could declare dead."""
    ctl, agent = agent_setup({"agent": ["bb"]})
    epoch = ctl.map.epoch
    assert ctl.receive(agent.exited("ba")[0].data, 0.002) == []
    assert ctl.counters["exit_refused"] == 1 and ctl.map.epoch == epoch
    assert "agent" not in ctl.detector.peers and "agent" not in ctl.members
    ctl.tick(0.5)                                 # ba and the agent silent for long
    assert [r for _, _, r in ctl.history] == ["ba missed heartbeats"]


def test_an_exit_notice_is_bound_to_the_controllers_incarnation():
    """A notice recorded and replayed to a restarted controller is refused
    (a live node is not declared dead by someone who only recorded the
    fabric); an agent that has heard no controller holds its notices."""
    ctl, agent = agent_setup()
    recorded = agent.exited("ba")[0].data
    again = Controller("ctl", pair_map(), KEYS, 8_000, FailureDetector(0.005, 4, 1.0), agents={"agent": ["ba"]})
    assert again.receive(recorded, 0.0) == []
    assert again.endpoint.rejected["wrong_incarnation"] == 1 and again.map.instance("ba").state != InstanceState.DEAD
    assert ControlClient("agent", "ctl", pair_map(), KEYS, 301).exited("ba") == []


# -- what mutation testing found untested (tests/MUTANTS.md) ------------------------------


def test_a_heartbeat_carries_the_sender_clock_and_a_status_of_epoch_and_flags():
    ctl = controller()
    client = ControlClient("ba", "ctl", ctl.map, KEYS, 100, interval=0.5)
    me = sw.node_id("ctl")
    (first,) = client.tick(0.0)                            # a new client: not dead, not in sync
    assert sw.decode(KEYS, first.data, me).records[1].value[4] == 0
    for dead, in_sync, flags in [(False, False, 0), (True, False, 1), (False, True, 2), (True, True, 3)]:
        client.declared_dead, client.in_sync = dead, in_sync
        client.epoch = 0x01020304
        now = 2.0 + flags
        (send,) = client.tick(now)
        assert send.to == "ctl"
        hb, status = sw.decode(KEYS, send.data, me).records
        assert hb.type == sw.RecordType.HEARTBEAT and sw.read_u64(hb.value) == int(now * 1e6)
        assert status.type == sw.RecordType.STATUS and status.value == bytes([1, 2, 3, 4, flags])
    assert client.tick(now + 0.25) == []                   # within the interval: nothing
    assert len(client.tick(now + 0.5)) == 1                # the interval exactly: the next one


def test_a_client_takes_every_map_record_of_a_datagram_and_counts_each_refusal():
    import zlib

    from dataplane.core.control import map_record

    ctl = controller()
    client = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    ctl.receive(client.tick(0.0)[0].data, 0.0)
    held = map_record(ctl.map)
    ctl.set_state("bb", InstanceState.DRAINING, "test", 0.01)
    newer = map_record(ctl.map)
    heartbeat = sw.Record(sw.RecordType.HEARTBEAT, sw.u64(1))
    got = client.receive(ctl.endpoint.encode("ba", [heartbeat, held, newer]))
    assert [e.smap.epoch for e in got] == [ctl.map.epoch] and client.confirmed
    bomb = sw.Record(sw.RecordType.MAP, zlib.compress(b" " * (2 << 20)))
    client.receive(ctl.endpoint.encode("ba", [bomb, bomb]))
    assert client.counters["map_too_big"] == 2
    bad = sw.Record(sw.RecordType.MAP, b"not zlib")
    for refused in (bomb, bad):
        ctl.set_state("bb", InstanceState.ACTIVE if ctl.map.instance("bb").state == InstanceState.DRAINING
                      else InstanceState.DRAINING, "test", 0.02)
        got = client.receive(ctl.endpoint.encode("ba", [refused, bad, map_record(ctl.map)]))
        assert [e.smap.epoch for e in got] == [ctl.map.epoch]       # what follows a refusal is read
    assert client.counters["map_too_big"] == 3 and client.counters["bad_map"] == 3
    assert client.counters["maps"] == 3


def test_a_new_map_confirms_a_client_that_had_none():
    from dataplane.core.control import map_record

    ctl = controller()
    client = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    ctl.receive(client.tick(0.0)[0].data, 0.0)
    ctl.set_state("bb", InstanceState.DRAINING, "test", 0.01)
    assert not client.confirmed
    client.receive(ctl.endpoint.encode("ba", [map_record(ctl.map)]))
    assert client.confirmed and client.counters["maps"] == 1


def test_every_refusal_of_the_control_endpoint_is_counted_each_time():
    ctl = controller()
    ba = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    first = ba.tick(0.0)[0].data
    ctl.receive(first, 0.0)
    for _ in range(2):
        assert ctl.receive(first, 0.01) == []                                  # a replay
    assert ctl.endpoint.rejected["replay"] == 2
    later = ba.tick(0.02)[0].data
    ctl.receive(later, 0.02)                                                   # a new counter is taken
    assert ctl.endpoint.rejected["replay"] == 2
    assert ctl.receive(later, 0.03) == [] and ctl.endpoint.rejected["replay"] == 3
    stale = ControlClient("ba", "ctl", ctl.map, KEYS, 99)                       # an older incarnation
    for t in (0.04, 0.05):
        assert ctl.receive(stale.tick(t)[0].data, t) == []
    assert ctl.endpoint.rejected["stale_incarnation"] == 2
    stranger = sw.encode(KEYS, sw.node_id("zz"), sw.node_id("ctl"), 5, 0, 1, 0, [])
    for _ in range(2):
        ctl.receive(stranger, 0.06)
    assert ctl.endpoint.rejected["unknown_sender"] == 2
    forged = first[:-1] + bytes([first[-1] ^ 1])
    for _ in range(2):
        ctl.receive(forged, 0.07)
    assert ctl.endpoint.rejected["bad_mac"] == 2                               # a bad tag, each time
    # to a forwarder, a push bound to another incarnation is refused, each time
    recorded = pushes(ctl.push(0.08), "ba")[0]
    new = ControlClient("ba", "ctl", ctl.map, KEYS, 200)
    new.receive(recorded)
    new.receive(recorded)
    assert new.endpoint.rejected["wrong_incarnation"] == 2
    # and the STATUS of every unbound heartbeat is counted
    ctl2 = Controller("ctl", pair_map(), KEYS, 9_000, FailureDetector(1.0, 4, 1.0))
    bb = ControlClient("bb", "ctl", ctl2.map, KEYS, 300)
    for t in (0.1, 0.2):
        ctl2.receive(bb.tick(t)[0].data, t)
    assert ctl2.endpoint.rejected["unbound_records"] == 2


def test_an_older_map_does_not_unconfirm_the_one_held():
    ctl = controller()
    client = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    ctl.receive(client.tick(0.0)[0].data, 0.0)
    old = ctl.map
    ctl.set_state("bb", InstanceState.DRAINING, "test", 0.01)
    client.receive(pushes(ctl.push(0.01), "ba")[0])
    assert client.confirmed and client.epoch == ctl.map.epoch
    from dataplane.core.control import map_record
    client.receive(ctl.endpoint.encode("ba", [map_record(old)]))
    assert client.confirmed and client.epoch == ctl.map.epoch


def test_a_truncated_map_record_is_refused_as_too_big_or_truncated():
    import zlib

    from dataplane.core.control import MapTooBig, read_map_record

    whole = zlib.compress(pair_map().to_json().encode())
    assert read_map_record(whole) == pair_map().to_json().encode()
    with pytest.raises(MapTooBig) as err:
        read_map_record(whole[:-8])
    assert str(err.value) == "map larger than 1048576 bytes, or truncated"


def test_the_controller_pushes_when_dirty_and_every_refresh_and_not_between():
    ctl = Controller("ctl", pair_map(), KEYS, 7_000, FailureDetector(1.0, 4, 1.0))   # refresh 0.1
    client = ControlClient("ba", "ctl", ctl.map, KEYS, 100)
    ctl.receive(client.tick(0.0)[0].data, 0.0)
    assert pushes(ctl.tick(0.0), "ba")                      # the first tick: the map is new
    assert not pushes(ctl.tick(0.05), "ba")                 # pushed, and no refresh due
    assert pushes(ctl.tick(0.1), "ba")                      # refresh exactly
    ctl.set_state("bb", InstanceState.DRAINING, "test", 0.12)
    assert pushes(ctl.tick(0.12), "ba")                     # a new epoch goes at once
    assert not pushes(ctl.tick(0.13), "ba")
    slow = Controller("ctl", pair_map(), KEYS, 7_000, FailureDetector(1.0, 4, 1.0), refresh=5.0)
    slow.receive(ControlClient("ba", "ctl", slow.map, KEYS, 100).tick(0.0)[0].data, 0.0)
    assert pushes(slow.tick(0.0), "ba")                     # new, whatever the refresh


def test_epochs_failovers_and_history_record_when_and_why():
    """The controller's history (`amesh map show`'s recent epochs) has the
    time and reason of every epoch it published; its counters count them."""
    ctl = controller(spare_map())
    clients = [ControlClient(n, "ctl", ctl.map, KEYS, 100 + i) for i, n in enumerate(("ba", "bb", "bc"))]
    out = exchange(ctl, clients, 0.0)
    assert sorted((d.peer, d.health.value) for d in out if isinstance(d, Declared)) == [
        ("ba", "alive"), ("bb", "alive"), ("bc", "alive")]
    base = ctl.map.epoch
    ctl.operator("bc", "scale-out", 0.01)
    exchange(ctl, clients, 0.02)
    clients[2].in_sync = True
    exchange(ctl, clients, 0.03)                            # bc in sync: it leads
    exchange(ctl, clients, 0.04)
    ctl.operator("bb", "drain", 0.05)
    ctl.tick(0.06)
    for t in (0.07, 0.08, 0.09):                            # only ba is heard from now on
        exchange(ctl, clients[:1], t)
    out = ctl.tick(0.1)                                     # bb and bc silent > 20 ms
    whys = [(t, e - base, why) for t, e, why in ctl.history]
    assert whys[:3] == [(0.01, 1, "bc scaled out: joining"), (0.04, 2, "bc in sync: takes its buckets"),
                        (0.05, 3, "bb draining")]
    assert sorted((t, why) for t, _, why in whys[3:]) == [(0.1, "bb missed heartbeats"),
                                                         (0.1, "bc missed heartbeats")]
    assert sorted(e for _, e, _ in whys[3:]) == [4, 5] and len(whys) == 5
    assert ctl.counters["epochs"] == 5 and ctl.counters["failovers"] == 2
    assert pushes(out, "ba")                                # every failover is pushed at once
    assert not pushes(ctl.tick(0.105), "ba")                # and counts as the last push


def test_a_member_that_died_joining_does_not_lead_on_a_late_in_sync_status():
    """bc joins, is declared dead before it reports in sync; its in-sync
    STATUS arriving later (within the hold-down, so not yet alive again)
    must not make a dead instance lead."""
    ctl = controller(spare_map())
    clients = [ControlClient(n, "ctl", ctl.map, KEYS, 100 + i) for i, n in enumerate(("ba", "bb", "bc"))]
    exchange(ctl, clients, 0.0)
    ctl.operator("bc", "scale-out", 0.01)
    exchange(ctl, clients, 0.02)
    exchange(ctl, clients[:2], 0.04)
    ctl.tick(0.06)
    assert ctl.map.instance("bc").state == InstanceState.DEAD
    clients[2].in_sync = True
    clients[2].epoch = ctl.map.epoch
    exchange(ctl, clients, 0.07)
    assert ctl.map.instance("bc").state == InstanceState.DEAD


@pytest.mark.parametrize("name,action,message", [
    ("zz", "drain", "no instance 'zz'"),
    ("bc", "drain", "cannot drain bc: it is spare"),
    ("ba", "scale-out", "cannot scale-out ba: it is active"),
])
def test_an_operator_action_the_state_does_not_allow_is_refused_by_name(name, action, message):
    ctl = controller(spare_map())
    epoch = ctl.map.epoch
    with pytest.raises(ValueError) as err:
        ctl.operator(name, action, 0.0)
    assert str(err.value) == message and ctl.map.epoch == epoch


def test_every_publication_is_the_last_push_and_has_its_time():
    """Scale-out, in-sync activation and a dead member's return each push at
    once: the next tick within the refresh pushes nothing, and the history
    has the time of each."""
    ctl = Controller("ctl", spare_map(), KEYS, 7_000, FailureDetector(0.01, 2, 0.05))
    clients = [ControlClient(n, "ctl", ctl.map, KEYS, 100 + i, interval=0.001)
               for i, n in enumerate(("ba", "bb", "bc"))]
    exchange(ctl, clients, 0.0)
    ctl.tick(0.0)
    assert pushes(ctl.operator("bc", "scale-out", 0.01), "ba")
    assert not pushes(ctl.tick(0.011), "ba")
    exchange(ctl, clients, 0.012)
    clients[2].in_sync = True
    out = []
    for c in clients:                                       # bc reports in sync: it leads
        for send in c.tick(0.015):
            out += ctl.receive(send.data, 0.015)
    assert ctl.map.instance("bc").state == InstanceState.ACTIVE and pushes(out, "ba")
    assert not pushes(ctl.tick(0.016), "ba")
    exchange(ctl, clients[:2], 0.02)
    ctl.tick(0.035)                                         # bc silent > 20 ms: dead
    assert ctl.map.instance("bc").state == InstanceState.DEAD
    out = []
    t = 0.04
    while ctl.map.instance("bc").state == InstanceState.DEAD and t < 0.2:
        for c in clients:                                   # heard again, past the hold-down
            for send in c.tick(t):
                out += ctl.receive(send.data, t)
        ctl.tick(t)
        t = round(t + 0.005, 3)
    assert ctl.map.instance("bc").state == InstanceState.JOINING and pushes(out, "ba")
    back = [(when, why) for when, _, why in ctl.history if why == "bc is back: joining"]
    assert back and back[0][0] is not None and 0.09 <= back[0][0] < 0.2
    assert not pushes(ctl.tick(t), "ba")
    assert [when for when, _, _ in ctl.history][:2] == [0.01, 0.015]
