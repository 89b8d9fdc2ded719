"""Rendezvous tables directly: every candidate of a bucket is a different
member, and with `rank_spread` each on a host the bucket does not use yet
while one is left."""

from __future__ import annotations

from dataplane.core.rendezvous import rank, rank_spread

BUCKETS = 256


def columns(out, buckets=BUCKETS):
    return [[out[r][b] for r in range(len(out))] for b in range(buckets)]


def test_three_candidates_take_three_hosts_while_there_are_three():
    members = ["a1", "a2", "b1", "b2", "c1", "c2"]
    hosts = ["ha", "ha", "hb", "hb", "hc", "hc"]
    out = rank_spread("B", members, hosts, [True] * 6, BUCKETS, 3)
    for cands in columns(out):
        assert len({hosts[i] for i in cands}) == 3, cands


def test_candidates_are_distinct_when_hosts_run_out():
    # two hosts for three candidates, and one host for all: the candidates
    # after the hosts are used are the next members in spread order, never
    # one already picked
    for hosts in (["ha", "ha", "hb"], ["h", "h", "h"]):
        out = rank_spread("B", ["x", "y", "z"], hosts, [True] * 3, BUCKETS, 3)
        for cands in columns(out):
            assert sorted(cands) == [0, 1, 2], (hosts, cands)
        two = rank_spread("B", ["x", "y", "z"], hosts, [True] * 3, BUCKETS, 2)
        assert all(p != s for p, s in columns(two))


def test_one_host_spreads_like_plain_rendezvous():
    """With every member on one host, spread order is weight order: the
    table is the plain HRW one."""
    names = ["x", "y", "z", "w"]
    spread = rank_spread("B", names, ["h"] * 4, [True] * 4, BUCKETS, 3)
    assert columns(spread) == columns(rank("B", names, BUCKETS, 3))


def test_a_host_whose_first_member_is_dead_still_counts_as_used_once_picked():
    """Members left on a host whose first (by weight) member is ineligible
    sit after the hosts' first members in spread order; once one of them is
    a candidate, its host is used: the next candidate is on a third host
    while one has an eligible member."""
    members = ["a1", "a2", "a3", "b1", "c0", "c1"]
    hosts = ["ha", "ha", "ha", "hb", "hc", "hc"]
    eligible = [False, True, True, True, False, True]
    out = rank_spread("B", members, hosts, eligible, 4096, 3)
    names = [m for m, e in zip(members, eligible) if e]
    host_of = dict(zip(members, hosts))
    for cands in columns(out, 4096):
        assert len({host_of[names[i]] for i in cands}) == 3, [names[i] for i in cands]
