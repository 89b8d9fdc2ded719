"""`amesh lab ...`, `amesh flows`, `amesh map show`: the namespace lab.

Lab commands find the lab from `--lab NAME`, else the only lab that is up,
else "default". Exit codes: 0 ok, 1 the operation failed (message on
stderr), 2 bad usage.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from dataplane.cli.packets import craft_options, spec_from

def _progress(msg: str) -> None:
    click.echo(f"[lab] {msg}", err=True)


def _fail(msg: str) -> NoReturn:
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


def _topology(path: str | None) -> Any:
    from dataplane.lab.topology import DEFAULT_LAB, TopologyError, load

    try:
        return load(path or DEFAULT_LAB)
    except TopologyError as exc:
        _fail(str(exc))


def _lab_name(lab: str | None) -> str:
    from dataplane.lab.state import labs

    if lab:
        return lab
    up = labs()
    return up[0] if len(up) == 1 else "default"


def _state(lab: str | None) -> Any:
    from dataplane.lab.state import LabState

    name = _lab_name(lab)
    try:
        state = LabState.load(name)
    except ValueError as exc:
        _fail(str(exc))
    if state is None:
        _fail(f"lab {name!r} is not up (no state file)")
    return state


def _loaded(lab: str | None, node: str | None = None) -> tuple[Any, Any]:
    """The lab's state and topology; with `node`, a usage error unless the
    lab has that node."""
    from dataplane.lab.topology import TopologyError, load

    state = _state(lab)
    try:
        topo = load(state.topology)
    except TopologyError as exc:
        _fail(f"the lab's topology changed or vanished: {exc}")
    if node is not None and node not in topo.all_nodes():
        raise click.BadParameter(f"no node {node!r}; nodes: {', '.join(topo.all_nodes())}",
                                 param_hint="NODE")
    return state, topo


def _ask(lab: str, node: str | list[str], req: dict[str, Any]) -> dict[str, Any]:
    """`req` to `node`, or to the first of a list of controllers that answers."""
    from dataplane.lab.query import QueryError, ask, ask_controller

    try:
        reply = ask_controller(lab, node, req) if isinstance(node, list) else ask(lab, node, req)
    except QueryError as exc:
        _fail(str(exc))
    if "error" in reply:
        _fail(f"{node}: {reply['error']}")
    return reply


lab_option = click.option("--lab", default=None, help="lab name (default: the one that is up)")


@click.group()
def lab() -> None:
    """Namespace labs: bring up, inspect, break and clean up."""


@lab.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
def validate(file: str | None) -> None:
    """Check a topology FILE (default: labs/default.toml); errors name the
    file, the key and the problem."""
    topo = _topology(file)
    click.echo(f"{file or topo.path}: ok: lab {topo.name}, {len(topo.all_nodes())} nodes, "
               f"services {', '.join(f'{s.name}({len(s.instances)}+{len(s.spares)} spare)' for s in topo.services.values())}")


@lab.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
def up(file: str | None) -> None:
    """Create the lab of FILE (default: labs/default.toml); idempotent."""
    from dataplane.lab.build import LabError, up as build_up

    topo = _topology(file)
    try:
        build_up(topo, _progress)
    except LabError as exc:
        _fail(str(exc))


@lab.command()
@lab_option
def down(lab: str | None) -> None:
    """Stop the lab's processes (and any other process still inside its
    namespaces, counted) and remove its namespaces and links."""
    from dataplane.lab.build import down as build_down

    build_down(_state(lab), _progress)


@lab.command()
@lab_option
@click.option("--dry-run", is_flag=True, help="list what would be removed")
def cleanup(lab: str | None, dry_run: bool) -> None:
    """Remove exactly what the lab's state file records (after a crash too)."""
    from dataplane.lab.build import down as build_down

    done = build_down(_state(lab), _progress, dry_run=dry_run)
    if not done:
        _progress("nothing to remove")


@lab.command()
@lab_option
@click.option("--json", "as_json", is_flag=True)
def status(lab: str | None, as_json: bool) -> None:
    """Nodes, namespaces, addresses, PIDs, health and map epoch."""
    from dataplane.lab import netns
    from dataplane.lab.query import QueryError, ask
    from dataplane.lab.state import alive

    state, topo = _loaded(lab)
    nodes = []
    for node in topo.all_nodes():
        proc = state.processes.get(node)
        row: dict[str, Any] = {"node": node, "role": topo.role(node), "netns": topo.netns(node),
                               "netns_exists": netns.exists(topo.netns(node))}
        if node in topo.hosts:
            row["address"] = str(topo.hosts[node].address)
            if topo.hosts[node].address6 is not None:
                row["address6"] = str(topo.hosts[node].address6)
        else:
            row["fabric_address"] = topo.fabric_ip(node)
        if proc is not None:
            row["pid"] = proc.pid
            row["running"] = alive(proc)
            try:
                st = ask(state.lab, node, {"cmd": "status"}, timeout=0.5)
                row.update(epoch=st.get("epoch"), serving=st.get("serving"),
                           flows=st.get("flow_table", {}).get("flows"))
                if "health" in st:
                    row["health"] = st["health"]
            except QueryError:
                row["responding"] = False
        nodes.append(row)
    doc = {"lab": state.lab, "topology": state.topology, "namespaces": state.namespaces,
           "links": _links(topo), "nodes": nodes}
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    click.echo(f"lab {state.lab} ({state.topology})")
    for r in nodes:
        where = r.get("address") or r.get("fabric_address")
        if "address6" in r:
            where += f" {r['address6']}"
        proc = "" if "pid" not in r else \
            f" pid {r['pid']} {'running' if r['running'] else 'DEAD'}" + \
            ("" if r.get("responding", True) else " NOT RESPONDING") + \
            (f" epoch {r['epoch']} flows {r['flows']}" if r.get("epoch") is not None and r.get("flows") is not None
             else f" epoch {r['epoch']}" if r.get("epoch") is not None else "")
        click.echo(f"  {r['node']:<8} {r['role']:<10} {where:<16} ns {r['netns']}{proc}")
        if "health" in r:
            click.echo("           health: " + ", ".join(f"{k} {v}" for k, v in r["health"].items()))


def _links(topo: Any) -> list[dict[str, str]]:
    """The lab's veth pairs as (namespace, interface) ends."""
    out = [{"a": f"{topo.netns(n)}:fab0", "b": f"{topo.fabric_home(n)}:p-{n}", "kind": "fabric"}
           for n in topo.forwarders()]
    out += [{"a": f"{topo.netns(h.name)}:eth0", "b": f"{topo.netns(h.attach)}:h-{h.name}", "kind": "host"}
            for h in topo.hosts.values()]
    out += [{"a": f"{ns}:u0", "b": f"{topo.underlay_ns}:u-{k}", "kind": "underlay"}
            for k, (ns, _) in enumerate(topo.underlay_hosts())]
    return out


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@lab_option
@click.argument("node")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(lab: str | None, node: str, cmd: tuple[str, ...]) -> None:
    """Run CMD inside NODE's namespace: amesh lab exec client -- curl ...

    SIGINT, SIGTERM and SIGHUP are passed on to CMD, so stopping this
    command stops it; exits with CMD's status (128 + N when a signal N
    ended it, as a shell does)."""
    import signal

    from dataplane.lab import netns

    _state_, topo = _loaded(lab, node)
    try:
        child = netns.spawn(topo.netns(node), list(cmd))
    except FileNotFoundError as exc:
        _fail(str(exc))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, _f: child.send_signal(n))
    code = child.wait()
    sys.exit(128 - code if code < 0 else code)


@lab.command()
@lab_option
@click.argument("node")
def shell(lab: str | None, node: str) -> None:
    """An interactive shell inside NODE's namespace."""
    from dataplane.lab import netns

    _state_, topo = _loaded(lab, node)
    sh = os.environ.get("SHELL", "/bin/bash")
    sys.exit(netns.run(topo.netns(node), [sh], env={**os.environ, "PS1": f"[{node}] \\w# "}).returncode)


@lab.command()
@lab_option
@click.argument("node")
@click.argument("iface")
@click.option("-w", "--write", "out", required=True, type=click.Path(dir_okay=False), help="pcap file")
@click.option("-c", "--count", type=click.IntRange(1), default=None, help="stop after N packets")
@click.option("--seconds", type=click.FloatRange(0.1), default=None, help="stop after S seconds")
@click.option("--filter", "bpf", default="", help="tcpdump capture filter")
def capture(lab: str | None, node: str, iface: str, out: str, count: int | None,
            seconds: float | None, bpf: str) -> None:
    """Capture IFACE of NODE into a pcap (tcpdump inside the namespace)."""
    import shutil
    import subprocess

    from dataplane.lab import netns

    _state_, topo = _loaded(lab, node)
    if shutil.which("tcpdump") is None:
        _fail("tcpdump is not installed (apt-get install tcpdump)")
    cmd = ["tcpdump", "--immediate-mode", "-i", iface, "-w", os.path.abspath(out), "-U", "-s", "0"]
    if count:
        cmd += ["-c", str(count)]
    cmd += bpf.split()
    proc = netns.spawn(topo.netns(node), cmd, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode not in (0, -15) and "packets captured" not in err:
        _fail(err.strip() or f"tcpdump exited with {proc.returncode}")
    click.echo(err.strip(), err=True)


@lab.command()
@lab_option
@click.argument("node")
@click.option("-n", "--lines", type=click.IntRange(1), default=50)
def logs(lab: str | None, node: str, lines: int) -> None:
    """The last lines of NODE's forwarder log."""
    from dataplane.lab.state import run_dir

    state, topo = _loaded(lab, node)
    path = run_dir(state.lab) / f"{node}.log"
    if not path.exists():
        _fail(f"no log for {node} (hosts run no forwarder)")
    click.echo("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))


@click.command()
@lab_option
@click.argument("node")
@click.option("--json", "as_json", is_flag=True)
def flows(lab: str | None, node: str, as_json: bool) -> None:
    """NODE's flow table: state, role, version, pinned next hops."""
    state, topo = _loaded(lab, node)
    reply = _ask(state.lab, node, {"cmd": "flows"})
    if as_json:
        click.echo(json.dumps(reply["flows"], indent=1))
        return
    click.echo(f"{len(reply['flows'])} flows at {node}")
    for f in reply["flows"]:
        st = f["state"]
        summary = st if not isinstance(st, dict) else \
            " ".join(f"{k}={v}" for k, v in st.items() if k in ("kind", "state", "action", "app", "matched"))
        click.echo(f"  chain {f['chain']} code {f['code']} proto {f['proto']} {f['lo']} <> {f['hi']} "
                   f"{f['role']} v{f['version']} pkts {f['packets']} (rev {f['rev_packets']}) "
                   f"next {f['fwd_hop']} back {f['prev_hop']} {summary}")


@click.command(name="show")
@lab_option
@click.option("--json", "as_json", is_flag=True)
def map_show(lab: str | None, as_json: bool) -> None:
    """The lab's current map from the controller: epoch, roles, buckets per instance."""
    state, topo = _loaded(lab)
    reply = _ask(state.lab, topo.controllers, {"cmd": "map"})
    if as_json:
        click.echo(json.dumps(reply, indent=1))
        return
    m = reply["map"]
    click.echo(f"epoch {m['epoch']}, {m['buckets']} buckets per service, {m['replicas']} candidates")
    for svc, insts in m["services"].items():
        counts = reply["primaries"].get(svc, {})
        parts = [f"{i['name']} {i['state']} "
                 f"{counts.get(i['name'], 0)} primary buckets" for i in insts]
        click.echo(f"  {svc}: " + "; ".join(parts))
    for t, epoch, reason in reply.get("history", [])[-10:]:
        click.echo(f"  epoch {epoch}: {reason}")


def _fault(fn_name: str, doc: str, needs_state: bool) -> click.Command:
    @click.command(name=fn_name.replace("_", "-"), help=doc)
    @lab_option
    @click.argument("node")
    def cmd(lab: str | None, node: str) -> None:
        from dataplane.lab import faults

        state, topo = _loaded(lab, node)
        fn = getattr(faults, fn_name)
        try:
            result = fn(state, node) if needs_state else fn(topo, node)
        except faults.FaultError as exc:
            _fail(str(exc))
        click.echo(f"{fn_name.replace('_', ' ')} {node}" + (f" at {result:.6f}" if isinstance(result, float) else ""))

    return cmd


for _name, _doc, _state_arg in (
        ("kill", "SIGKILL NODE's forwarder (a crash).", True),
        ("stop", "SIGSTOP NODE's forwarder (a hang); `cont` resumes it.", True),
        ("cont", "SIGCONT a stopped forwarder.", True),
        ("partition", "Cut NODE's fabric link (it keeps running).", False),
        ("heal", "Restore NODE's fabric link.", False)):
    lab.add_command(_fault(_name, _doc, _state_arg))


def _host_fault(fn_name: str, doc: str) -> click.Command:
    @click.command(name=fn_name.replace("_", "-"), help=doc)
    @lab_option
    @click.argument("machine")
    def cmd(lab: str | None, machine: str) -> None:
        from dataplane.lab import faults

        state, topo = _loaded(lab)
        try:
            nodes = faults.machine_nodes(topo, machine)
            result = faults.kill_host(topo, state, machine) if fn_name == "kill_host" \
                else getattr(faults, fn_name)(topo, machine)
        except faults.FaultError as exc:
            _fail(str(exc))
        click.echo(f"{fn_name.replace('_', ' ')} {machine} ({', '.join(nodes)})"
                   + (f" at {result:.6f}" if isinstance(result, float) else ""))

    return cmd


for _name, _doc in (
        ("kill_host", "SIGKILL MACHINE's agent and every forwarder on it at once (a machine lost)."),
        ("partition_host", "Cut every fabric link of MACHINE (its processes keep running)."),
        ("heal_host", "Restore MACHINE's fabric links.")):
    lab.add_command(_host_fault(_name, _doc))


@lab.command()
@lab_option
@click.argument("node")
def restart(lab: str | None, node: str) -> None:
    """Kill NODE's forwarder if running and start a fresh one (it rejoins)."""
    from dataplane.lab import faults

    state, topo = _loaded(lab, node)
    try:
        faults.restart(topo, state, node)
    except faults.FaultError as exc:
        _fail(str(exc))
    click.echo(f"restarted {node}")


@lab.command()
@lab_option
@click.argument("link", metavar="NODE")
@click.option("--loss", type=click.FloatRange(0, 100), default=0.0, help="percent")
@click.option("--delay", type=click.FloatRange(0, 10000), default=0.0, help="milliseconds")
@click.option("--reorder", type=click.FloatRange(0, 100), default=0.0, help="percent")
def impair(lab: str | None, link: str, loss: float, delay: float, reorder: float) -> None:
    """Impair NODE's fabric link (all zero clears it)."""
    from dataplane.lab import faults

    _state_, topo = _loaded(lab, link)
    try:
        mode = faults.impair(topo, link, loss, delay, reorder)
    except faults.FaultError as exc:
        _fail(str(exc))
    click.echo(f"{link}: loss {loss}% delay {delay} ms reorder {reorder}% ({mode})")


def _planned(action: str, doc: str) -> click.Command:
    @click.command(name=action, help=doc)
    @lab_option
    @click.argument("node")
    def cmd(lab: str | None, node: str) -> None:
        from dataplane.lab import faults

        _state_, topo = _loaded(lab, node)
        try:
            epoch = faults.operator(topo, node, action)
        except faults.FaultError as exc:
            _fail(str(exc))
        click.echo(f"{action} {node}: epoch {epoch}")

    return cmd


@lab.command()
@lab_option
@click.argument("node")
@click.option("--peer", required=True, help="the sync peer to bring back in sync")
def resync(lab: str | None, node: str, peer: str) -> None:
    """Force a full resync: NODE bulk-sends PEER every flow PEER mirrors for it."""
    state, topo = _loaded(lab, node)
    reply = _ask(state.lab, node, {"cmd": "resync", "peer": peer})
    click.echo(f"{node} -> {peer}: bulk {reply['bulk']} started")


@lab.command("rotate-key")
@lab_option
@click.option("--service", default=None, help="rotate this service's sync key only")
@click.option("--control", is_flag=True, help="rotate the control key only")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False),
              help="the new key: this file's bytes (at least 16); default 32 random bytes")
@click.option("--unsafe-skip-install", is_flag=True,
              help="skip phase 1: each node installs and switches at once (its peers refuse it: a control)")
def rotate_key(lab: str | None, service: str | None, control: bool, key_file: str | None,
               unsafe_skip_install: bool) -> None:
    """Install a new sync/control key on every node, switch to it, retire the old one.

    Three phases, each complete on every node before the next: install
    (accept the new key as well), switch (sign with it), retire (drop the
    old). Default: the control key and every service's sync key, each its
    own new key. A node that fails stops it, naming the phase; run it again
    to finish."""
    from dataplane.lab import keyrot
    from dataplane.lab.query import ask
    from dataplane.lab.state import run_dir

    if service is not None and control:
        raise click.UsageError("--service and --control exclude each other")
    state, topo = _loaded(lab)
    try:
        todo = keyrot.purposes(topo, service, control)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--service") from None
    key = Path(key_file).read_bytes() if key_file else None
    if key is not None and len(todo) > 1:
        raise click.UsageError("--key-file needs --service or --control: every purpose has its own key")
    rd = run_dir(state.lab)
    try:
        for purpose in todo:
            rot = keyrot.plan(topo, purpose, lambda node, req: ask(state.lab, node, req), rd, key)
            keyrot.rotate(topo, rot, lambda node, req: ask(state.lab, node, req), rd, _progress,
                          unsafe_skip_install=unsafe_skip_install)
            click.echo(f"{purpose}: key id {rot.kid} on {len(keyrot.nodes_of(topo, purpose))} nodes")
    except keyrot.RotationError as exc:
        _fail(str(exc))


@lab.command()
@lab_option
@click.argument("expr")
def promql(lab: str | None, expr: str) -> None:
    """An instant PromQL query to the lab's Prometheus ([observability] prometheus = true)."""
    from dataplane.lab.session import LabRun
    from dataplane.lab.topology import PROMETHEUS_NODE

    state, topo = _loaded(lab)
    if PROMETHEUS_NODE not in state.processes:
        _fail(f"lab {state.lab} runs no Prometheus (set [observability] prometheus = true)")
    run = LabRun(topo, state)
    try:
        rows = run.prometheus(expr)
    except RuntimeError as exc:
        _fail(str(exc))
    finally:
        run.close()
    for r in rows:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(r["metric"].items()))
        click.echo(f"{{{labels}}} {r['value'][1] if 'value' in r else r.get('values')}")


lab.add_command(_planned("drain", "Stop giving NODE new flows; its pinned flows finish there."))
lab.add_command(_planned("scale-out", "Bring spare NODE into service (joins, syncs, then leads)."))

@click.command()
@lab_option
@click.argument("node")
@click.option("--iface", default=None, help="send raw frames out of this interface of NODE")
@click.option("-r", "--read", "pcap", type=click.Path(exists=True, dir_okay=False),
              help="send the frames of this pcap instead of crafting")
@click.option("--paced", is_flag=True, help="keep the pcap's timing (default: as fast as possible)")
@craft_options
def send(lab: str | None, node: str, iface: str | None, pcap: str | None, paced: bool,
         **opts: Any) -> None:
    """Send crafted packets (the `craft` options) or a pcap into NODE, from
    inside its namespace: a host sends them out of eth0 (bare IP packets get
    its MACs; use --encap none), a forwarder receives encapsulated packets on
    its fabric socket."""
    from dataplane.lab.packets import SendError, send as send_packets
    from layers.craft import craft as build

    _state_, topo = _loaded(lab, node)
    try:
        what = pcap if pcap else build(spec_from(opts))
        res = send_packets(topo, node, what, iface=iface, fast=not paced)
    except (SendError, ValueError) as exc:
        _fail(str(exc))
    click.echo(f"sent {res['sent']} packet(s) into {node}"
               + (f", skipped {res['skipped']} (not UDP)" if res.get("skipped") else ""))


@click.command()
@lab_option
@click.argument("pcap", type=click.Path(exists=True, dir_okay=False))
@click.option("--tenant", type=int, default=None, help="replay as this tenant's lab host")
@click.option("--client-ip", default=None, help="which address of the capture is the client")
@click.option("--fast", is_flag=True, help="as fast as possible (default: the capture's pacing)")
@click.option("--capture", "capture_dir", type=click.Path(file_okay=False), default=None,
              help="record a pcap per hop into this directory")
def replay(lab: str | None, pcap: str, tenant: int | None, client_ip: str | None, fast: bool,
           capture_dir: str | None) -> None:
    """Replay PCAP's client-to-server packets through the lab's chain
    (addresses and MACs rewritten to the lab's: see dataplane/lab/replay.py)."""
    from dataplane.lab.packets import SendError
    from dataplane.lab.replay import ReplayError, host_for_tenant, replay as run_replay
    from layers.pcap import PcapError

    _state_, topo = _loaded(lab)
    try:
        res = run_replay(topo, pcap, host_for_tenant(topo, tenant), client_ip, fast,
                         Path(capture_dir) if capture_dir else None)
    except (ReplayError, PcapError, SendError) as exc:
        _fail(str(exc))
    click.echo(json.dumps(res, indent=1))


COMMANDS = (lab, flows, send, replay)
