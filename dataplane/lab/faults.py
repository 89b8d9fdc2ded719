"""Fault injection on a running lab: kill, hang, partition, impair, restart,
and the operator's planned changes (drain, scale-out).

Processes are signalled by the PID recorded in the state file (checked
against their start time), never found by name.
"""

from __future__ import annotations

import signal
import time

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from dataplane.lab import build
from dataplane.lab.query import QueryError, ask, ask_controller
from dataplane.lab.state import LabState, alive, signal_proc
from dataplane.lab.topology import AGENT_NODE, Topology

FABRIC_IF = "fab0"
NO_NETEM = (2, 95)
"""ENOENT / EOPNOTSUPP: the kernel has no sch_netem (qdisc kind unknown)."""


class FaultError(RuntimeError):
    """The fault cannot be injected; the message says why."""


def _proc(state: LabState, node: str):  # type: ignore[no-untyped-def]
    proc = state.processes.get(node)
    if proc is None:
        raise FaultError(f"{node} runs no forwarder")
    return proc


def kill(state: LabState, node: str) -> float:
    """SIGKILL the node's forwarder; returns the wall-clock time of the kill."""
    proc = _proc(state, node)
    t = time.time()
    if not signal_proc(proc, signal.SIGKILL):
        raise FaultError(f"{node} is not running")
    return t


def stop(state: LabState, node: str) -> float:
    """SIGSTOP: the forwarder hangs (alive to the kernel, silent on the wire;
    its heartbeat process notices the stopped loop and falls silent too)."""
    t = time.time()
    if not signal_proc(_proc(state, node), signal.SIGSTOP):
        raise FaultError(f"{node} is not running")
    return t


def cont(state: LabState, node: str) -> None:
    if not signal_proc(_proc(state, node), signal.SIGCONT):
        raise FaultError(f"{node} is not running")


def _fabric_link(topo: Topology, node: str, up: bool) -> None:
    with IPRoute(netns=topo.netns(node), flags=0) as ip:
        idx = ip.link_lookup(ifname=FABRIC_IF)
        if not idx:
            raise FaultError(f"{node} has no fabric link")
        ip.link("set", index=idx[0], state="up" if up else "down")


def partition(topo: Topology, node: str) -> float:
    """Cut the node off the fabric (its link goes down); it keeps running."""
    t = time.time()
    _fabric_link(topo, node, up=False)
    return t


def heal(topo: Topology, node: str) -> None:
    _fabric_link(topo, node, up=True)


def machine_nodes(topo: Topology, machine: str) -> list[str]:
    """The fabric nodes of a declared machine, its agent first (when
    `[lab] agents` runs one): what a whole machine failing takes with it."""
    if machine not in topo.machines:
        raise FaultError(f"no machine {machine!r} (machines: {', '.join(topo.machines) or 'none declared'})")
    on_fabric = set(topo.forwarders()) | {e.name for e in topo.extra_nodes()}
    agent = [a for a in topo.agents() if a == f"{AGENT_NODE}-{machine}"]
    return agent + [n for n in topo.machines[machine] if n in on_fabric]


def kill_host(topo: Topology, state: LabState, machine: str) -> float:
    """SIGKILL the agent and every forwarder of a machine at once (a machine
    lost: no agent is left to report the exits, so the heartbeats find
    them); returns the wall-clock time of the first kill."""
    procs = [(n, state.processes[n]) for n in machine_nodes(topo, machine) if n in state.processes]
    t = time.time()
    for _n, proc in procs:
        signal_proc(proc, signal.SIGKILL)
    return t


def _host_links(topo: Topology, machine: str, up: bool) -> None:
    """A machine's links to the others: its underlay uplink with `[fabric]
    underlay`, else every fabric link of its nodes."""
    nodes = machine_nodes(topo, machine)
    if topo.underlay is None:
        for n in nodes:
            _fabric_link(topo, n, up)
        return
    with IPRoute(netns=topo.netns(machine), flags=0) as ip:
        ip.link("set", index=ip.link_lookup(ifname="u0")[0], state="up" if up else "down")


def partition_host(topo: Topology, machine: str) -> float:
    """Cut a machine off (its processes keep running)."""
    t = time.time()
    _host_links(topo, machine, up=False)
    return t


def heal_host(topo: Topology, machine: str) -> None:
    _host_links(topo, machine, up=True)


def impair(topo: Topology, node: str, loss: float = 0.0, delay_ms: float = 0.0,
           reorder: float = 0.0) -> str:
    """Loss (%), delay (ms) and reordering (%) on the node's fabric link.

    netem through pyroute2 when the kernel has it; otherwise the forwarder
    impairs its own fabric and sync sends (returns which was used)."""
    clear = not (loss or delay_ms or reorder)
    try:
        with IPRoute(netns=topo.netns(node), flags=0) as ip:
            idx = ip.link_lookup(ifname=FABRIC_IF)[0]
            if clear:
                try:
                    ip.tc("del", "netem", index=idx, handle="1:")
                except NetlinkError:
                    pass
            else:
                ip.tc("replace", "netem", index=idx, handle="1:", delay=int(delay_ms * 1000),
                      loss=loss, prob_reorder=reorder)
                return "netem"
    except NetlinkError as exc:
        if exc.code not in NO_NETEM:
            raise FaultError(f"netem on {node}: {exc}") from None
    try:
        ask(topo.name, node, {"cmd": "impair", "loss": loss / 100, "delay": delay_ms / 1000,
                              "reorder": reorder / 100})
    except QueryError as exc:
        raise FaultError(str(exc)) from None
    return "cleared" if clear else "userspace (this kernel has no sch_netem)"


def restart(topo: Topology, state: LabState, node: str) -> None:
    """Kill the node's forwarder if it runs, start a new one, wait until ready."""
    proc = _proc(state, node)
    if alive(proc):
        signal_proc(proc, signal.SIGKILL)
        deadline = time.monotonic() + 2
        while alive(proc) and time.monotonic() < deadline:
            time.sleep(0.01)
    build.start_node(topo, state, node)
    build.wait_ready(topo, state, [node])


def operator(topo: Topology, node: str, action: str) -> int:
    """`drain` or `scale-out` through the controller; returns the new epoch."""
    try:
        reply = ask_controller(topo.name, topo.controllers, {"cmd": "operator", "node": node, "action": action})
    except QueryError as exc:
        raise FaultError(str(exc)) from None
    if "error" in reply:
        raise FaultError(reply["error"])
    return int(reply["epoch"])
