"""The failover demo: kill a primary mid-transfer, every connection survives.

One run: bring a lab up (a copy of the default lab named "demo", so a lab
the user has up is left alone), serve files from the server host, start a
long rate-limited download (curl) and a few dozen paced concurrent
connections from the client, find the download's B primary and secondary
in the controller's map, SIGKILL the primary, and collect the timeline:
kill, last heartbeat heard, declaration, new epoch, first packet served by
the promoted secondary. Every transfer is checked by sha256. The control
run does the same with state sync off.

With `host` (a lab file with `[machines]`, e.g. labs/three-hosts.toml) the
whole machine of the download's B primary is killed instead (its agent,
its instances, a controller on it), and the control turns anti-affinity
off: the flows whose primary and secondary shared the machine break.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dataplane.lab import faults
from dataplane.lab.query import ask_controller
from dataplane.lab.session import DEFAULT, LabRun, bring_up, tear_down

DOWNLOAD_PORT = 46000


@dataclass
class DemoResult:
    policy: str
    killed: str = ""
    """What was killed: the primary, or a machine and its nodes."""
    anti_affinity: bool = True
    primary: str = ""
    secondary: str = ""
    download_ok: bool = False
    download_error: str = ""
    connections: int = 0
    connections_ok: int = 0
    broken_ports: list[int] = field(default_factory=list)
    timeline_ms: dict[str, float] = field(default_factory=dict)
    flows_lost: int = 0
    misdelivery: int = 0
    promoted: int = 0

    @property
    def survived(self) -> bool:
        return self.download_ok and self.connections_ok == self.connections

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "survived": self.survived}


def failover_run(policy: str, connections: int = 30, size_mb: int = 24,
                 progress: Any = print, prefix: str = "amo", path: Path = DEFAULT,
                 host: bool = False, anti_affinity: bool = True) -> DemoResult:
    res = DemoResult(policy, anti_affinity=anti_affinity)
    progress(f"bringing the lab up (policy {policy}"
             + (f", anti-affinity {'on' if anti_affinity else 'off'})" if host else ")"))
    over: dict[str, Any] = {"anti_affinity": anti_affinity} if host else {}
    run = bring_up(path, lambda m: progress(f"  {m}"), name=f"demo-{prefix}", prefix=prefix,
                   policy=policy, **over)
    try:
        _transfers_with_a_kill(run, res, connections, size_mb, progress, host)
    finally:
        progress("tearing the lab down")
        tear_down(run)
    return res


def _transfers_with_a_kill(run: LabRun, res: DemoResult, connections: int, size_mb: int,
                           progress: Any, host: bool = False) -> None:
    big, small = os.urandom(size_mb << 20), os.urandom(1 << 20)
    sha = run.http_server({"big": big, "small": small})
    rate = max(1, size_mb // 6)
    out = run.tmp / "big.out"
    progress(f"download of {size_mb} MB at {rate} MB/s and {connections} concurrent connections start")
    curl = run.spawn("client", ["curl", "-s", "--limit-rate", f"{rate}M", "--max-time", "40",
                                "--local-port", str(DOWNLOAD_PORT), "-o", str(out), run.url("big")],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rows: list[dict[str, Any]] = []
    fetcher = threading.Thread(target=lambda: rows.extend(run.tool(
        "client", "fetch", run.url("small"), "-n", str(connections), "--pace", "0.25",
        "--timeout", "6", timeout=120)))
    fetcher.start()
    time.sleep(1.5)
    topo = run.topo
    code = topo.stream_code(DOWNLOAD_PORT, 8080)
    m = run.map()
    res.primary, res.secondary = m.primary("B", code) or "", m.secondary("B", code) or ""
    progress(f"the download (code 0x{code:08x}) is led by {res.primary}, mirrored to {res.secondary}")
    gone = {res.primary}
    if host:
        machine = topo.machine_of(res.primary)
        gone = set(faults.machine_nodes(topo, machine))
        t_kill = faults.kill_host(topo, run.state, machine)
        res.killed = f"machine {machine}: {', '.join(sorted(gone))}"
    else:
        t_kill = faults.kill(run.state, res.primary)
        res.killed = res.primary
    progress(f"killed {res.killed} (SIGKILL)")
    curl.wait(timeout=60)
    fetcher.join(timeout=120)
    res.download_ok = curl.returncode == 0 and out.exists() and \
        _sha(out.read_bytes()) == sha["big"]
    if not res.download_ok:
        res.download_error = f"curl exit {curl.returncode}"
    res.connections = connections
    res.connections_ok = sum(1 for r in rows if r["error"] is None and r["sha256"] == sha["small"])
    res.broken_ports = sorted(r["port"] or 0 for r in rows if r["error"] or r["sha256"] != sha["small"])
    res.timeline_ms = _timeline(run, res.primary, res.secondary, t_kill)
    for inst in topo.services["B"].members:
        if inst in gone:
            continue
        st = run.ask(inst, "status")
        res.flows_lost += st["counters"].get("flows_lost", 0)
        res.misdelivery += st["drops"].get("misdelivery", 0)
        res.promoted += st["counters"].get("promoted", 0)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _timeline(run: LabRun, dead: str, promoted: str, t_kill: float) -> dict[str, float]:
    ctl = ask_controller(run.name, run.topo.controllers, {"cmd": "status"})["events"]
    sec = run.ask(promoted, "status")["events"]
    out: dict[str, float] = {"kill": 0.0}
    decl = next((e for e in ctl if e["event"] == "declared_dead" and e.get("peer") == dead
                 and e["time"] >= t_kill), None)
    if decl:
        out["last_heartbeat"] = round((decl["last_heard"] - t_kill) * 1000, 1)
        out["declared_dead"] = round((decl["time"] - t_kill) * 1000, 1)
    epoch = next((e for e in ctl if e["event"] == "epoch" and e["time"] >= t_kill
                  and e.get("reason", "").startswith(f"{dead} ")), None)   # its death's map
    if epoch:
        out["new_epoch"] = round((epoch["time"] - t_kill) * 1000, 1)
        out["epoch"] = epoch["epoch"]
    got = next((e for e in sec if e["event"] == "map" and e["time"] >= t_kill), None)
    if got:
        out["map_read_at_promoted"] = round((got["time"] - t_kill) * 1000 - got.get("install_ms", 0), 1)
        out["map_at_promoted"] = round((got["time"] - t_kill) * 1000, 1)
    took = next((e for e in sec if e["event"] == "took_over" and e["time"] >= t_kill), None)
    if took:
        out["first_packet_at_promoted"] = round((took["time"] - t_kill) * 1000, 1)
    return out
