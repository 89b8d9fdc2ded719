"""`amesh map ...`: the service map from an operator's point of view."""

from __future__ import annotations

import json

import click

from dataplane.core.servicemap import DEFAULT_BUCKETS, MapError


def _parse_service(ctx: click.Context, param: click.Parameter,
                   values: tuple[str, ...]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """SERVICE=inst1,inst2@host,... -> ({service: names}, {name: host})."""
    services: dict[str, list[str]] = {}
    hosts: dict[str, str] = {}
    for v in values:
        name, sep, insts = v.partition("=")
        names = []
        for item in (n.strip() for n in insts.split(",") if n.strip()):
            inst, at, host = item.partition("@")
            if at and not host:
                raise click.BadParameter(f"{item!r}: expected NAME@HOST", ctx, param)
            if host:
                hosts[inst] = host
            names.append(inst)
        if not sep or not name or not names:
            raise click.BadParameter(f"{v!r}: expected SERVICE=inst1,inst2,... "
                                     "(inst@host places an instance on a host)", ctx, param)
        if name in services:
            raise click.BadParameter(f"service {name!r} given twice", ctx, param)
        if len(set(names)) != len(names):
            raise click.BadParameter(f"{v!r}: an instance is named twice", ctx, param)
        services[name] = names
    return services, hosts


@click.group(name="map")
def map_group() -> None:
    """Inspect and plan service maps."""


@map_group.command(name="plan")
@click.option("--service", "services", multiple=True, callback=_parse_service,
              help="SERVICE=inst1,inst2,... (repeatable); inst@HOST puts an instance on a host")
@click.option("--topology", "topology", type=click.Path(dir_okay=False),
              help="take the services, their hosts ([machines]), buckets and anti_affinity from a lab file")
@click.option("--fail", multiple=True, help="instance to declare dead (repeatable)")
@click.option("--fail-host", "fail_hosts", multiple=True,
              help="host whose every instance dies at once (repeatable)")
@click.option("--anti-affinity/--no-anti-affinity", default=None,
              help="keep each bucket's secondary off its primary's host  [default: on]")
@click.option("--add", multiple=True, help="instance to add: NAME or SERVICE=NAME (repeatable)")
@click.option("--buckets", type=click.IntRange(1, 1 << 20), default=None,
              help=f"buckets per service  [default: the topology's, else {DEFAULT_BUCKETS}]")
@click.option("--replicas", type=click.IntRange(1, 8), default=2, show_default=True,
              help="candidates per bucket (2 = primary + secondary)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plan_cmd(services: tuple[dict[str, list[str]], dict[str, str]], topology: str | None,
             fail: tuple[str, ...], fail_hosts: tuple[str, ...], anti_affinity: bool | None,
             add: tuple[str, ...], buckets: int | None, replicas: int, as_json: bool) -> None:
    """What-if: buckets per instance before and after failing/adding
    instances or whole hosts; `lost` counts the buckets whose primary and
    secondary both failed, so their flows' state is gone."""
    from dataplane.core.mapdiff import lost, plan

    names, hosts = services
    if topology is not None:
        if names:
            raise click.UsageError("give --service or --topology, not both")
        from dataplane.lab.topology import TopologyError, load

        try:
            topo = load(topology)
        except TopologyError as exc:
            raise click.UsageError(str(exc)) from None
        names = {s.name: list(s.instances) for s in topo.services.values()}
        hosts = {i: topo.machine_of(i) for insts in names.values() for i in insts if topo.machine_of(i)}
        buckets = topo.buckets if buckets is None else buckets
        anti_affinity = topo.anti_affinity if anti_affinity is None else anti_affinity
    elif not names:
        raise click.UsageError("give the services: --service SERVICE=inst1,... or --topology FILE")
    buckets = DEFAULT_BUCKETS if buckets is None else buckets
    anti_affinity = True if anti_affinity is None else anti_affinity
    try:
        before, after, diffs = plan(names, list(fail), list(add), buckets, replicas, hosts,
                                    list(fail_hosts), anti_affinity)
    except (MapError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    dead = {n for s in after.services.values() for n, i in s.items() if not after.is_alive(n)}
    gone = lost(before, dead)
    if as_json:
        click.echo(json.dumps({s: {**d.as_dict(), "lost": gone[s]} for s, d in sorted(diffs.items())},
                              indent=1))
        return
    for s, d in sorted(diffs.items()):
        click.echo(f"service {s} ({d.buckets} buckets)")
        click.echo(f"  {'instance':<16}{'before':>8}{'after':>8}")
        for name in sorted(d.before.keys() | d.after.keys()):
            b, a = d.before.get(name, 0), d.after.get(name, 0)
            click.echo(f"  {name:<16}{b:>8}{a:>8}")
        click.echo(f"  moved {d.moved} ({100 * d.moved / d.buckets:.2f} %), collateral "
                   f"{d.collateral}, to former secondary {d.to_secondary}, secondary changed "
                   f"{d.secondary_changed}, lost {gone[s]}")
        for move, n in sorted(d.moves.items()):
            click.echo(f"    {move}: {n}")


COMMANDS = (map_group,)
