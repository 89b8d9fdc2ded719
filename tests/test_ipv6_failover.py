"""IPv6 flows through failovers (issue #15 item 3), each on a fresh lab of
its own: a module apart from tests/test_ipv6_lab.py, whose module-scoped
default lab would otherwise stay up beside each fresh one (two labs at
once overload a 2-core machine: heartbeats late, false failovers)."""

from __future__ import annotations

import os

import pytest

from dataplane.lab import faults
from tests import test_failover
from tests.test_failover import B, WITH_CONTROL, Transfers, counters, leaders, why

fresh = test_failover.fresh
"""A fresh default lab per test (policy from the test's mark), as the failover tests use."""
BIG = os.urandom(3 << 20)
"""Big enough that 30 paced downloads are still running when the kill
comes (a smaller file sits whole in the client's receive buffer before it)."""


@WITH_CONTROL
def test_kill_the_b_primary_during_ipv6_transfers(fresh, policy):
    """IPv6 flows fail over like IPv4 ones: with sync every transfer ends
    sha256-intact; without it (the control) the transfers of the victim's
    flows break."""
    sha = fresh.http_server({"f6": BIG}, port=8086, family=6)["f6"]
    tr = Transfers(fresh, n=30, pace=0.15, url=fresh.url("f6", 8086, 6), sha=sha)
    m = fresh.map()
    victim = max(leaders(fresh, B).items(), key=lambda kv: kv[1])[0]
    faults.kill(fresh.state, victim)
    rows = tr.join()
    assert len(rows) == 30
    affected = {r["i"] for r in rows
                if m.primary("B", fresh.topo.stream_code(r["port"], 8086, family=6)) == victim}
    broken = {r["i"] for r in rows if not tr.ok(r)}
    assert affected, "no transfer had its flow on the victim"
    if policy == "async":
        assert broken == set(), why(fresh, rows, tr)
        assert counters(fresh, tuple(i for i in B if i != victim), "took_over") > 0
    else:
        assert broken and broken <= affected
        assert counters(fresh, tuple(i for i in B if i != victim), "misdelivery", "drops") > 0


@pytest.mark.gso
def test_ipv6_super_frames_cross_the_chain(fresh):
    """With `[fabric] gso` the hosts' IPv6 TCP super-frames (gso_type TCPV6)
    cross the chain whole and arrive intact."""
    sha = fresh.http_server({"f6": BIG}, port=8086, family=6)["f6"]
    before = counters(fresh, ("ingress", "egress"), "super_frames")
    rows = Transfers(fresh, n=5, pace=0, url=fresh.url("f6", 8086, 6), sha=sha).join()
    assert [r for r in rows if r["error"] or r["sha256"] != sha] == []
    assert counters(fresh, ("ingress", "egress"), "super_frames") > before
