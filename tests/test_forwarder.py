"""The forwarder shell, in process, on loopback (no namespaces, no root).

The default lab's topology with its fabric moved to 127.86.0.0/24: every
127.x address is the loopback's, so instance forwarders bind their fabric,
sync and control sockets there as they would on the lab's fabric. The loop is
driven a round at a time (`Forwarder.poll`); the heartbeat process is not
started.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.core import syncwire as sw
from dataplane.core.control import map_record
from dataplane.core.servicemap import InstanceState
from dataplane.lab.topology import load
from dataplane.shells.forwarder import Forwarder

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
