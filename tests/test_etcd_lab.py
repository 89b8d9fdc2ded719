"""The map in etcd on the namespace lab (issue #12 item 1): `[controller]
store = "etcd"` runs a 3-member etcd cluster on the fabric (etcd1..3, data
under the lab's run directory), the controller keeps every map there by
compare-and-swap before pushing it, resumes from it when restarted, and
keeps writing with one member gone; `down` removes the cluster.
"""

from __future__ import annotations

import json
import sys
import time

from dataplane.lab import faults, netns
from dataplane.lab.session import DEFAULT, LabRun, bring_up, tear_down
from dataplane.lab.state import alive, run_dir
from tests.conftest import need_root

READ = """
import asyncio, json, sys
from dataplane.shells.etcdstore import EtcdMapStore
async def main():
    s = EtcdMapStore(sys.argv[2:], sys.argv[1])
    for ep in range(len(s.endpoints)):   # the first member that answers
        try:
            got = (await s.read(ep)).stored
            break
        except Exception:
            continue
    await s.close()
    print(json.dumps({"revision": got.revision, "epoch": json.loads(got.value)["epoch"]}))
asyncio.run(main())
"""


def stored(run: LabRun) -> dict[str, int]:
    """The map key as etcd answers it, read from the controller's namespace
    by a process of its own (not the controller's view of it)."""
    res = run.run(run.topo.controller, [sys.executable, "-c", READ, f"/amesh/{run.topo.name}",
                                        *run.topo.etcd_endpoints])
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def caught_up(run: LabRun, timeout: float = 5.0) -> tuple[dict, dict]:
    """The controller's status and the stored map once etcd holds the
    controller's epoch: a map published during a leader election is kept by
    the controller's retry, not at once (the CI run where the killed member
    was the leader)."""
    deadline = time.monotonic() + timeout
    while True:
        st = run.ask(run.topo.controller, "status")
        got = stored(run)
        if got["epoch"] == st["epoch"] or time.monotonic() > deadline:
            return st, got
        time.sleep(0.2)


def test_the_controller_keeps_its_maps_in_the_labs_etcd_cluster():
    need_root()
    run = bring_up(DEFAULT, name="etcd", prefix="ame", **{"controller.store": "etcd"})
    members = ["etcd1", "etcd2", "etcd3"]
    ctl = run.topo.controller
    try:
        assert [e.name for e in run.topo.extra_nodes()] == members
        st, s0 = caught_up(run)
        assert st["store"]["kind"] == "etcd" and s0["epoch"] == st["epoch"]
        assert s0["revision"] == st["store"]["revision"] > 0
        assert not (run_dir(run.topo.name) / f"{ctl}-map.json").exists()   # no file keeps it

        faults.kill(run.state, "bc")                     # a failure: the new map is in etcd
        e1 = run.wait_epoch(s0["epoch"])
        st, s1 = caught_up(run)
        assert s1["epoch"] == st["epoch"] >= e1 and s1["revision"] > s0["revision"]

        faults.restart(run.topo, run.state, ctl)         # resumes from etcd, not the topology
        assert run.map().epoch == e1
        faults.kill(run.state, "ba")
        e2 = run.wait_epoch(e1)
        st, s2 = caught_up(run)
        assert s2["epoch"] == st["epoch"] >= e2

        faults.kill(run.state, members[0])               # 2 of 3 members: still a majority
        e3 = faults.operator(run.topo, "bd", "scale-out")
        st, s3 = caught_up(run)
        assert s3["epoch"] == st["epoch"] >= e3 > e2, st["counters"]
        procs = [run.state.processes[m] for m in members[1:]]
    finally:
        tear_down(run)
    assert not any(netns.exists(run.topo.netns(m)) for m in members)
    assert not any(alive(p) for p in procs)
    assert not run_dir(run.topo.name).exists()
