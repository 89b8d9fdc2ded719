"""`amesh demo`: the main job.

Until the namespace lab lands, the demo is the in-process claim-1 scenario
(`dataplane.simulation`): a TCP stream through AA -> {BA primary, BB
secondary}, BA dies mid-stream, the stream survives with state sync and
breaks without it.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import click


@click.command()
@click.option("--segments", type=click.IntRange(2, 10000), default=20, show_default=True,
              help="data segments in the stream")
@click.option("--fail-after", type=click.IntRange(1, 9999), default=8, show_default=True,
              help="segments through the primary before it dies")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
def demo(segments: int, fail_after: int, as_json: bool) -> None:
    """Kill a stream's primary mid-stream; show it survive (sync) and break (no sync)."""
    from dataplane.simulation import run_claim1

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


COMMANDS = (demo,)
