"""Replay a real capture recorded elsewhere through the lab's chain.

"Elsewhere" is a pair of throwaway namespaces with other addresses and MACs:
curl fetches a file from our HTTP server there while tcpdump records the
client side. The replay must cross the chain, the stateful firewall must see
the flow as a real flow, and the server-side capture must equal the input
modulo the documented rewrites (addresses, MACs, checksums).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from pyroute2 import netns as pr_netns
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from dataplane.lab import netns
from dataplane.lab.build import link_pair
from dataplane.lab.replay import ReplayError, replay, rewrite
from dataplane.lab.session import TOOLS
from dataplane.testing import assert_packets

A, B = "amr-rec-a", "amr-rec-b"
CLIENT_IP, SERVER_IP = "192.168.77.1", "192.168.77.2"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, lab):
    """A curl session between two namespaces of our own, captured by tcpdump."""
    out = tmp_path_factory.mktemp("rec")
    out.chmod(0o755)
    (out / "www").mkdir()
    (out / "www" / "page").write_bytes(b"x" * 30000)
    for ns in (A, B):
        pr_netns.create(ns)
    procs = []
    try:
        link_pair(A, "eth0", CLIENT_IP, B, "eth0", SERVER_IP)
        procs.append(netns.spawn(B, [sys.executable, str(TOOLS / "serve.py"), "--bind", SERVER_IP,
                                     "--port", "8080", "--directory", str(out / "www")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        pcap = out / "curl.pcap"
        dump = netns.spawn(A, ["tcpdump", "--immediate-mode", "-i", "eth0", "-w", str(pcap), "-U",
                               "tcp port 8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(dump)
        time.sleep(1.0)
        res = netns.run(A, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--retry", "3",
                            "--retry-connrefused", f"http://{SERVER_IP}:8080/page"],
                        capture_output=True, text=True, timeout=30)
        assert res.stdout == "200"
        time.sleep(0.3)
        dump.terminate()
        dump.wait(timeout=5)
        yield pcap
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in (A, B):
            if netns.exists(ns):
                pr_netns.remove(ns)


def test_real_capture_replays_through_the_chain(lab, recorded, tmp_path):
    tmp_path.chmod(0o755)
    rw = rewrite(lab.topo, str(recorded))
    assert (rw.client, rw.server) == (CLIENT_IP, SERVER_IP) and rw.service == (6, 8080)
    halves = {src: [p for p in rw.packets if p[IP].src == src] for src in ("10.1.0.10", "10.2.0.10")}
    assert all(halves.values()) and sum(map(len, halves.values())) == len(rw.packets)
    res = replay(lab.topo, str(recorded), capture=tmp_path / "hops")
    assert res["replayed"] == len(rw.packets)
    masks = {"Ethernet": {"src", "dst"}, "IP": {"chksum"}, "TCP": {"chksum"}}
    for host, sender in (("server", "10.1.0.10"), ("client", "10.2.0.10")):
        seen = [p for p in rdpcap(str(tmp_path / "hops" / f"{host}.pcap")) if IP in p and p[IP].src == sender]
        assert_packets(halves[sender], seen, masks)     # every packet crossed the chain, unchanged
    hops = [f for f in (tmp_path / "hops").glob("fabric-*.pcap") if len(rdpcap(str(f)))]
    assert len(hops) >= 3                                      # A instance, B instance, egress
    sport = rw.packets[0][TCP].sport
    fw = [f for n in ("ba", "bb", "bc") for f in lab.flows(n)
          if f["role"] == "primary" and (f["lo"].endswith(f":{sport}") or f["hi"].endswith(f":{sport}"))]
    assert fw and fw[0]["state"]["kind"] == "TCP"               # a real flow to the firewall


def test_unusable_captures_are_refused(lab, tmp_path):
    empty = tmp_path / "empty.pcap"
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap
    wrpcap(str(empty), [Ether() / b"not ip"])
    with pytest.raises(ReplayError, match="no IPv4 packets"):
        rewrite(lab.topo, str(empty))
    res = subprocess.run([sys.executable, "-m", "dataplane.cli", "replay", str(empty)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "no IPv4 packets" in res.stderr and "Traceback" not in res.stderr


def test_replay_cli_with_tenant(lab, recorded, tmp_path):
    res = subprocess.run([sys.executable, "-m", "dataplane.cli", "replay", str(recorded), "--fast",
                          "--tenant", "1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert '"replayed"' in res.stdout
    res = subprocess.run([sys.executable, "-m", "dataplane.cli", "replay", str(recorded), "--tenant", "9"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no tenant 9" in res.stderr
