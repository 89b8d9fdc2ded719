"""Cost of one eviction after little and after much churn (issue #14, finding 4).

A full table evicts on every insert. Evicting through a plain dict's
`d.pop(next(iter(d)))` walks over the deleted slots piled up at its front,
so an eviction grew from 10 to 65 us as churn went on; the flow table's
classes are OrderedDicts evicted with `popitem(last=False)`, which does not
walk. For both, this fills a table of `CAPACITY` entries, churns `churn`
more inserts through it (each evicts one), then times `SAMPLE` more, and
prints us/eviction after 10k and after 1M churned entries and their ratio
(1.0: eviction does not grow). `python -m benchmarks.evict`.
"""

from __future__ import annotations

import time

from dataplane.core.flowtable import FlowTable

CAPACITY = 100_000
SAMPLE = 10_000
CHURNS = (10_000, 1_000_000)


def key(i: int) -> tuple:
    return (1, i & 0xFFFFFFFF, 6, b"\x0a\x01\x00\x0a", i % 65536, b"\x0a\x02\x00\x0a", 80)


def flow_table(churn: int) -> float:
    """us per insert-with-eviction into a full FlowTable after `churn` evictions."""
    t = FlowTable(CAPACITY)
    for i in range(CAPACITY + churn):
        t.insert(key(i), 0.0)
    base = CAPACITY + churn
    start = time.perf_counter()
    for i in range(base, base + SAMPLE):
        t.insert(key(i), 0.0)
    return (time.perf_counter() - start) / SAMPLE * 1e6


def plain_dict(churn: int) -> float:
    """The same with a plain dict evicted by `d.pop(next(iter(d)))` (the baseline)."""
    d: dict = {}
    for i in range(CAPACITY + churn):
        if len(d) >= CAPACITY:
            d.pop(next(iter(d)))
        d[key(i)] = None
    base = CAPACITY + churn
    start = time.perf_counter()
    for i in range(base, base + SAMPLE):
        d.pop(next(iter(d)))
        d[key(i)] = None
    return (time.perf_counter() - start) / SAMPLE * 1e6


def main() -> dict[str, dict[str, float]]:
    out = {}
    for name, fn in (("flow table (OrderedDict.popitem)", flow_table),
                     ("plain dict, pop(next(iter(d)))", plain_dict)):
        small, big = (fn(c) for c in CHURNS)
        out[name] = {"us_after_10k": round(small, 3), "us_after_1M": round(big, 3),
                     "ratio": round(big / small, 2)}
        print(f"{name:36s} {small:7.2f} us/eviction after 10k churn, {big:7.2f} after 1M: x{big / small:.2f}")
    return out


if __name__ == "__main__":
    main()
