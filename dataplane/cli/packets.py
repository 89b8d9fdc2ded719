"""`amesh craft`, `amesh decode`, `amesh shell`: packets by hand.

Exit codes: 0 success, 1 a file that cannot be read or is damaged (after
printing what could be decoded), 2 bad options (click's usage errors).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from dataplane.core import header as wire
from dataplane.cli.params import CODE, FLAG_LIST, IP_ADDRESS, PORT, U8, U24, U32


def spec_from(opts: dict[str, Any]) -> Any:
    """A CraftSpec from the `craft_options` values (bad hex is a usage error)."""
    from layers.craft import DEFAULT_SECRET, CraftSpec

    payload_hex, payload = opts.pop("payload_hex"), opts.pop("payload")
    try:
        body = bytes.fromhex(payload_hex) if payload_hex is not None else payload.encode()
    except ValueError:
        raise click.BadParameter("not valid hex", param_hint="--payload-hex") from None
    secret = opts.pop("secret")
    return CraftSpec(**{k: v for k, v in opts.items() if k != "hdr_version"},
                     version=opts["hdr_version"], payload=body,
                     secret=secret.encode() if secret else DEFAULT_SECRET)


def craft_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The packet options shared by `craft` and `send`."""
    for option in reversed(CRAFT_OPTIONS):
        fn = option(fn)
    return fn


CRAFT_OPTIONS = [
    click.option("--src", type=IP_ADDRESS, default="10.1.0.10", show_default=True, help="inner source address"),
    click.option("--dst", type=IP_ADDRESS, default="10.2.0.10", show_default=True, help="inner destination address"),
    click.option("--sport", type=PORT, default=40000, show_default=True, help="source port (ICMP: echo id)"),
    click.option("--dport", type=PORT, default=80, show_default=True),
    click.option("--proto", type=click.Choice(["tcp", "udp", "icmp"]), default="tcp", show_default=True),
    click.option("--tcp-flags", default="S", show_default=True, help="TCP flags, e.g. S, SA, PA, FA"),
    click.option("--client", type=U32, default=1, show_default=True, help="client (tenant) id"),
    click.option("--chain", type=U24, default=1, show_default=True, help="service chain id"),
    click.option("--index", type=U8, default=2, show_default=True, help="service index"),
    click.option("--code", type=CODE, default="auto", show_default=True,
                  help="stream affinity code, or 'auto' to compute it with --secret"),
    click.option("--epoch", type=U32, default=1, show_default=True, help="service map epoch"),
    click.option("--flags", type=FLAG_LIST, default="", help="comma list: oam,rerouted,reverse"),
    click.option("--ttl", type=U8, default=wire.DEFAULT_TTL, show_default=True),
    click.option("--version", "hdr_version", type=click.IntRange(0, 15), default=wire.VERSION,
                  show_default=True, help="header version (set a wrong one to craft bad packets)"),
    click.option("--length", type=U8, default=None, help="header length in 4-byte words (default: computed)"),
    click.option("--payload", default="", help="payload text"),
    click.option("--payload-hex", default=None, help="payload as hex (overrides --payload)"),
    click.option("--count", type=click.IntRange(1, 100000), default=1, show_default=True),
    click.option("--encap", type=click.Choice(["udp", "ether", "none"]), default="udp", show_default=True,
                  help="udp: Ether/IP/UDP outer; ether: EtherType 0x88B5; none: inner packet only"),
    click.option("--outer-src", type=IP_ADDRESS, default="10.99.0.1", show_default=True),
    click.option("--outer-dst", type=IP_ADDRESS, default="10.99.0.2", show_default=True),
    click.option("--udp-port", type=click.IntRange(1, 65535), default=wire.UDP_PORT, show_default=True),
    click.option("--secret", default=None, help="mesh secret for --code auto (default: the lab's)"),
]


@click.command()
@craft_options
@click.option("-w", "--write", "out", type=click.Path(dir_okay=False, writable=True),
              help="write a pcap instead of printing a hexdump")
def craft(out: str | None, **opts: Any) -> None:
    """Build packets carrying the affinity header; write a pcap or print a hexdump."""
    from scapy.utils import hexdump, wrpcap

    from layers.craft import craft as build

    spec = spec_from(opts)
    try:
        pkts = build(spec)
        if out:
            wrpcap(out, pkts)
            click.echo(f"wrote {len(pkts)} packet(s) to {out}", err=True)
            return
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    for pkt in pkts:
        click.echo(pkt.summary())
        click.echo(hexdump(pkt, dump=True))


@click.command()
@click.argument("pcap", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="one JSON array of packets")
@click.option("--udp-port", type=click.IntRange(1, 65535), default=wire.UDP_PORT, show_default=True,
              help="UDP port the affinity header is bound to")
def decode(pcap: str, as_json: bool, udp_port: int) -> None:
    """Print the affinity header of every packet in PCAP, one line each."""
    from layers.affinity import set_udp_port
    from layers.describe import describe, dissect, one_line
    from layers.pcap import PcapError, read_frames

    set_udp_port(udp_port)
    rows = []
    error = None
    try:
        for n, frame in enumerate(read_frames(pcap), 1):
            row = {"n": n, "time": frame.time, **describe(dissect(frame.data, frame.linktype))}
            if as_json:
                rows.append(row)
            else:
                click.echo(one_line(n, row))
    except PcapError as exc:
        error = str(exc)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    if error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)


@click.command()
def shell() -> None:
    """Scapy's interactive shell with the affinity-mesh layers loaded."""
    from layers.shell import interact

    interact()


COMMANDS = (craft, decode, shell)
