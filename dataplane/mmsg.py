"""Batched UDP receive and send with recvmmsg(2)/sendmmsg(2) through ctypes.

One system call moves up to `batch` datagrams, where `socket.recv` and
`sendto` cost one call each. Python's socket module has neither call, so
this wraps libc directly around preallocated buffers (no per-packet
allocation on receive). Linux only.
"""

from __future__ import annotations

import ctypes
import socket

MSG_DONTWAIT = 0x40
_libc = ctypes.CDLL(None, use_errno=True)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_IOVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


class _SockAddrIn(ctypes.Structure):
    _fields_ = [("sin_family", ctypes.c_ushort), ("sin_port", ctypes.c_uint16),
                ("sin_addr", ctypes.c_uint8 * 4), ("sin_zero", ctypes.c_uint8 * 8)]


class BatchReceiver:
    """recvmmsg into `batch` preallocated buffers; yields (data, source IP)."""

    def __init__(self, sock: socket.socket, batch: int = 64, size: int = 2048) -> None:
        self.sock, self.batch, self.size = sock, batch, size
        self.bufs = (ctypes.c_char * (size * batch))()
        self.iov = (_IOVec * batch)()
        self.names = (_SockAddrIn * batch)()
        self.msgs = (_MMsgHdr * batch)()
        base = ctypes.addressof(self.bufs)
        for i in range(batch):
            self.iov[i].iov_base = base + i * size
            self.iov[i].iov_len = size
            h = self.msgs[i].msg_hdr
            h.msg_iov = ctypes.pointer(self.iov[i])
            h.msg_iovlen = 1
            h.msg_name = ctypes.addressof(self.names[i])
            h.msg_namelen = ctypes.sizeof(_SockAddrIn)
        self.view = memoryview(self.bufs).cast("B")

    def recv(self) -> list[tuple[bytes, str]]:
        """Whatever is waiting, up to `batch` datagrams (never blocks)."""
        for i in range(self.batch):
            self.msgs[i].msg_hdr.msg_namelen = ctypes.sizeof(_SockAddrIn)
        n = _libc.recvmmsg(self.sock.fileno(), self.msgs, self.batch, MSG_DONTWAIT, None)
        if n <= 0:
            return []
        out = []
        for i in range(n):
            start = i * self.size
            addr = self.names[i].sin_addr
            out.append((bytes(self.view[start:start + self.msgs[i].msg_len]),
                        f"{addr[0]}.{addr[1]}.{addr[2]}.{addr[3]}"))
        return out


class BatchSender:
    """sendmmsg of many datagrams to per-datagram destinations in one call."""

    def __init__(self, sock: socket.socket, batch: int = 64) -> None:
        self.sock, self.batch = sock, batch
        self.iov = (_IOVec * batch)()
        self.names = (_SockAddrIn * batch)()
        self.msgs = (_MMsgHdr * batch)()
        for i in range(batch):
            h = self.msgs[i].msg_hdr
            h.msg_iov = ctypes.pointer(self.iov[i])
            h.msg_iovlen = 1
            h.msg_name = ctypes.addressof(self.names[i])
            h.msg_namelen = ctypes.sizeof(_SockAddrIn)
            self.names[i].sin_family = socket.AF_INET

    def send(self, items: list[tuple[bytes, tuple[str, int]]]) -> int:
        """Send (data, (ip, port)) items; returns how many the kernel took."""
        sent = 0
        keep = []
        for start in range(0, len(items), self.batch):
            chunk = items[start:start + self.batch]
            for i, (data, (ip, port)) in enumerate(chunk):
                buf = ctypes.create_string_buffer(data, len(data))
                keep.append(buf)
                self.iov[i].iov_base = ctypes.addressof(buf)
                self.iov[i].iov_len = len(data)
                self.names[i].sin_port = socket.htons(port)
                self.names[i].sin_addr[:] = socket.inet_aton(ip)
            n = _libc.sendmmsg(self.sock.fileno(), self.msgs, len(chunk), 0)
            if n > 0:
                sent += n
        return sent
