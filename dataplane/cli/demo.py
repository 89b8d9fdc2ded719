"""`amesh demo` (the main job, on the namespace lab) and `amesh simulate`
(the whole mesh in one process on a simulated clock and network, from a
seed, with the checker's verdict; `--story` is the claim-1 story)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click


def _say(msg: str) -> None:
    click.echo(f"[demo] {msg}", err=True)


@click.command()
@click.option("--connections", type=click.IntRange(1, 200), default=30, show_default=True,
              help="concurrent TCP connections beside the long download")
@click.option("--size-mb", type=click.IntRange(6, 512), default=24, show_default=True,
              help="size of the long download")
@click.option("--no-control", is_flag=True, help="skip the control run (sync off, or anti-affinity off)")
@click.option("--lab", "path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a lab file (default: labs/default.toml)")
@click.option("--host", is_flag=True,
              help="kill the whole machine of the download's B primary (a lab with [machines], "
                   "e.g. labs/three-hosts.toml); the control turns anti-affinity off")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary on stdout")
def demo(connections: int, size_mb: int, no_control: bool, path: str | None, host: bool,
         as_json: bool) -> None:
    """Kill a B primary mid-transfer on the lab: everything survives; then
    the control run with sync off shows what breaks. With --host a whole
    machine dies, and the control is anti-affinity off. Needs root."""
    import os

    from pathlib import Path

    from dataplane.lab.build import LabError
    from dataplane.lab.demo import failover_run
    from dataplane.lab.session import DEFAULT
    from dataplane.lab.topology import TopologyError, load

    if os.geteuid() != 0:
        click.echo("error: the demo builds network namespaces: run it as root "
                   "(or try `amesh simulate`)", err=True)
        sys.exit(1)
    runs = []
    try:
        lab = Path(path) if path else DEFAULT
        if host and not load(lab).machines:
            raise ValueError(f"{lab} declares no [machines]: no whole machine to fail "
                             "(try --lab labs/three-hosts.toml)")
        plans = [("async", "amo", True), ("async" if host else "off", "amx", not host)]
        for policy, prefix, anti in plans[: 1 if no_control else 2]:
            r = failover_run(policy, connections, size_mb, _say, prefix, lab, host, anti)
            runs.append(r)
            if not as_json:
                _report(r)
    except KeyboardInterrupt:
        _say("interrupted: the lab was cleaned up")
        sys.exit(130)
    except (LabError, TopologyError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in runs], indent=1))
    ok = runs[0].survived and (no_control or not runs[1].survived)
    sys.exit(0 if ok else 1)


def _report(r) -> None:  # type: ignore[no-untyped-def]
    if r.killed.startswith("machine"):
        title = "anti-affinity on" if r.anti_affinity else "CONTROL: anti-affinity off"
    else:
        title = "state sync on (async)" if r.policy != "off" else "CONTROL: state sync off"
    click.echo(f"\n== {title}")
    click.echo(f"   B primary of the download: {r.primary}, secondary: {r.secondary}; killed {r.killed}")
    labels = [("kill", "primary killed"), ("last_heartbeat", "last heartbeat heard"),
              ("declared_dead", "declared dead"), ("new_epoch", "new map epoch published"),
              ("map_read_at_promoted", "secondary reads it"),
              ("map_at_promoted", "secondary has installed it"),
              ("first_packet_at_promoted", "first packet served by the promoted secondary")]
    for key, label in labels:
        if key in r.timeline_ms:
            click.echo(f"   {r.timeline_ms[key]:+8.1f} ms  {label}")
    click.echo(f"   download: {'sha256 OK' if r.download_ok else 'BROKEN ' + r.download_error}")
    click.echo(f"   connections: {r.connections_ok}/{r.connections} verified by sha256"
               + (f"; broken (client ports): {r.broken_ports}" if r.broken_ports else ""))
    click.echo(f"   promoted flows {r.promoted}, misdelivered packets {r.misdelivery}, "
               f"flows lost {r.flows_lost}")
    click.echo(f"   => {'every connection SURVIVED' if r.survived else 'connections BROKE'}")


@click.command()
@click.option("--seed", type=int, default=1, show_default=True, help="the run's seed (replays it)")
@click.option("--steps", type=click.IntRange(0, 1000), default=4, show_default=True,
              help="faults injected one after another")
@click.option("--seeds", type=click.IntRange(1), default=None,
              help="run this many seeds from --seed on (a soak); print the failing ones")
@click.option("--policy", type=click.Choice(["off", "async", "ordered", "acked"]), default="async",
              show_default=True, help="sync policy of the simulated mesh (off: the control)")
@click.option("--controllers", type=click.IntRange(1, 9), default=1, show_default=True,
              help="controllers sharing the map store (compare-and-swap); 2 or more adds controller faults")
@click.option("--story", is_flag=True, help="the fixed claim-1 story instead (one stream, one failure)")
@click.option("--segments", type=click.IntRange(2, 10000), default=20, show_default=True,
              help="--story: data segments in the stream")
@click.option("--fail-after", type=click.IntRange(1, 9999), default=8, show_default=True,
              help="--story: segments through the primary before it dies")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
def simulate(seed: int, steps: int, seeds: int | None, policy: str, controllers: int, story: bool,
             segments: int, fail_after: int, as_json: bool) -> None:
    """The whole mesh in one process on a simulated clock and network (no
    root, no lab): random traffic and faults from a seed, then the checker.
    Exits 1 when an invariant broke, and prints the command that replays it."""
    if story:
        _story(segments, fail_after, as_json)
        return
    from dataplane.sim.run import run

    failed = []
    for s in range(seed, seed + (seeds or 1)):
        r = run(s, steps, policy, controllers=controllers)
        if as_json:
            click.echo(json.dumps({"seed": s, "steps": steps, "policy": policy,
                                   "controllers": controllers, "ok": r.ok,
                                   "violations": r.verdict.violations, "faults": r.faults,
                                   "connections": r.connections, "outcomes": r.outcomes,
                                   "sim_seconds": r.sim_seconds, "epochs": r.epochs}))
        elif seeds is None:
            ctls = "" if controllers == 1 else f", {controllers} controllers"
            click.echo(f"== seed {s}, {steps} faults, policy {policy}{ctls}")
            for t, _, what in r.faults:
                click.echo(f"  t={t * 1000:8.1f} ms  {what}")
            click.echo(f"  {r.connections} connections: {r.outcomes}; {r.epochs} map epochs; "
                       f"{r.sim_seconds:.2f} s simulated")
            for name, found in r.verdict.violations.items():
                click.echo(f"  {name}: {'ok' if not found else f'{len(found)} VIOLATIONS'}")
                for line in found[:10]:
                    click.echo(f"      {line}")
        if not r.ok:
            failed.append(r)
            if seeds is not None and not as_json:
                click.echo(f"seed {s}: {r.verdict.summary()}")
            click.echo(f"replay: {r.replay_command()}", err=True)
    if seeds is not None and not as_json:
        click.echo(f"{seeds} seeds, {len(failed)} failed"
                   + (f": {[r.seed for r in failed]}" if failed else ""))
    sys.exit(1 if failed else 0)


def _story(segments: int, fail_after: int, as_json: bool) -> None:
    """Claim 1 as a fixed story: one stream, its primary dies mid-stream."""
    from dataplane.sim.simulation import run_claim1

    if fail_after >= segments:
        raise click.BadParameter("must be smaller than --segments", param_hint="--fail-after")
    runs = [run_claim1(sync=s, segments=segments, fail_after=fail_after) for s in (True, False)]
    if as_json:
        click.echo(json.dumps([{**asdict(r), "survived": r.survived} for r in runs], indent=1))
        return
    for r in runs:
        title = "with state sync" if r.sync else "control: state sync disabled"
        click.echo(f"== claim 1, {title}")
        for t, what in r.timeline:
            click.echo(f"  t={t * 1000:7.1f} ms  {what}")
        click.echo(f"  server received {r.server_bytes}/{r.sent_bytes} bytes, "
                   f"FIN handshake {'done' if r.handshake_closed else 'NOT done'}, "
                   f"rerouted flag seen: {r.rerouted_seen}")
        for node, drops in sorted(r.drops.items()):
            click.echo(f"  drops at {node}: {drops}")
        click.echo(f"  => the connection {'SURVIVED' if r.survived else 'BROKE'}\n")


COMMANDS = (demo, simulate)
