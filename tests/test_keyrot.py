"""Key rotation's phases over nodes that answer like forwarders, without a lab."""

from __future__ import annotations

import stat

import pytest

from dataplane.core import syncwire as sw
from dataplane.lab import keyrot
from dataplane.lab.query import QueryError
from dataplane.lab.topology import load
from tests.test_topology import DEFAULT

TOPO = load(DEFAULT)


class Nodes:
    """Every forwarder's keyrings as the topology gives them, answering
    `keys` queries with `keyrot.node_op`; a node in `down` does not answer."""

    def __init__(self) -> None:
        self.rings = {n: {"control": TOPO.control_keyring(n),
                          "sync": TOPO.sync_keyring(n) if TOPO.service_of(n) else None}
                      for n in TOPO.forwarders()}
        self.log: list[tuple[str, str]] = []
        self.down: set[str] = set()

    def ask(self, node: str, req: dict) -> dict:
        if node in self.down:
            raise QueryError(f"{node} did not answer (connection refused)")
        self.log.append((node, req["op"]))
        return keyrot.node_op(self.rings[node], req)[0]


def test_control_key_rotation_installs_everywhere_then_switches_then_retires(tmp_path):
    nodes = Nodes()
    rot = keyrot.plan(TOPO, "control", nodes.ask, tmp_path)
    assert rot.kid == 2 and len(rot.key) == 32
    keyrot.rotate(TOPO, rot, nodes.ask, tmp_path, settle=0)
    ops = [op for _, op in nodes.log if op != "show"]
    n = len(TOPO.forwarders())
    assert ops == ["install"] * n + ["switch"] * n + ["retire"] * n
    ctl = nodes.rings["ctl"]["control"]
    assert ctl.keys == {2: rot.key} and ctl.pairwise
    ba = nodes.rings["ba"]["control"]
    assert ba.keys == {2: sw.pair_key(rot.key, sw.node_id("ctl"), sw.node_id("ba"))}
    push = sw.encode(ctl, sw.node_id("ctl"), sw.node_id("ba"), 1, 0, 1, 0, [])
    assert sw.decode(ba, push, sw.node_id("ba")).key_id == 2
    assert nodes.rings["ba"]["sync"].keys[1] == TOPO.services["B"].sync_key   # another purpose
    assert not keyrot.pending_path(tmp_path, "control").exists()


def test_a_node_that_does_not_answer_stops_the_phase_and_a_rerun_finishes(tmp_path):
    nodes = Nodes()
    key = b"k" * 32
    rot = keyrot.plan(TOPO, "sync:B", nodes.ask, tmp_path, key=key)
    nodes.down.add("bc")
    with pytest.raises(keyrot.RotationError) as err:
        keyrot.rotate(TOPO, rot, nodes.ask, tmp_path, settle=0)
    assert "sync:B: phase install stopped at bc: bc did not answer" in str(err.value)
    assert "run the command again" in str(err.value)
    pending = keyrot.pending_path(tmp_path, "sync:B")
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    assert all(nodes.rings[n]["sync"].current == 1 for n in ("ba", "bb", "bd"))   # none switched
    nodes.down.clear()
    again = keyrot.plan(TOPO, "sync:B", nodes.ask, tmp_path)                      # the same rotation
    assert (again.kid, again.key) == (rot.kid, key)
    keyrot.rotate(TOPO, again, nodes.ask, tmp_path, settle=0)
    assert all(nodes.rings[n]["sync"].keys == {2: key} for n in ("ba", "bb", "bc", "bd"))
    assert nodes.rings["aa"]["sync"].current == 1
    with pytest.raises(keyrot.RotationError, match="at least 16 bytes"):
        keyrot.plan(TOPO, "sync:A", nodes.ask, tmp_path, key=b"short")


def test_a_node_refusal_names_the_phase(tmp_path):
    nodes = Nodes()
    rot = keyrot.plan(TOPO, "sync:A", nodes.ask, tmp_path)
    nodes.rings["ab"]["sync"].add(rot.kid, b"x" * 32)        # another key under that id
    with pytest.raises(keyrot.RotationError,
                       match=f"phase install stopped at ab: key id {rot.kid} holds another key"):
        keyrot.rotate(TOPO, rot, nodes.ask, tmp_path, settle=0)


def test_unsafe_skip_install_switches_nodes_before_their_peers_hold_the_key(tmp_path):
    nodes = Nodes()
    rot = keyrot.plan(TOPO, "sync:B", nodes.ask, tmp_path)
    keyrot.rotate(TOPO, rot, nodes.ask, tmp_path, unsafe_skip_install=True, settle=0)
    ops = [(n, op) for n, op in nodes.log if op != "show"]
    assert ops[:4] == [("ba", "install"), ("ba", "switch"), ("bb", "install"), ("bb", "switch")]


def test_node_op_refuses_out_of_order_and_bad_requests():
    rings = {"control": sw.Keyring({1: b"c" * 32}, 1), "sync": None}
    assert keyrot.node_op(rings, {"op": "switch", "purpose": "control", "kid": 2})[0] == \
        {"error": "key id 2 is not installed"}
    assert "switch first" in keyrot.node_op(rings, {"op": "retire", "purpose": "control", "kid": 2})[0]["error"]
    assert "no 'sync' keys" in keyrot.node_op(rings, {"op": "install", "purpose": "sync", "kid": 2})[0]["error"]
    assert keyrot.node_op(rings, {"op": "install", "purpose": "control", "kid": "2"})[0] == \
        {"error": "kid: expected an int"}
    assert "error" in keyrot.node_op(rings, {"op": "install", "purpose": "control", "kid": 2, "key": "zz"})[0]
    assert keyrot.node_op(rings, {"op": "show"}) == ({"control": {"current": 1, "ids": [1]}}, False)


def test_next_kid_skips_held_ids_and_wraps():
    assert keyrot.next_kid([[1], [1, 2]]) == 3
    assert keyrot.next_kid([[255], [1]]) == 2
    assert keyrot.purposes(TOPO) == ["control", "sync:A", "sync:B"]
    assert keyrot.purposes(TOPO, service="B") == ["sync:B"]
    with pytest.raises(ValueError, match="no service 'Z'"):
        keyrot.purposes(TOPO, service="Z")
