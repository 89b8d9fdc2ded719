"""`amesh top`: a live terminal view of a running lab, twice a second.

One row per forwarder: its map state and the controller's verdict on it,
packets/s in and out, flows it leads and mirrors, flows promoted, drops/s
and the commonest reason, sync lag and unacknowledged records, the epoch it
holds and whether its peers hold all it mirrored. Above: the controller's
epoch and its last events. A failover shows as it happens: the victim's
row turns DEAD, the epoch moves on every row, the secondaries' promoted
column jumps, packets/s move over, and (without sync) drops/s spike.

The data are the forwarders' status queries (their Unix sockets), reduced
to a *digest* (`digest`) per node; a *snapshot* is the digests of every
node at one time. Rendering is a pure function of two successive snapshots
(`frame`), so `tests/test_top.py` renders frames from snapshots recorded on
the lab during a failover (`--record FILE` writes them as JSON lines).
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

Snapshot = dict[str, Any]
"""{"lab", "time" (wall clock), "nodes": [{"node", "role", "service"}],
"digests": {node: digest or None (no answer)}}."""


def digest(status: dict[str, Any]) -> dict[str, Any]:
    """What `frame` needs of one node's status answer."""
    d: dict[str, Any] = {"epoch": status.get("epoch"), "serving": status.get("serving", True)}
    if status.get("role") == "controller":
        d["health"] = status.get("health", {})
        d["states"] = status.get("states", {})
        d["events"] = [e for e in status.get("events", [])
                       if e.get("event") == "epoch" or e.get("event", "").startswith("declared_")][-6:]
        return d
    c, io, ft = status.get("counters", {}), status.get("io", {}), status.get("flow_table", {})
    d["rx"] = io.get("fabric_rx", [0, 0])[0] + io.get("host_rx", [0, 0])[0]
    d["tx"] = io.get("fabric_tx", [0, 0])[0] + io.get("host_tx", [0, 0])[0]
    d["flows"] = ft.get("flows", 0)
    d["replicas"] = ft.get("replicas", 0)
    d["promoted"] = c.get("promoted", 0)
    d["took_over"] = c.get("took_over", 0)
    d["lost"] = c.get("flows_lost", 0)
    d["drops"] = dict(status.get("drops", {}))
    sync = status.get("sync")
    if sync is not None:
        peers = sync.get("peers", {}).values()
        d["lag_ms"] = max((p.get("lag_ms", 0.0) for p in peers), default=0.0)
        d["unacked"] = sum(p.get("resend_queue", 0) for p in peers)
        d["in_sync"] = all(p.get("in_sync") for p in peers)
    return d


def snapshot(lab: str, topo: Any, timeout: float = 0.3) -> Snapshot:
    """Ask every forwarder for its status (a node that does not answer is None)."""
    from dataplane.lab.query import QueryError, ask

    nodes, digests = [], {}
    for node in topo.forwarders():
        svc = topo.service_of(node)
        nodes.append({"node": node, "role": topo.role(node), "service": svc.name if svc else topo.role(node)})
        try:
            digests[node] = digest(ask(lab, node, {"cmd": "status"}, timeout=timeout))
        except QueryError:
            digests[node] = None
    return {"lab": lab, "time": time.time(), "nodes": nodes, "digests": digests}


def _rate(cur: dict | None, prev: dict | None, key: str, dt: float) -> float | None:
    if cur is None or prev is None or dt <= 0 or key not in cur or key not in prev:
        return None
    return max(0, cur[key] - prev[key]) / dt


def _num(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def frame(prev: Snapshot | None, cur: Snapshot) -> Any:
    """The view of `cur` (a rich renderable), with rates over the time since `prev`."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    dt = cur["time"] - prev["time"] if prev is not None else 0.0
    ctl_node = next((n["node"] for n in cur["nodes"] if n["role"] == "controller"), None)
    ctl = cur["digests"].get(ctl_node) if ctl_node else None
    ctl_epoch = ctl["epoch"] if ctl else None
    states = ctl["states"] if ctl else {}
    health = ctl["health"] if ctl else {}
    stamp = time.strftime("%H:%M:%S", time.localtime(cur["time"])) + f".{int(cur['time'] * 1000) % 1000:03d}"
    title = Text.assemble(("amesh top", "bold"), f"  lab {cur['lab']}  ", ("map epoch ", ""),
                          (str(ctl_epoch if ctl_epoch is not None else "?"), "bold cyan"), f"  {stamp}")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col, just in (("node", "left"), ("svc", "left"), ("state", "left"), ("pkts/s in", "right"),
                      ("pkts/s out", "right"), ("flows", "right"), ("replicas", "right"),
                      ("promoted", "right"), ("drops/s", "right"), ("top drop", "left"),
                      ("sync lag ms", "right"), ("unacked", "right"), ("epoch", "right"),
                      ("in sync", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for n in cur["nodes"]:
        name, d = n["node"], cur["digests"].get(n["node"])
        p = prev["digests"].get(name) if prev is not None else None
        table.add_row(*_row(n, d, p, dt, states.get(name), health.get(name), ctl_epoch))
    events = Table(box=None, show_header=False, pad_edge=False)
    for e in (ctl["events"] if ctl else [])[-4:]:
        t = time.strftime("%H:%M:%S", time.localtime(e["time"])) + f".{int(e['time'] * 1000) % 1000:03d}"
        what = (f"epoch {e.get('epoch')}: {e.get('reason', '')}" if e["event"] == "epoch"
                else f"{e['event'].replace('_', ' ')} {e.get('peer', '')}")
        events.add_row(Text(t, style="dim"), Text(what, style="red" if "dead" in what else ""))
    return Group(title, table, events)


def _row(n: dict, d: dict | None, p: dict | None, dt: float, state: str | None,
         health: str | None, ctl_epoch: int | None) -> list[Any]:
    from rich.text import Text

    name, role = n["node"], n["role"]
    if d is None:
        label = "DEAD" if state == "dead" else "no answer"
        return [Text(name, style="bold red"), Text(n["service"]), Text(label, style="bold red"),
                *[Text("-", style="dim")] * 11]
    if role == "controller":
        return [Text(name), Text("ctl"), Text("controller"), *[Text("")] * 9,
                Text(str(d["epoch"])), Text("")]
    st = state or "?"
    if health == "dead" or not d.get("serving", True):
        st, style = ("DEAD" if health == "dead" else st) + ("" if d.get("serving", True) else " (stopped serving)"), "bold red"
    else:
        style = {"active": "green", "joining": "yellow", "draining": "yellow", "spare": "dim"}.get(st, "")
    drops = sum(d["drops"].values())
    drop_rate = None if p is None else max(0, drops - sum(p["drops"].values())) / dt if dt > 0 else None
    grown = {r: v - (p["drops"].get(r, 0) if p else 0) for r, v in d["drops"].items()}
    top = max(grown, key=lambda r: grown[r]) if grown and max(grown.values()) > 0 else ""
    promoted_new = d["promoted"] - (p["promoted"] if p else d["promoted"])
    epoch_style = "yellow" if ctl_epoch is not None and d["epoch"] != ctl_epoch else ""
    in_sync = d.get("in_sync")
    return [Text(name), Text(n["service"]), Text(st, style=style),
            Text(_num(_rate(d, p, "rx", dt))), Text(_num(_rate(d, p, "tx", dt))),
            Text(f"{d['flows'] - d['replicas']:,}"), Text(f"{d['replicas']:,}"),
            Text(f"{d['promoted']:,}" + (f" (+{promoted_new})" if promoted_new > 0 else ""),
                 style="bold magenta" if promoted_new > 0 else ""),
            Text(_num(drop_rate), style="bold red" if drop_rate else ""), Text(top, style="red" if top else ""),
            Text(_num(d.get("lag_ms"), "{:.1f}")), Text(_num(d.get("unacked"))),
            Text(str(d["epoch"]), style=epoch_style),
            Text("" if in_sync is None else "yes" if in_sync else "NO", style="" if in_sync is not False else "yellow")]


@click.command()
@click.option("--lab", default=None, help="lab name (default: the one that is up)")
@click.option("--interval", type=click.FloatRange(0.1, 10), default=0.5, show_default=True,
              help="seconds between refreshes")
@click.option("--once", is_flag=True, help="print one frame (rates over one interval) and exit")
@click.option("--record", type=click.Path(dir_okay=False), default=None,
              help="append every snapshot to this file (JSON lines)")
@click.option("--seconds", type=click.FloatRange(0.1), default=None, help="stop after this long")
def top(lab: str | None, interval: float, once: bool, record: str | None, seconds: float | None) -> None:
    """A live view of the lab: packets/s, flows, drops, sync lag, epoch and health per node."""
    from rich.console import Console
    from rich.live import Live

    from dataplane.cli.lab import _loaded

    state, topo = _loaded(lab)
    out = open(record, "a") if record else None

    def take() -> Snapshot:
        snap = snapshot(state.lab, topo)
        if out is not None:
            out.write(json.dumps(snap) + "\n")
            out.flush()
        return snap

    console = Console()
    prev = take()
    time.sleep(interval)
    cur = take()
    try:
        if once:
            console.print(frame(prev, cur))
            return
        end = None if seconds is None else time.monotonic() + seconds
        with Live(frame(prev, cur), console=console, refresh_per_second=4, screen=False) as live:
            while end is None or time.monotonic() < end:
                time.sleep(max(0.0, interval - (time.time() - cur["time"])))
                prev, cur = cur, take()
                live.update(frame(prev, cur))
    except KeyboardInterrupt:
        pass
    finally:
        if out is not None:
            out.close()


COMMANDS = (top,)
