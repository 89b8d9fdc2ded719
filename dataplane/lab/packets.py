"""Put hand-crafted packets into a lab node, and capture what comes out.

`send` writes the packets to a pcap and runs `dataplane.lab.inject` inside
the node's namespace: a host sends them out of its `eth0` (bare IP packets
get the host's and its gateway's MACs), an edge out of its hosts bridge, and
a forwarder receives encapsulated packets on its own fabric socket as if
another forwarder had sent them. `Capture` runs tcpdump inside a namespace
and hands back Scapy packets. Both are what `amesh send`, `amesh replay`,
the Scapy shell helpers and the golden tests use.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import rdpcap, wrpcap

from dataplane.lab import netns
from dataplane.lab.topology import Topology


class SendError(RuntimeError):
    """The packets could not be sent; the message says why."""


def frames_for(topo: Topology, node: str, pkts: list[Packet]) -> list[Packet]:
    """Give bare IP packets from a host the Ethernet header its NIC would."""
    if topo.role(node) != "host":
        return pkts
    host = topo.hosts[node]
    src, dst = topo.mac_of(node), topo.mac_of(host.attach)
    return [p if isinstance(p, Ether) else Ether(src=src, dst=dst) / p for p in pkts]


def send(topo: Topology, node: str, pkts: list[Packet] | str, iface: str | None = None,
         fast: bool = True) -> dict[str, int]:
    """Send `pkts` (or a pcap file's frames) into `node`; returns counts."""
    role = topo.role(node)
    if isinstance(pkts, str):
        path, tmp = pkts, None
    else:
        fd, tmp = tempfile.mkstemp(suffix=".pcap")
        os.close(fd)
        wrpcap(tmp, frames_for(topo, node, pkts))
        path = tmp
    os.chmod(path, 0o644)
    if iface is not None:
        target = ["--iface", iface]
    elif role == "host":
        target = ["--iface", "eth0"]
    elif role in ("ingress", "egress"):
        target = ["--iface", "hbr0"]
    else:
        target = ["--udp-to", topo.fabric_ip(node)]
    argv = [sys.executable, "-m", "dataplane.lab.inject", "--pcap", path, *target]
    if fast:
        argv.append("--fast")
    try:
        res = netns.run(topo.netns(node), argv, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    finally:
        if tmp:
            os.unlink(tmp)
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SendError(f"injector failed in {node}: {res.stderr.strip()[-500:]}") from None
    if "error" in out:
        raise SendError(out["error"])
    return out


class Capture:
    """tcpdump on one interface of one node, for the life of the object."""

    def __init__(self, topo: Topology, node: str, iface: str, path: Path, bpf: str = "") -> None:
        self.path = path
        self.proc = netns.spawn(topo.netns(node), ["tcpdump", "--immediate-mode", "-i", iface, "-w", str(path), "-U",
                                                   "-s", "0", *bpf.split()],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while not path.exists() and time.monotonic() < deadline:  # tcpdump opened the file
            time.sleep(0.02)
        time.sleep(0.2)

    def stop(self) -> list[Packet]:
        if self.proc.poll() is None:
            time.sleep(0.2)  # let the last packets land
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return list(rdpcap(str(self.path))) if self.path.exists() and self.path.stat().st_size > 24 else []
