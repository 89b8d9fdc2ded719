"""Rendezvous (highest-random-weight) bucket tables.

Each bucket of a service gets an ordered list of candidate instances: the
live instances sorted by a pseudo-random weight w(instance, bucket), highest
first. Candidate 0 is the primary, candidate 1 the secondary. Because an
instance's weights do not depend on who else is in the set:

* removing X changes only the buckets where X was a candidate, and in each the
  candidates behind X move up one place: the old secondary becomes primary
  (zero collateral disruption, the property GLB's director relies on);
* adding Y moves only the buckets where Y now ranks first, about 1/(N+1).

The weights of one instance for all buckets are one SHAKE-128 stream
(`digest(4 * buckets)`), so a table costs one C call per instance plus a
per-bucket sort; weights are cached per (service, instance, buckets).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from functools import lru_cache

HRW_DOMAIN = b"affinity-mesh/hrw/v1\x00"


@lru_cache(maxsize=1024)
def weights(service: str, instance: str, buckets: int) -> array:
    """w(instance, b) for every bucket b of `service`: the b-th 32-bit
    little-endian word of SHAKE-128(domain || service || 0 || instance)."""
    seed = HRW_DOMAIN + service.encode() + b"\x00" + instance.encode()
    w = array("I", hashlib.shake_128(seed).digest(4 * buckets))
    if sys.byteorder == "big":  # pragma: no cover - same tables on every machine
        w.byteswap()
    return w


def rank(service: str, instances: list[str], buckets: int, depth: int) -> list[array]:
    """The first `depth` candidates of every bucket, as indexes into `instances`.

    Returns `depth` arrays; `out[r][b]` is the r-th candidate of bucket b, or
    0xFFFF when fewer than r+1 instances exist. Ties (equal weights) go to the
    instance listed first, so callers pass a sorted list and every process
    builds the same table.
    """
    cols = [weights(service, n, buckets) for n in instances]
    depth_here = min(depth, len(instances))
    out = [array("H", [0xFFFF]) * buckets for _ in range(depth)]
    idx = range(len(instances))
    if depth_here == 1:
        prim = out[0]
        for b, row in enumerate(zip(*cols)):
            prim[b] = max(idx, key=row.__getitem__)
    elif depth_here > 1:
        for b, row in enumerate(zip(*cols)):
            # stable sort on -weight keeps list order for ties
            for r, i in enumerate(sorted(idx, key=lambda i, row=row: -row[i])[:depth_here]):
                out[r][b] = i
    return out
