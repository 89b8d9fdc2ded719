"""Service kinds: the registry (built-ins and installed packages' entry
points), clear errors for broken plugins, and the state promises every
kind must keep (`dataplane.core.services`), checked for each registered
kind, the example plugin `examples/amesh-quota` included."""

from __future__ import annotations

import os
import random
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from dataplane.cli.main import main
from dataplane.core.packet import parse
from dataplane.core.services import BUILTIN, MAX_STATE, Action, ServiceError, Verdict, create, load, registry
from dataplane.lab.topology import TopologyError, load as load_topology
from tests.conftest import need_root, tcp, udp

ROOT = Path(__file__).resolve().parents[1]
QUOTA_LAB = ROOT / "examples" / "amesh-quota" / "lab.toml"
OPTIONS = {"nat": {"pool": ["198.51.100.1"]}}
"""Options a kind needs to be built in these tests."""


def quota_installed() -> bool:
    return "quota" in registry()


needs_quota = pytest.mark.skipif(not quota_installed(),
                                 reason="examples/amesh-quota not installed (make test installs it)")


def sample_states(kind: str) -> list:
    """States a kind really makes, from a handful of packets both ways."""
    svc = create(kind, **OPTIONS.get(kind, {}))
    states = []
    for packets in ([tcp(flags="S", seq=1), tcp(flags="A", seq=2, ack=1, payload=b"GET / HTTP/1.1\r\n")],
                    [udp(payload=b"q")], [udp(payload=b"SSH-2.0")]):
        st = None
        for data in packets:
            _verdict, st = svc.process(parse(data), True, st, 0.0)
            if st is not None:
                states.append(st)
    assert states, kind
    return states


@pytest.mark.parametrize("kind", sorted(registry()))
def test_state_promises_of_every_registered_kind(kind):
    """Deterministic, bounded, round-trips, and anything malformed is a
    ValueError (never another exception)."""
    svc = create(kind, **OPTIONS.get(kind, {}))
    rng = random.Random(kind)
    for st in sample_states(kind):
        data = svc.encode_state(st)
        assert isinstance(data, bytes) and len(data) <= MAX_STATE
        assert svc.encode_state(st) == data
        assert svc.encode_state(svc.decode_state(data)) == data
        garbage = [data[:n] for n in range(len(data))] + [data + b"\x00", os.urandom(len(data) + 3)]
        garbage += [bytes(rng.getrandbits(8) for _ in range(len(data))) for _ in range(50)]
        for bad in garbage:
            try:
                back = svc.decode_state(bad)
            except ValueError:
                continue
            assert svc.encode_state(back) is not None        # accepted: it must be usable


def test_registry_has_the_built_ins():
    assert set(BUILTIN) <= set(registry())
    assert load("nat").__name__ == "Nat"


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(ServiceError, match="unknown service kind 'nope'; known: .*firewall"):
        create("nope")
    with pytest.raises(ServiceError) as err:
        load("nope")
    assert str(err.value) == f"unknown service kind 'nope'; known: {', '.join(sorted(registry()))}"
    assert "firewall, inspection, nat, passthrough" in str(err.value)


@needs_quota
def test_a_plugin_kind_works_like_a_built_in():
    q = create("quota", max_packets=2)
    st = None
    verdicts = []
    for _ in range(3):
        v, st = q.process(parse(tcp()), True, st, 0.0)
        verdicts.append(v.action.value)
    assert verdicts == ["forward", "forward", "drop"]
    with pytest.raises(ValueError, match="max_packets"):
        create("quota", max_packets=0)


@needs_quota
def test_a_topology_names_a_plugin_kind_like_a_built_in():
    topo = load_topology(QUOTA_LAB)
    assert topo.services["Q"].kind == "quota"
    res = CliRunner().invoke(main, ["lab", "validate", str(QUOTA_LAB)])
    assert res.exit_code == 0 and "ok" in res.output


@pytest.fixture
def broken_plugins(tmp_path, monkeypatch):
    """An installed distribution (a dist-info on sys.path) whose entry points
    are broken in every way a plugin can be."""
    dist = tmp_path / "broken_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [affinity_mesh.services]
        noimport = broken_plugins_missing:Thing
        raises = broken_plugins_mod:Nothing
        notaclass = broken_plugins_ok:VALUE
        partial = broken_plugins_ok:Partial
        explodes = broken_plugins_ok:Explodes
        firewall = broken_plugins_ok:Partial
        """))
    (tmp_path / "broken_plugins_mod.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "broken_plugins_ok.py").write_text(textwrap.dedent("""\
        VALUE = 3
        class Partial:
            name = "partial"
            def process(self, *a): ...
        class Explodes:
            name = "explodes"
            max_timeout = 1.0
            def __init__(self):
                raise KeyError("no config")
            def process(self, *a): ...
            def encode_state(self, s): ...
            def decode_state(self, d): ...
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("kind,message", [
    ("noimport", "'noimport' from entry point 'broken_plugins_missing:Thing' of package 'broken-plugins' "
                 "does not load: ModuleNotFoundError"),
    ("raises", "does not load: RuntimeError: boom at import"),
    ("notaclass", "is not a class but int"),
    ("partial", "lacks max_timeout, encode_state, decode_state of the Service interface"),
    ("explodes", "service kind 'explodes' failed to start: KeyError"),
])
def test_a_broken_plugin_is_a_clear_error(broken_plugins, kind, message):
    with pytest.raises(ServiceError) as exc:
        create(kind)
    assert message in str(exc.value)


def test_a_broken_plugin_in_a_topology_is_a_topology_error(broken_plugins, tmp_path):
    text = (ROOT / "labs" / "default.toml").read_text().replace('kind = "firewall"', 'kind = "raises"')
    path = tmp_path / "lab.toml"
    path.write_text(text)
    with pytest.raises(TopologyError, match=r"services\.B: .*does not load: RuntimeError"):
        load_topology(path)


def test_a_plugin_cannot_replace_a_built_in(broken_plugins):
    assert registry()["firewall"] == BUILTIN["firewall"]
    assert load("firewall").__name__ == "Firewall"


def test_services_command_lists_kinds_and_broken_plugins(broken_plugins):
    res = CliRunner().invoke(main, ["services"])
    assert res.exit_code == 0
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.strip()}
    assert "built-in" in lines["firewall"] and "ok" in lines["nat"]
    assert "does not load" in lines["raises"]
    assert "shadowed" in res.output and "broken_plugins_ok:Partial" in res.output


@needs_quota
def test_a_lab_with_the_plugin_forwards_and_its_drops_are_counted():
    """The plugin in a real lab: pings cross the quota chain until a flow's
    quota (6 packets, both directions) is spent; the rest are dropped and
    counted under the documented reason."""
    from dataplane.lab.session import bring_up, tear_down

    need_root()
    run = bring_up(QUOTA_LAB)
    try:
        server = str(run.topo.hosts["server"].address.ip)
        assert run.tool("client", "ping", server, "-c", "3")[0]["received"] == 3   # 6 packets
        rows = run.tool("client", "ping", server, "-c", "4")      # a new echo id: a new flow
        assert rows[0]["received"] == 3, rows                      # the 7th packet is dropped
        drops = sum(run.ask(i, "status")["drops"].get("policy_denied", 0) for i in ("qa", "qb"))
        assert drops == 1
    finally:
        tear_down(run)


def test_passthrough_mirrors_a_flow_once_in_no_bytes_and_takes_the_fast_path():
    """Its state is only that the flow exists: the first packet is mirrored
    (that pins the flow's hops on the secondary), later ones and those of a
    decoded (promoted) flow are not, and every packet of a known flow may
    take the node's fast path."""
    svc = create("passthrough")
    v, st = svc.process(parse(tcp(flags="S")), True, None, 0.0)
    assert v == Verdict(Action.FORWARD, mirror=True) and st is True
    v, st = svc.process(parse(tcp(flags="A", seq=1001)), True, st, 0.0)
    assert v == Verdict(Action.FORWARD) and st is True
    assert svc.encode_state(st) == b""
    replica = svc.decode_state(svc.encode_state(st))
    v, st = svc.process(parse(tcp(flags="A", seq=1001)), False, replica, 0.0)
    assert v == Verdict(Action.FORWARD) and st is True
    data = tcp(flags="A", seq=1001)
    assert svc.fast(True, True, data, 6, 20, len(data)) is True
