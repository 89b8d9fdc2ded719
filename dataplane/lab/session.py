"""A lab session: a lab that is up, driven from Python.

`LabRun` runs programs inside nodes, starts servers (stopped by PID when
the session closes), asks forwarders, reads the map. The demo, the
benchmarks and the pytest plugin (dataplane/testing/plugin.py) are built on it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dataplane.lab import build, netns
from dataplane.lab.query import ask
from dataplane.lab.state import LabState, alive
from dataplane.lab.topology import DEFAULT_LAB, Topology, load

TOOLS = Path(__file__).resolve().parent / "tools"
DEFAULT = DEFAULT_LAB


class LabRun:
    """A lab that is up, and the processes a test started in it."""

    def __init__(self, topo: Topology, state: LabState) -> None:
        self.topo, self.state = topo, state
        self.procs: list[subprocess.Popen] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="amesh-lab-"))
        self.tmp.chmod(0o755)

    @property
    def name(self) -> str:
        return self.topo.name

    def run(self, node: str, argv: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
        return netns.run(self.topo.netns(node), argv, capture_output=True, text=True,
                         timeout=timeout, **kw)

    def spawn(self, node: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        p = netns.spawn(self.topo.netns(node), argv, **kw)
        self.procs.append(p)
        return p

    def tool(self, node: str, name: str, *args: str, timeout: float = 120) -> list[dict[str, Any]]:
        """Run dataplane/lab/tools/NAME.py inside `node`; its JSON lines."""
        res = self.run(node, [sys.executable, str(TOOLS / f"{name}.py"), *args], timeout=timeout)
        assert res.returncode == 0, res.stderr
        return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]

    def http_server(self, files: dict[str, bytes], port: int = 8080, family: int = 4) -> dict[str, str]:
        """Serve `files` from the server host on its IPv4 or (`family` 6)
        IPv6 address; returns name -> sha256."""
        www = self.tmp / "www"
        www.mkdir(exist_ok=True)
        for fname, data in files.items():
            (www / fname).write_bytes(data)
        self.spawn("server", [sys.executable, str(TOOLS / "serve.py"), "--port", str(port),
                              "--bind", self.topo.host_ip("server", family), "--directory", str(www)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._listening(port, family) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {f: hashlib.sha256(d).hexdigest() for f, d in files.items()}

    def _listening(self, port: int, family: int = 4) -> bool:
        tcp = self.run("server", ["cat", "/proc/net/tcp6" if family == 6 else "/proc/net/tcp"]).stdout
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
                   for line in tcp.splitlines()[1:])

    def url(self, fname: str, port: int = 8080, family: int = 4) -> str:
        ip = self.topo.host_ip("server", family)
        return f"http://{f'[{ip}]' if family == 6 else ip}:{port}/{fname}"

    def ask(self, node: str, cmd: str, **kw: Any) -> dict[str, Any]:
        return ask(self.name, node, {"cmd": cmd, **kw})

    def flows(self, node: str) -> list[dict[str, Any]]:
        return self.ask(node, "flows")["flows"]

    def map(self) -> Any:
        from dataplane.core.servicemap import ServiceMap

        from dataplane.lab.query import ask_controller

        return ServiceMap.from_dict(ask_controller(self.name, self.topo.controllers, {"cmd": "map"})["map"])

    def wait_epoch(self, above: int, timeout: float = 3.0) -> int:
        """Wait until the controller publishes an epoch above `above`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            epoch = self.map().epoch
            if epoch > above:
                return epoch
            time.sleep(0.02)
        raise TimeoutError(f"no map epoch above {above} within {timeout} s")

    def wait_in_sync(self, node: str, timeout: float = 5.0) -> bool:
        """Wait until `node` holds nothing its live sync peers lack: every
        channel to an instance alive in the map is in sync (bulks done,
        nothing unacked for long). A test that kills a second instance
        right after a first failure waits for this, not for a fixed time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m, st = self.map(), self.ask(node, "status")
            peers = st.get("sync", {}).get("peers", {})
            if st["epoch"] >= m.epoch and all(p["in_sync"] for name, p in peers.items() if m.is_alive(name)):
                return True
            time.sleep(0.05)
        return False

    def wait_state(self, nodes: tuple[str, ...], state: str, timeout: float = 5.0) -> bool:
        """Wait until every instance in `nodes` has `state` in the map."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.map()
            if all(m.instance(n).state.value == state for n in nodes):
                return True
            time.sleep(0.05)
        return False

    def failover_gap(self, victim: str, t_kill: float) -> float | None:
        """Milliseconds from the kill of `victim` to the first packet served by
        a promoted instance of its service (the first `took_over` event), or
        None when none was served."""
        service = self.topo.service_of(victim)
        assert service is not None
        firsts = [e["time"] for inst in service.members if inst != victim
                  for e in self.ask(inst, "status")["events"]
                  if e["event"] == "took_over" and e["time"] >= t_kill]
        return round((min(firsts) - t_kill) * 1000, 1) if firsts else None

    def prometheus(self, expr: str) -> list[dict[str, Any]]:
        """An instant PromQL query to the lab's Prometheus (`[observability]
        prometheus = true`), through its HTTP API from inside its namespace."""
        from dataplane.lab.extras import prometheus_url
        from dataplane.lab.topology import PROMETHEUS_NODE

        res = self.run(PROMETHEUS_NODE, ["curl", "-sf", "-m", "2", "--get", "--data-urlencode",
                                         f"query={expr}", prometheus_url(self.topo) + "/api/v1/query"])
        if res.returncode != 0:
            raise RuntimeError(f"Prometheus query {expr!r} failed: curl exit {res.returncode}")
        doc = json.loads(res.stdout)
        if doc.get("status") != "success":
            raise RuntimeError(f"Prometheus query {expr!r}: {doc.get('error')}")
        return doc["data"]["result"]

    def stop_procs(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    def close(self) -> None:
        self.stop_procs()
        shutil.rmtree(self.tmp, ignore_errors=True)


def bring_up(path: Path | str = DEFAULT, progress: build.Progress = lambda msg: None,
             **overrides: Any) -> LabRun:
    """Up a lab from `path`, optionally with [lab] keys replaced (name,
    prefix, policy, ...)."""
    topo = variant(path, overrides) if overrides else load(path)
    state = build.up(topo, progress)
    return LabRun(topo, state)


def variant(path: Path | str, overrides: dict[str, Any]) -> Topology:
    """A copy of a topology file with some keys replaced: `name` for a key
    of [lab], `section.name` for a key of another section (the key must be
    in the file)."""
    text = Path(path).read_text()
    lines = []
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip()[1:-1]
        key = line.split("=")[0].strip()
        full = key if section == "lab" else f"{section}.{key}"
        if full in overrides and "=" in line:
            line = f"{key} = {json.dumps(overrides[full])}"
        lines.append(line)
    out = Path(tempfile.mkdtemp(prefix="amesh-topo-")) / Path(path).name
    out.write_text("\n".join(lines) + "\n")
    return load(out)


def tear_down(run: LabRun, progress: build.Progress = lambda msg: None) -> None:
    """Stop the session's processes and remove the lab; raise if anything
    of it is left."""
    run.close()
    state = LabState.load(run.name)
    if state is not None:
        build.down(state, progress)
    leftovers = [ns for ns in run.state.namespaces if netns.exists(ns)]
    procs = [n for n, p in run.state.processes.items() if alive(p)]
    if leftovers or procs:
        raise build.LabError(f"left behind: namespaces {leftovers}, processes {procs}")
