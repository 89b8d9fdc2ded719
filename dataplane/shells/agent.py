"""`amesh agent`: one per machine; reports its forwarders' exits at once.

Heartbeats find a crashed forwarder only after `misses` intervals of
silence (100 ms with the lab's 10 ms x 10), and its heartbeat process may
outlive it while the kernel tears the process down. The agent learns of
the exit the moment it happens: it holds a pidfd (pidfd_open(2)) of every
forwarder on its machine, and a pidfd becomes readable when its process
exits. It then sends the controller a signed `EXITED` notice over the
control channel (UDP on the fabric, like every other control message, so
agents on other machines work the same way), and the controller declares
the node dead without waiting. Hangs (a SIGSTOPped forwarder) and lost
machines are still the heartbeats' to find.

The agent is a control-channel client of its own (`ControlClient`, its own
pair key with the controller): its heartbeats make it known, the
controller's pushes bind its notices to the controller's incarnation, so a
recorded notice replayed to a restarted controller is refused. A notice is
sent again with the next two ticks (a lost datagram), and held while no
controller has been heard. The controller takes notices from an agent only
for the nodes of its machine (`Topology.agents`).

On the single-machine lab the agent finds the processes in the lab's state
file (re-read when it changes: a restarted forwarder has a new PID), with
their kernel start times, so a recycled PID is never watched. It answers
`status` on ``<run dir>/<agent>.sock`` like a forwarder. It runs at
real-time priority, as the heartbeat processes do.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dataplane.core import syncwire as sw
from dataplane.core.control import ControlClient, ControlSend
from dataplane.lab.state import LabState, start_time
from dataplane.lab.topology import Topology, load
from dataplane.shells.forwarder import realtime

RESENDS = 2
"""Ticks that send a notice again after the first."""


class Agent:
    def __init__(self, topo: Topology, name: str, run_dir: Path) -> None:
        agents = topo.agents()
        if name not in agents:
            raise ValueError(f"{name!r} is not an agent of lab {topo.name} (agents: {', '.join(agents) or 'none'})")
        self.topo, self.name, self.run_dir = topo, name, run_dir
        self.nodes = agents[name]
        self.client = ControlClient(name, topo.controller, topo.build_map(), topo.control_keyring(name),
                                    time.time_ns() // 1000, topo.timers.heartbeat,
                                    others={c: topo.control_keyring(name, c) for c in topo.peers})
        self.ctl = {c: (topo.fabric_ip(c), sw.CONTROL_PORT) for c in topo.controllers}
        """Every controller's control address (each gets the notices)."""
        self.sel = selectors.DefaultSelector()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ip = next(e.address for e in topo.extra_nodes() if e.name == name)
        self.sock.bind((ip, sw.CONTROL_PORT))
        self.sock.setblocking(False)
        self.sel.register(self.sock, selectors.EVENT_READ, self._on_control)
        self.query = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = run_dir / f"{name}.sock"
        path.unlink(missing_ok=True)
        self.query.bind(str(path))
        self.query.listen(4)
        self.query.setblocking(False)
        self.sel.register(self.query, selectors.EVENT_READ, self._on_query)
        self.watched: dict[str, tuple[int, int]] = {}
        """Node -> (pid, pidfd) of the process watched."""
        self.pending: dict[str, int] = {}
        """Node -> sends left of its exit notice."""
        self.reported: list[dict[str, Any]] = []
        self.counters: Counter[str] = Counter()
        self._state_mtime = 0.0
        self.running = True

    # -- the processes ------------------------------------------------------------------

    def refresh(self) -> None:
        """Watch the processes the state file records for this machine's
        nodes, when it changed since last read."""
        path = self.run_dir / "state.json"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._state_mtime:
            return
        self._state_mtime = mtime
        state = LabState.load(self.topo.name)
        if state is None:
            return
        for node in self.nodes:
            proc = state.processes.get(node)
            if proc is None or self.watched.get(node, (0, 0))[0] == proc.pid:
                continue
            self._unwatch(node)
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                continue    # gone before we looked: the heartbeats' to find
            if start_time(proc.pid) != proc.start:   # the PID was recycled: not our process
                os.close(fd)
                continue
            self.watched[node] = (proc.pid, fd)
            self.sel.register(fd, selectors.EVENT_READ, lambda _f, node=node: self._exited(node))

    def _unwatch(self, node: str) -> None:
        got = self.watched.pop(node, None)
        if got is not None:
            self.sel.unregister(got[1])
            os.close(got[1])

    def _exited(self, node: str) -> None:
        pid = self.watched[node][0]
        self._unwatch(node)
        self.counters["exits"] += 1
        self.reported.append({"node": node, "pid": pid, "time": time.time()})
        del self.reported[:-50]
        self.pending[node] = 1 + RESENDS
        self._send_notices()

    def _send_notices(self) -> None:
        for node in list(self.pending):
            sends = self.client.exited(node)
            if not sends:
                continue    # no controller heard yet: held
            for s in sends:
                self._send(s)
            self.counters["notices_sent"] += 1
            self.pending[node] -= 1
            if not self.pending[node]:
                del self.pending[node]

    # -- the control channel ----------------------------------------------------------

    def _send(self, send: ControlSend) -> None:
        try:
            self.sock.sendto(send.data, self.ctl[send.to])
        except OSError:
            self.counters["send_error"] += 1

    def _on_control(self, _sock: socket.socket) -> None:
        while True:
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            self.client.receive(data)   # the pushes: they make the controller's incarnation known

    def _on_query(self, _sock: socket.socket) -> None:
        try:
            conn, _ = self.query.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                req = json.loads(conn.makefile("r").readline() or "{}")
                reply = self.status() if isinstance(req, dict) and req.get("cmd") == "status" \
                    else {"error": "an agent answers only status"}
            except (OSError, ValueError) as exc:
                reply = {"error": str(exc)}
            try:
                conn.sendall((json.dumps(reply) + "\n").encode())
            except OSError:
                pass

    def status(self) -> dict[str, Any]:
        heard = any(c in e.incarnations for c, e in self.client.endpoints.items())
        return {"node": self.name, "role": "agent", "pid": os.getpid(), "ready": heard,
                "not_ready": [] if heard else ["controller not heard yet"], "epoch": self.client.epoch,
                "watching": {n: pid for n, (pid, _) in self.watched.items()},
                "reported": self.reported, "counters": dict(self.counters),
                "rejected": dict(self.client.endpoint.rejected)}

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        while self.running:
            now = time.monotonic()
            self.refresh()
            sends = self.client.tick(now)
            for s in sends:
                self._send(s)
            if sends:
                self._send_notices()   # once a tick: the resends, and what was held
            for key, _ in self.sel.select(timeout=self.client.interval / 2):
                key.data(key.fileobj)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="amesh agent", description="report a machine's forwarder exits at once")
    ap.add_argument("--topology", required=True)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--run-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    agent = Agent(load(args.topology), args.agent, args.run_dir)
    realtime()   # like the heartbeats: a notice that waits for a busy core is late

    def stop(_sig: int, _frame: object) -> None:
        agent.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
