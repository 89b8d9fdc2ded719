"""The service map: who serves which stream, as primary and as secondary.

One map is distributed to every instance. It holds the services and their
instances, the tenants and their chains, and an *epoch* that grows on every
change, so an instance can tell which of two maps is newer and a packet can
say which map routed it.

For each service, stream affinity codes fall into `buckets` buckets
(``code % buckets``); each bucket has an ordered candidate list computed by
rendezvous hashing over the service's *eligible* instances (see
`dataplane.core.rendezvous`): candidate 0 is the primary, 1 the secondary, and so
on up to `replicas` candidates. ACTIVE and JOINING instances are eligible; a
DEAD, DRAINING or SPARE one holds no role, so when an instance dies each of
its buckets is led by its former secondary and the next candidate becomes
secondary.

Make before break: a JOINING instance (rejoining after a failure, or added
by scale-out) is never primary while another candidate exists: in a bucket
where it ranks first it is swapped with the next candidate, so it starts as
the *secondary* of the buckets it will lead, receives their state by bulk
sync, and only when the controller marks it ACTIVE (all its peers' bulks
done) does it lead them. The primaries of a map with a JOINING instance are
exactly those of the map without it (with hosts declared: with it DEAD).

Failure domains: an instance may name the `host` (machine) it runs on.
A host failing takes all its instances at once, so a bucket whose primary
and secondary share a host loses its flows' state with it. With
`anti_affinity` (the default) a bucket's secondary is never on its
primary's host while another host has an eligible instance
(`dataplane.core.rendezvous.rank_spread`, like Ceph CRUSH spreading
replicas over hosts). Without hosts every instance is its own host and the
tables are plain HRW, exactly as before hosts existed. Spreading costs
about twice the build time (14 ms against 6.4 ms for 4 instances on 2
hosts at 4,096 buckets, best of 7 on this machine).

The default of 65,536 buckets is what keeps HRW's statistical balance within
10 % (max/mean primary buckets) for 16 instances: with B buckets and N
instances the spread is about sqrt(N/B), 4096 buckets would give ~12 % at 16.

Tables are derived from the rest of the map, so they are built lazily and
shipped in JSON only as a digest (a receiver rebuilds them and checks).

Building one costs milliseconds (5.8 ms for 4 instances at 4,096 buckets),
and after a failure every node needs the new one at the same moment, on
machines as busy as the failure left them. So tables live in a process-wide
cache keyed by everything they are computed from (`table_inputs`), and
`prepare_failures` builds ahead, in a node's idle time, the table of each
service as it will be when any one of its instances dies: MPLS fast reroute's
precomputed backup paths, for bucket tables. The map that declares an
instance dead then finds its tables ready.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import re
import sys
from array import array
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from dataplane.core.rendezvous import rank, rank_spread

DEFAULT_BUCKETS = 65536
DEFAULT_REPLICAS = 2
NO_INSTANCE = 0xFFFF
TABLE_CACHE = 256
"""Tables kept process-wide (each 4 bytes per bucket at 2 replicas)."""
NAME = re.compile(r"^[a-z][a-z0-9-]{0,9}$")
"""Instance (and every lab node) name: the topology's rule (a namespace
name is a prefix, a dash and this, within Linux's 15 characters)."""
SERVICE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
MAX_MAP_JSON = 1 << 20
"""Largest map document accepted, in bytes of JSON."""
MAX_MAP_DEPTH = 8
"""Deepest nesting of a map document (a real one has 4 levels)."""


def _never_lead(ranks: list[array], joining: set[int]) -> None:
    """Swap a JOINING first candidate behind the first non-joining one."""
    prim = ranks[0]
    for b, i in enumerate(prim):
        if i in joining:
            for r in range(1, len(ranks)):
                j = ranks[r][b]
                if j != NO_INSTANCE and j not in joining:
                    prim[b], ranks[r][b] = j, i
                    break


class MapError(ValueError):
    """A map operation or a map document that does not make sense."""


class InstanceState(str, Enum):
    """Life cycle of an instance as the map sees it."""

    ACTIVE = "active"
    """Eligible for every role."""
    DRAINING = "draining"
    """Being taken out on purpose: no new role, its flows finish or move."""
    DEAD = "dead"
    """Declared failed: holds no role."""
    JOINING = "joining"
    """Back or new, not yet in sync: secondary only (make before break)."""
    SPARE = "spare"
    """Provisioned but not in service until scaled out."""


TableInputs = tuple[int, int, bool, tuple[tuple[str, bool, bool, str, bool], ...]]
"""(buckets, replicas, anti_affinity, sorted (name, eligible, joining, host
or "", spare) of every member)."""
_TABLES: OrderedDict[tuple[str, TableInputs], BucketTable] = OrderedDict()


def _table(service: str, inputs: TableInputs) -> BucketTable:
    """The bucket table for `inputs`, from the cache or built (and cached)."""
    t = _TABLES.get((service, inputs))
    if t is not None:
        _TABLES.move_to_end((service, inputs))
        return t
    buckets, replicas, anti_affinity, members = inputs
    names = [n for n, eligible, _, _, _ in members if eligible]
    if anti_affinity and any(m[3] for m in members):
        # departed members keep their place in the spread order (see
        # rank_spread); spares never held a role
        held = [m for m in members if not m[4]]
        joining = frozenset(k for k, m in enumerate(held) if m[1] and m[2])
        t = BucketTable(names, rank_spread(service, [m[0] for m in held], [m[3] or m[0] for m in held],
                                           [m[1] for m in held], buckets, replicas, joining))
    else:
        # no host declared (each instance a host of its own) or spreading
        # off: plain HRW, the tables (and their known answers) of before hosts
        t = BucketTable(names, rank(service, names, buckets, replicas))
        joining = {names.index(n) for n, eligible, j, _, _ in members if eligible and j}
        if joining and len(t.ranks) > 1:
            _never_lead(t.ranks, joining)
    _TABLES[(service, inputs)] = t
    if len(_TABLES) > TABLE_CACHE:
        _TABLES.popitem(last=False)
    return t


_ALIVE = frozenset({"active", "joining", "draining"})
_ELIGIBLE = frozenset({"active", "joining"})


@dataclass
class Instance:
    """One instance of a service, reachable at `address` on the fabric."""

    name: str
    address: str = ""
    state: InstanceState = InstanceState.ACTIVE
    host: str = ""
    """The failure domain (machine) it runs on; empty: a host of its own."""

    @property
    def machine(self) -> str:
        """The host it fails with: `host`, or its own name when none is set."""
        return self.host or self.name


@dataclass
class Chain:
    """An ordered list of services that a tenant's matching traffic crosses."""

    id: int
    tenant: int
    services: list[str]
    match_dports: list[int] = field(default_factory=list)
    """Select this chain for these server ports; empty means any (the default)."""


@dataclass
class Tenant:
    """A subscriber: its client id, the client prefixes it owns, its chains."""

    id: int
    name: str
    prefixes: list[str] = field(default_factory=list)


@dataclass
class BucketTable:
    """Candidate lists of one service: `ranks[r][b]` indexes `names`."""

    names: list[str]
    ranks: list[array]

    def candidates(self, bucket: int) -> list[str]:
        return [self.names[r[bucket]] for r in self.ranks if r[bucket] != NO_INSTANCE]

    def where(self, rank: int, names: set[str | None]) -> int:
        """The buckets whose `rank`-th candidate (0: the primary) is one of
        `names` (None: no candidate), as a bit set: bit 8*b is bucket b.

        A byte per bucket, so that sets of buckets combine with & | and ~
        and list their members (`listed`) in C: any Python loop over a
        table's buckets costs milliseconds at 65,536 (the map install of
        `ServiceNode._orphaned` walked them four times and took 26 ms)."""
        return int.from_bytes(self._read(rank, dict.fromkeys(names, 1)), "little")

    def others(self, exclude: str, codes: dict[str, int]) -> bytes:
        """Every bucket's first candidate other than `exclude` (what
        `ServiceMap.secondary(service, code, exclude)` answers), as a byte
        per bucket: its code in `codes` (1 to 255, shared by the tables
        compared), 0 for none."""
        others = 0
        for r in reversed(range(len(self.ranks))):
            here = self._read(r, {name: c for name, c in codes.items() if name != exclude})
            skipped = self.where(r, {exclude, None}) * 0xFF
            others = (others & skipped) | int.from_bytes(here, "little")
        return others.to_bytes(len(self.ranks[0]), "little")

    def _read(self, rank: int, value: dict[str | None, int]) -> bytes:
        """A byte per bucket: `value` of its `rank`-th candidate's name
        (None: no candidate), 0 for a name not in `value`."""
        n = len(self.ranks[0])
        if rank >= len(self.ranks):
            return bytes([value.get(None, 0)]) * n
        row = self.ranks[rank]
        values = [value.get(name, 0) for name in self.names]
        if len(values) < 0xFF and row.itemsize == 2:
            # the low byte of each index: the index itself below 0xFF, 0xFF
            # for NO_INSTANCE
            table = bytes(values + [0] * (0xFF - len(values)) + [value.get(None, 0)])
            return row.tobytes()[_LOW_BYTE::2].translate(table)
        of = dict(enumerate(values))
        of[NO_INSTANCE] = value.get(None, 0)
        return bytes(map(of.__getitem__, row))

    def primary_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.names, 0)
        for i in self.ranks[0]:
            if i != NO_INSTANCE:
                counts[self.names[i]] += 1
        return counts


_LOW_BYTE = 0 if sys.byteorder == "little" else 1
"""Where the low byte of an array("H") item is in its bytes."""


def listed(buckets: int, n: int) -> list[int]:
    """The buckets of a bit set of `BucketTable.where` (`n` buckets in all),
    found by a regular expression: 25 us for none of 65,536 and 0.15 ms for
    1 % of them, where `itertools.compress` takes 1.4 ms whatever the set."""
    return [m.start() for m in _ANY_BYTE.finditer(buckets.to_bytes(n, "little"))]


_ANY_BYTE = re.compile(rb"[^\x00]")


class ServiceMap:
    """Services, instances, tenants, chains and their bucket tables, at an epoch."""

    def __init__(self, buckets: int = DEFAULT_BUCKETS, replicas: int = DEFAULT_REPLICAS,
                 anti_affinity: bool = True) -> None:
        if not 1 <= buckets <= 1 << 20:
            raise MapError(f"buckets must be 1..{1 << 20}, got {buckets}")
        if not 1 <= replicas <= 8:
            raise MapError(f"replicas must be 1..8, got {replicas}")
        self.buckets = buckets
        self.replicas = replicas
        self.anti_affinity = anti_affinity
        """Keep a bucket's candidates on different hosts (see `rank_spread`);
        off only as the control of an experiment."""
        self.epoch = 1
        self.services: dict[str, dict[str, Instance]] = {}
        self.tenants: dict[int, Tenant] = {}
        self.chains: dict[int, Chain] = {}
        self._tables: dict[str, BucketTable] = {}
        self._where: dict[str, str] = {}
        """instance name -> its service"""

    # -- changes (each bumps the epoch) --------------------------------------

    def add_service(self, service: str, instances: list[Instance] | list[str] = ()) -> None:
        if service in self.services:
            raise MapError(f"service {service!r} already exists")
        self.services[service] = {}
        for inst in instances:
            self.add_instance(service, inst if isinstance(inst, Instance) else Instance(inst))
        self._changed(service)

    def add_instance(self, service: str, inst: Instance) -> None:
        if self.service_of(inst.name) is not None:
            raise MapError(f"instance {inst.name!r} already exists")
        self._service(service)[inst.name] = inst
        self._where[inst.name] = service
        self._changed(service)

    def set_state(self, name: str, state: InstanceState) -> None:
        """Change an instance's state (e.g. DEAD when declared failed)."""
        service = self.service_of(name)
        if service is None:
            raise MapError(f"no instance named {name!r}")
        self.services[service][name].state = state
        self._changed(service)

    def add_tenant(self, tenant: Tenant) -> None:
        self.tenants[tenant.id] = tenant
        self._changed(None)

    def add_chain(self, chain: Chain) -> None:
        if chain.tenant not in self.tenants:
            raise MapError(f"chain {chain.id}: unknown tenant {chain.tenant}")
        for s in chain.services:
            self._service(s)
        if not chain.services:
            raise MapError(f"chain {chain.id} has no services")
        self.chains[chain.id] = chain
        self._changed(None)

    def _changed(self, service: str | None) -> None:
        self.epoch += 1
        if service is None:
            return
        self._tables.pop(service, None)

    # -- lookups ---------------------------------------------------------------

    def _service(self, service: str) -> dict[str, Instance]:
        try:
            return self.services[service]
        except KeyError:
            raise MapError(f"no service named {service!r}") from None

    def service_of(self, instance: str) -> str | None:
        return self._where.get(instance)

    def instance(self, name: str) -> Instance:
        service = self.service_of(name)
        if service is None:
            raise MapError(f"no instance named {name!r}")
        return self.services[service][name]

    def is_alive(self, name: str) -> bool:
        """True for instances that may receive packets: ACTIVE, JOINING and
        DRAINING (its pinned flows finish there); not DEAD, SPARE or unknown."""
        service = self._where.get(name)
        return service is not None and self.services[service][name].state in _ALIVE

    def table(self, service: str) -> BucketTable:
        t = self._tables.get(service)
        if t is None:
            t = self._tables[service] = _table(service, self.table_inputs(service))
        return t

    def table_inputs(self, service: str) -> TableInputs:
        """Everything a service's bucket table is computed from."""
        return (self.buckets, self.replicas, self.anti_affinity,
                tuple(sorted((n, i.state in _ELIGIBLE, i.state == InstanceState.JOINING, i.host,
                              i.state == InstanceState.SPARE)
                             for n, i in self._service(service).items())))

    def prepare_failures(self, budget: int = 1) -> int:
        """Build up to `budget` of the tables this map's services will need
        when one of their eligible instances dies; returns how many are
        still missing (0: every single failure is ready)."""
        missing = 0
        for service in self.services:
            buckets, replicas, spread, members = self.table_inputs(service)
            for k, (name, eligible, _joining, host, _spare) in enumerate(members):
                if not eligible:
                    continue
                dead = (name, False, False, host, False)
                inputs = (buckets, replicas, spread, members[:k] + (dead,) + members[k + 1:])
                if (service, inputs) in _TABLES:
                    continue
                if budget > 0:
                    _table(service, inputs)
                    budget -= 1
                else:
                    missing += 1
        return missing

    def bucket(self, code: int) -> int:
        return code % self.buckets

    def candidates(self, service: str, code: int) -> list[str]:
        """Ordered candidates for a code: [primary, secondary, ...]."""
        return self.table(service).candidates(code % self.buckets)

    def primary(self, service: str, code: int) -> str | None:
        t = self.table(service)
        i = t.ranks[0][code % self.buckets]
        return None if i == NO_INSTANCE else t.names[i]

    def secondary(self, service: str, code: int, exclude: str | None = None) -> str | None:
        """The instance that mirrors a code's state: the first candidate other
        than `exclude` (default: the primary). Read off the rank arrays
        directly: it runs for every mirrored update."""
        t = self.table(service)
        b = code % self.buckets
        owner = exclude
        for r in t.ranks:
            i = r[b]
            if i == NO_INSTANCE:
                continue
            name = t.names[i]
            if owner is None:
                owner = name
            elif name != owner:
                return name
        return None

    def chain_for(self, tenant: int, dport: int) -> Chain | None:
        """The tenant's chain for a server port: first with a matching port
        list, else the tenant's lowest-id chain without one."""
        mine = sorted((c for c in self.chains.values() if c.tenant == tenant), key=lambda c: c.id)
        for c in mine:
            if dport in c.match_dports:
                return c
        return next((c for c in mine if not c.match_dports), None)

    # -- serialization ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The map document. `host` and `anti_affinity` appear only when set
        (a host) or off, so a map without hosts has the document it had
        before failure domains existed."""
        return {
            "epoch": self.epoch,
            "buckets": self.buckets,
            "replicas": self.replicas,
            **({} if self.anti_affinity else {"anti_affinity": False}),
            "services": {s: [_instance_doc(i) for i in insts.values()]
                         for s, insts in self.services.items()},
            "tenants": [asdict(t) for t in self.tenants.values()],
            "chains": [asdict(c) for c in self.chains.values()],
            "table_digests": {s: self.table_digest(s) for s in self.services},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ServiceMap:
        """Parse and check a map document (its tables against its digests).

        Every field is checked first (`check_document`): a map comes signed,
        but one bad field would otherwise break every node that installs it."""
        check_document(doc)
        try:
            m = cls(int(doc["buckets"]), int(doc["replicas"]), doc.get("anti_affinity", True))
            for s, insts in doc["services"].items():
                m.services[s] = {i["name"]: Instance(i["name"], i.get("address", ""),
                                                     InstanceState(i.get("state", "active")),
                                                     i.get("host", ""))
                                 for i in insts}
                m._where.update(dict.fromkeys(m.services[s], s))
            for t in doc.get("tenants", []):
                m.tenants[int(t["id"])] = Tenant(int(t["id"]), str(t["name"]), list(t["prefixes"]))
            for c in doc.get("chains", []):
                m.chains[int(c["id"])] = Chain(int(c["id"]), int(c["tenant"]), list(c["services"]),
                                               [int(p) for p in c.get("match_dports", [])])
            m.epoch = int(doc["epoch"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MapError(f"not a service map document: {exc!r}") from None
        for s, digest in doc.get("table_digests", {}).items():
            if s in m.services and m.table_digest(s) != digest:
                raise MapError(f"service {s}: bucket table does not match its digest")
        return m

    @classmethod
    def from_json(cls, text: str | bytes) -> ServiceMap:
        return cls.from_dict(load_json(text))

    def table_digest(self, service: str) -> str:
        t = self.table(service)
        h = hashlib.sha256(json.dumps(t.names).encode())
        for r in t.ranks:
            h.update(r.tobytes())
        return h.hexdigest()[:32]

    def copy(self) -> ServiceMap:
        return copy.deepcopy(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ServiceMap) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


def _instance_doc(i: Instance) -> dict[str, Any]:
    d = {"name": i.name, "address": i.address, "state": i.state.value}
    if i.host:
        d["host"] = i.host
    return d


# -- documents from outside ---------------------------------------------------------------
#
# A map document arrives signed by the controller or read from its store, but
# signed is not sane: a bug, a wrong topology or a holder of the control key
# could publish a document that breaks every node at once (an epoch of 1e999
# is a float infinity, which int() refuses with OverflowError; a chain with no
# services or a prefix "junk" fails only when the first packet needs it; a
# chain id of 2**24 no longer fits the header). So the text is bounded in size
# and nesting before it is parsed, and every field a node uses is checked,
# type and range, before anything is built. Keys it does not know are left
# alone (a newer controller may add some).


def load_json(text: str | bytes) -> Any:
    """Parse a map document's JSON, bounded in size and nesting; MapError if not."""
    if len(text) > MAX_MAP_JSON:
        raise MapError(f"map document larger than {MAX_MAP_JSON} bytes")
    raw = text.encode() if isinstance(text, str) else bytes(text)
    bare = _JSON_STRING.sub(b"", raw)         # brackets inside strings do not nest
    depth = 0
    for c in bare.translate(None, _NOT_BRACKETS):
        depth += 1 if c in _OPENING else -1
        if depth > MAX_MAP_DEPTH:
            raise MapError(f"map document nested deeper than {MAX_MAP_DEPTH} levels")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MapError(f"not JSON: {exc}") from None


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_OPENING = frozenset(b"[{")
_STATES = frozenset(s.value for s in InstanceState)


def check_document(doc: Any) -> None:
    """Raise MapError naming the first field of a map document that is not
    what a node can use: `chains[0].services[1]: unknown service 'C'`."""
    if not isinstance(doc, dict):
        raise MapError(f"expected a JSON object, got {type(doc).__name__}")
    _int(doc, "epoch", "epoch", 0, 2**32 - 1)   # the header carries it in 32 bits
    _int(doc, "buckets", "buckets", 1, 1 << 20)
    _int(doc, "replicas", "replicas", 1, 8)
    _get(doc, "anti_affinity", "anti_affinity", bool, True)
    services = _get(doc, "services", "services", dict)
    where: dict[str, str] = {}
    for sname, insts in services.items():
        if not SERVICE_NAME.match(sname):
            raise MapError(f"services: service name {sname!r} must match {SERVICE_NAME.pattern}")
        if not isinstance(insts, list):
            raise MapError(f"services.{sname}: expected a list, got {type(insts).__name__}")
        for i, inst in enumerate(insts):
            at = f"services.{sname}[{i}]"
            if not isinstance(inst, dict):
                raise MapError(f"{at}: expected an object")
            name = _get(inst, "name", f"{at}.name", str)
            if not NAME.match(name):
                raise MapError(f"{at}.name: {name!r} must match {NAME.pattern}")
            if name in where:
                raise MapError(f"{at}.name: {name!r} is also in service {where[name]}")
            where[name] = sname
            address = _get(inst, "address", f"{at}.address", str, "")
            if address:
                try:
                    ipaddress.IPv4Address(address)
                except ValueError:
                    raise MapError(f"{at}.address: {address!r} is not an IPv4 address") from None
            host = _get(inst, "host", f"{at}.host", str, "")
            if host and not NAME.match(host):
                raise MapError(f"{at}.host: {host!r} must match {NAME.pattern}")
            state = _get(inst, "state", f"{at}.state", str, "active")
            if state not in _STATES:
                raise MapError(f"{at}.state: {state!r} is not one of {', '.join(sorted(_STATES))}")
    tenants: set[int] = set()
    for i, t in enumerate(_get(doc, "tenants", "tenants", list, [])):
        at = f"tenants[{i}]"
        if not isinstance(t, dict):
            raise MapError(f"{at}: expected an object")
        tid = _int(t, "id", f"{at}.id", 0, 2**32 - 1)   # the header's client id
        if tid in tenants:
            raise MapError(f"{at}.id: {tid} appears twice")
        tenants.add(tid)
        if len(_get(t, "name", f"{at}.name", str)) > 64:
            raise MapError(f"{at}.name: longer than 64 characters")
        for j, prefix in enumerate(_get(t, "prefixes", f"{at}.prefixes", list)):
            try:
                ipaddress.ip_network(prefix, strict=False)
            except (ValueError, TypeError):
                raise MapError(f"{at}.prefixes[{j}]: {prefix!r} is not an IP network") from None
    chains: set[int] = set()
    for i, c in enumerate(_get(doc, "chains", "chains", list, [])):
        at = f"chains[{i}]"
        if not isinstance(c, dict):
            raise MapError(f"{at}: expected an object")
        cid = _int(c, "id", f"{at}.id", 0, 2**24 - 1)   # the header's chain field
        if cid in chains:
            raise MapError(f"{at}.id: {cid} appears twice")
        chains.add(cid)
        tenant = _int(c, "tenant", f"{at}.tenant", 0, 2**32 - 1)
        if tenant not in tenants:
            raise MapError(f"{at}.tenant: unknown tenant {tenant}")
        svcs = _get(c, "services", f"{at}.services", list)
        if not 1 <= len(svcs) <= 255:                    # the header's service index
            raise MapError(f"{at}.services: a chain has 1 to 255 services, not {len(svcs)}")
        for j, svc in enumerate(svcs):
            if not isinstance(svc, str) or svc not in services:
                raise MapError(f"{at}.services[{j}]: unknown service {svc!r}")
        for j, port in enumerate(_get(c, "match_dports", f"{at}.match_dports", list, [])):
            if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
                raise MapError(f"{at}.match_dports[{j}]: {port!r} is not a port")
    for sname, digest in _get(doc, "table_digests", "table_digests", dict, {}).items():
        if sname not in services:
            raise MapError(f"table_digests: unknown service {sname!r}")
        if not isinstance(digest, str):
            raise MapError(f"table_digests.{sname}: expected a string")


def _get(table: dict[str, Any], key: str, at: str, kind: type, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise MapError(f"{at}: missing")
        return default
    value = table[key]
    if not isinstance(value, kind):
        raise MapError(f"{at}: expected a {_KINDS.get(kind, kind.__name__)}, got {type(value).__name__}")
    return value


def _int(table: dict[str, Any], key: str, at: str, lo: int, hi: int) -> int:
    value = table.get(key)
    if key not in table:
        raise MapError(f"{at}: missing")
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise MapError(f"{at}: {value!r} is not an integer in {lo}..{hi}")
    return value


_KINDS = {dict: "JSON object", list: "list", str: "string"}
