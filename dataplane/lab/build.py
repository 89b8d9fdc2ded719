"""Bring a lab up and down with pyroute2: namespaces, veths, bridges, processes.

Layout of a lab (prefix ``am``)::

    am-client  eth0 ──── h-client ┐                      ┌ h-server ──── eth0  am-server
                           am-ingress: hbr0 (gateway)     am-egress: hbr0 (gateway)
                           fab0 ┐                              ┌ fab0
    am-fabric:  br0 ── p-ingress, p-egress, p-ctl, p-aa, p-ab, p-ba, p-bb, p-bc
                             └ fab0 in am-ctl, am-aa, ... (one per forwarder)

Every link is created directly between two lab namespaces (never in the
caller's namespace), so deleting the namespaces deletes every link; the
state file records each namespace before it is created and each process
after it starts. Offloads (checksums, TSO, GSO, GRO) are turned off on every
lab link: frames captured on a veth with offloads on carry partial checksums
and super-frames that cannot be re-injected.

Processes that are not forwarders (the Prometheus server of
`[observability] prometheus`) are `dataplane.lab.extras`: their namespaces
and fabric links are made with the forwarders', they start once the
forwarders are ready and are recorded and stopped the same way.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import config as pr_config
from pyroute2 import netns as pr_netns

from dataplane.lab import netns
from dataplane.lab.extras import Extra, extras
from dataplane.lab.state import LabState, Proc, alive, run_dir, start_time, stop
from dataplane.lab.topology import GSO_MAX_SIZE, VXLAN_OVERHEAD, Topology

Progress = Callable[[str], None]
IFF_UP = 0x1
OFFLOADS = ["rx", "off", "tx", "off", "tso", "off", "gso", "off", "gro", "off"]
REQUIRED_TOOLS = ("ethtool",)
READY_TIMEOUT = 30.0
# IPRoute(netns=...) forks a helper that enters the namespace and must answer
# within pyroute2's default 2 s, or the lab set-up fails with "no response from
# the child". Forking a large process (pytest with Scapy loaded) on a loaded
# 2-core machine took longer than that in CI; a dead child is still reported
# at once, only a slow one gets longer.
pr_config.default_communicate_timeout = 15


class LabError(RuntimeError):
    """A lab operation that cannot be done; the message says why."""


def check_environment() -> None:
    if os.geteuid() != 0:
        raise LabError("lab commands need root (network namespaces): run with sudo")
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise LabError(f"missing tools: {', '.join(missing)} (make demo/test installs them; "
                       f"or apt-get install {' '.join(missing)})")


def health(state: LabState) -> dict[str, list[str]]:
    """What of a recorded lab is missing: namespaces and dead processes."""
    return {"missing_namespaces": [n for n in state.namespaces if not netns.exists(n)],
            "dead_processes": [n for n, p in state.processes.items() if not alive(p)]}


def up(topo: Topology, progress: Progress, start_forwarders: bool = True) -> LabState:
    """Create the lab; idempotent: an intact lab is left as it is, a broken
    one (a crash half-way, a killed forwarder) is torn down and rebuilt."""
    check_environment()
    old = LabState.load(topo.name)
    if old is not None:
        problems = health(old)
        if not any(problems.values()) and old.topology == os.path.abspath(topo.path):
            progress(f"lab {topo.name} is already up ({len(old.processes)} processes)")
            return old
        progress(f"lab {topo.name} is partly up ({problems}); rebuilding")
        down(old, progress)
    taken = [ns for ns in _all_namespaces(topo) if netns.exists(ns)]
    if taken:
        raise LabError(f"namespaces {', '.join(taken)} exist but no lab state records them: "
                       f"another lab uses prefix {topo.prefix!r}? change [lab].prefix")
    state = LabState(topo.name, os.path.abspath(topo.path))
    rd = run_dir(topo.name)
    rd.mkdir(parents=True, exist_ok=True)
    try:
        for ns in _all_namespaces(topo):
            state.namespaces.append(ns)
            state.save()
            pr_netns.create(ns)
        for ns in state.namespaces:  # before any link exists: every link is made without IPv6
            netns.sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
            netns.sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
        progress(f"created {len(state.namespaces)} namespaces")
        _build_fabric(topo)
        progress(f"fabric bridge with {len(topo.forwarders())} ports, {topo.subnet}")
        _build_edges(topo)
        progress(f"hosts {', '.join(topo.hosts)} attached"
                 + (" (dual stack)" if any(h.address6 for h in topo.hosts.values()) else ""))
        _offloads(topo)
        progress("offloads on the host links (GSO super-frames), off on the fabric" if topo.gso
                 else "offloads off on every lab link")
        _wait_links_up(state.namespaces)
        if start_forwarders:
            later = []
            for extra in extras(topo, rd):
                if extra.early:
                    start_extra(topo, state, extra)
                    progress(f"started {extra.node} ({extra.argv[0]}) on the fabric")
                else:
                    later.append(extra)
            for node in topo.forwarders():
                start_node(topo, state, node)
            progress(f"started {len(topo.forwarders())} forwarders; waiting for them")
            wait_ready(topo, state)
            for extra in later:
                start_extra(topo, state, extra)
                progress(f"started {extra.node} ({extra.argv[0]}) on the fabric")
        progress(f"lab {topo.name} is up")
        return state
    except BaseException:
        progress("set-up failed; removing what was created")
        down(state, progress)
        raise


def _wait_links_up(namespaces: list[str], timeout: float = 5.0) -> None:
    """Wait until every link set up in the lab is operationally up. The
    kernel brings a new link's carrier and queueing discipline up, and a
    bridge's port to forwarding, from deferred work (up to a second later,
    more under load); until then frames sent on it are dropped without a
    trace, so a lab that says it is up must be past that."""
    deadline = time.monotonic() + timeout
    for ns in namespaces:
        with IPRoute(netns=ns, flags=0) as ip:
            while True:
                down = [link.get_attr("IFLA_IFNAME") for link in ip.get_links()
                        if link["flags"] & IFF_UP and link.get_attr("IFLA_IFNAME") != "lo"
                        and link.get_attr("IFLA_OPERSTATE") not in ("UP", *NO_CARRIER_STATE.get(
                            link.get_attr("IFLA_IFNAME"), ()))]
                if not down:
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"links {', '.join(down)} in {ns} not up after {timeout} s")
                time.sleep(0.02)


def _all_namespaces(topo: Topology) -> list[str]:
    machines = [topo.underlay_ns, *(ns for ns, _ in topo.underlay_hosts()[1:])] if topo.underlay else []
    return [topo.fabric_ns, *machines, *(topo.netns(n) for n in topo.all_nodes()),
            *(topo.netns(e.name) for e in topo.extra_nodes())]


def _fabric_nodes(topo: Topology) -> list[tuple[str, str]]:
    """(node, fabric address) of every namespace on the fabric bridge."""
    return [*((n, topo.fabric_ip(n)) for n in topo.forwarders()),
            *((e.name, e.address) for e in topo.extra_nodes())]


def _up(ip: IPRoute, ifname: str, **attrs: object) -> int:
    idx = ip.link_lookup(ifname=ifname)[0]
    ip.link("set", index=idx, state="up", **attrs)
    return idx


def _build_fabric(topo: Topology) -> None:
    """One fabric bridge (`br0`) per machine namespace: the lab's fabric
    namespace, and with `[fabric] underlay` each declared machine's; every
    fabric node plugged into its machine's bridge (`Topology.fabric_home`)."""
    bridges = {}
    for ns in [topo.fabric_ns, *(ns for ns, _ in topo.underlay_hosts()[1:])]:
        with IPRoute(netns=ns, flags=0) as fab:
            fab.link("add", ifname="br0", kind="bridge")
            bridges[ns] = _up(fab, "br0", mtu=topo.mtu)
            _up(fab, "lo")
    if topo.underlay is not None:
        _build_underlay(topo, bridges)
    for node, address in _fabric_nodes(topo):
        home = topo.fabric_home(node)
        with IPRoute(netns=topo.netns(node), flags=0) as ip:
            ip.link("add", ifname="fab0", kind="veth",
                    peer={"ifname": f"p-{node}", "net_ns_fd": home})
            idx = _up(ip, "fab0", mtu=topo.mtu)
            ip.addr("add", index=idx, address=address, prefixlen=topo.subnet.prefixlen)
            _up(ip, "lo")
        with IPRoute(netns=home, flags=0) as fab:
            _up(fab, f"p-{node}", mtu=topo.mtu, master=bridges[home])


NO_CARRIER_STATE = {"vx0": ("UNKNOWN",)}
"""Links whose driver reports no carrier: a VXLAN device up is UNKNOWN."""
VXLAN_VNI = 42
VXLAN_PORT = 4789
"""IANA's VXLAN port."""


def _build_underlay(topo: Topology, bridges: dict[str, int]) -> None:
    """The machines' network: an underlay bridge (`ubr0`, in its own
    namespace, the switch between machines), each machine's uplink `u0` on
    it with its underlay address, and a VXLAN device `vx0` (VNI
    `VXLAN_VNI`, UDP 4789) in the machine's fabric bridge. Broadcasts
    (ARP) go to every other machine by head-end replication (an all-zero
    FDB entry per remote machine); the bridges learn the rest. The uplinks
    carry the fabric MTU plus VXLAN's 50 bytes, so no fabric frame is cut."""
    assert topo.underlay is not None
    machines = topo.underlay_hosts()
    with IPRoute(netns=topo.underlay_ns, flags=0) as ul:
        ul.link("add", ifname="ubr0", kind="bridge")
        ubr = _up(ul, "ubr0", mtu=topo.mtu + VXLAN_OVERHEAD)
        _up(ul, "lo")
    for k, (ns, address) in enumerate(machines):
        port = f"u-{k}"
        with IPRoute(netns=ns, flags=0) as ip:
            ip.link("add", ifname="u0", kind="veth", peer={"ifname": port, "net_ns_fd": topo.underlay_ns})
            up = _up(ip, "u0", mtu=topo.mtu + VXLAN_OVERHEAD)
            ip.addr("add", index=up, address=address, prefixlen=topo.underlay.prefixlen)
            ip.link("add", ifname="vx0", kind="vxlan", vxlan_id=VXLAN_VNI, vxlan_local=address,
                    vxlan_port=VXLAN_PORT, vxlan_link=up, vxlan_learning=1)
            vx = _up(ip, "vx0", mtu=topo.mtu, master=bridges[ns])
            for other_ns, other in machines:
                if other_ns != ns:
                    ip.fdb("append", ifindex=vx, lladdr="00:00:00:00:00:00", dst=other)
        with IPRoute(netns=topo.underlay_ns, flags=0) as ul:
            _up(ul, port, mtu=topo.mtu + VXLAN_OVERHEAD, master=ubr)


def _build_edges(topo: Topology) -> None:
    for edge in (topo.ingress, topo.egress):
        with IPRoute(netns=topo.netns(edge.name), flags=0) as ip:
            ip.link("add", ifname="hbr0", kind="bridge", address=topo.mac_of(edge.name))
            br = _up(ip, "hbr0")
            ip.addr("add", index=br, address=str(edge.address.ip), prefixlen=edge.address.network.prefixlen)
        if edge.address6 is not None:
            _add6(topo.netns(edge.name), "hbr0", edge.address6)
            with IPRoute(netns=topo.netns(edge.name), flags=0) as ip:
                # the hosts' packets through the edge are the forwarder's (it
                # reads copies); without a route the kernel would answer each
                # with an ICMPv6 no-route error (IPv4 stays silent with
                # forwarding off), which aborts a connection in SYN_SENT
                ip.route("add", dst="::/0", type="blackhole", family=socket.AF_INET6)
        for host in (h for h in topo.hosts.values() if h.attach == edge.name):
            with IPRoute(netns=topo.netns(host.name), flags=0) as ip:
                ip.link("add", ifname="eth0", kind="veth",
                        peer={"ifname": f"h-{host.name}", "net_ns_fd": topo.netns(edge.name)})
                idx = _up(ip, "eth0", address=topo.mac_of(host.name))
                ip.addr("add", index=idx, address=str(host.address.ip),
                        prefixlen=host.address.network.prefixlen)
                _up(ip, "lo")
                ip.route("add", dst="0.0.0.0/0", gateway=str(host.gateway))
            if host.address6 is not None:
                _add6(topo.netns(host.name), "eth0", host.address6, host.gateway6)
            with IPRoute(netns=topo.netns(edge.name), flags=0) as ip:
                _up(ip, f"h-{host.name}", master=br)


def _add6(ns: str, ifname: str, address: ipaddress.IPv6Interface,
          gateway: ipaddress.IPv6Address | None = None) -> None:
    """IPv6 on one host-facing interface only (the namespaces are made
    without it, and the fabric carries IPv6 inside IPv4 so it needs none):
    no duplicate address detection (the lab's addresses are unique by
    validation, and DAD would leave them tentative for a second or two)
    and no router advertisements; the address, and a default route via
    `gateway`. The kernel answers neighbour discovery on it."""
    for key, value in (("accept_dad", "0"), ("accept_ra", "0"), ("disable_ipv6", "0")):
        netns.sysctl(ns, f"net.ipv6.conf.{ifname}.{key}", value)
    with IPRoute(netns=ns, flags=0) as ip:
        idx = ip.link_lookup(ifname=ifname)[0]
        ip.addr("add", index=idx, address=str(address.ip), prefixlen=address.network.prefixlen)
        if gateway is not None:
            ip.route("add", dst="::/0", gateway=str(gateway), family=socket.AF_INET6)


def _offloads(topo: Topology) -> None:
    """Offloads off everywhere, so every packet is a real MTU-sized packet;
    or, with `[fabric] gso`, left on for the host links (their TCP hands the
    edges 64 KB super-frames, at most GSO_MAX_SIZE) and off on the fabric."""
    links = [(topo.netns(n), "fab0") for n, _ in _fabric_nodes(topo)]
    links += [(topo.fabric_home(n), f"p-{n}") for n, _ in _fabric_nodes(topo)]
    hosts = [(topo.netns(h.name), "eth0") for h in topo.hosts.values()]
    hosts += [(topo.netns(h.attach), f"h-{h.name}") for h in topo.hosts.values()]
    if topo.gso:
        for ns, ifname in hosts:
            with IPRoute(netns=ns, flags=0) as ip:
                ip.link("set", index=ip.link_lookup(ifname=ifname)[0], gso_max_size=GSO_MAX_SIZE)
    else:
        links += hosts
    for ns, ifname in links:
        offloads_off(ns, ifname)


def offloads_off(ns: str, ifname: str) -> None:
    """Checksum offload, TSO, GSO and GRO off on one interface of a namespace."""
    res = netns.run(ns, ["ethtool", "-K", ifname, *OFFLOADS], capture_output=True, text=True)
    if res.returncode != 0:
        raise LabError(f"ethtool -K {ifname} in {ns} failed: {res.stderr.strip()}")


def link_pair(a: str, ifa: str, ipa: str, b: str, ifb: str, ipb: str, prefixlen: int = 24) -> None:
    """A veth between namespaces `a` and `b`, addressed, up, offloads off
    (for test and benchmark topologies outside a lab file)."""
    with IPRoute(netns=a, flags=0) as ip:
        ip.link("add", ifname=ifa, kind="veth", peer={"ifname": ifb, "net_ns_fd": b})
    for ns, ifname, addr in ((a, ifa, ipa), (b, ifb, ipb)):
        with IPRoute(netns=ns, flags=0) as ip:
            idx = _up(ip, ifname)
            ip.addr("add", index=idx, address=addr, prefixlen=prefixlen)
            _up(ip, "lo")
        offloads_off(ns, ifname)


def start_node(topo: Topology, state: LabState, node: str) -> Proc:
    """Start (or restart) a node's forwarder inside its namespace."""
    rd = run_dir(topo.name)
    argv = [sys.executable, "-m", "dataplane.shells.forwarder", "--topology", os.path.abspath(topo.path),
            "--node", node, "--run-dir", str(rd)]
    logf = open(rd / f"{node}.log", "ab")
    try:
        p = netns.spawn(topo.netns(node), argv, stdout=logf, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True,
                        env={**os.environ, "PYTHONPATH": _project_root()})
    finally:
        logf.close()
    proc = Proc(p.pid, _start_time_of(p.pid), argv)
    state.processes[node] = proc
    state.save()
    return proc


def start_extra(topo: Topology, state: LabState, extra: Extra) -> Proc:
    """Start a non-forwarder lab process (see `dataplane.lab.extras`) in its
    namespace, record it, and wait until its `ready_url` answers."""
    rd = run_dir(topo.name)
    for path, text in extra.files.items():
        path.write_text(text)
    if shutil.which(extra.argv[0]) is None:
        raise LabError(f"{extra.node} needs {extra.argv[0]!r}, which is not installed "
                       f"(make demo/test installs it; or apt-get install {extra.argv[0]})")
    logf = open(rd / f"{extra.node}.log", "ab")
    try:
        p = netns.spawn(topo.netns(extra.node), extra.argv, stdout=logf, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True,
                        env={**os.environ, "PYTHONPATH": _project_root()})
    finally:
        logf.close()
    proc = Proc(p.pid, _start_time_of(p.pid), extra.argv)
    state.processes[extra.node] = proc
    state.save()
    if not extra.ready_url:
        wait_ready(topo, state, [extra.node])
        return proc
    deadline = time.monotonic() + READY_TIMEOUT
    while netns.run(topo.netns(extra.node), ["curl", "-sf", "-o", "/dev/null", "-m", "1", extra.ready_url]
                    ).returncode != 0:
        if not alive(proc):
            log = (rd / f"{extra.node}.log").read_text(errors="replace")[-2000:]
            raise LabError(f"{extra.node} died at start:\n{log}")
        if time.monotonic() > deadline:
            raise LabError(f"{extra.node} not ready after {READY_TIMEOUT:.0f} s ({extra.ready_url})")
        time.sleep(0.1)
    return proc


def _start_time_of(pid: int) -> str:
    t0 = time.monotonic()
    start = start_time(pid)
    while start is None and time.monotonic() - t0 < 1:
        time.sleep(0.01)
        start = start_time(pid)
    return start or ""


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def wait_ready(topo: Topology, state: LabState, nodes: list[str] | None = None) -> None:
    from dataplane.lab.query import QueryError, ask

    deadline = time.monotonic() + READY_TIMEOUT
    forwarders = set(topo.forwarders())
    for node in nodes or [n for n in state.processes if n in forwarders]:
        why: object = "no answer"
        while True:
            try:
                reply = ask(topo.name, node, {"cmd": "status"}, timeout=0.5)
                if reply.get("ready"):
                    break
                why = reply.get("not_ready")
            except QueryError:
                pass
            if not alive(state.processes[node]):
                log = (run_dir(topo.name) / f"{node}.log").read_text()[-2000:]
                raise LabError(f"forwarder {node} died at start:\n{log}")
            if time.monotonic() > deadline:
                raise LabError(f"forwarder {node} not ready after {READY_TIMEOUT:.0f} s: {why}")
            time.sleep(0.05)


def down(state: LabState, progress: Progress, dry_run: bool = False) -> list[str]:
    """Remove exactly what `state` records, and end every process still
    inside its namespaces (found by namespace identity, not by name: a
    process would otherwise outlive its namespace's name); returns what was
    (or would be) removed."""
    done = []
    for node, proc in reversed(list(state.processes.items())):
        if alive(proc):
            done.append(f"process {node} pid {proc.pid}")
            if not dry_run:
                stop(proc)
    for ns in reversed(state.namespaces):
        left = netns.processes_in(ns)  # started by `lab exec` or by hand: gone with the lab
        if left:
            done.append(f"{len(left)} process{'es' if len(left) > 1 else ''} still in namespace {ns}")
            if not dry_run:
                netns.end_processes(ns)
        if netns.exists(ns):
            done.append(f"namespace {ns} (and its links)")
            if not dry_run:
                pr_netns.remove(ns)
    rd = run_dir(state.lab)
    if rd.exists():
        done.append(f"run directory {rd}")
        if not dry_run:
            shutil.rmtree(rd, ignore_errors=True)
    for line in done:
        progress(("would remove " if dry_run else "removed ") + line)
    return done
