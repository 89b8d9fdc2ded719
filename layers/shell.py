"""Scapy's interactive shell with the project's layers and helpers preloaded.

`amesh shell` runs `interact()`. From a plain Python or Scapy session the same
names come from `from layers.shell import *`.
"""

from __future__ import annotations

from typing import Any

from layers.affinity import FLAG_BITS, Affinity, set_udp_port
from layers.sync import AffinitySync
from layers.craft import CraftSpec, craft

BANNER = ("affinity-mesh layers loaded: Affinity, AffinitySync, craft(CraftSpec(...)), set_udp_port;\n"
          "with a lab up: send_into(node, pkts), sniff_node(node, iface, seconds).\n"
          "Try: Ether()/IP()/UDP()/Affinity(chain=1, index=2, code=0xabc)/IP()/TCP()")

__all__ = ["Affinity", "AffinitySync", "CraftSpec", "FLAG_BITS", "craft", "interact", "namespace",
           "send_into", "set_udp_port", "sniff_node"]


def _topology(lab: str | None) -> Any:
    from dataplane.lab.state import LabState, labs
    from dataplane.lab.topology import load

    name = lab or (labs()[0] if len(labs()) == 1 else "default")
    state = LabState.load(name)
    if state is None:
        raise RuntimeError(f"lab {name!r} is not up (amesh lab up)")
    return load(state.topology)


def send_into(node: str, pkts: Any, iface: str | None = None, lab: str | None = None) -> dict:
    """Send Scapy packets (or a pcap path) into a lab node from inside its
    namespace; bare IP packets from a host get its Ethernet header."""
    from dataplane.lab.packets import send

    return send(_topology(lab), node, pkts if isinstance(pkts, str) else list(pkts), iface)


def sniff_node(node: str, iface: str, seconds: float = 2.0, bpf: str = "",
               lab: str | None = None) -> list:
    """Capture `seconds` of `iface` inside a lab node; returns Scapy packets."""
    import tempfile
    import time
    from pathlib import Path

    from dataplane.lab.packets import Capture

    d = Path(tempfile.mkdtemp(prefix="amesh-sniff-"))
    d.chmod(0o755)
    cap = Capture(_topology(lab), node, iface, d / "sniff.pcap", bpf)
    time.sleep(seconds)
    return cap.stop()


def namespace() -> dict[str, Any]:
    """The names preloaded into the shell."""
    return {name: globals()[name] for name in __all__ if name not in ("interact", "namespace")}


def interact() -> None:
    """Start Scapy's console (IPython if installed) with `namespace()` loaded."""
    from scapy.main import interact as scapy_interact

    scapy_interact(mydict=namespace(), argv=[], mybanner=BANNER)
