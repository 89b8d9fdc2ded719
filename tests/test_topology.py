"""Topology files: the default lab is valid; every mistake is named precisely."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from dataplane.core import syncwire as sw
from dataplane.cli.main import main
from dataplane.lab.topology import TopologyError, load

DEFAULT = Path(__file__).resolve().parents[1] / "labs" / "default.toml"
TEXT = DEFAULT.read_text()


def test_default_lab_is_valid_and_names_its_nodes():
    t = load(DEFAULT)
    assert set(t.all_nodes()) == {"client", "server", "ingress", "egress", "aa", "ab", "ba", "bb",
                                  "bc", "bd", "ctl"}
    assert t.services["B"].spares == ["bd"]
    assert t.fabric_ip("ctl") == "10.99.0.2" and t.fabric_ip("aa") == "10.99.0.10"
    m = t.build_map()
    assert set(m.services) == {"ingress", "A", "B", "egress"} and m.chains[1].services == ["A", "B"]
    assert all(len(t.netns(n)) <= 15 for n in t.all_nodes())


def test_the_default_lab_is_dual_stack():
    t = load(DEFAULT)
    c, s = t.hosts["client"], t.hosts["server"]
    assert (str(c.address6), str(c.gateway6), str(s.address6), str(s.gateway6)) == (
        "fd00:1::10/64", "fd00:1::1", "fd00:2::10/64", "fd00:2::1")
    assert t.host_ip("server", 6) == "fd00:2::10" and t.host_ip("server") == "10.2.0.10"
    assert t.build_map().tenants[1].prefixes == ["10.1.0.0/24", "fd00:1::/64"]
    assert t.stream_code(40000, 80, family=6) != t.stream_code(40000, 80)
    lines = [ln for ln in TEXT.splitlines() if not ln.startswith("address6")]
    single = load_text("\n".join(lines).replace(', "fd00:1::/64"', ""))
    assert all(h.address6 is None and h.gateway6 is None for h in single.hosts.values())
    with pytest.raises(ValueError, match="no address6"):
        single.host_ip("client", 6)


def load_text(text: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return load(f.name)
    finally:
        Path(f.name).unlink()


def variant(tmp_path, old: str, new: str) -> str:
    assert old in TEXT, old
    p = tmp_path / "lab.toml"
    p.write_text(TEXT.replace(old, new, 1))
    return str(p)


@pytest.mark.parametrize("old,new,needle", [
    ('instances = ["ba", "bb", "bc"]', 'instances = ["ba", "Bad_Name"]',
     "services.B.instances[1]: name 'Bad_Name' must match"),
    ('instances = ["ba", "bb", "bc"]', 'instances = ["ba", "aa"]',
     "services.B.instances[1]: name 'aa' already used by the instance of service A"),
    ('services = ["A", "B"]', 'services = ["A", "C"]', "tenants[0].chains[0].services[1]: unknown service 'C'"),
    ('address = "10.1.0.10/24"', 'address = "10.7.0.10/24"', "hosts.client.address: 10.7.0.10/24 must be another address"),
    ('address = "10.2.0.1/24"', 'address = "10.2.0.300/24"', "egress.address: '10.2.0.300/24' is not an IPv4 address"),
    ('policy = "async"', 'policy = "sometimes"', "lab.policy: 'sometimes' is not one of"),
    ('kind = "firewall"', 'kind = "antivirus"', "services.B: service kind 'antivirus'"),
    ('kind = "firewall"', 'kind = "firewall"\noptions = { colour = "red" }', "services.B: service kind 'firewall' with these options"),
    ('heartbeat_ms = 10', 'heartbeat_ms = 0', "timers.heartbeat_ms: must be positive"),
    ('buckets = 4096', 'buckets = "many"', "lab.buckets: expected int, got str"),
    ('mtu = 1600', 'mtu = 1500', "fabric.mtu: must be 1548-9000"),
    ('gso = false', 'gso = 1', "fabric.gso: expected bool, got int"),
    ('attach = "egress"', 'attach = "nowhere"', "hosts.server.attach: 'nowhere' is neither the ingress nor the egress"),
    ('[timers]', '[timer]', "timer: unknown section"),
    ('store = "embedded"', 'store = "etcd"\nmembers = 2', "controller.members: 2: the lab runs 1, 3 or 5 etcd members"),
    ('store = "embedded"', 'store = "embedded"\nmembers = 3', 'controller.members: only with store = "etcd"'),
    ('store = "embedded"', 'store = "etcd"\nendpoints = ["http://10.0.0.1:2379"]\nmembers = 3',
     "controller.members: the lab runs members only when no endpoints are given"),
    ('store = "embedded"', 'store = "zookeeper"', "controller.store: 'zookeeper' is not one of embedded, etcd"),
    ('store = "embedded"', 'store = "embedded"\nendpoints = ["http://10.0.0.1:2379"]',
     'controller.endpoints: only with store = "etcd"'),
    ('store = "embedded"', 'store = "etcd"\nendpoints = ["10.0.0.1:2379"]',
     "controller.endpoints[0]: '10.0.0.1:2379' is not http://IPv4:PORT"),
    ('store = "embedded"', 'store = "etcd"\nendpoints = ["http://10.0.0.1:2379", "http://10.0.0.1:99999"]',
     "controller.endpoints[1]: 'http://10.0.0.1:99999' is not http://IPv4:PORT"),
    ('store = "embedded"', 'store = "etcd"\nendpoints = ["http://10.0.0.300:2379"]',
     "controller.endpoints[0]: 'http://10.0.0.300:2379' is not http://IPv4:PORT"),
    ('store = "embedded"', 'store = "etcd"\nendpoints = "http://10.0.0.1:2379"',
     "controller.endpoints: expected list, got str"),
    ('store = "embedded"', 'store = "etcd"\nendpoints = ["http://10.0.0.1:2379", "http://10.0.0.1:2379"]',
     "controller.endpoints: an endpoint is listed twice"),
    ('[controller]', '[machines.h1]\nnodes = ["ba", "nope"]\n\n[controller]', "machines.h1.nodes[1]: unknown node 'nope'"),
    ('[controller]', '[machines.h1]\nnodes = ["ba"]\n[machines.h2]\nnodes = ["ba"]\n\n[controller]',
     "machines.h2.nodes[0]: 'ba' is already on machine h1"),
    ('[controller]', '[machines.ba]\nnodes = ["bb"]\n\n[controller]',
     "machines.ba: name 'ba' already used by the instance of service B"),
    ('[controller]', '[machines.h1]\nnodes = ["ba"]\nrack = 3\n\n[controller]', "machines.h1.rack: unknown key"),
    ('[controller]', '[machines.h1]\n\n[controller]', "machines.h1.nodes: missing"),
    ('[controller]', '[machines.h1]\nnodes = ["ba"]\n[machines.h2]\nnodes = ["h1"]\n\n[controller]',
     "machines.h2.nodes[0]: unknown node 'h1'"),
    ('policy = "async"', 'policy = "async"\nanti_affinity = "no"', "lab.anti_affinity: expected bool, got str"),
    ('prefix = "am"', 'prefix = "much-too-long"', "lab.prefix"),
    ('control_key = "affinity-mesh-lab-control-key-1"', 'sync_key = "affinity-mesh-lab-sync-key-1"',
     "lab.sync_key: replaced by lab.control_key (the controller's) and services.<name>.sync_key"),
    ('control_key = "affinity-mesh-lab-control-key-1"', 'control_key = "short"',
     "lab.control_key: must be at least 16 bytes"),
    ('sync_key = "affinity-mesh-lab-B-sync-key-1"', '', "services.B.sync_key: missing"),
    ('sync_key = "affinity-mesh-lab-B-sync-key-1"', 'sync_key = "affinity-mesh-lab-A-sync-key-1"',
     "services.B.sync_key: the same as services.A.sync_key: every key must differ"),
    ('sync_key = "affinity-mesh-lab-B-sync-key-1"', 'sync_key = "affinity-mesh-lab-control-key-1"',
     "services.B.sync_key: the same as lab.control_key"),
    ('metrics_port = 9469', 'metrics_port = 70000', "observability.metrics_port: must be 0 (no metrics) to 65535"),
    ('scrape_interval_ms = 200', 'scrape_interval_ms = 1', "observability.scrape_interval_ms: must be 10-60000"),
    ('scrape_interval_ms = 200', 'scrape_every = 1', "observability.scrape_every: unknown key"),
    ('prometheus = false', 'prometheus = "yes"', "observability.prometheus: expected bool, got str"),
    ('embryonic_per_tenant = 65536', 'embryonic_per_tenant = 0', "limits.embryonic_per_tenant: must be 1 to limits.flows"),
    ('embryonic_per_tenant = 65536', 'embryonic_per_tenant = 2000000', "limits.embryonic_per_tenant: must be 1 to limits.flows (1048576)"),
    ('embryonic_per_tenant = 65536', 'embryonic_per_tenant = "lots"', "limits.embryonic_per_tenant: expected int, got str"),
    ('flows = 1048576', 'flows = 0', "limits.flows: must be 1-16777216"),
    ('flows = 1048576', 'max_flows = 1', "limits.max_flows: unknown key"),
    ('address6 = "fd00:1::10/64"', 'address6 = "10.1.0.11/24"',
     "hosts.client.address6: '10.1.0.11/24' is not an IPv6 address with prefix"),
    ('address6 = "fd00:1::10/64"', 'address6 = "fd00:1::10/128"', "hosts.client.address6: needs a prefix length below 128"),
    ('address6 = "fd00:1::10/64"', 'address6 = "fe80::10/64"', "hosts.client.address6: fe80::10 is a link-local"),
    ('address6 = "fd00:1::10/64"', 'address6 = "fd00:7::10/64"',
     "hosts.client.address6: fd00:7::10/64 must be another address in ingress's IPv6 subnet fd00:1::/64"),
    ('address6 = "fd00:1::10/64"', 'address6 = "fd00:1::1/64"', "hosts.client.address6: fd00:1::1/64 must be another"),
    ('address6 = "fd00:1::10/64"', 'address6 = 10', "hosts.client.address6: expected str, got int"),
    ('address6 = "fd00:2::1/64"', 'address6 = "ff02::1/64"', "egress.address6: ff02::1 is a link-local, multicast"),
    ('address6 = "fd00:1::1/64"', '', "hosts.client.address6: needs ingress.address6 (the hosts' IPv6 gateway)"),
    ('name = "ctl"', 'name = "ctl"\npeers = ["ctl2"]',
     'controller.peers: several controllers share the map through etcd: needs store = "etcd"'),
    ('store = "embedded"', 'store = "etcd"\npeers = ["ba"]',
     "services.B.instances[0]: name 'ba' already used by the controller"),
    ('store = "embedded"', 'store = "etcd"\npeers = ["c1", "c2", "c3", "c4", "c5", "c6"]',
     "controller.peers: at most 5 peers (fabric addresses .5-.9)"),
    ('store = "embedded"', 'store = "etcd"\npeers = "ctl2"', "controller.peers: expected list, got str"),
    ('gso = false', 'gso = false\nunderlay = "10.98.0.0/24"',
     "fabric.underlay: needs machines ([machines.NAME] nodes = [...]) to join"),
    ('gso = false', 'gso = false\nunderlay = "10.99.0.0/16"', "fabric.underlay: 10.99.0.0/16 overlaps the fabric subnet"),
    ('gso = false', 'gso = true\nunderlay = "10.98.0.0/24"', "fabric.underlay: not with gso"),
    ('gso = false', 'gso = false\nunderlay = "10.98.0.300/24"', "fabric.underlay: "),
])
def test_precise_errors(tmp_path, old, new, needle):
    path = variant(tmp_path, old, new)
    with pytest.raises(TopologyError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert needle in str(err.value)


NAT = '\n[services.N]\nsync_key = "affinity-mesh-lab-N-sync-key-1"\nkind = "nat"\ninstances = ["na"]\noptions = { pool = ["198.51.100.1"] }\n'


@pytest.mark.parametrize("edits,needle", [
    ({"metrics_port = 9469": "metrics_port = 0", "prometheus = false": "prometheus = true"},
     "observability.prometheus: needs metrics_port"),
    ({'spares = ["bd"]': 'spares = ["prom"]', "prometheus = false": "prometheus = true"},
     "observability.prometheus: the Prometheus node is named 'prom', taken by the spare of service B"),
    ({"gso = false": "gso = true", '[[tenants]]': NAT + '[[tenants]]'},
     "services.N.kind: 'nat' rewrites packets, which the super-frames of [fabric] gso"),
])
def test_errors_that_take_two_edits(tmp_path, edits, needle):
    text = TEXT
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "lab.toml"
    path.write_text(text)
    with pytest.raises(TopologyError, match=re.escape(needle)):
        load(path)


def test_prometheus_is_an_extra_fabric_node_at_the_top_of_the_subnet(tmp_path):
    assert load(DEFAULT).extra_nodes() == []
    path = tmp_path / "lab.toml"
    path.write_text(TEXT.replace("prometheus = false", "prometheus = true"))
    t = load(path)
    assert [(e.name, e.address) for e in t.extra_nodes()] == [("prom", "10.99.0.254")]
    assert t.observability.scrape_interval == 0.2 and t.observability.metrics_port == 9469
    from dataplane.lab.extras import scrape_config
    cfg = scrape_config(t)
    assert "scrape_interval: 200ms" in cfg and "'10.99.0.2:9469'" in cfg and "'10.99.0.13:9469'" in cfg


def test_unreadable_and_not_toml(tmp_path):
    with pytest.raises(TopologyError, match="cannot read"):
        load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[lab\nname=")
    with pytest.raises(TopologyError, match="not valid TOML"):
        load(bad)


def test_missing_key(tmp_path):
    path = variant(tmp_path, 'name = "default"\n', "")
    with pytest.raises(TopologyError, match=r"lab\.name: missing"):
        load(path)


def test_validate_command(tmp_path):
    res = CliRunner().invoke(main, ["lab", "validate", str(DEFAULT)])
    assert res.exit_code == 0 and "ok: lab default, 11 nodes" in res.output
    res = CliRunner().invoke(main, ["lab", "validate"])   # the default every lab command uses
    assert res.exit_code == 0 and "ok: lab default, 11 nodes" in res.output, res.output
    bad = variant(tmp_path, 'policy = "async"', 'policy = "x"')
    res = CliRunner().invoke(main, ["lab", "validate", bad])
    assert res.exit_code == 1 and "lab.policy" in res.output and "Traceback" not in res.output


def test_keys_are_per_service_and_per_forwarder():
    """Issue #14, finding 7: an instance holds its service's sync key (bound
    to that service's members) and its own control key, nothing else."""
    from dataplane.core import syncwire as sw

    t = load(DEFAULT)
    ba, aa = t.sync_keyring("ba"), t.sync_keyring("aa")
    assert ba.keys != aa.keys and ba.senders[1] == {sw.node_id(n) for n in ("ba", "bb", "bc", "bd")}
    ctl = t.control_keyring("ctl")
    assert ctl.pairwise and t.control_key in ctl.keys.values()
    mine, theirs = t.control_keyring("ba"), t.control_keyring("bb")
    assert not mine.pairwise and mine.keys != theirs.keys and t.control_key not in mine.keys.values()
    assert mine.senders[1] == {sw.node_id("ctl")}
    with pytest.raises(ValueError, match="not a service instance"):
        t.sync_keyring("ingress")


LABS = sorted(DEFAULT.parent.glob("*.toml"))


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_every_lab_file_is_valid(path):
    """Every labs/*.toml loads, its namespace names fit the kernel's 15
    characters, and every chain can be used: a host attached to the ingress
    lies in each tenant's prefixes."""
    import ipaddress

    t = load(path)
    assert all(len(t.netns(n)) <= 15 for n in t.all_nodes())
    m = t.build_map()
    clients = [h.address.ip for h in t.hosts.values() if h.attach == t.ingress.name]
    for tenant in t.tenants:
        nets = [ipaddress.ip_network(p) for p in tenant["prefixes"]]
        assert any(ip in net for ip in clients for net in nets), tenant["name"]
        assert all(c["id"] in m.chains for c in tenant["chains"])


def test_lab_files_can_be_up_side_by_side():
    """Names, namespace prefixes and fabric subnets differ between lab
    files, so any two of them can be up at once."""
    topos = [load(p) for p in LABS]
    for attr in ("name", "prefix", "subnet"):
        values = [getattr(t, attr) for t in topos]
        assert len(set(values)) == len(values), attr


def test_the_issue_15_lab_files():
    """Two tenants with their own chains, 3 services x 6 instances, the
    super-frame lab."""
    by = {p.stem: p for p in LABS}
    two = load(by["two-tenants"])
    assert [[c["services"] for c in t["chains"]] for t in two.tenants] == [[["A", "B"]], [["B"]]]
    large = load(by["large"])
    assert [len(s.instances) for s in large.services.values()] == [6, 6, 6]
    assert len(large.forwarders()) == 21
    gso = load(by["gso"])
    assert gso.gso and gso.mtu == 65535


def test_etcd_store_and_its_endpoints(tmp_path):
    t = load(variant(tmp_path, 'store = "embedded"',
                     'store = "etcd"\nendpoints = ["http://10.98.0.1:2379", "http://10.98.0.2:2379"]'))
    assert t.store == "etcd" and t.etcd_endpoints == ["http://10.98.0.1:2379", "http://10.98.0.2:2379"]
    assert t.etcd_members == 0 and [e.name for e in t.extra_nodes()] == []
    assert load(DEFAULT).store == "embedded" and load(DEFAULT).etcd_endpoints == []


def test_etcd_store_without_endpoints_runs_three_members_on_the_fabric(tmp_path):
    """The lab's own cluster: members etcd1..3 addressed down from the top
    of the fabric subnet (below Prometheus when it runs), their client URLs
    the controller's endpoints."""
    t = load(variant(tmp_path, 'store = "embedded"', 'store = "etcd"'))
    assert t.etcd_members == 3
    assert [(e.name, e.address) for e in t.extra_nodes()] == [
        ("etcd1", "10.99.0.254"), ("etcd2", "10.99.0.253"), ("etcd3", "10.99.0.252")]
    assert t.etcd_endpoints == [f"http://10.99.0.{a}:2379" for a in (254, 253, 252)]
    t = load(variant(tmp_path, 'store = "embedded"', 'store = "etcd"\nmembers = 1'))
    assert t.etcd_endpoints == ["http://10.99.0.254:2379"]
    taken = tmp_path / "taken.toml"
    taken.write_text(DEFAULT.read_text().replace('store = "embedded"', 'store = "etcd"')
                     .replace('"bd"', '"etcd2"'))
    with pytest.raises(TopologyError, match="etcd2 is taken by the spare of service B"):
        load(taken)


def test_machines_place_instances_in_the_map(tmp_path):
    """Declared machines become the instances' hosts; undeclared nodes have
    none (a machine of their own), and without machines the map is the one
    a topology had before machines existed."""
    t = load(variant(tmp_path, "[controller]",
                     '[machines.h1]\nnodes = ["aa", "ba", "bb"]\n[machines.h2]\nnodes = ["ab", "bc"]\n\n[controller]'))
    assert t.machine_of("ba") == "h1" and t.machine_of("bc") == "h2" and t.machine_of("ctl") == ""
    m = t.build_map()
    assert m.instance("bb").host == "h1" and m.instance("ingress").host == ""
    assert m.anti_affinity
    for code in range(0, 4096, 7):
        cands = m.candidates("B", code)
        assert {m.instance(n).machine for n in cands[:2]} == {"h1", "h2"}
    plain = load(DEFAULT).build_map()
    assert "host" not in plain.to_json() and "anti_affinity" not in plain.to_json()
    off = load(variant(tmp_path, 'policy = "async"', 'policy = "async"\nanti_affinity = false')).build_map()
    assert not off.anti_affinity and off.table_digest("B") == plain.table_digest("B")


def test_peer_controllers_share_the_map_in_etcd(tmp_path):
    """`[controller] peers`: more controllers, the equals of `name`, each a
    forwarder process with the controller role, addressed from .5 while
    every other node keeps its address; every controller holds the master
    key, and each forwarder one pair key per controller."""
    base = load(variant(tmp_path, 'store = "embedded"', 'store = "etcd"'))
    t = load(variant(tmp_path, 'store = "embedded"', 'store = "etcd"\npeers = ["ctl2", "ctl3"]'))
    assert t.controllers == ["ctl", "ctl2", "ctl3"] and base.controllers == ["ctl"]
    assert [t.role(c) for c in t.controllers] == ["controller"] * 3
    assert [t.fabric_ip(c) for c in t.controllers] == ["10.99.0.2", "10.99.0.5", "10.99.0.6"]
    assert all(t.fabric_ip(n) == base.fabric_ip(n) for n in base.forwarders())
    assert len({t.fabric_ip(n) for n in t.forwarders()}) == len(t.forwarders())
    for c in t.controllers:
        assert t.control_keyring(c).keys == {1: t.control_key}
        mine = t.control_keyring("ba", c)
        assert mine.keys == {1: sw.pair_key(t.control_key, sw.node_id(c), sw.node_id("ba"))}
    assert t.control_keyring("ba").keys == t.control_keyring("ba", "ctl").keys


def test_an_underlay_gives_each_machine_its_fabric_bridge(tmp_path):
    """`[fabric] underlay`: a declared machine's nodes (and its agent) plug
    into that machine's namespace, the rest into the lab's fabric
    namespace; the machines' underlay addresses from .1, the lab's first."""
    path = Path(variant(tmp_path, "[controller]", '[machines.h1]\nnodes = ["aa", "ba"]\n[machines.h2]\n'
                        'nodes = ["ab", "bb"]\n\n[controller]'))
    plain = load(path)
    assert plain.underlay is None and plain.fabric_home("ba") == plain.fabric_ns and not plain.underlay_hosts()
    path.write_text(path.read_text().replace("gso = false", 'gso = false\nunderlay = "10.98.0.0/24"', 1)
                    .replace("agents = false", "agents = true", 1))
    t = load(path)
    assert [t.fabric_home(n) for n in ("ba", "ab", "ctl", "ag-h1", "agent")] == \
        ["am-h1", "am-h2", "am-fabric", "am-h1", "am-fabric"]
    assert t.underlay_hosts() == [("am-fabric", "10.98.0.1"), ("am-h1", "10.98.0.2"), ("am-h2", "10.98.0.3")]
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(path.read_text().replace("10.98.0.0/24", "10.98.0.0/31"))
    with pytest.raises(TopologyError, match="fabric.underlay: too small for 3 machines"):
        load(tiny)
