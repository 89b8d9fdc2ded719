"""Click parameter types shared by the `amesh` commands.

Bad values become click usage errors (exit code 2) that name the option,
never tracebacks.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import click

from dataplane.core import header as wire


class IPAddressType(click.ParamType):
    """An IPv4 or IPv6 address, returned as text."""

    name = "address"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return str(ipaddress.ip_address(str(value)))
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 or IPv6 address", param, ctx)


class UIntType(click.ParamType):
    """An unsigned integer of `bits` bits, decimal or 0x-hex; optionally 'auto' -> None."""

    def __init__(self, bits: int, allow_auto: bool = False) -> None:
        self.bits = bits
        self.allow_auto = allow_auto
        self.name = f"u{bits}" + ("|auto" if allow_auto else "")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if isinstance(value, int) or value is None:
            n = value
        elif self.allow_auto and str(value).lower() == "auto":
            return None
        else:
            try:
                n = int(str(value), 0)
            except ValueError:
                self.fail(f"{value!r} is not an integer", param, ctx)
        if n is not None and not 0 <= n < (1 << self.bits):
            self.fail(f"{n} does not fit in {self.bits} bits (0-{(1 << self.bits) - 1})", param, ctx)
        return n


class FlagListType(click.ParamType):
    """Comma-separated affinity header flag names."""

    name = "flags"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[str]:
        if isinstance(value, list):
            return value
        names = [v.strip().lower() for v in str(value).split(",") if v.strip()]
        bad = [n for n in names if n not in wire.FLAG_NAMES]
        if bad:
            self.fail(f"unknown flag(s) {', '.join(bad)}; known: {', '.join(wire.FLAG_NAMES)}",
                      param, ctx)
        return names


IP_ADDRESS = IPAddressType()
PORT = click.IntRange(0, 65535)
U8, U24, U32 = UIntType(8), UIntType(24), UIntType(32)
CODE = UIntType(32, allow_auto=True)
FLAG_LIST = FlagListType()
