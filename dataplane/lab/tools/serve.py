"""A threaded static HTTP server for lab hosts. Unlike `python -m http.server`
it does not resolve its own name at start (a DNS lookup that waits ~10 s
inside a namespace with no resolver)."""

from __future__ import annotations

import argparse
import functools
import http.server
import socket
import socketserver


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port


class Server6(Server):
    """The same on an IPv6 address ("::" also takes IPv4, as Linux's
    bindv6only is off by default)."""

    address_family = socket.AF_INET6


class Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--directory", required=True)
    args = ap.parse_args()
    handler = functools.partial(Quiet, directory=args.directory)
    (Server6 if ":" in args.bind else Server)((args.bind, args.port), handler).serve_forever()


if __name__ == "__main__":
    main()
