"""The state-sync wire format: datagrams of records, authenticated.

Every datagram (UDP, default port 6887) is a 48-byte header, a body of
records, and a 16-byte HMAC-SHA-256-128 tag (RFC 4868 truncation) over
everything before it::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +---------------+---------------+---------------+---------------+
    |  Version (2)  |    Flags      |    Key id     |   Reserved    |
    +---------------+---------------+---------------+---------------+
    |                     Sender node id (32)                       |
    +---------------------------------------------------------------+
    |                    Receiver node id (32)                      |
    +---------------------------------------------------------------+
    |              Sender incarnation (64, microseconds)            |
    +---------------------------------------------------------------+
    |     Receiver incarnation (64), as the sender knows it; 0: none |
    +---------------------------------------------------------------+
    |          Datagram counter (64, anti-replay, +1 per datagram)  |
    +---------------------------------------------------------------+
    |     Sequence (64): seq of the first reliable record in body   |
    +-------------------------------+-------------------------------+
    |        Body length (16)       |        Record count (16)      |
    +-------------------------------+-------------------------------+
    |  Records: Type (8) | Length (16) | Value (Length bytes) ...   |
    +---------------------------------------------------------------+
    |                 HMAC-SHA-256-128 tag (16 bytes)               |
    +---------------------------------------------------------------+

Node ids are the first 4 bytes of BLAKE2b(name); a datagram for another
receiver is refused, so one captured datagram cannot be replayed to a third
node. The incarnation is the sender's start time in microseconds: a restart
shows as a larger incarnation, and an older one is refused.

The *receiver* incarnation binds a datagram to one life of its receiver: a
receiver refuses a datagram bound to another incarnation of itself
(`wrong_incarnation`), so what was recorded before it restarted cannot be
replayed to it afterwards (its anti-replay window is new, and would let it
through). Only a HELLO, the message that introduces a sender to a receiver
it does not know yet, may carry another value (0, or an older incarnation);
the channel treats it so that a replayed one costs nothing but an answer
(`dataplane.core.syncchannel`). Version 1 had no such field and is refused.

Records. *Reliable* records (UPSERT, DELETE, BULK_BEGIN, BULK_END) are
numbered consecutively from the header's sequence number; the others ride
along unnumbered:

=========== ==== ===========================================================
type        code value
=========== ==== ===========================================================
HELLO        1   next seq (u64): the sender's first unacknowledged record;
                 flags (u8, 1 = "answer me": the sender is not established)
HEARTBEAT    2   sender's clock (u64 us)
ACK          3   cumulative: every reliable seq below this was received (u64)
NACK         4   n x (first u64, last u64) ranges missing
FLOW_UPSERT  6   flow key, version u64, timeout ms u32, 2 hops (next, previous), state
FLOW_DELETE  7   flow key, version u64
BULK_BEGIN   8   bulk id u32, flows u64, sender's map epoch u32
BULK_END     9   bulk id u32, flows u64, sender's map epoch u32
RESYNC      10   (empty) ask the peer for a full bulk transfer
MAP         11   control channel: zlib-compressed service map JSON
STATUS      12   control channel: instance to controller, u32 map epoch held,
                 u8 flags (1 = declared dead: it stopped serving)
=========== ==== ===========================================================

The control channel between the controller and every forwarder (UDP 6888)
uses the same datagram format and anti-replay rules, under its own keys:
HEARTBEAT and STATUS from forwarders, MAP pushes from the controller. There
the forwarder's HEARTBEAT plays the HELLO (`dataplane.core.control`).

Flow key: chain u32, code u32, proto u8, family u8 (4|6), lo ip, lo port
u16, hi ip, hi port u16. Hop: u8 length + name (0 = none). State: u16
length + service bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from dataplane.core.events import FlowUpdate
from dataplane.core.flowtable import FlowKey

VERSION = 2
SYNC_PORT = 6887
CONTROL_PORT = 6888
TAG_LEN = 16
MAX_DATAGRAM = 1400
"""Datagrams are kept under a typical fabric MTU so they are never fragmented."""

_HDR = struct.Struct("!BBBBIIQQQQHH")
HEADER_LEN = _HDR.size
_REC = struct.Struct("!BH")
_U64 = struct.Struct("!Q")
_KEY_HEAD = struct.Struct("!IIBB")
_KEY4 = struct.Struct("!IIBB4sH4sH")
"""A whole IPv4 flow key in one unpack: the common case."""
_UPSERT4 = struct.Struct("!IIBB4sH4sHQI")
"""An IPv4 upsert up to its hops (key, version, timeout) in one unpack."""
_UPSERT = struct.Struct("!QI")
_BULK = struct.Struct("!IQI")


class RecordType(IntEnum):
    HELLO = 1
    HEARTBEAT = 2
    ACK = 3
    NACK = 4
    FLOW_UPSERT = 6
    FLOW_DELETE = 7
    BULK_BEGIN = 8
    BULK_END = 9
    RESYNC = 10
    MAP = 11
    STATUS = 12
    EXITED = 13
    """An agent to the controller: the process of the node named in the
    value exited (control channel only)."""


_RECORD_TYPES = {int(t): t for t in RecordType}
"""A dict lookup: calling the enum costs a microsecond per record."""
RELIABLE = frozenset({RecordType.FLOW_UPSERT, RecordType.FLOW_DELETE, RecordType.BULK_BEGIN,
                      RecordType.BULK_END})


class SyncError(ValueError):
    """A datagram or record refused; `reason` is the rejection counter's name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def node_id(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big")


@dataclass(frozen=True, slots=True)
class Record:
    type: RecordType
    value: bytes


@dataclass(slots=True)
class Datagram:
    """A decoded datagram (after its tag was checked)."""

    key_id: int
    sender: int
    receiver: int
    incarnation: int
    receiver_incarnation: int
    counter: int
    seq: int
    records: list[Record] = field(default_factory=list)


class Keyring:
    """The HMAC keys of one purpose (one service's sync channels, or the
    control channel), by key id.

    Sends with `current` and accepts every key it holds, so two keys are
    accepted during a rotation. Each key is bound to the node ids allowed to
    sign with it (`senders`; None: any): a datagram claiming another sender
    under it is refused (`key_not_for_sender`) before its tag is computed.

    A *pairwise* keyring holds master keys: the key of a datagram between
    nodes a and b is `pair_key(master, a, b)`. The controller holds the
    master; each forwarder is given only its own pair key (a plain keyring),
    so it can neither sign as the controller to another forwarder nor as
    another forwarder to the controller."""

    def __init__(self, keys: dict[int, bytes], current: int, senders: Iterable[int] | None = None,
                 pairwise: bool = False) -> None:
        if current not in keys:
            raise ValueError(f"current key id {current} not in keyring")
        self.keys: dict[int, bytes] = {}
        self.senders: dict[int, frozenset[int] | None] = {}
        bound = None if senders is None else frozenset(senders)
        for kid, key in keys.items():
            self._set(kid, key, bound)
        self.current = current
        self.pairwise = pairwise
        self._pairs: dict[tuple[int, int, int], bytes] = {}

    def _set(self, kid: int, key: bytes, senders: frozenset[int] | None) -> None:
        if not 0 <= kid <= 255 or len(key) < 16:
            raise ValueError(f"key {kid}: ids are 0-255 and keys at least 16 bytes")
        self.keys[kid] = key
        self.senders[kid] = senders

    def add(self, kid: int, key: bytes) -> None:
        """A second key of the same purpose, bound to the same senders
        (phase 1 of a rotation: accepted, not yet signed with). Adding the
        key an id already holds does nothing, so a rotation can be rerun;
        another key under a held id is refused: a node that already signs
        with it would split from the others."""
        held = self.keys.get(kid)
        if held is not None and held != key:
            raise ValueError(f"key id {kid} holds another key")
        self._set(kid, key, self.senders[self.current])

    def use(self, kid: int) -> None:
        """Sign with key `kid` from now on (phase 2 of a rotation)."""
        if kid not in self.keys:
            raise ValueError(f"no key {kid}")
        self.current = kid

    def state(self) -> dict[str, object]:
        """Key ids, keys (hex) and the id in use: what a node persists so a
        restart comes back with the keys of a rotation, not the topology's."""
        return {"current": self.current, "keys": {str(k): v.hex() for k, v in sorted(self.keys.items())}}

    def restore(self, state: dict[str, object]) -> None:
        """Replace the keys with a `state()`; the senders binding and
        pairwise-ness stay this keyring's (the topology's)."""
        raw = state.get("keys")
        current = state.get("current")
        if not isinstance(raw, dict) or type(current) is not int:
            raise ValueError("a keyring state has 'current' (int) and 'keys' (id -> hex)")
        keys = {int(k): bytes.fromhex(v) for k, v in raw.items()}
        if current not in keys:
            raise ValueError(f"current key id {current} not in the keys")
        bound = self.senders[self.current]
        self.keys, self.senders = {}, {}
        for kid, key in keys.items():
            self._set(kid, key, bound)
        self.current = current
        self._pairs.clear()

    def retire(self, kid: int) -> None:
        """Drop key `kid` (phase 3): a datagram under it is `unknown_key`."""
        if kid == self.current:
            raise ValueError("cannot retire the key in use")
        self.keys.pop(kid, None)
        self.senders.pop(kid, None)
        self._pairs.clear()

    def signing_key(self, sender: int, receiver: int) -> bytes:
        key = self.keys[self.current]
        return self._pair(self.current, key, sender, receiver) if self.pairwise else key

    def verifying_key(self, kid: int, sender: int, receiver: int) -> bytes:
        """The key a datagram under `kid` from `sender` must be signed with;
        raise SyncError when there is none or the sender may not use it."""
        key = self.keys.get(kid)
        if key is None:
            raise SyncError("unknown_key", f"key id {kid}")
        allowed = self.senders[kid]
        if allowed is not None and sender not in allowed:
            raise SyncError("key_not_for_sender", f"key id {kid}")
        return self._pair(kid, key, sender, receiver) if self.pairwise else key

    def _pair(self, kid: int, master: bytes, a: int, b: int) -> bytes:
        k = (kid, a, b) if a < b else (kid, b, a)
        key = self._pairs.get(k)
        if key is None:
            if len(self._pairs) >= 4096:
                self._pairs.clear()
            key = self._pairs[k] = pair_key(master, a, b)
        return key


def pair_key(master: bytes, a: int, b: int) -> bytes:
    """The key of nodes `a` and `b` (either order) under a master key."""
    lo, hi = (a, b) if a < b else (b, a)
    return hmac.new(master, b"affinity-mesh pair key" + struct.pack("!II", lo, hi),
                    hashlib.sha256).digest()


def tag(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:TAG_LEN]


def encode(keyring: Keyring, sender: int, receiver: int, incarnation: int,
           receiver_incarnation: int, counter: int, seq: int, records: list[Record]) -> bytes:
    body = b"".join(_REC.pack(r.type, len(r.value)) + r.value for r in records)
    head = _HDR.pack(VERSION, 0, keyring.current, 0, sender, receiver, incarnation,
                     receiver_incarnation, counter, seq, len(body), len(records))
    data = head + body
    return data + tag(keyring.signing_key(sender, receiver), data)


def sender_of(data: bytes) -> int | None:
    """The sender id a datagram claims, unchecked: only to choose which
    keys to check it with (a client of several controllers); None when it is
    too short to say."""
    if len(data) < HEADER_LEN:
        return None
    return int(_HDR.unpack_from(data)[4])


def decode(keyring: Keyring, data: bytes, me: int) -> Datagram:
    """Check and parse a datagram; raise SyncError(reason) if refused.

    The tag is checked before any body field is believed."""
    if len(data) < HEADER_LEN + TAG_LEN:
        raise SyncError("truncated")
    (version, _flags, kid, _res, sender, receiver, inc, rinc, counter, seq,
     body_len, count) = _HDR.unpack_from(data)
    if version != VERSION:
        raise SyncError("bad_version")
    if len(data) != HEADER_LEN + body_len + TAG_LEN:
        raise SyncError("truncated" if len(data) < HEADER_LEN + body_len + TAG_LEN else "bad_length")
    key = keyring.verifying_key(kid, sender, receiver)
    if not hmac.compare_digest(tag(key, data[:-TAG_LEN]), data[-TAG_LEN:]):
        raise SyncError("bad_mac")
    if receiver != me:
        raise SyncError("wrong_receiver")
    records = []
    pos, end = HEADER_LEN, HEADER_LEN + body_len
    for _ in range(count):
        if pos + _REC.size > end:
            raise SyncError("malformed", "record header past body")
        rtype, rlen = _REC.unpack_from(data, pos)
        pos += _REC.size
        if pos + rlen > end:
            raise SyncError("malformed", "record past body")
        rt = _RECORD_TYPES.get(rtype)
        if rt is None:
            raise SyncError("malformed", f"record type {rtype}")
        records.append(Record(rt, data[pos:pos + rlen]))
        pos += rlen
    if pos != end:
        raise SyncError("malformed", "trailing bytes in body")
    return Datagram(kid, sender, receiver, inc, rinc, counter, seq, records)


class ReplayWindow:
    """RFC 4303-style sliding window over 64-bit datagram counters."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.top = 0
        self.bits = 0

    def check_and_set(self, counter: int) -> bool:
        """True if `counter` is new (and records it), False for a replay."""
        if counter > self.top:
            shift = counter - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.top = counter
            return True
        offset = self.top - counter
        if offset >= self.size or self.bits >> offset & 1:
            return False
        self.bits |= 1 << offset
        return True


# -- record bodies -------------------------------------------------------------------


def u64(n: int) -> bytes:
    return _U64.pack(n)


def read_u64(value: bytes, offset: int = 0) -> int:
    if len(value) < offset + 8:
        raise SyncError("malformed", "short u64")
    return _U64.unpack_from(value, offset)[0]


HELLO_ANSWER_ME = 1


def hello(next_seq: int, answer_me: bool = True) -> Record:
    return Record(RecordType.HELLO, u64(next_seq) + bytes([HELLO_ANSWER_ME if answer_me else 0]))


def read_hello(value: bytes) -> tuple[int, bool]:
    """(next seq, answer me)."""
    if len(value) != 9:
        raise SyncError("malformed", "hello record")
    return read_u64(value), bool(value[8] & HELLO_ANSWER_ME)


def ranges(kind: RecordType, spans: list[tuple[int, int]]) -> Record:
    return Record(kind, b"".join(u64(a) + u64(b) for a, b in spans))


def read_ranges(value: bytes) -> list[tuple[int, int]]:
    if len(value) % 16:
        raise SyncError("malformed", "range list")
    return [(read_u64(value, i), read_u64(value, i + 8)) for i in range(0, len(value), 16)]


def bulk(kind: RecordType, bulk_id: int, flows: int, epoch: int) -> Record:
    return Record(kind, _BULK.pack(bulk_id, flows, epoch))


def read_bulk(value: bytes) -> tuple[int, int, int]:
    """(bulk id, flows, epoch)."""
    if len(value) != _BULK.size:
        raise SyncError("malformed", "bulk record")
    return _BULK.unpack(value)


def _key_bytes(key: FlowKey) -> bytes:
    chain, code, proto, lo_ip, lo_port, hi_ip, hi_port = key
    if len(lo_ip) == 4:
        return _KEY4.pack(chain, code, proto, 4, lo_ip, lo_port, hi_ip, hi_port)
    return (_KEY_HEAD.pack(chain, code, proto, 6) + lo_ip + lo_port.to_bytes(2, "big")
            + hi_ip + hi_port.to_bytes(2, "big"))


def _read_key(value: bytes, pos: int) -> tuple[FlowKey, int]:
    if len(value) < pos + _KEY_HEAD.size:
        raise SyncError("malformed", "flow key")
    chain, code, proto, family = _KEY_HEAD.unpack_from(value, pos)
    if family == 4 and len(value) >= pos + _KEY4.size:
        chain, code, proto, _f, lo, lo_port, hi, hi_port = _KEY4.unpack_from(value, pos)
        return (chain, code, proto, lo, lo_port, hi, hi_port), pos + _KEY4.size
    if family not in (4, 6):
        raise SyncError("malformed", "flow key family")
    n = 4 if family == 4 else 16
    pos += _KEY_HEAD.size
    if len(value) < pos + 2 * (n + 2):
        raise SyncError("malformed", "flow key")
    lo = value[pos:pos + n]
    lo_port = int.from_bytes(value[pos + n:pos + n + 2], "big")
    pos += n + 2
    hi = value[pos:pos + n]
    hi_port = int.from_bytes(value[pos + n:pos + n + 2], "big")
    return (chain, code, proto, bytes(lo), lo_port, bytes(hi), hi_port), pos + n + 2


_HOPS: dict[str | None, bytes] = {}
_HOP_NAMES: dict[bytes, str | None] = {}
"""Instance names seen on the wire, both ways: a mesh has few, and every
flow record carries two."""


def _hop(name: str | None) -> bytes:
    raw = _HOPS.get(name)
    if raw is None:
        enc = (name or "").encode()[:255]
        raw = bytes([len(enc)]) + enc
        if len(_HOPS) < 4096:
            _HOPS[name] = raw
    return raw


def _hop_name(raw: bytes, whole: bool) -> str | None:
    """The name of a hop not seen yet (`whole`: its bytes were all there)."""
    if not whole:
        raise SyncError("malformed", "hop")
    name = raw.decode(errors="replace") or None
    if len(_HOP_NAMES) < 4096:
        _HOP_NAMES[raw] = name
    return name


def flow_record(u: FlowUpdate) -> Record:
    if u.deleted:
        return Record(RecordType.FLOW_DELETE, _key_bytes(u.key) + u64(u.version))
    key = u.key
    if len(key[3]) == 4:  # the common case in one pack: IPv4 key, version, timeout
        head = _UPSERT4.pack(key[0], key[1], key[2], 4, key[3], key[4], key[5], key[6], u.version,
                             int(u.timeout * 1000))
    else:
        head = _key_bytes(key) + _UPSERT.pack(u.version, int(u.timeout * 1000))
    return Record(RecordType.FLOW_UPSERT, b"".join((head, _hop(u.fwd_hop), _hop(u.prev_hop),
                                                    len(u.state).to_bytes(2, "big"), u.state)))


def read_flow(rec: Record) -> FlowUpdate:
    """The update a flow record carries; SyncError("malformed") for any
    record that does not parse whole. The hops of an upsert are read inline
    and named from `_HOP_NAMES` (a secondary reads one record per mirrored
    update: two helper calls per record were a fifth of its decode)."""
    value = rec.value
    if rec.type is RecordType.FLOW_UPSERT and len(value) >= _UPSERT4.size and value[9] == 4:
        chain, code, proto, _f, lo, lo_port, hi, hi_port, version, timeout_ms = _UPSERT4.unpack_from(value)
        key: FlowKey = (chain, code, proto, lo, lo_port, hi, hi_port)
        pos = _UPSERT4.size
    else:
        key, pos = _read_key(value, 0)
        if rec.type is RecordType.FLOW_DELETE:
            if len(value) != pos + 8:
                raise SyncError("malformed", "delete record")
            return FlowUpdate(key, read_u64(value, pos), deleted=True)
        if len(value) < pos + _UPSERT.size:
            raise SyncError("malformed", "upsert record")
        version, timeout_ms = _UPSERT.unpack_from(value, pos)
        pos += _UPSERT.size
    size = len(value)
    names = _HOP_NAMES
    if size <= pos:
        raise SyncError("malformed", "hop")
    end = pos + 1 + value[pos]
    raw = value[pos + 1:end]
    fwd = names.get(raw, "")
    if fwd == "":
        fwd = _hop_name(raw, size >= end)
    if size <= end:
        raise SyncError("malformed", "hop")
    pos, end = end, end + 1 + value[end]
    raw = value[pos + 1:end]
    prev = names.get(raw, "")
    if prev == "":
        prev = _hop_name(raw, size >= end)
    if size < end + 2:
        raise SyncError("malformed", "state length")
    if size != end + 2 + ((value[end] << 8) | value[end + 1]):
        raise SyncError("malformed", "state")
    return FlowUpdate(key, version, bytes(value[end + 2:]), False, fwd, prev, timeout_ms / 1000)
