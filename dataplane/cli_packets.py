"""`amesh craft`, `amesh decode`, `amesh shell`: packets by hand.

Exit codes: 0 success, 1 a file that cannot be read or is damaged (after
printing what could be decoded), 2 bad options (click's usage errors).
"""

from __future__ import annotations

import json
import sys

import click

from dataplane import header as wire
from dataplane.cli_types import CODE, FLAG_LIST, IP_ADDRESS, PORT, U8, U24, U32


@click.command()
@click.option("--src", type=IP_ADDRESS, default="10.1.0.10", show_default=True, help="inner source address")
@click.option("--dst", type=IP_ADDRESS, default="10.2.0.10", show_default=True, help="inner destination address")
@click.option("--sport", type=PORT, default=40000, show_default=True, help="source port (ICMP: echo id)")
@click.option("--dport", type=PORT, default=80, show_default=True)
@click.option("--proto", type=click.Choice(["tcp", "udp", "icmp"]), default="tcp", show_default=True)
@click.option("--tcp-flags", default="S", show_default=True, help="TCP flags, e.g. S, SA, PA, FA")
@click.option("--client", type=U32, default=1, show_default=True, help="client (tenant) id")
@click.option("--chain", type=U24, default=1, show_default=True, help="service chain id")
@click.option("--index", type=U8, default=2, show_default=True, help="service index")
@click.option("--code", type=CODE, default="auto", show_default=True,
              help="stream affinity code, or 'auto' to compute it with --secret")
@click.option("--epoch", type=U32, default=1, show_default=True, help="service map epoch")
@click.option("--flags", type=FLAG_LIST, default="", help="comma list: oam,rerouted,reverse")
@click.option("--ttl", type=U8, default=wire.DEFAULT_TTL, show_default=True)
@click.option("--version", "hdr_version", type=click.IntRange(0, 15), default=wire.VERSION,
              show_default=True, help="header version (set a wrong one to craft bad packets)")
@click.option("--length", type=U8, default=None, help="header length in 4-byte words (default: computed)")
@click.option("--payload", default="", help="payload text")
@click.option("--payload-hex", default=None, help="payload as hex (overrides --payload)")
@click.option("--count", type=click.IntRange(1, 100000), default=1, show_default=True)
@click.option("--encap", type=click.Choice(["udp", "ether", "none"]), default="udp", show_default=True,
              help="udp: Ether/IP/UDP outer; ether: EtherType 0x88B5; none: inner packet only")
@click.option("--outer-src", type=IP_ADDRESS, default="10.99.0.1", show_default=True)
@click.option("--outer-dst", type=IP_ADDRESS, default="10.99.0.2", show_default=True)
@click.option("--udp-port", type=click.IntRange(1, 65535), default=wire.UDP_PORT, show_default=True)
@click.option("--secret", default=None, help="mesh secret for --code auto (default: the lab's)")
@click.option("-w", "--write", "out", type=click.Path(dir_okay=False, writable=True),
              help="write a pcap instead of printing a hexdump")
def craft(src: str, dst: str, sport: int, dport: int, proto: str, tcp_flags: str, client: int,
          chain: int, index: int, code: int | None, epoch: int, flags: list[str], ttl: int,
          hdr_version: int, length: int | None, payload: str, payload_hex: str | None,
          count: int, encap: str, outer_src: str, outer_dst: str, udp_port: int,
          secret: str | None, out: str | None) -> None:
    """Build packets carrying the affinity header; write a pcap or print a hexdump."""
    from scapy.utils import hexdump, wrpcap

    from layers.craft import DEFAULT_SECRET, CraftSpec, craft as build

    try:
        body = bytes.fromhex(payload_hex) if payload_hex is not None else payload.encode()
    except ValueError:
        raise click.BadParameter("not valid hex", param_hint="--payload-hex") from None
    spec = CraftSpec(src=src, dst=dst, sport=sport, dport=dport, proto=proto, tcp_flags=tcp_flags,
                     client=client, chain=chain, index=index, code=code, epoch=epoch, flags=flags,
                     ttl=ttl, version=hdr_version, length=length, payload=body, count=count,
                     encap=encap, outer_src=outer_src, outer_dst=outer_dst, udp_port=udp_port,
                     secret=secret.encode() if secret else DEFAULT_SECRET)
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
