"""`amesh map ...`: the service map from an operator's point of view."""

from __future__ import annotations

import json

import click

from dataplane.core.servicemap import DEFAULT_BUCKETS, MapError


def _parse_service(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, list[str]]:
    services: dict[str, list[str]] = {}
    for v in values:
        name, sep, insts = v.partition("=")
        names = [n.strip() for n in insts.split(",") if n.strip()]
        if not sep or not name or not names:
            raise click.BadParameter(f"{v!r}: expected SERVICE=inst1,inst2,...", ctx, param)
        if name in services:
            raise click.BadParameter(f"service {name!r} given twice", ctx, param)
        if len(set(names)) != len(names):
            raise click.BadParameter(f"{v!r}: an instance is named twice", ctx, param)
        services[name] = names
    return services


@click.group(name="map")
def map_group() -> None:
    """Inspect and plan service maps."""


@map_group.command(name="plan")
@click.option("--service", "services", multiple=True, required=True, callback=_parse_service,
              help="SERVICE=inst1,inst2,... (repeatable)")
@click.option("--fail", multiple=True, help="instance to declare dead (repeatable)")
@click.option("--add", multiple=True, help="instance to add: NAME or SERVICE=NAME (repeatable)")
@click.option("--buckets", type=click.IntRange(1, 1 << 20), default=DEFAULT_BUCKETS, show_default=True)
@click.option("--replicas", type=click.IntRange(1, 8), default=2, show_default=True,
              help="candidates per bucket (2 = primary + secondary)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plan_cmd(services: dict[str, list[str]], fail: tuple[str, ...], add: tuple[str, ...],
             buckets: int, replicas: int, as_json: bool) -> None:
    """What-if: buckets per instance before and after failing/adding instances."""
    from dataplane.core.mapdiff import plan

    try:
        _before, _after, diffs = plan(services, list(fail), list(add), buckets, replicas)
    except (MapError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps({s: d.as_dict() for s, d in sorted(diffs.items())}, indent=1))
        return
    for s, d in sorted(diffs.items()):
        click.echo(f"service {s} ({d.buckets} buckets)")
        click.echo(f"  {'instance':<16}{'before':>8}{'after':>8}")
        for name in sorted(d.before.keys() | d.after.keys()):
            b, a = d.before.get(name, 0), d.after.get(name, 0)
            click.echo(f"  {name:<16}{b:>8}{a:>8}")
        click.echo(f"  moved {d.moved} ({100 * d.moved / d.buckets:.2f} %), collateral "
                   f"{d.collateral}, to former secondary {d.to_secondary}, secondary changed "
                   f"{d.secondary_changed}")
        for move, n in sorted(d.moves.items()):
            click.echo(f"    {move}: {n}")


COMMANDS = (map_group,)
