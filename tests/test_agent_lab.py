"""Machine agents on the lab (`[lab] agents = true`): a forwarder's exit is
reported by its machine's agent through a pidfd the moment it happens, and
the controller declares it dead without waiting for missed heartbeats; a
hang (no exit) is still the heartbeats' to find (the control)."""

from __future__ import annotations

import time

from dataplane.lab import faults
from dataplane.lab.session import DEFAULT, bring_up, tear_down
from tests.conftest import need_root
from tests.test_failover import Transfers, leaders, why, B


def reasons(run, above: int) -> list[str]:
    return [e["reason"] for e in run.ask(run.topo.controller, "status")["events"]
            if e["event"] == "epoch" and e["epoch"] > above]


def test_an_exit_is_reported_by_the_agent_and_a_hang_by_heartbeats():
    need_root()
    run = bring_up(DEFAULT, name="agents", prefix="amz", agents=True)
    run.sha = run.http_server({"f": b"x" * (2 << 20)})["f"]
    try:
        assert run.ask("agent", "status")["watching"].keys() == set(run.topo.forwarders()) - {"ctl"}
        tr = Transfers(run, n=20, pace=0.1)
        victim = max(leaders(run, B).items(), key=lambda kv: kv[1])[0]
        e0 = run.map().epoch
        faults.kill(run.state, victim)
        rows = tr.join()
        assert [r for r in rows if not tr.ok(r)] == [], why(run, rows, tr)
        assert reasons(run, e0) == [f"{victim} exited (agent)"]
        assert [r["node"] for r in run.ask("agent", "status")["reported"]] == [victim]

        faults.restart(run.topo, run.state, victim)      # a new process, watched anew
        deadline = time.monotonic() + 5
        while run.ask("agent", "status")["watching"].get(victim) != run.state.processes[victim].pid:
            assert time.monotonic() < deadline, "the agent does not watch the restarted forwarder"
            time.sleep(0.05)

        hung = next(i for i in B if i != victim and run.map().instance(i).state.value == "active")
        faults.stop(run.state, hung)                      # the control: no exit, nothing to report
        try:
            assert run.wait_state((hung,), "dead")
            assert f"{hung} missed heartbeats" in reasons(run, e0)
            assert [r["node"] for r in run.ask("agent", "status")["reported"]] == [victim]
        finally:
            faults.cont(run.state, hung)
    finally:
        tear_down(run)
