"""Throughput over time around a failover, as a PNG (needs root, matplotlib).

iperf3 runs client -> server through the lab for 8 s with 100 ms intervals;
at 3 s the B primary of its data connection is SIGKILLed. The plot shows the
goodput per interval with the kill and the new map epoch marked.
`python -m benchmarks.plot` writes benchmarks/out/failover.png.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from dataplane.lab import faults
from dataplane.lab.session import DEFAULT, bring_up, tear_down

OUT = Path(__file__).parent / "out"
CPORT = 47777


def main() -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = bring_up(DEFAULT, name="bench-plot", prefix="amq")
    try:
        topo = run.topo
        server = str(topo.hosts["server"].address.ip)
        run.spawn("server", ["iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        client = run.spawn("client", ["iperf3", "-c", server, "-t", "8", "-i", "0.1", "-J",
                                      "--cport", str(CPORT)], stdout=subprocess.PIPE, text=True)
        t0 = time.time()
        time.sleep(3.0)
        code = topo.stream_code(CPORT, 5201)
        victim = run.map().primary("B", code)
        t_kill = faults.kill(run.state, victim) - t0
        out, _ = client.communicate(timeout=60)
        epochs = [e["time"] - t0 for e in run.ask(topo.controller, "status")["events"]
                  if e["event"] == "epoch"]
    finally:
        tear_down(run)
    doc = json.loads(out)
    xs = [iv["sum"]["end"] for iv in doc["intervals"]]
    ys = [iv["sum"]["bits_per_second"] / 1e6 for iv in doc["intervals"]]
    OUT.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(xs, ys, drawstyle="steps-post", label="TCP goodput (iperf3, 100 ms intervals)")
    ax.axvline(t_kill, color="red", linestyle="--", label=f"kill {victim} (B primary)")
    for i, e in enumerate(epochs):
        ax.axvline(e, color="green", linestyle=":", label="new map epoch" if i == 0 else None)
    ax.set_xlabel("seconds")
    ax.set_ylabel("Mbit/s")
    ax.set_ylim(bottom=0)
    ax.set_title("affinity-mesh: goodput through the chain around a failover")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = OUT / "failover.png"
    fig.savefig(path, dpi=110)
    print(f"\nwritten {path}")
    return path


if __name__ == "__main__":
    main()
