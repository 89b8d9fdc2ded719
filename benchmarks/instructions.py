"""Machine instructions per sync record and per guarded packet, counted by
valgrind (callgrind), for changes too small for wall-clock runs to see on a
shared machine (run to run, the sync benchmark's rates vary by 10-30 %).

* sync record: a record's round trip through both channel ends in one
  process (submit, flush, encode, HMAC, decode, checks, apply to the
  receiver's stream);
* fabric packet: an exact-match cache hit of the service node, handed over
  the way the forwarder's fabric handler does: in a list comprehension (no
  guard) and in the guarded loop it runs (source check, try per packet).

Each workload runs at two sizes; the difference divided by the extra work is
the cost of one unit, free of start-up. `python -m benchmarks.instructions`
(needs valgrind; a minute or two).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

RECORDS = """
from dataplane.core import syncwire as sw
from dataplane.core.events import FlowUpdate
from dataplane.core.syncchannel import SyncChannel, Transmit
keys = sw.Keyring({1: b"k" * 32}, 1)
a, b = SyncChannel("ba", "bb", keys, 1000), SyncChannel("bb", "ba", keys, 2000)
def deliver(evs, dst, now, back):
    for ev in evs:
        if isinstance(ev, Transmit):
            deliver(dst.receive(ev.data, now), back, now, dst)
now = 0.0
for _ in range(10):
    now += 0.01
    deliver(a.tick(now), b, now, a)
    deliver(b.tick(now), a, now, b)
N = int(sys.argv[1])
ups = [FlowUpdate((1, i, 6, b"\\x0a\\x01\\x00\\x0a", 1000 + i % 60000, b"\\x0a\\x02\\x00\\x0a", 80), 1,
                  b"s" * 24, False, "egress", "aa", 30.0) for i in range(N)]
for i in range(0, N, 64):
    for u in ups[i:i + 64]:
        a.submit(u, now)
    deliver(a.flush(now), b, now, a)
    now += 0.0001
    if i % 4096 == 0:
        deliver(b.tick(now), a, now, b)
assert b.stats["records_received"] >= N
"""

PACKETS = """
from dataplane.core import header as wire
from dataplane.core.node import ServiceNode
from dataplane.core.services import create
from tests.conftest import codes_led_by, pair_map, udp
m = pair_map()
node = ServiceNode("ba", m, create("firewall"))
pk = [wire.pack(1, 1, c, 1, m.epoch) + udp(sport=1000 + i) for i, c in enumerate(codes_led_by(m, "ba", 64))]
src = b"\\x0a\\x63\\x00\\x03"
got = [(p, src) for p in pk]
by_ip = {src: "ingress"}
from_fabric = node.from_fabric
def plain():
    return [from_fabric(data, by_ip.get(s), 0.0) for data, s in got]
def guarded():
    batch = []
    for data, s in got:
        hop = by_ip.get(s)
        if hop is None:
            continue
        try:
            batch.append(from_fabric(data, hop, 0.0))
        except Exception:
            pass
    return batch
plain()
f = plain if sys.argv[2] == "plain" else guarded
for _ in range(int(sys.argv[1])):
    f()
assert node.counters["fast_path"] >= 64 * int(sys.argv[1])
"""


def instructions(script: str, *args: str) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", "import sys\n" + script, *args],
                         capture_output=True, text=True, env=env, check=True).stderr
    return int(re.search(r"Collected : (\d+)", out).group(1))


def per_unit(script: str, small: int, large: int, units: int, *args: str) -> float:
    return (instructions(script, str(large), *args) - instructions(script, str(small), *args)) / units


def main() -> dict[str, float]:
    if shutil.which("valgrind") is None:
        print("valgrind not installed: instruction counts skipped")
        return {}
    out = {"sync_record": per_unit(RECORDS, 2000, 12000, 10000),
           "fabric_packet_plain": per_unit(PACKETS, 100, 600, 500 * 64, "plain"),
           "fabric_packet_guarded": per_unit(PACKETS, 100, 600, 500 * 64, "guarded")}
    print("\ninstructions (valgrind)")
    print(f"  sync record, both channel ends:        {out['sync_record']:>9,.0f}")
    print(f"  fabric packet, cache hit, no guard:    {out['fabric_packet_plain']:>9,.0f}")
    print(f"  fabric packet, cache hit, guarded:     {out['fabric_packet_guarded']:>9,.0f}")
    return out


if __name__ == "__main__":
    main()
