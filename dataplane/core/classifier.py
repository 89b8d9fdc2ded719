"""The ingress classifier: which tenant, which chain, which stream code.

A client packet's source address names its tenant (longest matching prefix
among the tenants' prefixes), the tenant's chain is picked by server port
(`ServiceMap.chain_for`), and the stream affinity code is the keyed
symmetric hash of the six-tuple with the tenant's client id.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from dataplane.core.affinity import AffinityHasher
from dataplane.core.packet import Inner, PacketError
from dataplane.core.servicemap import Chain, ServiceMap


@dataclass(frozen=True, slots=True)
class Classification:
    client: int
    chain: Chain
    code: int


class Classifier:
    """Classifies client packets against one service map."""

    def __init__(self, smap: ServiceMap, hasher: AffinityHasher) -> None:
        self.hasher = hasher
        self._prefixes: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]] = []
        self._epoch = -1
        self.map = smap

    def tenant_of(self, src: bytes) -> int | None:
        """Client id of the tenant owning source address `src` (packed)."""
        self._refresh()
        addr = ipaddress.ip_address(src)
        for net, tenant in self._prefixes:
            if addr.version == net.version and addr in net:
                return tenant
        return None

    def classify(self, pkt: Inner) -> Classification:
        """Raise PacketError('unknown_tenant' / 'no_chain') when it cannot."""
        client = self.tenant_of(pkt.src)
        if client is None:
            raise PacketError("unknown_tenant")
        chain = self.map.chain_for(client, pkt.dport)
        if chain is None:
            raise PacketError("no_chain")
        return Classification(client, chain, self.hasher.code(client, pkt))

    def _refresh(self) -> None:
        if self._epoch == self.map.epoch:
            return
        nets = [(ipaddress.ip_network(p, strict=False), t.id)
                for t in self.map.tenants.values() for p in t.prefixes]
        self._prefixes = sorted(nets, key=lambda nt: -nt[0].prefixlen)
        self._epoch = self.map.epoch
