"""The namespace lab with real programs: curl and http.server through the chain."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.utils import rdpcap

from dataplane.lab import build, netns
from dataplane.lab.state import LabState, alive, run_dir
from layers.affinity import Affinity
from dataplane.lab.session import DEFAULT, bring_up
from tests.conftest import need_root

AMESH = [sys.executable, "-m", "dataplane.cli"]
BLOB = os.urandom(20 * 1024 * 1024)
SMALL = os.urandom(200 * 1024)


@pytest.fixture(scope="module")
def served(lab):
    return lab.http_server({"blob": BLOB, "small": SMALL})


def holders(lab, code: int) -> dict[str, dict]:
    """Instance -> its flow entry (as primary) for `code`."""
    out = {}
    for svc in lab.topo.services.values():
        for inst in svc.instances:
            for f in lab.flows(inst):
                if f["code"] == f"0x{code:08x}" and f["role"] == "primary":
                    out[inst] = f
    return out


def test_20mb_download_crosses_one_instance_per_service_both_ways(lab, served):
    res = lab.run("client", ["curl", "-s", "--local-port", "45000", "-o", str(lab.tmp / "got"),
                             "-w", "%{http_code} %{speed_download}", lab.url("blob")], timeout=120)
    code_http, speed = res.stdout.split()
    assert code_http == "200", res.stderr
    assert hashlib.sha256((lab.tmp / "got").read_bytes()).hexdigest() == served["blob"]
    print(f"\n20 MB through the chain at {float(speed) * 8 / 1e6:.0f} Mbit/s")
    code = lab.topo.stream_code(45000, 8080)
    held = holders(lab, code)
    m = lab.map()
    a = [i for i in held if i in lab.topo.services["A"].instances]
    b = [i for i in held if i in lab.topo.services["B"].instances]
    assert a == [m.primary("A", code)] and b == [m.primary("B", code)]
    for inst in (a[0], b[0]):
        f = held[inst]
        assert f["packets"] > 10_000 and f["rev_packets"] > 10_000        # data flows back
        assert f["packets"] - f["rev_packets"] > 1000                      # and ACKs forward


def test_50_concurrent_connections_spread_by_the_map(lab, served):
    rows = lab.tool("client", "fetch", lab.url("small"), "-n", "50")
    assert len(rows) == 50
    assert all(r["error"] is None and r["sha256"] == served["small"] for r in rows), \
        [r for r in rows if r["error"] or r["sha256"] != served["small"]][:3]
    m = lab.map()
    used = {"A": set(), "B": set()}
    for r in rows:
        code = lab.topo.stream_code(r["port"], 8080)
        held = holders(lab, code)
        for svc in ("A", "B"):
            inst = [i for i in held if i in lab.topo.services[svc].instances]
            assert inst == [m.primary(svc, code)], (r["port"], held.keys())
            used[svc].add(inst[0])
    assert used["A"] == {"aa", "ab"} and used["B"] == {"ba", "bb", "bc"}


def test_ping_through_the_chain(lab):
    out = lab.tool("client", "ping", str(lab.topo.hosts["server"].address.ip), "-c", "3")[0]
    assert out["received"] == 3, out


def test_fabric_capture_dissects_every_layer(lab, served):
    pcap = lab.tmp / "fab.pcap"
    cap = subprocess.Popen([*AMESH, "lab", "capture", "ingress", "fab0", "-w", str(pcap),
                            "--seconds", "2", "--filter", "udp port 6886"],
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while not pcap.exists() and time.monotonic() < deadline:  # tcpdump has its socket open
        time.sleep(0.05)
    lab.run("client", ["curl", "-s", "--local-port", "45100", "-o", "/dev/null", lab.url("small")])
    _, err = cap.communicate(timeout=10)
    assert cap.returncode == 0, err
    pkts = [p for p in rdpcap(str(pcap)) if Affinity in p and p[Affinity][TCP].sport == 45100]
    assert pkts, "no encapsulated packet of the flow captured"
    first = pkts[0]
    assert IP in first and UDP in first and first[UDP].dport == 6886
    hdr = first[Affinity]
    assert hdr.code == lab.topo.stream_code(45100, 8080) and hdr.index == 2 and hdr.chain == 1 and hdr.client == 1
    assert isinstance(hdr.payload, IP) and hdr[TCP].flags == "S"


def test_second_up_says_it_is_up(lab):
    msgs = []
    build.up(lab.topo, msgs.append)
    assert any("already up" in m for m in msgs)


def test_cleanup_after_sigkill_leaves_nothing():
    need_root()
    run = bring_up(DEFAULT, name="cleanup-test", prefix="amc")
    state = LabState.load("cleanup-test")
    pids = [p.pid for p in state.processes.values()]
    for p in state.processes.values():
        os.kill(p.pid, signal.SIGKILL)
    time.sleep(0.2)
    res = subprocess.run([*AMESH, "lab", "cleanup", "--lab", "cleanup-test", "--dry-run"],
                         capture_output=True, text=True)
    assert "would remove namespace amc-fabric" in res.stderr
    assert all(netns.exists(ns) for ns in state.namespaces)
    res = subprocess.run([*AMESH, "lab", "cleanup", "--lab", "cleanup-test"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not any(netns.exists(ns) for ns in state.namespaces)
    assert not any(alive(p) for p in state.processes.values())
    assert not run_dir("cleanup-test").exists()
    assert all(not os.path.exists(f"/proc/{pid}/status") or "zombie" in open(f"/proc/{pid}/status").read()
               for pid in pids)
    run.close()


def test_down_removes_a_healthy_lab():
    need_root()
    run = bring_up(DEFAULT, name="down-test", prefix="amd")
    state = LabState.load("down-test")
    res = subprocess.run([*AMESH, "lab", "down", "--lab", "down-test"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not any(netns.exists(ns) for ns in state.namespaces)
    assert not any(alive(p) for p in state.processes.values())
    run.close()


def test_impair_adds_delay_and_clears(lab):
    from dataplane.lab import faults

    server = str(lab.topo.hosts["server"].address.ip)
    base = lab.tool("client", "ping", server, "-c", "3")[0]
    mode = faults.impair(lab.topo, "ingress", delay_ms=60)
    try:
        slow = lab.tool("client", "ping", server, "-c", "3")[0]
    finally:
        faults.impair(lab.topo, "ingress")
    fast = lab.tool("client", "ping", server, "-c", "3")[0]
    assert mode in ("netem", "userspace (this kernel has no sch_netem)")
    assert min(slow["rtt_ms"]) >= 60 > max(base["rtt_ms"])
    assert max(fast["rtt_ms"]) < 60


def test_status_json_lists_nodes_links_and_pids(lab):
    import json as _json

    res = subprocess.run([*AMESH, "lab", "status", "--json"], capture_output=True, text=True)
    doc = _json.loads(res.stdout)
    nodes = {n["node"]: n for n in doc["nodes"]}
    assert set(nodes) == set(lab.topo.all_nodes())
    assert all(nodes[n]["running"] and nodes[n]["epoch"] for n in lab.topo.forwarders())
    assert {"a": "am-ba:fab0", "b": "am-fabric:p-ba", "kind": "fabric"} in doc["links"]
    assert nodes["ctl"]["health"]["ba"] == "alive"


def test_forced_resync_from_the_command_line(lab):
    res = subprocess.run([*AMESH, "lab", "resync", "ba", "--peer", "bb"], capture_output=True, text=True)
    assert res.returncode == 0 and "bulk" in res.stdout, res.stderr
    time.sleep(0.3)
    peers = lab.ask("ba", "status")["sync"]["peers"]
    assert peers["bb"]["stats"].get("bulk_done", 0) >= 1
    res = subprocess.run([*AMESH, "lab", "resync", "ba", "--peer", "zz"], capture_output=True, text=True)
    assert res.returncode == 1 and "no sync peer" in res.stderr
