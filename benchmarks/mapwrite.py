"""Map write to install on every forwarder, through etcd (needs root).

Each round SIGKILLs a B instance and restarts it: its death, its rejoin and
its activation each publish a map. On the etcd lab (two controllers, `ctl1`
and `ctl2`, over the lab's 3-member cluster) a map is published once its
compare-and-swap won; on the baseline, the default lab (one controller, the
map file), once the file is written. For every epoch of the rounds the
delay runs from the controller's `epoch` event to each forwarder's `map`
event (stamped once the map is installed), the victim left out (restarted,
it takes the maps it missed when it starts). Prints p50 / p99 over all
(epoch, forwarder) pairs and of the slowest forwarder of each epoch, for
both labs, and the ratios. `python -m benchmarks.mapwrite [ROUNDS]`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dataplane.lab import faults
from dataplane.lab.query import QueryError
from dataplane.lab.session import DEFAULT, LabRun, bring_up, tear_down

VICTIM = "bb"


def _etcd_lab() -> Path:
    text = DEFAULT.read_text().replace('name = "ctl"', 'name = "ctl1"\npeers = ["ctl2"]', 1) \
        .replace('store = "embedded"', 'store = "etcd"', 1)
    path = Path(tempfile.mkdtemp(prefix="amesh-bench-")) / "etcd.toml"
    path.write_text(text)
    return path


def _events(run: LabRun, seen: dict[tuple[str, str, float], dict[str, Any]]) -> None:
    """Every node's recent events, kept across rounds (a node keeps 50)."""
    for node in run.topo.forwarders():
        try:
            events = run.ask(node, "status")["events"]
        except QueryError:                 # the killed instance
            continue
        for e in events:
            seen[(node, e["event"], e["time"])] = e


def _delays(run: LabRun, seen: dict[tuple[str, str, float], dict[str, Any]],
            after: float) -> tuple[list[float], list[float]]:
    """(every forwarder's delay, the slowest forwarder's per epoch), in ms."""
    published: dict[int, float] = {}
    installed: dict[int, dict[str, float]] = {}
    for (node, kind, t), e in seen.items():
        if t < after:
            continue
        if kind == "epoch" and node in run.topo.controllers:
            published[e["epoch"]] = min(t, published.get(e["epoch"], t))
        elif kind == "map" and node != VICTIM:   # a restarted victim takes, late, what it missed
            installed.setdefault(e["epoch"], {})[node] = t
    every, slowest = [], []
    for epoch, t0 in published.items():
        got = [(t - t0) * 1000 for t in installed.get(epoch, {}).values()]
        if got:
            every += got
            slowest.append(max(got))
    return every, slowest


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else float("nan")


def measure(path: Path, name: str, prefix: str, rounds: int) -> dict[str, Any]:
    run = bring_up(path, name=name, prefix=prefix)
    try:
        time.sleep(1.0)
        start = time.time()
        seen: dict[tuple[str, str, float], dict[str, Any]] = {}
        for _ in range(rounds):
            faults.kill(run.state, VICTIM)
            run.wait_state((VICTIM,), "dead", timeout=10)
            _events(run, seen)
            faults.restart(run.topo, run.state, VICTIM)
            run.wait_state((VICTIM,), "active", timeout=15)
            time.sleep(0.3)
            _events(run, seen)
        every, slowest = _delays(run, seen, start)
    finally:
        tear_down(run)
    return {"epochs": len(slowest), "installs": len(every),
            "every_p50_ms": round(statistics.median(every), 2) if every else None,
            "every_p99_ms": _pct(every, 0.99),
            "slowest_p50_ms": round(statistics.median(slowest), 2) if slowest else None,
            "slowest_p99_ms": _pct(slowest, 0.99)}


def main(rounds: int = 10) -> dict[str, Any]:
    base = measure(DEFAULT, "mapfile", "amb", rounds)
    etcd = measure(_etcd_lab(), "mapetcd", "amh", rounds)
    out = {"embedded_one_controller": base, "etcd_two_controllers": etcd}
    print(f"\nmap published -> installed, {rounds} kill/restart rounds of {VICTIM} (ms)")
    print(f"{'':28}{'epochs':>7}{'p50 every':>11}{'p99 every':>11}{'p50 slowest':>13}{'p99 slowest':>13}")
    for label, r in (("embedded, 1 controller", base), ("etcd, 2 controllers", etcd)):
        print(f"{label:28}{r['epochs']:>7}{r['every_p50_ms']:>11}{r['every_p99_ms']:>11}"
              f"{r['slowest_p50_ms']:>13}{r['slowest_p99_ms']:>13}")
    if base["slowest_p50_ms"] and etcd["slowest_p50_ms"]:
        out["ratio_slowest_p50"] = round(etcd["slowest_p50_ms"] / base["slowest_p50_ms"], 2)
        print(f"etcd / embedded, slowest forwarder p50: {out['ratio_slowest_p50']}")
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
