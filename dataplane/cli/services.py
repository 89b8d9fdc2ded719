"""`amesh services`: the service kinds a topology can name, and where each
comes from (built in, or an installed package's `affinity_mesh.services`
entry point), with the error of any plugin that cannot be used."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True)
def services(as_json: bool) -> None:
    """Service kinds: built-ins and those installed packages provide."""
    from importlib.metadata import entry_points

    from dataplane.core.services import BUILTIN, ENTRY_POINTS, ServiceError, load, registry

    rows = []
    for kind, value in sorted(registry().items()):
        row = {"kind": kind, "from": "built-in" if kind in BUILTIN else value, "status": "ok"}
        try:
            load(kind)
        except ServiceError as exc:
            row["status"] = str(exc)
        rows.append(row)
    shadowed = [{"kind": ep.name, "from": ep.value, "package": ep.dist.name if ep.dist else None}
                for ep in entry_points(group=ENTRY_POINTS) if ep.name in BUILTIN]
    if as_json:
        click.echo(json.dumps({"kinds": rows, "shadowed": shadowed}, indent=1))
        return
    for r in rows:
        click.echo(f"{r['kind']:14} {r['from']:40} {r['status']}")
    for s in shadowed:
        click.echo(f"(shadowed) {s['kind']} = {s['from']} of package {s['package']}: "
                   f"ignored, a built-in kind has that name")


COMMANDS = (services,)
