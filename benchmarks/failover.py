"""Failover gap over repeated kills of a primary under load (needs root).

Each round: a paced download plus a few concurrent connections run through
the lab, the download's B primary is SIGKILLed, the gap is measured from the
kill to the first packet served by the promoted instance (its `took_over`
event), every transfer is checked by sha256, and the killed instance is
restarted and waited for until it is ACTIVE again (it rejoins, syncs, leads).
Prints p50 / p99 / max of the gap, the flows lost, and the false alarms
(live instances the controller declared dead: the price of fast timers).
Rounds alternate on one lab with `[lab] agents`: the agent reporting the
exit through a pidfd; the agent stopped (SIGSTOP), so the kill is found
by missed heartbeats only, as without agents; and a hang: the primary is
SIGSTOPped instead of killed (its heartbeat child goes on until the loop
has been still for the forwarder's HANG_AFTER, then falls silent), and
SIGCONTed after the round: it finds itself declared dead and rejoins.
`python -m benchmarks.failover [ROUNDS]`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time

from dataplane.lab import faults
from dataplane.lab.session import DEFAULT, LabRun, bring_up, tear_down

PORT = 46500
MODES = ("agents", "heartbeats", "hang")
AGENT = "agent"


def one_round(run: LabRun, sha: dict[str, str], i: int,
              hang: bool = False) -> tuple[float | None, float | None, int, int, int]:
    topo = run.topo
    start = time.time()
    port = PORT + i
    curl = run.spawn("client", ["curl", "-s", "--limit-rate", "2M", "--max-time", "30", "--local-port",
                                str(port), "-o", str(run.tmp / "dl"), run.url("big")],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list = []
    t = threading.Thread(target=lambda: rows.extend(run.tool(
        "client", "fetch", run.url("small"), "-n", "10", "--pace", "0.1", "--timeout", "5")))
    t.start()
    time.sleep(0.8)
    code = topo.stream_code(port, 8080)
    victim = run.map().primary("B", code)
    t_kill = faults.stop(run.state, victim) if hang else faults.kill(run.state, victim)
    curl.wait(timeout=60)
    t.join(timeout=60)
    bad = (curl.returncode != 0) + sum(1 for r in rows if r["error"] or r["sha256"] != sha["small"])
    gap = run.failover_gap(victim, t_kill)
    lost = sum(run.ask(inst, "status")["counters"].get("flows_lost", 0)
               for inst in topo.services["B"].members if inst != victim)
    events = run.ask(topo.controller, "status")["events"]
    false = sum(1 for e in events if e["event"] == "declared_dead" and e["peer"] != victim and e["time"] >= start)
    detect = next(((e["time"] - t_kill) * 1000 for e in events
                   if e["event"] == "declared_dead" and e["peer"] == victim and e["time"] >= t_kill), None)
    if hang:
        faults.cont(run.state, victim)
    else:
        faults.restart(topo, run.state, victim)
    run.wait_state((victim,), "active", timeout=15)
    return gap, detect, bad, lost, false


def main(rounds: int = 20) -> dict[str, dict[str, float]]:
    run = bring_up(DEFAULT, name="bench-fo", prefix="amg", agents=True)
    tally = {mode: {"gaps": [], "detect": [], "broken": 0, "lost": 0, "false": 0} for mode in MODES}
    try:
        sha = run.http_server({"big": os.urandom(3 << 20), "small": os.urandom(512 << 10)})
        for i in range(rounds):
            for mode in MODES:
                if mode == "heartbeats":   # the agent stopped: it reports nothing
                    faults.stop(run.state, AGENT)
                try:
                    gap, detect, bad, lost, false = one_round(run, sha, len(MODES) * i + MODES.index(mode),
                                                              hang=mode == "hang")
                finally:
                    if mode == "heartbeats":
                        faults.cont(run.state, AGENT)
                t = tally[mode]
                t["broken"] += bad
                t["false"] += false
                t["lost"] = lost
                if gap is not None:
                    t["gaps"].append(gap)
                if detect is not None:
                    t["detect"].append(detect)
                print(f"  round {i + 1:2} {mode:<10}: declared dead {_ms(detect)} ms after the kill/stop, "
                      f"gap {_ms(gap)} ms, broken {bad}", flush=True)
    finally:
        tear_down(run)
    results: dict[str, dict[str, float]] = {}
    for mode, t in tally.items():
        gaps, detect = _pct(t["gaps"]), _pct(t["detect"])
        results[mode] = {
            "rounds": rounds, "measured": len(t["gaps"]), "p50_ms": gaps[0], "p99_ms": gaps[1],
            "max_ms": gaps[2], "detect_p50_ms": detect[0], "detect_p99_ms": detect[1],
            "broken_transfers": t["broken"], "flows_lost": t["lost"], "false_alarms": t["false"]}
        print(f"\n{mode}, {rounds} kills: declared dead p50 {detect[0]:.1f} / p99 {detect[1]:.1f} ms after the "
              f"kill; failover gap ({len(t['gaps'])} measured) p50 {gaps[0]:.1f} ms, p99 {gaps[1]:.1f} ms, "
              f"max {gaps[2]:.1f} ms; broken transfers {t['broken']}, flows lost {t['lost']}; "
              f"live instances declared dead {t['false']}")
    return results


def _pct(values: list[float]) -> tuple[float, float, float]:
    """p50, p99, max (nan when empty)."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    v = sorted(values)
    return statistics.median(v), v[min(len(v) - 1, int(round(0.99 * (len(v) - 1))))], v[-1]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
