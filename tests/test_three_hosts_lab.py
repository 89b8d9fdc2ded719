"""`labs/three-hosts.toml` (issue #12 item 6): three machines joined by
VXLAN over an underlay, the map in a 3-member etcd cluster, two
controllers, an agent per machine. Machine h2 (ctl2, ab, bc, bd, its agent)
is killed whole while 24 downloads run and 4 idle connections wait: every
transfer completes, every idle connection carries its next chunk, nothing
is lost, and ctl1 alone publishes the map that etcd keeps. (The control of
the same experiment, anti-affinity off, is `tests/test_hosts_lab.py`'s.)"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from dataplane.lab import faults
from dataplane.lab.session import TOOLS, bring_up, tear_down
from tests.conftest import need_root
from tests.test_etcd_lab import stored
from tests.test_failover import Transfers, why

THREE = Path(__file__).resolve().parents[1] / "labs" / "three-hosts.toml"
IDLE_PORT = 9000


def test_a_whole_host_dies_under_load_on_three_hosts():
    need_root()
    run = bring_up(THREE)
    run.sha = run.http_server({"f": b"t" * (2 << 20)})["f"]
    try:
        server = run.topo.host_ip("server")
        sink = run.tmp / "idle.jsonl"
        run.spawn("server", [sys.executable, str(TOOLS / "sink.py"), "--bind", server,
                             "--port", str(IDLE_PORT), "--out", str(sink)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not run._listening(IDLE_PORT) and time.monotonic() < deadline:
            time.sleep(0.05)
        idle: list[dict] = []
        threads = [threading.Thread(target=lambda k=k: idle.extend(run.tool(
            "client", "chunks", server, "--port", str(IDLE_PORT), "--local-port", str(47100 + k),
            "--pause", "4", "before-", "after"))) for k in range(4)]
        for t in threads:
            t.start()
        tr = Transfers(run, n=24, pace=0.1)
        faults.kill_host(run.topo, run.state, "h2")
        rows = tr.join()
        for t in threads:
            t.join(timeout=60)
        assert run.wait_state(("ab", "bc", "bd"), "dead")
        assert all(tr.ok(r) for r in rows), why(run, rows, tr)
        assert len(idle) == 4 and all(r == {"sent": 2, "error": None} for r in idle), idle
        closed = [json.loads(line) for line in sink.read_text().splitlines() if '"closed"' in line]
        assert sorted(r["bytes"] for r in closed) == [len("before-after")] * 4, closed
        lost = sum(run.ask(i, "status")["counters"].get("flows_lost", 0)
                   for i in ("aa", "ba", "bb", "be"))
        assert lost == 0
        st = run.ask("ctl1", "status")
        assert stored(run)["epoch"] == st["epoch"] and st["counters"].get("failovers", 0) >= 3
    finally:
        tear_down(run)
