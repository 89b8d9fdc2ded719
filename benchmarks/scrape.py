"""Does a Prometheus scrape disturb forwarding? TCP goodput through the
chain with the busiest instance scraped every second (and, to bound it,
ten times a second) against no scrape, one lab, interleaved runs.

The lab is the default one; iperf3 pushes one TCP connection from client
to server; a scraper in the controller's namespace (the fabric) fetches
`/metrics` of the B instance that carries the connection (the busiest) at
the given rate for the run. Also reported: the time the forwarder spent
producing one scrape (it counts it, `status.metrics`). Needs root.
`python -m benchmarks.scrape [ROUNDS]`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from benchmarks.lab import iperf
from dataplane.lab.session import DEFAULT, bring_up, tear_down

SECONDS = 5
RATES = (0.0, 1.0, 10.0)
"""Scrapes per second."""


def scraper(run, node: str, rate: float) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    url = f"http://{run.topo.fabric_ip(node)}:{run.topo.observability.metrics_port}/metrics"
    code = (f"import time, urllib.request\nend = time.monotonic() + {SECONDS + 1}\n"
            f"while time.monotonic() < end:\n    urllib.request.urlopen({url!r}, timeout=2).read()\n"
            f"    time.sleep({1 / rate})\n")
    return run.spawn(run.topo.controller, [sys.executable, "-c", code])


def main(rounds: int = 3) -> dict[str, object]:
    run = bring_up(DEFAULT, name="bench-scrape", prefix="ams")
    try:
        run.spawn("server", ["iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        iperf(run, 1)                                       # the connection's flows, pinned
        busiest = max(("ba", "bb", "bc"), key=lambda n: run.ask(n, "status")["io"]["fabric_rx"][0])
        goodput: dict[float, list[float]] = {r: [] for r in RATES}
        for _ in range(rounds):
            for rate in RATES:
                p = scraper(run, busiest, rate) if rate else None
                goodput[rate].append(iperf(run))
                if p is not None:
                    p.wait(timeout=30)
        m = run.ask(busiest, "status")["metrics"]
        per_scrape = m["scrape_seconds"] / max(1, m["scrapes"])
        flows = run.ask(busiest, "status")["flow_table"]["flows"]
    finally:
        tear_down(run)
    base = statistics.median(goodput[0.0])
    print(f"\nTCP goodput through the chain, {SECONDS} s iperf3, {rounds} interleaved runs; "
          f"{busiest} (the connection's B instance) scraped")
    for rate in RATES:
        med = statistics.median(goodput[rate])
        print(f"  {'no scrape' if not rate else f'{rate:g} scrape/s':<14}{med / 1e6:8.0f} Mbit/s  "
              f"({min(goodput[rate]) / 1e6:.0f}-{max(goodput[rate]) / 1e6:.0f})  {med / base:.3f} of no scrape")
    print(f"  one scrape costs the forwarder {per_scrape * 1000:.2f} ms ({m['scrapes']} scrapes, {flows} flows)")
    return {"goodput_bps": {str(r): v for r, v in goodput.items()}, "scrape_ms": per_scrape * 1000}


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
