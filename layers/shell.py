"""Scapy's interactive shell with the project's layers and helpers preloaded.

`amesh shell` runs `interact()`. From a plain Python or Scapy session the same
names come from `from layers.shell import *`.
"""

from __future__ import annotations

from typing import Any

from layers.affinity import FLAG_BITS, Affinity, set_udp_port
from layers.craft import CraftSpec, craft

BANNER = ("affinity-mesh layers loaded: Affinity, craft(CraftSpec(...)), set_udp_port.\n"
          "Try: Ether()/IP()/UDP()/Affinity(chain=1, index=2, code=0xabc)/IP()/TCP()")

__all__ = ["Affinity", "CraftSpec", "FLAG_BITS", "craft", "interact", "namespace", "set_udp_port"]


def namespace() -> dict[str, Any]:
    """The names preloaded into the shell."""
    return {name: globals()[name] for name in __all__ if name not in ("interact", "namespace")}


def interact() -> None:
    """Start Scapy's console (IPython if installed) with `namespace()` loaded."""
    from scapy.main import interact as scapy_interact

    scapy_interact(mydict=namespace(), argv=[], mybanner=BANNER)
