"""TCP goodput through the chain vs plain kernel forwarding, same namespaces, one run.

The default lab is built without forwarders first; the ingress and egress
namespaces forward in the kernel (routes over the fabric) and iperf3 measures
client -> server. Then kernel forwarding is switched off, the forwarders
start, and the same iperf3 runs through ingress -> A -> B -> egress. Both
are measured twice: with every link's offloads off (each packet is an
MTU-sized packet), and with `[fabric] gso` (the hosts' TCP hands over 64 KB
super-frames, which the chain carries whole). The chain is measured over
IPv6 too (the default lab is dual stack), beside IPv4 in the same lab: the
kernel baseline routes IPv4 only, since the fabric between the edges is
IPv4. Needs root.
`python -m benchmarks.lab`.
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


def iperf(run: LabRun, seconds: int = SECONDS, family: int = 4) -> float:
    """Goodput in bit/s, client -> server, over IPv4 or IPv6."""
    host = run.topo.hosts["server"]
    server = str(host.address.ip if family == 4 else host.address6.ip)
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


def measure(gso: bool) -> tuple[float, float, float]:
    """(kernel, chain, chain over IPv6) goodput in bit/s on one lab, MTU
    frames or super-frames."""
    topo = variant(DEFAULT, {"name": "bench-gso" if gso else "bench", "prefix": "amb",
                             "fabric.gso": gso})
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
        chain6 = iperf(run, family=6)
    finally:
        tear_down(run)
    return kernel, chain, chain6


def main() -> dict[str, float]:
    out = {}
    print(f"\nTCP goodput client -> server, {SECONDS} s iperf3 each; kernel and chain in the same namespaces")
    for gso, label in ((False, "MTU frames (offloads off)"), (True, "64 KB super-frames ([fabric] gso)")):
        kernel, chain, chain6 = measure(gso)
        key = "gso_" if gso else ""
        out.update({f"{key}kernel_bps": kernel, f"{key}chain_bps": chain, f"{key}ratio": chain / kernel,
                    f"{key}chain6_bps": chain6, f"{key}ipv6_vs_ipv4": chain6 / chain})
        print(f"  {label}")
        print(f"    kernel forwarding      {kernel / 1e6:10.0f} Mbit/s")
        print(f"    affinity-mesh chain    {chain / 1e6:10.0f} Mbit/s   ({chain / kernel:.3f} of kernel)")
        print(f"    same chain over IPv6   {chain6 / 1e6:10.0f} Mbit/s   ({chain6 / chain:.3f} of IPv4)")
    return out


if __name__ == "__main__":
    main()
