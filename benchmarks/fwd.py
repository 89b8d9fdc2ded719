"""Forwarding rate of one service instance beside Python baselines, one run.

Three namespaces (sender -> DUT -> sink, veth links, offloads off); each DUT
program forwards the same stream of small encapsulated UDP packets (1000
flows) for the same time, and the sink counts what arrives. The first table
gives packets/s and the ratio of the affinity-mesh instance (decap,
firewall, async sync to a secondary in the sink's namespace, encap) to each
baseline. The second runs the instance under each sync policy with traffic
that opens a new flow every 10 packets (so one packet in ten changes state
the secondary must mirror), relative to sync off. The third gives one and
two worker processes of the instance sharing the port with SO_REUSEPORT
(sync off: each worker would need its own sync identity), the sender
spreading the flows over 8 outer source ports. Every mode runs 3 times,
interleaved, and the median counts: run to run, this machine varies by
about 10 %. Needs root.
`python -m benchmarks.fwd [SECONDS]`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyroute2 import netns as pr_netns

from benchmarks.relays import DUT_IN, DUT_OUT, FLOWS, SINK, SRC
from dataplane.core import syncwire as sw
from dataplane.lab import netns
from dataplane.lab.build import link_pair
from tests.conftest import codes_led_by, pair_map

NS = {"src": "amp-src", "dut": "amp-dut", "sink": "amp-sink"}
MODES = ["bare", "bare-mmsg", "instance", "instance-mmsg", "scapy-kept", "scapy-naive"]
POLICIES = ["off", "async", "ordered", "acked"]
RUNS = {**{m: (m, [], [], None) for m in MODES},
        **{f"sync-{p}": ("instance-mmsg", ["--policy", p], ["--new-every", "10"], None) for p in POLICIES},
        **{f"workers-{n}": ("instance-mmsg", ["--policy", "off"], ["--sources", "8"], n) for n in (1, 2)}}
"""run name -> (DUT mode, DUT arguments, sender arguments, SO_REUSEPORT workers or None)."""
ROUNDS = 3
ONLY = os.environ["AMESH_FWD_MODES"].split(",") if os.environ.get("AMESH_FWD_MODES") else list(RUNS)
ROOT = str(Path(__file__).resolve().parents[1])


def _py(ns: str, *args: str, **kw: object) -> subprocess.Popen:
    return netns.spawn(NS[ns], [sys.executable, "-m", *args], env={**os.environ, "PYTHONPATH": ROOT},
                       **kw)  # type: ignore[arg-type]


def run_mode(run: str, seconds: float, codes: str, mapfile: str, epoch: int) -> float:
    mode, dut_args, send_args, workers = RUNS[run]
    sink = _py("sink", "benchmarks.relays", "sink", "--seconds", str(seconds + 2.5),
               stdout=subprocess.PIPE, text=True)
    extra = []
    if mode.startswith("instance"):
        extra.append(_py("sink", "dataplane.shells.syncudp", "--map", mapfile, "--me", "bb",
                         "--listen", f"{SINK}:{sw.SYNC_PORT}", "--peer", f"ba={DUT_OUT}:{sw.SYNC_PORT}",
                         "--key", "bench-sync-key-0123456789", "--idle", "60",
                         "--max-seconds", str(seconds + 3), stdout=subprocess.DEVNULL))
    duts = [_py("dut", "benchmarks.relays", mode, "--seconds", str(seconds + 1.5), "--map", mapfile,
                *dut_args, *(["--worker", str(k)] if workers else []),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k in range(workers or 1)]
    time.sleep(1.0)
    sender = _py("src", "benchmarks.relays", "send", "--seconds", str(seconds), "--codes", codes,
                 "--epoch", str(epoch), *send_args, stdout=subprocess.PIPE, text=True)
    sender.wait(timeout=seconds + 30)
    out, _ = sink.communicate(timeout=seconds + 30)
    for dut in duts:
        _, err = dut.communicate(timeout=30)
        if dut.returncode:
            print(f"  {run} failed: {err.strip()[-600:]}", file=sys.stderr)
    for p in extra:
        p.kill()
        p.wait()
    return json.loads(out.strip().splitlines()[-1])["rate"]


def main(seconds: float = 3.0) -> dict[str, object]:
    m = pair_map()
    codes = ",".join(str(c) for c in codes_led_by(m, "ba", FLOWS))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(m.to_json())
    os.chmod(f.name, 0o644)
    for ns in NS.values():
        pr_netns.create(ns)
    try:
        link_pair(NS["src"], "s0", SRC, NS["dut"], "d0", DUT_IN)
        link_pair(NS["dut"], "d1", DUT_OUT, NS["sink"], "k0", SINK)
        runs: dict[str, list[float]] = {run: [] for run in RUNS}
        for _ in range(ROUNDS):  # interleaved, so a noisy moment hits every mode alike
            for run in RUNS:
                if run in ONLY:
                    runs[run].append(run_mode(run, seconds, codes, f.name, m.epoch))
    finally:
        for ns in NS.values():
            if netns.exists(ns):
                pr_netns.remove(ns)
        os.unlink(f.name)
    rates = {run: statistics.median(v) if v else 0.0 for run, v in runs.items()}
    spread = {run: (f"{min(v) / 1000:.0f}-{max(v) / 1000:.0f}k" if min(v) >= 1000 else f"{min(v):.0f}-{max(v):.0f}")
              if v else "" for run, v in runs.items()}
    inst = max(rates["instance"], rates["instance-mmsg"])
    print(f"\nforwarding rate of one DUT, small UDP packets, {seconds:.0f} s each, same namespaces,"
          f" median of {ROUNDS} interleaved runs (range)")
    print(f"{'forwarder':<40}{'packets/s':>12}{'range':>12}{'best instance / this':>22}")
    labels = {"bare": "bare Python relay (recv/send, no work)",
              "bare-mmsg": "bare Python relay, recvmmsg/sendmmsg",
              "instance": "affinity-mesh instance",
              "instance-mmsg": "affinity-mesh instance, mmsg batches",
              "scapy-kept": "Scapy, kept socket, raw bytes", "scapy-naive": "Scapy sniff + sendp"}
    for mode in MODES:
        r = rates[mode]
        print(f"{labels[mode]:<40}{r:>12,.0f}{spread[mode]:>12}{inst / r if r else float('inf'):>22.2f}")
    off = rates["sync-off"]
    print("\nsync policy, instance with mmsg batches, a new flow every 10 packets")
    print(f"{'policy':<40}{'packets/s':>12}{'range':>12}{'rate / off':>22}")
    for p in POLICIES:
        r = rates[f"sync-{p}"]
        print(f"{p:<40}{r:>12,.0f}{spread[f'sync-{p}']:>12}{r / off if off else 0.0:>22.2f}")
    one = rates["workers-1"]
    print("\nworkers per instance (SO_REUSEPORT, flows on 8 outer source ports, sync off)")
    print(f"{'workers':<40}{'packets/s':>12}{'range':>12}{'rate / one':>22}")
    for n in (1, 2):
        r = rates[f"workers-{n}"]
        print(f"{n:<40}{r:>12,.0f}{spread[f'workers-{n}']:>12}{r / one if one else 0.0:>22.2f}")
    return {**rates, "runs": runs}


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0)
