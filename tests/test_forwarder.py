"""The forwarder shell, in process, on loopback (no namespaces, no root).

The default lab's topology with its fabric moved to 127.86.0.0/24: every
127.x address is the loopback's, so instance forwarders bind their fabric,
sync and control sockets there as they would on the lab's fabric. The loop is
driven a round at a time (`Forwarder.poll`); the heartbeat process is not
started.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from dataplane.core import header as wire
from dataplane.core import syncwire as sw
from dataplane.core.control import map_record
from dataplane.core.header import UDP_PORT
from dataplane.core.servicemap import InstanceState, ServiceMap
from dataplane.lab.topology import load
from dataplane.shells.forwarder import Forwarder
from tests.conftest import codes_led_by, tcp

DEFAULT = Path(__file__).resolve().parents[1] / "labs" / "default.toml"
SUBNET = "127.86.0.0/24"


@pytest.fixture
def mesh(tmp_path):
    """mesh(node) -> a Forwarder of that node; all closed at the end."""
    text = DEFAULT.read_text().replace('subnet = "10.99.0.0/24"', f'subnet = "{SUBNET}"')
    path = tmp_path / "lab.toml"
    path.write_text(text)
    topo = load(path)
    made: list[Forwarder] = []

    def make(node: str) -> Forwarder:
        fwd = Forwarder(topo, node, tmp_path)
        made.append(fwd)
        return fwd

    make.topo = topo
    yield make
    for fwd in made:
        fwd.close()


def test_an_instance_cannot_sign_a_map_as_the_controller(mesh):
    """Issue #14, finding 7: neither the keys of ba's sync channels nor its
    own control key let it sign a map another forwarder takes."""
    ba, ab = mesh("ba"), mesh("ab")
    ctl = mesh.topo.controller
    forged = ab.map.copy()
    forged.set_state("aa", InstanceState.DEAD)
    for n, keyring in enumerate((ba.rep.keyring, ba.client.endpoint.keyring)):
        data = sw.encode(keyring, sw.node_id(ctl), sw.node_id("ab"), 1, ab.client.endpoint.incarnation,
                         n + 1, 0, [map_record(forged)])
        assert ab.client.receive(data) == []
    assert ab.client.epoch == ab.map.epoch < forged.epoch


def test_an_instance_of_one_service_cannot_sign_as_another_services(mesh):
    ba, ab = mesh("ba"), mesh("ab")
    data = sw.encode(ba.rep.keyring, sw.node_id("aa"), sw.node_id("ab"), 1, 0, 1, 0, [sw.hello(1)])
    assert ab.rep.receive(data, 0.0) == []
    assert ab.rep.channels["aa"].rejected["bad_mac"] == 1 and ab.rep.channels["aa"].peer_incarnation == 0


def fabric_socket(mesh, node: str) -> socket.socket:
    """A UDP socket on `node`'s fabric address (the node itself is not running)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((mesh.topo.fabric_ip(node), UDP_PORT))
    s.settimeout(0.5)
    return s


def poll_until(fwd: Forwarder, sink: socket.socket, rounds: int = 50) -> list[bytes]:
    """Run the forwarder's loop until the sink has something (bounded)."""
    got: list[bytes] = []
    sink.setblocking(False)
    for _ in range(rounds):
        fwd.poll(0.005)
        try:
            while True:
                got.append(sink.recv(65535))
        except BlockingIOError:
            pass
        if got:
            break
    return got


def syn(fwd: Forwarder, sport: int, marker: bytes = b"") -> bytes:
    code = codes_led_by(fwd.map, fwd.name)[0]
    return wire.pack(1, 1, code, 1, fwd.map.epoch) + tcp(sport=sport, payload=marker)


def test_an_exception_in_a_packet_handler_costs_that_packet_not_the_process(mesh):
    """Issue #14, finding 6: the loop counts an exception of one packet's
    handling as `internal_error` (by handler), logs it, and forwards on."""
    ba = mesh("ba")
    upstream, sink = fabric_socket(mesh, "aa"), fabric_socket(mesh, "egress")
    real = ba.node.from_fabric

    def flaky(data, src, now):
        if data.endswith(b"BOOM"):
            raise RuntimeError("injected")
        return real(data, src, now)

    ba.node.from_fabric = flaky
    try:
        upstream.sendto(syn(ba, 40000, b"BOOM"), (ba.ip, UDP_PORT))
        upstream.sendto(syn(ba, 40001), (ba.ip, UDP_PORT))
        got = poll_until(ba, sink)
        assert len(got) == 1 and got[0].endswith(syn(ba, 40001)[20:])
        assert ba.status(0.0)["internal_error"] == {"fabric": 1}
        original_tick = ba.tick
        ba.tick = lambda now: (_ for _ in ()).throw(RuntimeError("injected in the tick"))
        ba.poll(0.002)
        ba.tick = original_tick
        upstream.sendto(syn(ba, 40002), (ba.ip, UDP_PORT))
        assert len(poll_until(ba, sink)) == 1
        assert ba.status(0.0)["internal_error"] == {"fabric": 1, "tick": 1}
    finally:
        upstream.close()
        sink.close()


def test_fabric_packets_from_an_address_that_is_no_node_are_counted_and_dropped(mesh):
    """Issue #14, finding 9."""
    ba = mesh("ba")
    sink = fabric_socket(mesh, "egress")
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.86.0.200", 0))
    try:
        stranger.sendto(syn(ba, 40003), (ba.ip, UDP_PORT))
        assert poll_until(ba, sink, rounds=20) == []
        assert ba.node.drops["not_a_node"] == 1 and ba.node.counters["forwarded"] == 0
    finally:
        stranger.close()
        sink.close()


def test_status_is_not_ready_until_the_controller_confirmed_the_map(mesh):
    """Issue #13, defect 4: `ready` was always true."""
    ab = mesh("ab")
    status = ab.status(0.0)
    assert not status["ready"] and "no_map" in status["not_ready"]


def test_rotated_keys_are_persisted_0600_and_a_restarted_forwarder_comes_back_with_them(mesh, tmp_path):
    """`keys` queries (amesh lab rotate-key) change the node's keyrings in
    place, are written to <run-dir>/<node>-keys.json (mode 0600), reach the
    heartbeat process through the pulse, and survive both a restart of the
    process and the new replicator of a node declared dead."""
    import stat

    from dataplane.shells.forwarder import Pulse

    ba = mesh("ba")
    ba.pulse = Pulse()
    new_sync, new_ctl = b"s" * 32, b"c" * 32
    for op in ("install", "switch", "retire"):
        for purpose, key in (("sync", new_sync), ("control", new_ctl)):
            reply = ba.answer({"cmd": "keys", "op": op, "purpose": purpose, "kid": 2, "key": key.hex()}, 0.0)
            assert reply.get("ok"), reply
    assert ba.rep.keyring.keys == {2: new_sync} and ba.client.endpoint.keyring.keys == {2: new_ctl}
    assert ba.pulse.key() == (2, new_ctl)
    assert ba.status(0.0)["keys"] == {"control": {"current": 2, "ids": [2]}, "sync": {"current": 2, "ids": [2]}}
    path = tmp_path / "ba-keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ba._declared_dead(0.0)
    assert ba.rep.keyring.keys == {2: new_sync}
    ba.close()
    again = mesh("ba")
    assert again.rep.keyring.keys == {2: new_sync} and again.rep.keyring.current == 2
    assert again.client.endpoint.keyring.keys == {2: new_ctl}
    assert again.rep.keyring.senders[2] == frozenset(sw.node_id(n) for n in ("ba", "bb", "bc", "bd"))
    assert mesh("aa").rep.keyring.current == 1                    # another node's keys untouched
    assert "not installed" in again.answer({"cmd": "keys", "op": "switch", "purpose": "sync", "kid": 9}, 0.0)["error"]


def test_the_controller_reads_waiting_heartbeats_before_it_judges_silence(mesh):
    """A controller loop kept busy (publishing maps) past the detection time
    declared members dead whose heartbeats were waiting in its socket, and
    each false death published another map: after one hang the lab's mesh
    never settled. Its tick reads what waits first."""
    ctl, ba = mesh(mesh.topo.controller), mesh("ba")
    to = (mesh.topo.fabric_ip(mesh.topo.controller), sw.CONTROL_PORT)

    def beat() -> None:
        for send in ba.client.tick(time.monotonic()):
            ba.control.sendto(send.data, to)

    beat()
    ctl.poll(0.05)
    detector = ctl.ctl.detector
    assert detector.health("ba").value == "alive"
    busy_until = time.monotonic() + 3 * detector.timeout    # the loop does not come round
    while time.monotonic() < busy_until:
        beat()
        time.sleep(ba.client.interval)
    ctl.tick(time.monotonic())
    assert detector.health("ba").value == "alive"


def test_the_controller_shell_keeps_each_epoch_and_a_restarted_controller_resumes_it(mesh, tmp_path):
    """The controller's Persist events, written by its shell: the store is
    replaced whole (no temporary file left), a new controller process
    resumes at its epoch with the joiner still joining, and a store that
    cannot be written is counted, not a crash."""
    name = mesh.topo.controller
    ctl = mesh(name)
    reply = ctl.answer({"cmd": "operator", "node": "bd", "action": "scale-out"}, 0.0)
    store = tmp_path / f"{name}-map.json"
    assert ServiceMap.from_json(store.read_bytes()).epoch == reply["epoch"]
    assert not store.with_suffix(".tmp").exists()
    ctl.close()
    again = mesh(name)
    assert again.map.epoch == reply["epoch"] and again.map.instance("bd").state == InstanceState.JOINING
    assert again.ctl.joined_at == {"bd": reply["epoch"]}
    store.unlink()
    store.mkdir()                                            # a rename onto it fails
    again.answer({"cmd": "operator", "node": "ba", "action": "drain"}, 0.0)
    assert again.status(0.0)["counters"]["persist_error"] == 1
