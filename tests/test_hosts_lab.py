"""A whole machine failing (issue #12 item 5 on the single-machine lab):
`kill-host` takes a machine's agent and every forwarder on it at once.
With anti-affinity every bucket's secondary is on the other machine, so
24 downloads survive; the control, anti-affinity off, loses the flows whose
primary and secondary shared the machine, each counted in `flows_lost`.
`partition-host` cuts the machine off and `heal-host` brings it back."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pyroute2 import IPRoute

from dataplane.cli.main import main
from dataplane.lab import faults, netns
from dataplane.lab.session import DEFAULT, bring_up, tear_down
from tests.conftest import need_root
from tests.test_failover import B, Transfers, why

H1 = ["aa", "ba", "bb"]
H2 = ["ab", "bc", "bd"]
MACHINES = f'[machines.h1]\nnodes = {H1}\n[machines.h2]\nnodes = {H2}\n\n[controller]'.replace("'", '"')


UNDERLAY = "10.98.0.0/24"


def two_machines(tmp_path: Path, anti_affinity: bool, underlay: bool = False) -> Path:
    text = DEFAULT.read_text().replace("[controller]", MACHINES, 1).replace(
        'policy = "async"', f'policy = "async"\nanti_affinity = {str(anti_affinity).lower()}', 1)
    if underlay:
        text = text.replace("\n[fabric]\n", f'\n[fabric]\nunderlay = "{UNDERLAY}"\n', 1)
    path = tmp_path / "two-machines.toml"
    path.write_text(text)
    return path


def vxlan_packets(run, machine: str) -> int:
    """Frames the machine's VXLAN device sent and received (0 without one)."""
    with IPRoute(netns=run.topo.netns(machine), flags=0) as ip:
        idx = ip.link_lookup(ifname="vx0")
        if not idx:
            return 0
        st = ip.get_links(idx[0])[0].get_attr("IFLA_STATS64")
        return st["rx_packets"] + st["tx_packets"]


@pytest.mark.parametrize("anti_affinity,underlay", [(True, False), (False, False), (True, True)],
                         ids=["anti-affinity", "control", "vxlan-underlay"])
def test_a_machine_killed_under_load(tmp_path, anti_affinity, underlay):
    """With `underlay`, each machine is a namespace of its own with its own
    fabric bridge, and the fabric crosses between machines as VXLAN over
    the underlay: the same downloads survive the same machine's death."""
    need_root()
    run = bring_up(two_machines(tmp_path, anti_affinity, underlay), name="hosts", prefix="amy", agents=True)
    run.sha = run.http_server({"f": b"h" * (2 << 20)})["f"]
    try:
        m = run.map()
        tr = Transfers(run, n=24, pace=0.1)
        faults.kill_host(run.topo, run.state, "h1")
        rows = tr.join()
        assert run.wait_state(("aa", "ba", "bb"), "dead")
        shared = {r["i"] for r in rows
                  if set(m.candidates("B", run.topo.stream_code(r["port"], 8080))[:2]) <= set(H1)}
        broken = {r["i"] for r in rows if not tr.ok(r)}
        if underlay:   # the chain crossed machines inside VXLAN: h2's device carried it
            assert vxlan_packets(run, "h2") > 1000 and run.topo.fabric_home("bc") == run.topo.netns("h2")
        lost = sum(run.ask(i, "status")["counters"].get("flows_lost", 0) for i in B if i not in H1)
        if anti_affinity:
            assert shared == set() and broken == set(), why(run, rows, tr)
            assert lost == 0
        else:
            assert shared and shared <= broken, why(run, rows, tr)
            assert lost == len(shared)
    finally:
        tear_down(run)


@pytest.mark.parametrize("underlay", [False, True], ids=["fabric-links", "vxlan-uplink"])
def test_partition_and_heal_a_machine(tmp_path, underlay):
    """Without an underlay partition-host cuts the machine's nodes' fabric
    links; with one, the machine's uplink to the underlay."""
    need_root()
    run = bring_up(two_machines(tmp_path, True, underlay), name="hostp", prefix="amx", agents=True)
    try:
        env = {"AMESH_LAB": "hostp"}
        res = CliRunner().invoke(main, ["lab", "partition-host", "--lab", "hostp", "h2"], env=env)
        assert res.exit_code == 0 and "ag-h2, ab, bc, bd" in res.output, res.output
        assert run.wait_state(("ab", "bc"), "dead")
        res = CliRunner().invoke(main, ["lab", "heal-host", "--lab", "hostp", "h2"], env=env)
        assert res.exit_code == 0, res.output
        assert run.wait_state(("ab", "bc"), "active", timeout=15)
        res = CliRunner().invoke(main, ["lab", "kill-host", "--lab", "hostp", "h9"], env=env)
        assert res.exit_code == 1 and "no machine 'h9' (machines: h1, h2)" in res.output
        assert netns.exists(run.topo.netns("ag-h2"))
    finally:
        tear_down(run)
