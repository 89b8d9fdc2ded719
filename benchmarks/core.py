"""Per-packet cost of the sans-I/O core, step by step.

Each step is timed with `timeit` (best of 5 repeats) and printed in
microseconds and as a multiple of the baseline: one `struct.unpack_from` of
the 20-byte header, the least work any forwarder does per packet. Run with
`python -m benchmarks` (writes benchmarks/out/results.json).
"""

from __future__ import annotations

import timeit
from pathlib import Path

from dataplane.core import header as wire
from dataplane.core.affinity import AffinityHasher
from dataplane.core.flowtable import FlowTable
from dataplane.core.node import EGRESS, INGRESS, ServiceNode, flow_key
from dataplane.core.packet import parse
from dataplane.core.servicemap import Chain, ServiceMap, Tenant
from dataplane.core.services import create
from tests.conftest import tcp

OUT = Path(__file__).parent / "out"


def _setup() -> dict:
    m = ServiceMap()
    m.add_service(INGRESS, [INGRESS])
    m.add_service("A", ["aa", "ab"])
    m.add_service("B", [f"b{i}" for i in range(16)])
    m.add_service(EGRESS, [EGRESS])
    m.add_tenant(Tenant(1, "t", ["10.1.0.0/16"]))
    m.add_chain(Chain(1, 1, ["A", "B"]))
    m.table("B")
    hasher = AffinityHasher(b"bench")
    inner_bytes = tcp(flags="A", seq=1000, ack=1, payload=b"x" * 64)
    inner = parse(inner_bytes)
    code = hasher.code(1, inner)
    key, _ = flow_key(1, code, inner)
    table = FlowTable()
    for i in range(100_000):
        table.insert((1, i, 6, b"\x0a\x01\x00\x0a", i % 65536, b"\x0a\x02\x00\x0a", 80), 0.0)
    table.insert(key, 0.0)
    fw = create("firewall")
    _, fw_state = fw.process(parse(tcp(flags="S", seq=999)), True, None, 0.0)
    hdr = wire.pack(1, 1, code, 1, m.epoch)
    node = ServiceNode(m.primary("B", code), m, create("firewall"))
    full = ServiceNode(m.primary("B", code), m, create("firewall"), exact_match=False)
    rev = wire.pack(1, 2, code, 1, m.epoch, int(wire.Flags.REVERSE))
    for n in (node, full):  # a handshake: established, as the firewall's fast check wants
        n.from_fabric(hdr + tcp(flags="S", seq=999), "aa", 0.0)
        n.from_fabric(rev + tcp("10.2.0.10", "10.1.0.10", 80, 40000, flags="SA", seq=5000, ack=1000),
                      "egress", 0.0)
        n.from_fabric(hdr + tcp(flags="A", seq=1000, ack=5001), "aa", 0.0)
    return dict(m=m, hasher=hasher, inner_bytes=inner_bytes, inner=inner, code=code, key=key,
                table=table, fw=fw, fw_state=fw_state, hdr=hdr, node=node, full=full,
                packet=hdr + tcp(flags="A", seq=1000, ack=5001, payload=b"x" * 64), wire=wire,
                parse=parse)


STEPS = {
    "baseline: struct-unpack header": "wire._WORDS.unpack_from(packet)",
    "header decode + validate": "wire.decode(packet)",
    "inner parse (IPv4/TCP)": "parse(inner_bytes)",
    "affinity code (keyed BLAKE2b)": "hasher.code(1, inner)",
    "map lookup (primary, 16 inst.)": "m.primary('B', code)",
    "flow lookup (100k flows)": "table.lookup(key, 1.0)",
    "firewall process (established)": "fw.process(inner, True, fw_state, 1.0)",
    "header encode": "wire.pack(1, 0, code, 1, 5)",
    "service node, whole packet, full path": "full.from_fabric(packet, 'aa', 1.0)",
    "service node, whole packet, cache hit": "node.from_fabric(packet, 'aa', 1.0)",
}


def measure(number: int = 20000) -> dict[str, float]:
    env = _setup()
    out = {}
    for name, stmt in STEPS.items():
        best = min(timeit.repeat(stmt, globals=env, number=number, repeat=5))
        out[name] = best / number * 1e6
    return out


def main() -> dict[str, float]:
    costs = measure()
    base = costs["baseline: struct-unpack header"]
    print(f"{'step':<36}{'us/packet':>10}{'x baseline':>12}")
    for name, us in costs.items():
        print(f"{name:<36}{us:>10.3f}{us / base:>12.1f}")
    for path in ("full path", "cache hit"):
        whole = costs[f"service node, whole packet, {path}"]
        print(f"service node alone, {path}: {1e6 / whole:,.0f} packets/s on one core (no I/O)")
    return costs


if __name__ == "__main__":
    main()
