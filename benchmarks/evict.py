"""Cost of one eviction after little and after much churn (issue #14, finding 4).

A full table evicts on every insert. Evicting through a plain dict's
`d.pop(next(iter(d)))` walks over the deleted slots piled up at its front,
so an eviction grew from 10 to 65 us as churn went on; the flow table's
classes are OrderedDicts evicted with `popitem(last=False)`, which does not
walk. This fills a table of `CAPACITY` entries, churns more inserts through
it (each evicts one), then times `SAMPLE` more, and prints us/eviction
after 10k and after 1M churned entries and their ratio (1.0: eviction does
not grow). The plain-dict baseline is timed after 10k and 60k churned
entries only (where the deleted slots of a 100k-entry dict peak): past
that it costs minutes. `python -m benchmarks.evict`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from dataplane.core.flowtable import FlowTable

CAPACITY = 100_000
SAMPLE = 10_000
CHURNS = (10_000, 1_000_000)
BASELINE_CHURNS = (10_000, 60_000)


def key(i: int) -> tuple:
    return (1, i & 0xFFFFFFFF, 6, b"\x0a\x01\x00\x0a", i % 65536, b"\x0a\x02\x00\x0a", 80)


def flow_table(churn: int) -> float:
    """us per insert-with-eviction into a full FlowTable after `churn` evictions."""
    t = FlowTable(CAPACITY)
    for i in range(CAPACITY + churn):
        t.insert(key(i), 0.0)
    return _timed(lambda i: t.insert(key(i), 0.0), CAPACITY + churn)


def plain_dict(churn: int) -> float:
    """The same with a plain dict evicted by `d.pop(next(iter(d)))` (the baseline)."""
    d: dict = {}
    for i in range(CAPACITY + churn):
        if len(d) >= CAPACITY:
            d.pop(next(iter(d)))
        d[key(i)] = None
    def evict_insert(i: int) -> None:
        d.pop(next(iter(d)))
        d[key(i)] = None

    return _timed(evict_insert, CAPACITY + churn)


def _timed(step: Callable[[int], None], base: int) -> float:
    """CPU us per call of step(i) for SAMPLE values of i from `base`: process
    time, not wall clock (the shared machine's other work does not count),
    the cyclic garbage collector off (as timeit does: its passes over a
    heap of 100k entries would land in one sample or the other)."""
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()
        for i in range(base, base + SAMPLE):
            step(i)
        return (time.process_time() - start) / SAMPLE * 1e6
    finally:
        gc.enable()


def main() -> dict[str, dict[str, float]]:
    out = {}
    for name, fn, churns in (("flow table (OrderedDict.popitem)", flow_table, CHURNS),
                             ("plain dict, pop(next(iter(d)))", plain_dict, BASELINE_CHURNS)):
        small, big = (fn(c) for c in churns)
        out[name] = {"churn": list(churns), "us_per_eviction": [round(small, 3), round(big, 3)],
                     "ratio": round(big / small, 2)}
        print(f"{name:34s} {small:7.2f} us/eviction after {churns[0]:,} churned, "
              f"{big:7.2f} after {churns[1]:,}: x{big / small:.2f}")
    return out


if __name__ == "__main__":
    main()
