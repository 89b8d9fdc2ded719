"""Cost of state sync per policy, measured side by side in one run.

A primary service node forwards packets that each open a new flow (the worst
case: every packet produces a mirrored update) while a real secondary process
(`python -m dataplane.shells.syncudp`) receives over UDP on loopback. Each policy
runs the same packets; the table shows packets/s, its ratio to sync `off`,
sync updates/s, and bytes on the wire per update (header, HMAC tag and
record overhead included).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataplane.core import header as wire
from dataplane.core import syncwire as sw
from dataplane.core.node import INGRESS, ServiceNode
from dataplane.core.replicator import Policy, Replicator
from dataplane.core.servicemap import ServiceMap
from dataplane.core.services import create
from dataplane.shells.syncudp import UdpSync, free_udp_port
from tests.conftest import codes_led_by, pair_map, tcp, udp

KEY = "benchmark-key-0123456789abcdef01"
PACKETS = 20_000


def run_policy(policy: Policy, mapfile: str, packets: list[bytes]) -> dict[str, float]:
    m = ServiceMap.from_json(Path(mapfile).read_text())
    pa, pb = free_udp_port(), free_udp_port()
    proc = subprocess.Popen([sys.executable, "-m", "dataplane.shells.syncudp", "--map", mapfile, "--me", "bb",
                             "--listen", f"127.0.0.1:{pb}", "--peer", f"ba=127.0.0.1:{pa}",
                             "--key", KEY, "--idle", "0.5", "--max-seconds", "60"],
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        node = ServiceNode("ba", m, create("firewall"))
        rep = Replicator(node, sw.Keyring({1: KEY.encode()}, 1), time.time_ns() // 1000, policy)
        shell = UdpSync(rep, ("127.0.0.1", pa), {"bb": ("127.0.0.1", pb)})
        t_end = time.monotonic() + 2
        while time.monotonic() < t_end and not rep.channels["bb"].state.value == "established":
            now = time.monotonic()
            shell.emit(shell.drain(now))
            shell.emit(rep.tick(now))
            time.sleep(0.001)
        released = 0
        start = time.perf_counter()
        last_tick = start
        for i, data in enumerate(packets):
            now = time.monotonic()
            released += _sends(shell.emit(rep.process(node.from_fabric(data, INGRESS, now), now)))
            if i % 64 == 0:
                released += _sends(shell.emit(shell.drain(now)))
            if now - last_tick >= 0.001:
                last_tick = now
                released += _sends(shell.emit(rep.tick(now)))
        while released < len(packets) and time.perf_counter() - start < 30:
            now = time.monotonic()
            released += _sends(shell.emit(shell.drain(now)))
            released += _sends(shell.emit(rep.tick(now)))
        elapsed = time.perf_counter() - start
        ch = rep.channels["bb"]
        updates = ch.stats["records_sent"]
        sent_bytes = ch.stats.get("bytes_sent", 0)
        shell.close()
        return {"pps": released / elapsed, "updates": updates, "updates_per_s": updates / elapsed,
                "bytes_per_update": (sent_bytes / updates) if updates else 0.0,
                "held_timeouts": rep.counters["hold_timeout"]}
    finally:
        proc.kill()
        proc.wait()


def _sends(outs: list) -> int:
    return sum(1 for o in outs if type(o).__name__ == "Send")


def _scenario(m: ServiceMap, per_flow: int) -> list[bytes]:
    """PACKETS packets in flows of `per_flow` packets. One packet per flow:
    TCP SYNs, each opening a flow (mirrored). Longer flows are UDP, as in
    `benchmarks.fwd`: the first packet opens the flow (mirrored), the others
    change nothing the secondary must hold. (TCP data segments after a lone
    SYN are out of the firewall's window, which tracks the handshake since
    issue #14: they were dropped, and the run waited 30 s for them.)"""
    codes = codes_led_by(m, "ba", PACKETS // per_flow)
    out = []
    for i, c in enumerate(codes):
        hdr = wire.pack(1, 1, c, 1, m.epoch)
        sport = 1024 + i % 60000
        if per_flow == 1:
            out.append(hdr + tcp(sport=sport, flags="S", seq=1000))
        else:
            out.extend([hdr + udp(sport=sport, payload=b"q" * 18)] * per_flow)
    return out


def main() -> dict[str, dict[str, dict[str, float]]]:
    m = pair_map(buckets=4096)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(m.to_json())
    results = {}
    for label, per_flow in (("every packet mirrored", 1), ("1 in 10 mirrored", 10)):
        packets = _scenario(m, per_flow)
        r = {p.value: run_policy(p, f.name, packets) for p in Policy}
        results[label] = r
        base = r["off"]["pps"]
        print(f"\nsync policies, {len(packets)} packets, {label} (real secondary over UDP)")
        print(f"{'policy':<10}{'packets/s':>12}{'vs off':>9}{'updates/s':>12}{'B/update':>10}")
        for name, x in r.items():
            per = "-" if name == "off" else f"{x['bytes_per_update']:.1f}"
            print(f"{name:<10}{x['pps']:>12,.0f}{x['pps'] / base:>9.2f}{x['updates_per_s']:>12,.0f}"
                  f"{per:>10}")
    Path(f.name).unlink()
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
