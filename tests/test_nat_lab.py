"""The NAT in a lab, with real TCP: a download through a source NAT whose
primary is killed mid-transfer. With state sync the secondary holds the
mirrored mapping: the server sees one translated address and port for the
whole connection and the file arrives intact. The control (sync off): the
secondary makes a new mapping, the server sees a second port, answers it
with a RST, and the download breaks."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP

from dataplane.lab import faults
from dataplane.lab.packets import Capture
from dataplane.lab.session import bring_up, tear_down
from tests.conftest import need_root

LAB = Path(__file__).resolve().parents[1] / "labs" / "nat.toml"
FILE = os.urandom(4 << 20)
PUBLIC = "198.51.100.10"


@pytest.fixture(params=["async", "off"], ids=["sync", "control-sync-off"])
def nat_lab(request):
    need_root()
    run = bring_up(LAB, name=f"nat-{request.param}", policy=request.param)
    run.policy = request.param
    run.sha = run.http_server({"f": FILE})["f"]
    try:
        yield run
    finally:
        tear_down(run)


def test_nat_primary_killed_mid_download(nat_lab):
    run = nat_lab
    server = Capture(run.topo, "server", "eth0", run.tmp / "server.pcap", "tcp port 8080")
    out = run.tmp / "got"
    curl = run.spawn("client", ["curl", "-s", "-m", "30", "--limit-rate", "1M", "-o", str(out), run.url("f")])
    time.sleep(1.2)
    holders = [n for n in ("na", "nb") for f in run.flows(n) if f["role"] == "primary" and f["proto"] == 6]
    assert len(holders) == 1, holders
    victim = holders[0]
    mapping = run.flows(victim)[0]["state"]
    faults.kill(run.state, victim)
    code = curl.wait(timeout=40)
    pkts = server.stop()
    to_server = [p for p in pkts if IP in p and p[IP].dst == str(run.topo.hosts["server"].address.ip)]
    sources = {(p[IP].src, p[TCP].sport) for p in to_server}
    assert {s for s, _ in sources} == {PUBLIC}                 # the client's address never showed
    print(f"\n{run.policy}: killed {victim} (mapping {mapping['public_port']}), curl exit {code}, "
          f"server saw source ports {sorted(p for _, p in sources)}")
    if run.policy == "async":
        assert code == 0 and hashlib.sha256(out.read_bytes()).hexdigest() == run.sha
        assert sources == {(PUBLIC, mapping["public_port"])}
        survivor = "nb" if victim == "na" else "na"
        assert run.ask(survivor, "status")["counters"].get("took_over", 0) == 1
    else:
        assert code != 0 or hashlib.sha256(out.read_bytes()).hexdigest() != run.sha
        assert len(sources) == 2 and (PUBLIC, mapping["public_port"]) in sources
