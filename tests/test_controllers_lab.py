"""Two controllers sharing the map in etcd on the namespace lab (issue #12
item 2): `ctl1` and `ctl2` both hear every heartbeat, propose each new map
by compare-and-swap and adopt what the other won, so either handles a
failure alone (also right after the etcd leader died), and each follows
etcd's watch for what the other published (also when the member it
watches is cut off).
The control: with both down nothing reroutes (the epoch stands still);
restarted, they resume at the stored revision and carry on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dataplane.lab import faults
from dataplane.lab.session import DEFAULT, LabRun, bring_up, tear_down
from tests.conftest import need_root
from tests.test_etcd_lab import stored
from tests.test_failover import B, Transfers, leaders, why

CTLS = ("ctl1", "ctl2")


def two_controllers(tmp_path: Path) -> Path:
    text = DEFAULT.read_text().replace('name = "ctl"', 'name = "ctl1"\npeers = ["ctl2"]', 1) \
        .replace('store = "embedded"', 'store = "etcd"', 1)
    path = tmp_path / "two-controllers.toml"
    path.write_text(text)
    return path


def views(run: LabRun, ctls: tuple[str, ...] = CTLS) -> dict[str, tuple[int, int]]:
    """(epoch, revision) each controller holds."""
    return {c: (st["epoch"], st["revision"]) for c in ctls for st in [run.ask(c, "status")]}


def converged(run: LabRun, above: int = 0, timeout: float = 5.0,
              ctls: tuple[str, ...] = CTLS) -> tuple[int, int]:
    """The (epoch, revision) every controller and etcd hold alike, once the
    epoch is above `above`."""
    deadline = time.monotonic() + timeout
    while True:
        v = views(run, ctls)
        s = stored(run)
        if len(set(v.values())) == 1 and (s["epoch"], s["revision"]) in v.values() and s["epoch"] > above:
            return s["epoch"], s["revision"]
        if time.monotonic() > deadline:
            raise AssertionError(f"controllers {v}, etcd {s}: not one map above epoch {above}")
        time.sleep(0.1)


LEADER = """
import asyncio, sys
import aetcd
from dataplane.shells.etcdstore import parse_endpoint
async def main():
    for ep in sys.argv[1:]:
        host, port = parse_endpoint(ep)
        try:
            async with aetcd.Client(host=host, port=port, timeout=2) as c:
                print((await c.status()).leader.name)
                return
        except Exception:
            continue
asyncio.run(main())
"""


def etcd_leader(run: LabRun, node: str) -> str:
    """The etcd member that leads the cluster, asked from `node`'s namespace."""
    res = run.run(node, [sys.executable, "-c", LEADER, *run.topo.etcd_endpoints])
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    return res.stdout.strip()


def counter(run: LabRun, ctl: str, key: str) -> int:
    return run.ask(ctl, "status")["counters"].get(key, 0)


def test_either_controller_handles_a_failure_and_they_never_split(tmp_path):
    need_root()
    run = bring_up(two_controllers(tmp_path), name="ctls", prefix="amr")
    run.sha = run.http_server({"f": b"c" * (2 << 20)})["f"]
    try:
        assert run.topo.controllers == list(CTLS)
        converged(run)

        # an etcd member cut off (the first endpoint both controllers use):
        # an operator's change through one controller is written through the
        # majority, and the other's watch leaves the silent member for the next
        faults.partition(run.topo, "etcd1")
        e = faults.operator(run.topo, "bd", "scale-out")
        e0, r0 = converged(run, above=e - 1, timeout=15)
        assert e0 >= e
        faults.heal(run.topo, "etcd1")
        assert run.wait_state(("bd",), "active", timeout=10)
        e0, r0 = converged(run, above=e0 - 1)
        for i in (*B, "bd"):
            assert run.wait_in_sync(i)

        # the control: no controller alive, a B instance dies, nothing reroutes
        tr = Transfers(run, n=12, pace=0.1)
        faults.kill(run.state, "ctl1")
        faults.kill(run.state, "ctl2")
        victim = max(leaders(run, B).items(), key=lambda kv: kv[1])[0]
        faults.kill(run.state, victim)
        time.sleep(1.5)                                   # 15 detection times
        assert {run.ask(n, "status")["epoch"] for n in ("ingress", "aa", "ab")} == {e0}
        # both restarted: they resume at the stored revision, then act on the death
        for c in CTLS:
            faults.restart(run.topo, run.state, c)
        e1, r1 = converged(run, above=e0)
        assert e1 == e0 + 1 and r1 > r0 and run.map().instance(victim).state.value == "dead"
        rows = tr.join()
        assert all(tr.ok(r) for r in rows), why(run, rows, tr)
        assert sum(counter(run, c, "failovers") for c in CTLS) == 1   # one published it

        # the etcd leader dies, then ctl1, then another B instance: ctl2 alone
        # reroutes once the cluster has elected a new leader, no transfer breaks
        left = [i for i in (*B, "bd") if i != victim]
        for i in left:
            assert run.wait_in_sync(i)
        leader = etcd_leader(run, "ctl2")
        tr = Transfers(run, n=12, pace=0.1)
        faults.kill(run.state, leader)
        faults.kill(run.state, "ctl1")
        faults.kill(run.state, left[0])
        e2, r2 = converged(run, above=e1, ctls=("ctl2",))
        rows = tr.join()
        assert all(tr.ok(r) for r in rows), why(run, rows, tr)
        assert counter(run, "ctl2", "failovers") >= 1

        # ctl1 comes back at ctl2's revision, never behind it
        faults.restart(run.topo, run.state, "ctl1")
        assert converged(run, above=e1) == (e2, r2)

        # both alive and both hear A's ab fall silent: one map wins, the other
        # controller adopts it; one epoch for one failure
        won = {c: counter(run, c, "failovers") for c in CTLS}
        faults.kill(run.state, "ab")
        e3, _ = converged(run, above=e2)
        assert e3 == e2 + 1
        assert sum(counter(run, c, "failovers") - won[c] for c in CTLS) == 1
        assert {run.ask(n, "status")["epoch"] for n in ("ingress", "aa", left[1], "egress")} == {e3}

        # an operator's change through one controller: the other has nothing
        # to propose and learns it from its etcd watch alone
        e4 = faults.operator(run.topo, left[1], "drain")
        assert converged(run, above=e3)[0] >= e4 > e3
        assert counter(run, "ctl2", "adopted") >= 1
    finally:
        tear_down(run)
