"""The fixed, documented reason values: why a packet was dropped, why a sync
or control datagram was refused.

These are the values of the `reason` label of `amesh_drops_total` and
`amesh_sync_refused_total` (`dataplane.shells.metrics`), so they are part of
the interface: a dashboard or an alert written against them must keep
working across releases (Hubble changed its drop reasons between releases;
we do not). Rules:

* a value, once released, keeps its name and meaning; it is never removed
  (a reason the code no longer produces simply stays at zero);
* the code counts drops under internal counter names (`Node.drops`); those
  are the documented names themselves unless `DROP_ALIASES` maps a renamed
  internal name onto the documented one: rename in code, add an alias,
  the label stays;
* a counter name that is neither documented nor aliased is exported as
  `unclassified`, never silently lost; `tests/test_reasons.py` scans the
  code for every reason it can count and fails on one missing here, so an
  undocumented reason cannot be merged. Adding a reason = one line below.

A service from another package (`affinity_mesh.services`) should drop with
a documented reason (most often `policy_denied`); its other reasons are
exported as `unclassified`.
"""

from __future__ import annotations

DROP_REASONS: dict[str, str] = {
    # the affinity header (dataplane.core.header)
    "truncated": "shorter than the 20-byte affinity header",
    "bad_version": "affinity header version other than 0",
    "bad_length": "affinity header length field below 5 words or past the datagram",
    "ttl_expired": "affinity header TTL reached 0 (a forwarding loop)",
    "bad_next_proto": "affinity header next-protocol not IPv4, IPv6 or Ethernet",
    "next_proto_mismatch": "affinity header next-protocol says another IP version than the inner packet's",
    "bad_option": "an affinity header option that runs past the header or has a wrong size",
    # the inner packet (dataplane.core.packet)
    "inner_truncated": "inner packet shorter than its own headers say",
    "inner_not_ip": "inner packet neither IPv4 nor IPv6",
    "inner_bad_ip_header": "inner IPv4 header length below 20 bytes or past the total length",
    "inner_bad_tcp_header": "inner TCP data offset below 20 bytes or past the segment",
    # fragments and ICMP errors at the edges (dataplane.core.defrag, node)
    "frag_tiny": "a first IP fragment too short for its whole transport header (RFC 1858)",
    "frag_malformed": "an IP fragment other than the last whose length is not a multiple of 8",
    "frag_too_big": "IP fragments reaching past 65,535 bytes",
    "frag_overlap": "overlapping IP fragments that disagree (the whole datagram is dropped)",
    "frag_limit": "IP fragment past the reassembly limits (datagrams, bytes or fragments in progress)",
    "frag_timeout": "IP datagram not complete within the reassembly timeout (counted per datagram)",
    "frag_unsupported": "an IPv6 fragment: not reassembled, so not classified (stated policy)",
    "link_local": "a host's ICMPv6 neighbour discovery or MLD, or link-local or multicast IPv6: the link's own business",
    "too_big": "an IPv6 packet bigger than the host link's MTU: answered with ICMPv6 Packet Too Big",
    "icmp_bad_quote": "ICMP error whose quoted packet is not an IP header with 8 bytes after it",
    "icmp_unrelated": "ICMP error quoting no flow this node holds",
    # classification and routing (dataplane.core.classifier, node)
    "steering_attempt": "a client packet to or from the fabric port: an attempt to steer the mesh",
    "unknown_tenant": "client address in no tenant's prefixes",
    "no_chain": "the tenant has no chain for the destination port",
    "unknown_chain": "chain id not in the service map",
    "bad_index": "service index outside the chain, or a reply/forward flag at the wrong edge",
    "wrong_service": "packet addressed to an instance of another service",
    "no_instance": "no live instance of the next service",
    "no_flow_return": "a server packet of no flow the egress delivered",
    # services (dataplane.core.services)
    "misdelivery": "mid-stream packet of a flow the instance holds no state for",
    "no_state": "the service kept no state for a new flow and gave no reason",
    "policy_denied": "new flow refused by the service's policy",
    "policy_rejected": "new flow refused and answered (a TCP RST)",
    "rst_out_of_window": "TCP RST outside the flow's window",
    "rst_challenge": "TCP RST inside the window but not at the receiver's next byte (RFC 5961; the hosts' challenge ACK sorts it out)",
    "out_of_window": "TCP segment outside the flow's window",
    "ack_out_of_window": "TCP acknowledgement of data never sent",
    "unexpected_syn": "a SYN in the wrong direction or state of a TCP connection",
    "blocked": "packet of a flow an inspection content rule blocked",
    "embryonic_limit": "new flow refused: its tenant holds as many half-open flows as it may",
    "bad_checksum": "a TCP or UDP segment with a wrong checksum, which its receiver would discard",
    "out_of_order": "a TCP segment ahead of the inspected stream (its sender retransmits it in order)",
    "overlap_mismatch": "a TCP retransmission whose bytes differ from the ones inspected",
    "inspect_window": "a TCP segment more than 64 KiB past what its receiver acknowledged, while inspected",
    "nat_unsupported": "a packet the NAT cannot translate (not IPv4 TCP/UDP, a fragment)",
    "nat_exhausted": "no free public address and port in the NAT instance's share of the pool",
    # state sync (dataplane.core.node.apply_update)
    "bad_state": "a mirrored flow state the service refused to decode",
    # the forwarder shell (dataplane.shells.forwarder)
    "declared_dead": "received while the map declares this instance dead (it stopped serving)",
    "no_address": "next hop has no fabric address in the map",
    "send_error": "the kernel refused to send",
    "unknown_host": "delivery to an address with no lab host behind the edge",
    "not_a_node": "a fabric packet from an address that is no node of the map",
    # the catch-all
    "unclassified": "a reason this release does not document (see the node's status for its name)",
}

DROP_ALIASES: dict[str, str] = {}
"""Internal drop counter name -> documented reason, for internal names that
changed after their reason was released."""

REFUSAL_REASONS: dict[str, str] = {
    # dataplane.core.syncwire.decode
    "truncated": "datagram shorter than its header, body and tag",
    "bad_version": "sync wire version other than the one spoken",
    "bad_length": "body length field disagrees with the datagram",
    "unknown_key": "key id not in the keyring",
    "bad_mac": "HMAC does not verify",
    "wrong_receiver": "addressed to another node",
    "malformed": "a record that does not parse",
    # dataplane.core.syncchannel, control
    "wrong_sender": "sender is not the channel's peer",
    "stale_incarnation": "from an older incarnation of the peer than one already heard",
    "replay": "datagram counter already seen or behind the anti-replay window",
    "unknown_sender": "sender id of no node in the map",
    "wrong_incarnation": "bound to an incarnation of the receiver other than the current one",
    "key_not_for_sender": "signed with a key the sender is not allowed to use",
    "unbound_records": "control records (other than the heartbeat) before the sender heard this incarnation",
    "unclassified": "a reason this release does not document",
}
"""Why a sync or control datagram was refused (`amesh_sync_refused_total`,
`amesh_control_refused_total`)."""


def drop_reason(counter: str) -> str:
    """The documented reason of an internal drop counter name."""
    counter = DROP_ALIASES.get(counter, counter)
    return counter if counter in DROP_REASONS else "unclassified"


def refusal_reason(counter: str) -> str:
    """The documented reason of a sync/control refusal counter name."""
    return counter if counter in REFUSAL_REASONS else "unclassified"
