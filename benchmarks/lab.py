"""TCP goodput through the chain vs plain kernel forwarding, same namespaces, one run.

The default lab is built without forwarders first; the ingress and egress
namespaces forward in the kernel (routes over the fabric) and iperf3 measures
client -> server. Then kernel forwarding is switched off, the forwarders
start, and the same iperf3 runs through ingress -> A -> B -> egress.
Needs root. `python -m benchmarks.lab`.
"""

from __future__ import annotations

import json
import subprocess
import time

from pyroute2 import IPRoute

from dataplane.lab import build, netns
from dataplane.lab.topology import Topology
from dataplane.lab.session import DEFAULT, LabRun, tear_down, variant

SECONDS = 5


def iperf(run: LabRun, seconds: int = SECONDS) -> float:
    """Goodput in bit/s, client -> server."""
    server = str(run.topo.hosts["server"].address.ip)
    res = run.run("client", ["iperf3", "-c", server, "-t", str(seconds), "-J"], timeout=seconds + 30)
    doc = json.loads(res.stdout)
    if "error" in doc:
        raise RuntimeError(doc["error"])
    return doc["end"]["sum_received"]["bits_per_second"]


def kernel_forwarding(topo: Topology, on: bool) -> None:
    routes = [(topo.ingress.name, topo.egress.address.network, topo.fabric_ip(topo.egress.name)),
              (topo.egress.name, topo.ingress.address.network, topo.fabric_ip(topo.ingress.name))]
    for node, dst, via in routes:
        netns.sysctl(topo.netns(node), "net.ipv4.ip_forward", "1" if on else "0")
        with IPRoute(netns=topo.netns(node), flags=0) as ip:
            ip.route("add" if on else "del", dst=str(dst), gateway=via)


def main() -> dict[str, float]:
    topo = variant(DEFAULT, {"name": "bench", "prefix": "amb"})
    state = build.up(topo, print, start_forwarders=False)
    run = LabRun(topo, state)
    try:
        run.spawn("server", ["iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        kernel_forwarding(topo, True)
        kernel = iperf(run)
        kernel_forwarding(topo, False)
        for node in topo.forwarders():
            build.start_node(topo, state, node)
        build.wait_ready(topo, state)
        time.sleep(0.3)
        chain = iperf(run)
    finally:
        tear_down(run)
    print(f"\nTCP goodput client -> server, {SECONDS} s iperf3 each, same namespaces")
    print(f"  kernel forwarding      {kernel / 1e6:10.0f} Mbit/s")
    print(f"  affinity-mesh chain    {chain / 1e6:10.0f} Mbit/s   ({chain / kernel:.3f} of kernel)")
    return {"kernel_bps": kernel, "chain_bps": chain, "ratio": chain / kernel}


if __name__ == "__main__":
    main()
