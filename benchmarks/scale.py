"""Memory per flow-table entry and bulk-sync throughput, measured.

* bytes per entry: tracemalloc around filling a FlowTable with firewall
  flows (key, entry, state object), at 100k and 1M flows;
* bulk sync: wall-clock flows/s for the sender and receiver channels to move
  10k and 100k flows through a simulated lossless link, in process (the
  pacing limit `bulk_rate` is lifted so the Python cost shows).
`python -m benchmarks.scale`.
"""

from __future__ import annotations

import time
import tracemalloc

from dataplane.core import syncwire as sw
from dataplane.core.events import FlowUpdate
from dataplane.core.flowtable import FlowTable
from dataplane.core.services.firewall import FlowState, Kind
from dataplane.core.syncchannel import Apply, BulkDone, SyncChannel, SyncConfig, Transmit


def bytes_per_entry(n: int) -> float:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t = FlowTable(capacity=n + 1)
    for i in range(n):
        key = (1, i, 6, (0x0A010000 + i % 65536).to_bytes(4, "big"), 1024 + i % 60000,
               b"\x0a\x02\x00\x0a", 80)
        t.insert(key, 0.0, FlowState(Kind.TCP, 3, True, 0, i, i + 7, i, i + 7, i + 65535, i + 70000,
                                     65535 << 7, 64240 << 7, i + 7, i, 7, 7, 30))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / n


def bulk_rate(n: int) -> float:
    cfg = SyncConfig(bulk_rate=1e9, resend_queue=16384, batch_records=64)
    keys = sw.Keyring({1: b"k" * 32}, 1)
    a, b = SyncChannel("ba", "bb", keys, 1, cfg), SyncChannel("bb", "ba", keys, 2, cfg)
    now = 0.0
    pending: list[tuple[SyncChannel, bytes]] = []

    def pump(ch: SyncChannel, evs: list) -> int:
        applied = 0
        for e in evs:
            if isinstance(e, Transmit):
                pending.append((b if ch is a else a, e.data))
            elif isinstance(e, Apply):
                applied += 1
        return applied

    for _ in range(5):
        pump(a, a.tick(now))
        pump(b, b.tick(now))
        while pending:
            ch, data = pending.pop(0)
            pump(ch, ch.receive(data, now))
        now += 0.01
    ups = [FlowUpdate((1, i, 6, b"\x0a\x01\x00\x0a", i % 65536, b"\x0a\x02\x00\x0a", 80), 1, b"s" * 20)
           for i in range(n)]
    t0 = time.perf_counter()
    bulk = a.start_bulk(ups, now)
    applied = 0
    done = False
    while not done:
        now += 0.001
        evs = a.tick(now)
        done = any(isinstance(e, BulkDone) and e.bulk_id == bulk for e in evs)
        pump(a, evs)
        while pending:
            ch, data = pending.pop(0)
            evs = ch.receive(data, now)
            done = done or any(isinstance(e, BulkDone) and e.bulk_id == bulk for e in evs)
            applied += pump(ch, evs)
        applied += pump(b, b.tick(now))
    return n / (time.perf_counter() - t0)


def map_at_64() -> dict[str, float]:
    """A service of 64 instances at the default 65,536 buckets: build time,
    table memory, primary lookup cost, and balance."""
    import timeit

    from dataplane.core.servicemap import ServiceMap

    m = ServiceMap()
    m.add_service("B", [f"i{n:02d}" for n in range(64)])
    t0 = time.perf_counter()
    t = m.table("B")
    build = time.perf_counter() - t0
    lookup = min(timeit.repeat("m.primary('B', 123456789)", globals={"m": m}, number=100_000,
                               repeat=5)) / 100_000
    counts = t.primary_counts()
    return {"table_build_s_64": build, "table_bytes_64": sum(r.itemsize * len(r) for r in t.ranks),
            "primary_lookup_us_64": lookup * 1e6,
            "max_over_mean_64": max(counts.values()) / (m.buckets / 64)}


def main() -> dict[str, float]:
    out = {**map_at_64(), "bytes_per_entry_100k": bytes_per_entry(100_000),
           "bytes_per_entry_1m": bytes_per_entry(1_000_000),
           "bulk_flows_per_s_10k": bulk_rate(10_000),
           "bulk_flows_per_s_100k": bulk_rate(100_000)}
    print(f"\n64 instances x 65,536 buckets: table built in {out['table_build_s_64']:.2f} s, "
          f"{out['table_bytes_64'] / 1024:.0f} KiB, primary lookup {out['primary_lookup_us_64']:.2f} us, "
          f"max/mean primary buckets {out['max_over_mean_64']:.3f}")
    print(f"flow table: {out['bytes_per_entry_100k']:.0f} B/entry at 100k flows, "
          f"{out['bytes_per_entry_1m']:.0f} B/entry at 1M (firewall state included)")
    print(f"bulk sync (both channel ends, one process): {out['bulk_flows_per_s_10k']:,.0f} flows/s "
          f"for 10k, {out['bulk_flows_per_s_100k']:,.0f} flows/s for 100k "
          f"({100_000 / out['bulk_flows_per_s_100k']:.1f} s for 100k)")
    return out


if __name__ == "__main__":
    main()
