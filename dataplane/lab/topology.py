"""Lab topology files (TOML): parse, validate, and derive the service map.

Every error names the file, the key and what is wrong, e.g.
``labs/x.toml: services.B.instances[1]: name 'Bad_Name' must match [a-z][a-z0-9-]*``.
See `labs/default.toml` for a commented example of every section.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataplane.core import syncwire as sw
from dataplane.core.affinity import AffinityHasher
from dataplane.core.node import EGRESS, INGRESS
from dataplane.core.servicemap import NAME, SERVICE_NAME, Chain, Instance, InstanceState, ServiceMap, Tenant
from dataplane.core.services import create, load as load_service

DEFAULT_LAB = Path(__file__).resolve().parents[2] / "labs" / "default.toml"
"""The default lab: what `amesh lab up`, the demo, the simulator and the
pytest plugin use when no file is named."""
PREFIX = re.compile(r"^[a-z][a-z0-9]{0,3}$")
POLICIES = ("off", "async", "ordered", "acked")
STORES = ("embedded", "etcd")
ENDPOINT = re.compile(r"^http://(?P<ip>[0-9.]+):(?P<port>[0-9]{1,5})$")
FIRST_INSTANCE_HOST = 10
FIRST_PEER_HOST = 5
MAX_PEERS = FIRST_INSTANCE_HOST - FIRST_PEER_HOST
"""Peer controllers take the fabric addresses between the edges' and the instances'."""


class TopologyError(ValueError):
    """A topology file that cannot be used; the message says where and why."""


@dataclass
class Host:
    name: str
    address: ipaddress.IPv4Interface
    attach: str
    gateway: ipaddress.IPv4Address
    address6: ipaddress.IPv6Interface | None = None
    """Dual stack: the host's IPv6 address (optional)."""
    gateway6: ipaddress.IPv6Address | None = None
    """Its IPv6 default route: its edge's `address6`."""


@dataclass
class Edge:
    name: str
    address: ipaddress.IPv4Interface
    address6: ipaddress.IPv6Interface | None = None
    """The hosts' IPv6 gateway on this edge's host bridge (dual stack)."""


@dataclass
class ServiceSpec:
    name: str
    kind: str
    instances: list[str]
    sync_key: bytes
    """HMAC key of the sync channels between this service's instances only."""
    options: dict[str, Any] = field(default_factory=dict)
    spares: list[str] = field(default_factory=list)
    """Instances that run but hold no role until `amesh lab scale-out`."""

    @property
    def members(self) -> list[str]:
        return [*self.instances, *self.spares]


GSO_MTU = 65535
VXLAN_OVERHEAD = 50
"""Outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8: what the underlay's MTU
adds to the fabric's so that no fabric frame is fragmented."""
"""Fabric MTU when super-frames are carried: one 64 KB frame, one datagram."""
GSO_MAX_SIZE = 60000
"""Largest super-frame a host may build (its gso_max_size): with the
affinity header and its options, outer IP and UDP, it still fits one
datagram of 65,535 bytes."""


@dataclass
class Timers:
    heartbeat: float = 0.005
    misses: int = 4
    holddown: float = 1.0
    map_refresh: float = 0.100


@dataclass
class Observability:
    """`[observability]`: every forwarder and the controller serve Prometheus
    metrics on `metrics_port` of their fabric address (0: none); with
    `prometheus`, the lab runs a Prometheus server on the fabric scraping
    them every `scrape_interval` seconds."""

    metrics_port: int = 9469
    prometheus: bool = False
    prometheus_port: int = 9090
    scrape_interval: float = 0.200


@dataclass
class Limits:
    """`[limits]`: bounds of every forwarder's flow table. `flows` is the
    table's capacity (also the most flow keys a sync channel remembers for
    a peer before asking for a full bulk instead); `embryonic_per_tenant`
    how many half-open flows one tenant may hold on one instance, so a flood
    from one tenant is refused before it fills the table for the others."""

    flows: int = 1 << 20
    embryonic_per_tenant: int = 1 << 16


PROMETHEUS_NODE = "prom"
"""The name (and namespace suffix) of the lab's Prometheus server."""
ETCD_NODE = "etcd"
"""Name prefix of the etcd members the lab runs (etcd1, etcd2, ...)."""
AGENT_NODE = "ag"
"""Name prefix of a declared machine's agent (`ag-<machine>`; `agent` for
the nodes on no declared machine)."""
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380


@dataclass
class ExtraNode:
    """A lab process on the fabric that is not a forwarder (the Prometheus
    server): its own namespace, a fabric address from the top of the subnet,
    started after the forwarders by `dataplane.lab.build`."""

    name: str
    address: str


@dataclass
class Topology:
    path: str
    name: str
    prefix: str
    buckets: int
    secret: bytes
    control_key: bytes
    """The controller's master key: each forwarder gets only its own pair key."""
    policy: str
    timers: Timers
    subnet: ipaddress.IPv4Network
    mtu: int
    controller: str
    ingress: Edge
    egress: Edge
    hosts: dict[str, Host]
    services: dict[str, ServiceSpec]
    tenants: list[dict[str, Any]]
    gso: bool = False
    """Carry the hosts' TCP super-frames whole (see `dataplane.shells.forwarder`)."""
    observability: Observability = field(default_factory=Observability)
    limits: Limits = field(default_factory=Limits)
    store: str = "embedded"
    """Where the controller keeps the map: "embedded" (its file) or "etcd"."""
    etcd_endpoints: list[str] = field(default_factory=list)
    """`[controller] endpoints` of the etcd cluster, as http://IP:PORT: given
    (a cluster outside the lab), or those of the members the lab runs."""
    etcd_members: int = 0
    """etcd members the lab runs on its fabric (`[controller] members`, 3
    when store = "etcd" names no endpoints; 0 otherwise)."""
    machines: dict[str, list[str]] = field(default_factory=dict)
    """`[machines.NAME] nodes = [...]`: the failure domains; a node in none
    is a machine of its own (so a topology without machines is unchanged)."""
    anti_affinity: bool = True
    """`[lab] anti_affinity`: keep a bucket's secondary off its primary's machine."""
    agent: bool = False
    """`[lab] agents`: run one `amesh agent` per machine, which reports its
    forwarders' exits to the controller the moment they happen."""
    underlay: ipaddress.IPv4Network | None = None
    """`[fabric] underlay`: each declared machine is a namespace of its own
    with its own fabric bridge, joined to the others by VXLAN over this
    subnet (the underlay); None: one fabric bridge for the whole lab."""
    peers: list[str] = field(default_factory=list)
    """`[controller] peers`: more controllers, the equals of `controller`,
    sharing the map in etcd (compare-and-swap); `controller` is the one the
    lab's tools ask first."""

    # -- derived ------------------------------------------------------------------

    @property
    def controllers(self) -> list[str]:
        """Every controller: `controller` first, then its peers."""
        return [self.controller, *self.peers]

    def forwarders(self) -> list[str]:
        """Nodes that run a forwarder process on the fabric, in address order."""
        return [self.controller, self.ingress.name, self.egress.name, *self.peers,
                *(i for s in self.services.values() for i in s.members)]

    def fabric_ip(self, node: str) -> str:
        """The controller .2, the edges .3 and .4, the peer controllers from
        .5 (at most MAX_PEERS of them), instances from .10."""
        k = self.forwarders().index(node)
        peers_end = 3 + len(self.peers)
        host = 2 + k if k < 3 else FIRST_PEER_HOST + k - 3 if k < peers_end else \
            FIRST_INSTANCE_HOST + k - peers_end
        return str(self.subnet.network_address + host)

    def extra_nodes(self) -> list[ExtraNode]:
        """Fabric nodes that run no forwarder, addressed down from the top
        of the fabric subnet."""
        top = self.subnet.broadcast_address
        out = []
        if self.observability.prometheus:
            out.append(ExtraNode(PROMETHEUS_NODE, str(top - 1 - len(out))))
        for k in range(1, self.etcd_members + 1):
            out.append(ExtraNode(f"{ETCD_NODE}{k}", str(top - 1 - len(out))))
        for agent in self.agents():
            out.append(ExtraNode(agent, str(top - 1 - len(out))))
        return out

    def agents(self) -> dict[str, list[str]]:
        """With `[lab] agents`: each machine's agent and the forwarders it
        watches (the controller's own process excepted: a controller cannot
        declare itself dead): `ag-<machine>` for a declared machine,
        `agent` for the nodes in none (the single machine of a lab without
        `[machines]`)."""
        if not self.agent:
            return {}
        out: dict[str, list[str]] = {}
        for node in self.forwarders():
            if node not in self.controllers:
                m = self.machine_of(node)
                out.setdefault(f"{AGENT_NODE}-{m}" if m else "agent", []).append(node)
        return out

    def netns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    @property
    def fabric_ns(self) -> str:
        return f"{self.prefix}-fabric"

    @property
    def underlay_ns(self) -> str:
        return f"{self.prefix}-underlay"

    def fabric_home(self, node: str) -> str:
        """The namespace whose fabric bridge `node` (a forwarder or an extra
        node) is plugged into: its machine's with an underlay, else the
        lab's one fabric namespace (also for the nodes in no machine)."""
        if self.underlay is None:
            return self.fabric_ns
        m = self.machine_of(node) or next((m for m in self.machines if node == f"{AGENT_NODE}-{m}"), "")
        return self.netns(m) if m else self.fabric_ns

    def underlay_hosts(self) -> list[tuple[str, str]]:
        """(namespace, underlay address) of every machine with an underlay:
        the lab's fabric namespace (the nodes in no machine) first, .1, then
        the declared machines from .2 in file order."""
        if self.underlay is None:
            return []
        homes = [self.fabric_ns, *(self.netns(m) for m in self.machines)]
        return [(ns, str(self.underlay.network_address + 1 + k)) for k, ns in enumerate(homes)]

    def role(self, node: str) -> str:
        if node in self.controllers:
            return "controller"
        if node == self.ingress.name:
            return "ingress"
        if node == self.egress.name:
            return "egress"
        if node in self.hosts:
            return "host"
        return "instance"

    def mac_of(self, node: str) -> str:
        """Fixed, locally administered MACs for host links and the edges'
        host bridges, so forwarders know them without ARP."""
        if node == self.ingress.name:
            return "02:a2:00:00:00:01"
        if node == self.egress.name:
            return "02:a2:00:00:00:02"
        i = list(self.hosts).index(node) + 1
        return f"02:a1:00:00:{i >> 8:02x}:{i & 0xFF:02x}"

    def stream_code(self, sport: int, dport: int, proto: int = 6, host: str = "client",
                    server: str = "server", client: int = 1, family: int = 4) -> int:
        """The affinity code of a stream from `host` to `server` (tenant
        `client`), between their IPv4 or (`family` 6) IPv6 addresses."""
        return AffinityHasher(self.secret).code_of(client, self.host_ip(host, family), sport,
                                                   self.host_ip(server, family), dport, proto)

    def host_ip(self, host: str, family: int = 4) -> str:
        """A host's IPv4 or (`family` 6) IPv6 address as text."""
        h = self.hosts[host]
        if family == 6:
            if h.address6 is None:
                raise ValueError(f"host {host!r} has no address6")
            return str(h.address6.ip)
        return str(h.address.ip)

    def service_of(self, node: str) -> ServiceSpec | None:
        return next((s for s in self.services.values() if node in s.members), None)

    def sync_keyring(self, node: str) -> sw.Keyring:
        """An instance's sync keys: its service's key, bound to its members."""
        spec = self.service_of(node)
        if spec is None:
            raise ValueError(f"{node!r} is not a service instance")
        return sw.Keyring({1: spec.sync_key}, 1, senders=[sw.node_id(n) for n in spec.members])

    def control_keyring(self, node: str, controller: str | None = None) -> sw.Keyring:
        """The controller's: the master key, pairwise, bound to the forwarders;
        a forwarder's: its pair key with the controller, bound to the controller.
        `controller` names another controller sharing the map store (the
        simulator's): every controller holds the master, and a forwarder has
        one pair key per controller."""
        controller = controller or (node if node in self.peers else self.controller)
        ctl = sw.node_id(controller)
        if node == controller:
            return sw.Keyring({1: self.control_key}, 1, pairwise=True,
                              senders=[sw.node_id(n) for n in [*self.forwarders(), *self.agents()]
                                       if n != node])
        return sw.Keyring({1: sw.pair_key(self.control_key, ctl, sw.node_id(node))}, 1, senders=[ctl])

    def all_nodes(self) -> list[str]:
        return [*self.hosts, *self.forwarders()]

    def machine_of(self, node: str) -> str:
        """The machine (failure domain) a node runs on; "" when none is
        declared, which the map reads as a machine of its own."""
        return next((m for m, nodes in self.machines.items() if node in nodes), "")

    def build_map(self) -> ServiceMap:
        """The initial service map: every instance active and in sync."""
        m = ServiceMap(buckets=self.buckets, anti_affinity=self.anti_affinity)
        m.add_service(INGRESS, [Instance(self.ingress.name, self.fabric_ip(self.ingress.name))])
        for s in self.services.values():
            m.add_service(s.name, [Instance(i, self.fabric_ip(i), host=self.machine_of(i)) for i in s.instances]
                          + [Instance(i, self.fabric_ip(i), InstanceState.SPARE, self.machine_of(i))
                             for i in s.spares])
        m.add_service(EGRESS, [Instance(self.egress.name, self.fabric_ip(self.egress.name))])
        for t in self.tenants:
            m.add_tenant(Tenant(t["id"], t["name"], t["prefixes"]))
            for c in t["chains"]:
                m.add_chain(Chain(c["id"], t["id"], c["services"], c.get("match_dports", [])))
        return m


def load(path: str | Path) -> Topology:
    """Read and validate a topology file; raise TopologyError on any problem."""
    p = str(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise TopologyError(f"{p}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{p}: not valid TOML: {exc}") from None
    return _Validator(p, doc).topology()


class _Validator:
    def __init__(self, path: str, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc
        self.names: dict[str, str] = {}

    def fail(self, key: str, what: str) -> TopologyError:
        return TopologyError(f"{self.path}: {key}: {what}")

    def get(self, table: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...],
            default: Any = ...) -> Any:
        if key not in table:
            if default is ...:
                raise self.fail(f"{where}.{key}" if where else key, "missing")
            return default
        value = table[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(f"{where}.{key}" if where else key,
                            f"expected {names}, got {type(value).__name__} {value!r}")
        return value

    def table(self, key: str, required: bool = True) -> dict[str, Any]:
        return self.get(self.doc, key, "", dict, ... if required else {})

    def name(self, value: Any, key: str, role: str) -> str:
        if not isinstance(value, str) or not NAME.match(value):
            raise self.fail(key, f"name {value!r} must match [a-z][a-z0-9-]* (at most 10 characters)")
        if value in self.names:
            raise self.fail(key, f"name {value!r} already used by the {self.names[value]}")
        self.names[value] = role
        return value

    def key(self, table: dict[str, Any], key: str, where: str) -> bytes:
        value = self.get(table, key, where, str).encode()
        if len(value) < 16:
            raise self.fail(f"{where}.{key}", "must be at least 16 bytes")
        return value

    def iface(self, value: Any, key: str) -> ipaddress.IPv4Interface:
        try:
            iface = ipaddress.IPv4Interface(value)
        except (ValueError, TypeError):
            raise self.fail(key, f"{value!r} is not an IPv4 address with prefix, like 10.1.0.1/24") from None
        if iface.network.prefixlen == 32:
            raise self.fail(key, "needs a prefix length below 32")
        return iface

    def iface6(self, table: dict[str, Any], where: str) -> ipaddress.IPv6Interface | None:
        """The optional `address6` of an edge or a host: a global or unique
        local IPv6 address with a prefix (link-local, multicast, loopback
        and unspecified addresses are the link's own, never a host's)."""
        value = self.get(table, "address6", where, str, None)
        if value is None:
            return None
        key = f"{where}.address6"
        try:
            iface = ipaddress.IPv6Interface(value)
        except (ValueError, TypeError):
            raise self.fail(key, f"{value!r} is not an IPv6 address with prefix, like fd00:1::1/64") from None
        if iface.network.prefixlen == 128:
            raise self.fail(key, "needs a prefix length below 128")
        ip = iface.ip
        if ip.is_link_local or ip.is_multicast or ip.is_loopback or ip.is_unspecified:
            raise self.fail(key, f"{ip} is a link-local, multicast, loopback or unspecified address")
        return iface

    def topology(self) -> Topology:
        unknown = set(self.doc) - {"lab", "timers", "fabric", "controller", "ingress", "egress",
                                   "hosts", "services", "tenants", "observability",
                                   "limits", "machines"}
        if unknown:
            raise self.fail(sorted(unknown)[0], "unknown section")
        lab = self.table("lab")
        name = self.get(lab, "name", "lab", str)
        prefix = self.get(lab, "prefix", "lab", str, "am")
        if not PREFIX.match(prefix):
            raise self.fail("lab.prefix", f"{prefix!r} must be 1-4 lowercase letters/digits")
        buckets = self.get(lab, "buckets", "lab", int, 4096)
        if not 1 <= buckets <= 1 << 20:
            raise self.fail("lab.buckets", "must be between 1 and 1048576")
        secret = self.get(lab, "secret", "lab", str).encode()
        if not 1 <= len(secret) <= 64:
            raise self.fail("lab.secret", "must be 1 to 64 bytes")
        if "sync_key" in lab:
            raise self.fail("lab.sync_key", "replaced by lab.control_key (the controller's) and "
                            "services.<name>.sync_key (one per service): one key for both let "
                            "any instance sign maps")
        control_key = self.key(lab, "control_key", "lab")
        policy = self.get(lab, "policy", "lab", str, "async")
        if policy not in POLICIES:
            raise self.fail("lab.policy", f"{policy!r} is not one of {', '.join(POLICIES)}")
        timers = self.timers(self.table("timers", required=False))
        fabric = self.table("fabric")
        try:
            subnet = ipaddress.IPv4Network(self.get(fabric, "subnet", "fabric", str))
        except ValueError as exc:
            raise self.fail("fabric.subnet", str(exc)) from None
        mtu = self.get(fabric, "mtu", "fabric", int, 1600)
        if not 1548 <= mtu <= 9000:
            raise self.fail("fabric.mtu", "must be 1548-9000 (1500 + 48 bytes of encapsulation)")
        gso = self.get(fabric, "gso", "fabric", bool, False)
        underlay = self.underlay(fabric, subnet, gso)
        ctl = self.name(self.get(self.table("controller"), "name", "controller", str),
                        "controller.name", "controller")
        peers = self.peers(self.table("controller"))
        anti_affinity = self.get(lab, "anti_affinity", "lab", bool, True)
        agent = self.get(lab, "agents", "lab", bool, False)
        edges = {}
        for role in ("ingress", "egress"):
            t = self.table(role)
            edges[role] = Edge(self.name(self.get(t, "name", role, str), f"{role}.name", role),
                               self.iface(self.get(t, "address", role, str), f"{role}.address"),
                               self.iface6(t, role))
        hosts = self.hosts(edges)
        services = self.services()
        tenants = self.tenants(services)
        store, endpoints, members = self.store(self.table("controller"))
        machines = self.machines(self.table("machines", required=False))
        if underlay is not None and "underlay" in self.names:
            raise self.fail("fabric.underlay", "the underlay's namespace is <prefix>-underlay: "
                            f"'underlay' is taken by the {self.names['underlay']}")
        if underlay is not None and not machines:
            raise self.fail("fabric.underlay", "needs machines ([machines.NAME] nodes = [...]) to join")
        if underlay is not None and underlay.num_addresses - 2 < len(machines) + 1:
            raise self.fail("fabric.underlay", f"too small for {len(machines) + 1} machines")
        obs = self.observability(self.table("observability", required=False))
        limits = self.limits(self.table("limits", required=False))
        n_extra = int(obs.prometheus) + members + (len(machines) + 1 if agent else 0)
        if peers and store != "etcd":
            raise self.fail("controller.peers", "several controllers share the map through etcd: "
                            "needs store = \"etcd\"")
        n_fabric = 3 + sum(len(s.members) for s in services.values())
        if FIRST_INSTANCE_HOST + n_fabric + n_extra > subnet.num_addresses - 2:
            raise self.fail("fabric.subnet", f"too small for {n_fabric + n_extra} fabric nodes")
        if gso:
            for s in services.values():
                if hasattr(load_service(s.kind), "rewrite"):
                    raise self.fail(f"services.{s.name}.kind", f"{s.kind!r} rewrites packets, which "
                                    "the super-frames of [fabric] gso (partial checksums) do not allow")
        keys = {"lab.control_key": control_key}
        for sname, spec in services.items():
            other = next((k for k, v in keys.items() if v == spec.sync_key), None)
            if other is not None:
                raise self.fail(f"services.{sname}.sync_key", f"the same as {other}: every key must differ")
            keys[f"services.{sname}.sync_key"] = spec.sync_key
        topo = Topology(self.path, name, prefix, buckets, secret, control_key, policy, timers, subnet,
                        GSO_MTU if gso else mtu, ctl, edges["ingress"], edges["egress"], hosts,
                        services, tenants, gso, obs, limits, store, endpoints, members, machines,
                        anti_affinity, agent, underlay, peers)
        for a in topo.agents():
            if a in self.names:
                raise self.fail("lab.agents", f"the agents are named agent and {AGENT_NODE}-<machine>: "
                                f"{a} is taken by the {self.names[a]}")
        if members:
            topo.etcd_endpoints = [f"http://{e.address}:{ETCD_CLIENT_PORT}" for e in topo.extra_nodes()
                                   if e.name.startswith(ETCD_NODE)]
        return topo

    def underlay(self, fabric: dict[str, Any], subnet: ipaddress.IPv4Network,
                 gso: bool) -> ipaddress.IPv4Network | None:
        """`[fabric] underlay`: the machines' own subnet, VXLAN between them."""
        value = self.get(fabric, "underlay", "fabric", str, None)
        if value is None:
            return None
        try:
            net = ipaddress.IPv4Network(value)
        except ValueError as exc:
            raise self.fail("fabric.underlay", str(exc)) from None
        if net.overlaps(subnet):
            raise self.fail("fabric.underlay", f"{net} overlaps the fabric subnet {subnet}")
        if gso:
            raise self.fail("fabric.underlay", "not with gso: a 64 KB super-frame plus VXLAN's "
                            f"{VXLAN_OVERHEAD} bytes exceeds the largest MTU")
        return net

    def peers(self, t: dict[str, Any]) -> list[str]:
        """`[controller] peers`: the other controllers' names (fabric .5 up)."""
        names = self.get(t, "peers", "controller", list, [])
        if len(names) > MAX_PEERS:
            raise self.fail("controller.peers", f"at most {MAX_PEERS} peers "
                            "(fabric addresses .5-.9)")
        return [self.name(n, f"controller.peers[{i}]", "controller") for i, n in enumerate(names)]

    def store(self, t: dict[str, Any]) -> tuple[str, list[str], int]:
        """`[controller] store`; for etcd, the cluster's `endpoints`
        (http://IP:PORT each) or, without them, how many `members` the lab
        runs itself (3 by default; an odd number, so a majority is clear)."""
        store = self.get(t, "store", "controller", str, "embedded")
        if store not in STORES:
            raise self.fail("controller.store", f"{store!r} is not one of {', '.join(STORES)}")
        endpoints = self.get(t, "endpoints", "controller", list, [])
        if store == "embedded":
            for key in ("endpoints", "members"):
                if key in t:
                    raise self.fail(f"controller.{key}", "only with store = \"etcd\"")
            return store, [], 0
        if not endpoints:
            members = self.get(t, "members", "controller", int, 3)
            if members not in (1, 3, 5):
                raise self.fail("controller.members", f"{members}: the lab runs 1, 3 or 5 etcd members")
            for k in range(1, members + 1):
                if f"{ETCD_NODE}{k}" in self.names:
                    raise self.fail("controller.members", f"the etcd members are named {ETCD_NODE}1.."
                                    f"{ETCD_NODE}{members}: {ETCD_NODE}{k} is taken by the "
                                    f"{self.names[f'{ETCD_NODE}{k}']}")
            return store, [], members
        if "members" in t:
            raise self.fail("controller.members", "the lab runs members only when no endpoints are given")
        for i, ep in enumerate(endpoints):
            m = ENDPOINT.match(ep) if isinstance(ep, str) else None
            ok = m is not None and 1 <= int(m["port"]) <= 65535
            if ok:
                try:
                    ipaddress.IPv4Address(m["ip"])
                except ValueError:
                    ok = False
            if not ok:
                raise self.fail(f"controller.endpoints[{i}]", f"{ep!r} is not http://IPv4:PORT")
        if len(set(endpoints)) != len(endpoints):
            raise self.fail("controller.endpoints", "an endpoint is listed twice")
        return store, list(endpoints), 0

    def machines(self, table: dict[str, Any]) -> dict[str, list[str]]:
        """`[machines.NAME] nodes = [...]`: each node on at most one machine."""
        out: dict[str, list[str]] = {}
        placed: dict[str, str] = {}
        for mname, mt in table.items():
            where = f"machines.{mname}"
            if not isinstance(mt, dict):
                raise self.fail(where, "expected a table")
            self.name(mname, where, "machine")
            unknown = set(mt) - {"nodes"}
            if unknown:
                raise self.fail(f"{where}.{sorted(unknown)[0]}", "unknown key")
            nodes = self.get(mt, "nodes", where, list)
            for i, node in enumerate(nodes):
                at = f"{where}.nodes[{i}]"
                if node not in self.names or self.names[node] == "machine":
                    raise self.fail(at, f"unknown node {node!r}")
                if node in placed:
                    raise self.fail(at, f"{node!r} is already on machine {placed[node]}")
                placed[node] = mname
            out[mname] = list(nodes)
        return out

    def limits(self, t: dict[str, Any]) -> Limits:
        unknown = set(t) - {"flows", "embryonic_per_tenant"}
        if unknown:
            raise self.fail(f"limits.{sorted(unknown)[0]}", "unknown key")
        flows = self.get(t, "flows", "limits", int, Limits.flows)
        embryonic = self.get(t, "embryonic_per_tenant", "limits", int, min(Limits.embryonic_per_tenant, flows))
        if not 1 <= flows <= 1 << 24:
            raise self.fail("limits.flows", "must be 1-16777216 (the flow table's capacity)")
        if not 1 <= embryonic <= flows:
            raise self.fail("limits.embryonic_per_tenant",
                            f"must be 1 to limits.flows ({flows}): half-open flows one tenant may hold")
        return Limits(flows, embryonic)

    def observability(self, t: dict[str, Any]) -> Observability:
        unknown = set(t) - {"metrics_port", "prometheus", "prometheus_port", "scrape_interval_ms"}
        if unknown:
            raise self.fail(f"observability.{sorted(unknown)[0]}", "unknown key")
        port = self.get(t, "metrics_port", "observability", int, 9469)
        prom = self.get(t, "prometheus", "observability", bool, False)
        prom_port = self.get(t, "prometheus_port", "observability", int, 9090)
        interval = self.get(t, "scrape_interval_ms", "observability", (int, float), 200)
        if not 0 <= port <= 65535:
            raise self.fail("observability.metrics_port", "must be 0 (no metrics) to 65535")
        if not 1 <= prom_port <= 65535:
            raise self.fail("observability.prometheus_port", "must be 1-65535")
        if prom and not port:
            raise self.fail("observability.prometheus", "needs metrics_port (the forwarders' metrics)")
        if not 10 <= interval <= 60000:
            raise self.fail("observability.scrape_interval_ms", "must be 10-60000")
        if prom and PROMETHEUS_NODE in self.names:
            raise self.fail("observability.prometheus",
                            f"the Prometheus node is named {PROMETHEUS_NODE!r}, taken by the {self.names[PROMETHEUS_NODE]}")
        return Observability(port, prom, prom_port, interval / 1000)

    def timers(self, t: dict[str, Any]) -> Timers:
        hb = self.get(t, "heartbeat_ms", "timers", (int, float), 10)
        misses = self.get(t, "misses", "timers", int, 10)
        hold = self.get(t, "holddown_ms", "timers", (int, float), 1000)
        refresh = self.get(t, "map_refresh_ms", "timers", (int, float), 100)
        for key, v in (("heartbeat_ms", hb), ("misses", misses), ("map_refresh_ms", refresh)):
            if v <= 0:
                raise self.fail(f"timers.{key}", "must be positive")
        if hold < 0:
            raise self.fail("timers.holddown_ms", "must not be negative")
        return Timers(hb / 1000, misses, hold / 1000, refresh / 1000)

    def hosts(self, edges: dict[str, Edge]) -> dict[str, Host]:
        out = {}
        table = self.table("hosts")
        if not table:
            raise self.fail("hosts", "at least one host is needed")
        for hname, h in table.items():
            where = f"hosts.{hname}"
            if not isinstance(h, dict):
                raise self.fail(where, "expected a table")
            self.name(hname, where, "host")
            attach = self.get(h, "attach", where, str)
            edge = next((e for e in edges.values() if e.name == attach), None)
            if edge is None:
                raise self.fail(f"{where}.attach", f"{attach!r} is neither the ingress nor the egress")
            addr = self.iface(self.get(h, "address", where, str), f"{where}.address")
            if addr.network != edge.address.network or addr.ip == edge.address.ip:
                raise self.fail(f"{where}.address",
                                f"{addr} must be another address in {edge.name}'s subnet {edge.address.network}")
            gw = self.get(h, "gateway", where, str, str(edge.address.ip))
            addr6 = self.iface6(h, where)
            if addr6 is not None:
                if edge.address6 is None:
                    raise self.fail(f"{where}.address6", f"needs {attach}.address6 (the hosts' IPv6 gateway)")
                if addr6.network != edge.address6.network or addr6.ip == edge.address6.ip:
                    raise self.fail(f"{where}.address6", f"{addr6} must be another address in {edge.name}'s "
                                    f"IPv6 subnet {edge.address6.network}")
            out[hname] = Host(hname, addr, attach, ipaddress.IPv4Address(gw), addr6,
                              edge.address6.ip if addr6 is not None and edge.address6 else None)
        return out

    def services(self) -> dict[str, ServiceSpec]:
        out = {}
        table = self.table("services")
        if not table:
            raise self.fail("services", "at least one service is needed")
        for sname, s in table.items():
            where = f"services.{sname}"
            if not SERVICE_NAME.match(sname):
                raise self.fail(where, f"service name {sname!r} must match {SERVICE_NAME.pattern}")
            if not isinstance(s, dict):
                raise self.fail(where, "expected a table")
            kind = self.get(s, "kind", where, str)
            insts = self.get(s, "instances", where, list)
            if not insts:
                raise self.fail(f"{where}.instances", "at least one instance is needed")
            for i, inst in enumerate(insts):
                self.name(inst, f"{where}.instances[{i}]", f"instance of service {sname}")
            spares = self.get(s, "spares", where, list, [])
            for i, inst in enumerate(spares):
                self.name(inst, f"{where}.spares[{i}]", f"spare of service {sname}")
            sync_key = self.key(s, "sync_key", where)
            options = self.get(s, "options", where, dict, {})
            try:
                create(kind, **options)
            except (TypeError, ValueError) as exc:
                raise self.fail(where, f"service kind {kind!r} with these options: {exc}") from None
            out[sname] = ServiceSpec(sname, kind, list(insts), sync_key, options, list(spares))
        return out

    def tenants(self, services: dict[str, ServiceSpec]) -> list[dict[str, Any]]:
        tenants = self.get(self.doc, "tenants", "", list)
        ids: set[int] = set()
        chain_ids: set[int] = set()
        for n, t in enumerate(tenants):
            where = f"tenants[{n}]"
            if not isinstance(t, dict):
                raise self.fail(where, "expected a table")
            tid = self.get(t, "id", where, int)
            if tid in ids or not 0 <= tid < 2**32:
                raise self.fail(f"{where}.id", f"{tid} is a duplicate or outside 0..2^32-1")
            ids.add(tid)
            self.get(t, "name", where, str)
            for i, pfx in enumerate(self.get(t, "prefixes", where, list)):
                try:
                    ipaddress.ip_network(pfx)
                except (ValueError, TypeError):
                    raise self.fail(f"{where}.prefixes[{i}]", f"{pfx!r} is not a network") from None
            chains = self.get(t, "chains", where, list)
            if not chains:
                raise self.fail(f"{where}.chains", "at least one chain is needed")
            for i, c in enumerate(chains):
                cw = f"{where}.chains[{i}]"
                cid = self.get(c, "id", cw, int)
                if cid in chain_ids or not 0 <= cid < 2**24:
                    raise self.fail(f"{cw}.id", f"{cid} is a duplicate or outside 0..2^24-1")
                chain_ids.add(cid)
                for j, s in enumerate(self.get(c, "services", cw, list)):
                    if s not in services:
                        raise self.fail(f"{cw}.services[{j}]", f"unknown service {s!r}")
        return tenants
