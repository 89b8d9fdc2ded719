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


def rank_spread(service: str, members: list[str], hosts: list[str], eligible: list[bool],
                buckets: int, depth: int, joining: frozenset[int] = frozenset()) -> list[array]:
    """Like `rank`, but a bucket's secondary avoids its primary's host.

    `members` are the instances that hold or held roles (eligible ones, and
    DEAD or DRAINING ones, which keep their place: see below), `hosts[i]`
    the failure domain of member i, `joining` the indexes of JOINING
    members. The output indexes the eligible members, in `members` order,
    like `rank`.

    Per bucket, members are put in *spread order*: highest weight first,
    each next one the highest-weight member on a host not used yet, and,
    once every host is used, the rest by weight (Ceph CRUSH's "choose leaf
    by host"). The primary is the first eligible, non-joining member in
    that order (a JOINING one only if no other is eligible); the next
    candidates are the first members left on a host not used by the bucket
    yet, or, when every host with one left is used, the first left. So:

    * a secondary is on another host than its primary whenever another host
      has an eligible member;
    * a non-primary failing moves no primary, and a primary failing hands
      its buckets to the next eligible member in spread order: its
      secondary whenever no other member of the primary's host sits
      between them, which is always so from a healthy map or one that lost
      whole hosts. Departed members keep their place in the order, which
      would change without them. After single failures on several hosts
      it may not be so, and no rule that sees only who is dead can promise
      it: with X, Z, i2, Y in weight order, X and i2 on one host, Z and Y
      on another, "X dies, then Z" leaves the state on i2 and "Z dies,
      then X" leaves it on Y, in the same map;
    * a JOINING member that would be first is the secondary whenever its
      host differs from the primary's, and the primaries with it JOINING
      are those with it DEAD (make before break); a spare turned JOINING
      may hand some buckets to their secondaries, where their state is.
    """
    cols = [weights(service, n, buckets) for n in members]
    index = {m: k for k, m in enumerate(i for i, e in enumerate(eligible) if e)}
    depth_here = min(depth, len(index))
    out = [array("H", [0xFFFF]) * buckets for _ in range(depth)]
    idx = range(len(members))
    if not depth_here:
        return out
    for b, row in enumerate(zip(*cols)):
        order = [i for i in _spread(sorted(idx, key=row.__getitem__, reverse=True), hosts) if eligible[i]]
        first = order[0]
        if joining and first in joining:
            first = next((i for i in order if i not in joining), first)
        out[0][b] = index[first]
        if depth_here > 1:
            picked = [first]
            used = {hosts[first]}
            for r in range(1, depth_here):
                c = next((i for i in order if hosts[i] not in used and i not in picked), None)
                if c is None:
                    c = next(i for i in order if i not in picked)
                out[r][b] = index[c]
                picked.append(c)
                used.add(hosts[c])
    return out


def _spread(order: list[int], hosts: list[str]) -> list[int]:
    """`order` (by weight) rearranged: the first member met of each host,
    in the order met, then the others in `order`'s order."""
    firsts: list[int] = []
    others: list[int] = []
    seen: set[str] = set()
    for i in order:
        if hosts[i] in seen:
            others.append(i)
        else:
            seen.add(hosts[i])
            firsts.append(i)
    return firsts + others
