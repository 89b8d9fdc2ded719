-- Wireshark / tshark dissector for the affinity-mesh affinity header.
--
-- Load it with:   tshark -X lua_script:layers/affinity.lua -r capture.pcap
-- or copy it into ~/.local/lib/wireshark/plugins/ (Wireshark loads plugins
-- from there at start). tshark refuses Lua scripts when run as root: read
-- captures as an ordinary user.
--
-- The layout is documented in layers/affinity.py; this file must agree with it.
-- Registered on UDP port 6886 (change it in Preferences > Protocols > AFFINITY)
-- and on EtherType 0x88B5. The payload goes to the IPv4, IPv6 or Ethernet
-- dissector according to the next-protocol field.

local affinity = Proto("affinity", "Affinity-mesh service header")

local next_proto_names = { [1] = "IPv4", [2] = "IPv6", [3] = "Ethernet" }

local f = affinity.fields
f.version    = ProtoField.uint8("affinity.version", "Version", base.DEC, nil, 0xF0)
f.flags      = ProtoField.uint8("affinity.flags", "Flags", base.HEX, nil, 0x0F)
f.flag_oam   = ProtoField.bool("affinity.flags.oam", "OAM", 8, nil, 0x08)
f.flag_rer   = ProtoField.bool("affinity.flags.rerouted", "Rerouted to secondary", 8, nil, 0x04)
f.flag_rev   = ProtoField.bool("affinity.flags.reverse", "Reverse direction", 8, nil, 0x02)
f.ttl        = ProtoField.uint8("affinity.ttl", "TTL", base.DEC)
f.length     = ProtoField.uint8("affinity.length", "Length (4-byte words)", base.DEC)
f.next_proto = ProtoField.uint8("affinity.next_proto", "Next protocol", base.DEC, next_proto_names)
f.chain      = ProtoField.uint24("affinity.chain", "Service chain id", base.DEC)
f.index      = ProtoField.uint8("affinity.index", "Service index", base.DEC)
f.code       = ProtoField.uint32("affinity.code", "Stream affinity code", base.HEX)
f.client     = ProtoField.uint32("affinity.client", "Client id", base.DEC)
f.epoch      = ProtoField.uint32("affinity.epoch", "Map epoch", base.DEC)
f.options    = ProtoField.bytes("affinity.options", "Options")

local HEADER_LEN = 20
affinity.prefs.udp_port = Pref.uint("UDP port", 6886, "UDP port of the affinity header")

local payload_dissectors = {
  [1] = Dissector.get("ip"),
  [2] = Dissector.get("ipv6"),
  [3] = Dissector.get("eth_withoutfcs"),
}

function affinity.dissector(tvb, pinfo, tree)
  if tvb:len() < HEADER_LEN then
    return 0
  end
  pinfo.cols.protocol = "AFFINITY"
  local words = tvb(2, 1):uint()
  local hdr_len = words * 4
  if hdr_len < HEADER_LEN or hdr_len > tvb:len() then
    hdr_len = HEADER_LEN
  end
  local t = tree:add(affinity, tvb(0, hdr_len))
  t:add(f.version, tvb(0, 1))
  local ft = t:add(f.flags, tvb(0, 1))
  ft:add(f.flag_oam, tvb(0, 1))
  ft:add(f.flag_rer, tvb(0, 1))
  ft:add(f.flag_rev, tvb(0, 1))
  t:add(f.ttl, tvb(1, 1))
  t:add(f.length, tvb(2, 1))
  t:add(f.next_proto, tvb(3, 1))
  t:add(f.chain, tvb(4, 3))
  t:add(f.index, tvb(7, 1))
  t:add(f.code, tvb(8, 4))
  t:add(f.client, tvb(12, 4))
  t:add(f.epoch, tvb(16, 4))
  if hdr_len > HEADER_LEN then
    t:add(f.options, tvb(HEADER_LEN, hdr_len - HEADER_LEN))
  end
  t:append_text(string.format(", Chain: %d, SI: %d, Code: 0x%08x, Client: %d, Epoch: %d",
    tvb(4, 3):uint(), tvb(7, 1):uint(), tvb(8, 4):uint(), tvb(12, 4):uint(), tvb(16, 4):uint()))
  local nxt = payload_dissectors[tvb(3, 1):uint()]
  if nxt ~= nil and tvb:len() > hdr_len then
    nxt:call(tvb(hdr_len):tvb(), pinfo, tree)
  end
  return tvb:len()
end

local registered_port = affinity.prefs.udp_port
DissectorTable.get("udp.port"):add(registered_port, affinity)
DissectorTable.get("ethertype"):add(0x88B5, affinity)

function affinity.prefs_changed()
  if registered_port ~= affinity.prefs.udp_port then
    DissectorTable.get("udp.port"):remove(registered_port, affinity)
    registered_port = affinity.prefs.udp_port
    DissectorTable.get("udp.port"):add(registered_port, affinity)
  end
end

-- State-sync datagrams (dataplane/core/syncwire.py, wire version 2): 48-byte
-- header, records, HMAC tag.

local sync = Proto("affinity_sync", "Affinity-mesh state sync")
local record_names = { [1] = "HELLO", [2] = "HEARTBEAT", [3] = "ACK", [4] = "NACK",
  [6] = "FLOW_UPSERT", [7] = "FLOW_DELETE", [8] = "BULK_BEGIN", [9] = "BULK_END",
  [10] = "RESYNC", [11] = "MAP", [12] = "STATUS" }
local s = sync.fields
s.version     = ProtoField.uint8("affinity_sync.version", "Version", base.DEC)
s.key_id      = ProtoField.uint8("affinity_sync.key_id", "Key id", base.DEC)
s.sender      = ProtoField.uint32("affinity_sync.sender", "Sender node id", base.HEX)
s.receiver    = ProtoField.uint32("affinity_sync.receiver", "Receiver node id", base.HEX)
s.incarnation = ProtoField.uint64("affinity_sync.incarnation", "Sender incarnation", base.DEC)
s.receiver_incarnation = ProtoField.uint64("affinity_sync.receiver_incarnation",
  "Receiver incarnation (as the sender knows it)", base.DEC)
s.counter     = ProtoField.uint64("affinity_sync.counter", "Datagram counter", base.DEC)
s.seq         = ProtoField.uint64("affinity_sync.seq", "First reliable seq", base.DEC)
s.body_len    = ProtoField.uint16("affinity_sync.body_len", "Body length", base.DEC)
s.count       = ProtoField.uint16("affinity_sync.count", "Records", base.DEC)
s.rtype       = ProtoField.uint8("affinity_sync.record.type", "Record type", base.DEC, record_names)
s.rlen        = ProtoField.uint16("affinity_sync.record.length", "Record length", base.DEC)
s.rvalue      = ProtoField.bytes("affinity_sync.record.value", "Record value")
s.tag         = ProtoField.bytes("affinity_sync.tag", "HMAC-SHA-256-128 tag")

local SYNC_HEADER, SYNC_TAG = 48, 16

function sync.dissector(tvb, pinfo, tree)
  if tvb:len() < SYNC_HEADER + SYNC_TAG then
    return 0
  end
  pinfo.cols.protocol = "AMESH-SYNC"
  local t = tree:add(sync, tvb())
  t:add(s.version, tvb(0, 1))
  t:add(s.key_id, tvb(2, 1))
  t:add(s.sender, tvb(4, 4))
  t:add(s.receiver, tvb(8, 4))
  t:add(s.incarnation, tvb(12, 8))
  t:add(s.receiver_incarnation, tvb(20, 8))
  t:add(s.counter, tvb(28, 8))
  t:add(s.seq, tvb(36, 8))
  t:add(s.body_len, tvb(44, 2))
  t:add(s.count, tvb(46, 2))
  local pos, stop = SYNC_HEADER, math.min(SYNC_HEADER + tvb(44, 2):uint(), tvb:len() - SYNC_TAG)
  while pos + 3 <= stop do
    local rlen = tvb(pos + 1, 2):uint()
    if pos + 3 + rlen > stop then break end
    local r = t:add(tvb(pos, 3 + rlen), "Record")
    r:add(s.rtype, tvb(pos, 1))
    r:add(s.rlen, tvb(pos + 1, 2))
    if rlen > 0 then r:add(s.rvalue, tvb(pos + 3, rlen)) end
    r:append_text(": " .. (record_names[tvb(pos, 1):uint()] or "?"))
    pos = pos + 3 + rlen
  end
  t:add(s.tag, tvb(tvb:len() - SYNC_TAG, SYNC_TAG))
  return tvb:len()
end

DissectorTable.get("udp.port"):add(6887, sync)
DissectorTable.get("udp.port"):add(6888, sync)
